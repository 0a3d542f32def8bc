"""The ``genserve`` command. ``main.py`` builds the parser from the command groups and turns expected failures into
one line on stderr; each group lives in its own module (serve, jobs, bench, models, config, keys, simulate). The
entry point wires every room together, so it may import any of them; nothing imports the CLI."""
