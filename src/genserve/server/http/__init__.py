"""The HTTP surface: the FastAPI app (``app.py``), the routers for jobs, observability and the OpenAI-compatible
routes (``openai/``), request schemas, the OpenAPI rewrite, multipart parsing, the docs and dashboard assets,
and running it all under uvicorn with a graceful drain (``serve.py``).

May import every server room below it (runtime, jobs, observe, security), the engine's types, config and storage;
nothing imports it but the CLI."""
