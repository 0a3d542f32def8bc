"""genserve: a self-hosted inference platform for image and video diffusion models.

The rooms, in the order a request meets them (docs/architecture.md draws the map):
  cli/       the ``genserve`` command, one module per command group
  config/    reading, validating, describing and overriding genserve.toml (every section)
  server/    the HTTP surface, job records, security, observation and the asyncio runtime
  engine/    the pure scheduling core (events and ``now`` in, decisions out) and its policies
  workers/   worker pools (local processes, Ray actors) and the worker's message loop
  backends/  diffusers runners (request and step level), model families, demo models, encoders
  storage/   result stores (local, S3) and the model source cache
  sim/       the simulator: the production engine on a virtual clock
  bench/     the load generator and a harness that starts a real server
"""
