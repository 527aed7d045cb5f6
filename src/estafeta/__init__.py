"""estafeta: a self-hosted integration hub for WhatsApp-facing businesses."""

__version__ = "0.1.0"
