"""The ``genserve`` command: serve, submit, jobs, cancel, result, models, bench, config, simulate.

Expected failures (server down, bad arguments, missing files, invalid config) end in one line on
stderr — ``genserve: …`` — and a non-zero exit, never a traceback (see :func:`main`)."""
from __future__ import annotations

import argparse
import sys

from .common import FORMATTER


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("genserve")
    except PackageNotFoundError:
        return "0+unknown"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="genserve", description="Self-hosted inference for image and video diffusion models.",
        formatter_class=FORMATTER,
        epilog="examples:\n  genserve serve                               # the demo catalog on http://127.0.0.1:8000\n"
               "  genserve submit \"a red fox\" --size 64x64 -o fox.png\n  genserve jobs --status queued\n"
               "  genserve config check\n\nRun `genserve COMMAND --help` for a command's options.")
    p.add_argument("--version", action="version", version=f"genserve {_version()}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    from . import bench, config, db, jobs, keys, models, serve, simulate

    for group in (serve, jobs, bench, models, config, simulate, keys, db):
        group.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    return run(a)


def run(a: argparse.Namespace) -> int:
    """Run a parsed command; expected failures become one line on stderr and an exit status."""
    import httpx

    from ..config.errors import ConfigError, ConfigErrors
    from .jobs import CLIError

    try:
        return a.func(a)
    except ConfigErrors as e:
        print(f"genserve: invalid config ({len(e.errors)} errors):", file=sys.stderr)
        for err in e.errors:
            print(f"  {err}", file=sys.stderr)
        return 2
    except ConfigError as e:
        print(f"genserve: invalid config: {e}", file=sys.stderr)
        return 2
    except CLIError as e:
        print(f"genserve: {e}", file=sys.stderr)
        return e.code
    except httpx.ConnectError as e:
        url = str(e.request.url.copy_with(path="/", query=None)) if _has_request(e) else "the server"
        print(f"genserve: cannot connect to {url} (is `genserve serve` running? set --url or $GENSERVE_URL)",
              file=sys.stderr)
        return 3
    except httpx.TimeoutException as e:
        print(f"genserve: the server did not answer in time ({type(e).__name__})", file=sys.stderr)
        return 3
    except httpx.HTTPError as e:
        print(f"genserve: HTTP error: {e}", file=sys.stderr)
        return 3
    except OSError as e:
        print(f"genserve: {e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("genserve: interrupted", file=sys.stderr)
        return 130


def _has_request(e: Exception) -> bool:
    try:
        e.request  # noqa: B018  (raises RuntimeError when the error has no request)
        return True
    except RuntimeError:
        return False


if __name__ == "__main__":
    sys.exit(main())
