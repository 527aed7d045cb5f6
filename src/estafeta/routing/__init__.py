"""Routing: which deliveries an event needs, decided from the configuration alone."""
