"""The HTTP API (FastAPI): events, messages, conversations, the DLQ, health and `/metrics`,
behind API-key authentication, every error as `{error, detail}`; `app.py` puts the ingest
route in front of it."""
