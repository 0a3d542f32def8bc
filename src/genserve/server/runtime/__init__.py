"""The runtime: the asyncio driver of the engine. It feeds the engine events with ``now``, carries out its decisions
on the worker pool (``messages.py`` turns decisions into worker messages), folds worker events back in
(``worker_events.py``), re-attaches to surviving workers after a restart (``reattach.py``) and keeps the fleet view.

May import: jobs, observe, security, the engine, workers, storage and config. Only http and the CLI import it."""
