"""Backends: the diffusers runners (request level ``runner.py``, step level ``stepping.py`` / ``step_runner.py``), the
model families (``families/``), image inputs (checks at submit, fitting in the worker), the demo model builder and
output encoders. Runs inside a worker process; may import storage only."""
