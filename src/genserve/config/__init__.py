"""Configuration: reading ``genserve.toml`` (``load.py``), validating every section with errors that name the key
(``errors.py``), the JSON Schema that describes it (``schema.py``), ``GENSERVE_SECTION__KEY`` overrides (``env.py``)
and the built-in demo catalog (``demo.py``). Each section with rules of its own parses in its own module (auth,
cluster, families, faults, network, retention, values for the shared checks).

May import: the engine (its settings and policy names) and the model families' pure tables. Never the server,
workers or backends' runners: everything else reads the parsed ``Config``."""
