"""What every command group shares: the server URL default, the help texts, ``--size`` parsing and the config
lookup (--config, else ./genserve.toml, else $GENSERVE_CONFIG, else the demo catalog)."""
from __future__ import annotations

import argparse
import os

DEFAULT_URL = os.environ.get("GENSERVE_URL", "http://127.0.0.1:8000")
URL_HELP = "server URL (default: $GENSERVE_URL or http://127.0.0.1:8000)"
CONFIG_HELP = "config file (default: ./genserve.toml, else $GENSERVE_CONFIG, else the built-in demo catalog)"
LOG_LEVELS = ["critical", "error", "warning", "info", "debug"]
FORMATTER = argparse.RawDescriptionHelpFormatter


def size_arg(text: str) -> tuple[int, int]:
    """``--size`` as WIDTHxHEIGHT, checked before anything is sent."""
    from ..config.load import parse_size

    try:
        w, h = parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT (e.g. 512x512)") from None
    if w <= 0 or h <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: width and height must be positive")
    return w, h


def load_config(path_arg: str | None):
    """The config every command reads: --config, else ./genserve.toml, else $GENSERVE_CONFIG."""
    from ..config.env import find_config
    from ..config.load import load_config as load

    return load(find_config(path_arg))
