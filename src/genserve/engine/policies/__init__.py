"""The engine's small named policies, each a pure function of a snapshot and ``now`` (DESIGN §2): batching,
placement, residency (eviction order, idle unload), preloading, retry, liveness, preemption at step boundaries and
autoscaling. The engine's components call them; a policy imports only the engine's types."""
