"""WhatsApp conversations and the messages a tenant sends through its provider."""
