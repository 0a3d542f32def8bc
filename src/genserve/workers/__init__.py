"""Worker processes and pools: the local process pool and the Ray pool behind one narrow ``Pool`` protocol, the
worker main loop (``process.py``), its message protocol, fault injection and an in-memory fake for tests.

May import: backends, storage and the engine's error codes and liveness policy; never the server."""
