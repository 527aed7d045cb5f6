"""What operators see of a running hub: structured logs with redaction, Prometheus metrics,
alerts, and refused or unrouted webhooks made visible."""
