"""Delivery: the pure core (states, outcomes, backoff, decisions, circuits) and the worker
that leases due deliveries, sends them and records what happened."""
