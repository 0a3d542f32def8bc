"""Backends: the diffusers runners (request level ``runner.py``, step level ``stepping.py`` / ``step_runner.py``), the
model families (``families/``), image inputs (checks at submit, fitting in the worker), the demo model builder,
output encoders, and the speed levers applied in the worker: the prompt-embedding cache (``prompt_cache.py``), step
caches (``step_cache.py``), compile / attention backend / quantization at load (``compile.py``). Runs inside a worker
process; may import storage only."""
