"""Job records and what lives with them: the job store (SQLite), the one writer of job rows (``records.py``),
each job's stored inputs, the event stream and its listeners, per-job SSE history, webhooks, retention sweeps,
cost shares and the read models (``views.py``) through which routes and the observer see the system.

May import: security (principals, visibility), the server's vocabulary, the engine's types, config, backends'
pure image checks and storage. Never runtime, observe or http."""
