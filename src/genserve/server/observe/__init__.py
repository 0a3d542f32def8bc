"""Observation: Prometheus metrics, per-window statistics, device usage, per-tenant usage and the structured job
log, fed by the runtime's events (``observer.py`` is a listener; it never writes job records).

May import: jobs (events, read models, cost), security (the tenant of a request), the vocabulary and config."""
