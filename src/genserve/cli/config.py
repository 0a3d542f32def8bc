"""``genserve config``: check a config (every error at once), show it resolved, print its JSON Schema."""
from __future__ import annotations

import argparse
import json
import sys

from ..config.env import find_config

EPILOG = """examples:
  genserve config check                       # ./genserve.toml, else $GENSERVE_CONFIG, else the demo catalog
  genserve config check --config prod.toml
  GENSERVE_SERVER__PORT=9000 genserve config show
  genserve config schema > genserve.schema.json   # for editors (Even Better TOML, Taplo)"""


def cmd_check(a: argparse.Namespace) -> int:
    from ..config.load import ConfigError, load_config

    path = find_config(a.config)
    try:
        config = load_config(path)
    except ConfigError as e:
        print(f"genserve: invalid config ({path or 'built-in demo catalog'}):\n{_indent(e)}", file=sys.stderr)
        return 2
    if a.cmd_config == "show":
        s = config.server
        out = {"source": str(path) if path else None,
               "server": {k: str(v) if k == "data_dir" else ("<set>" if k == "webhook_secret" and v else v)
                          for k, v in vars(s).items()},
               "models": {n: m.public() for n, m in config.models.items()}}
        print(json.dumps(out, indent=2))
    else:
        print(f"{path or 'built-in demo catalog'}: ok ({len(config.models)} models)")
    return 0


def cmd_schema(a: argparse.Namespace) -> int:
    from ..config.load import SECTIONS
    from ..config.schema import json_schema

    print(json.dumps(json_schema(SECTIONS), indent=2))
    return 0


def _indent(e: Exception) -> str:
    return "\n".join("  " + line for line in str(e).splitlines())


def add_parsers(sub) -> None:
    c = sub.add_parser("config", help="check, show or describe genserve.toml", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Environment variables GENSERVE_SECTION__KEY=value override any key "
                                   "(value read as TOML; see docs/configuration.md).")
    csub = c.add_subparsers(dest="cmd_config", required=True)
    for name, what in (("check", "validate; print every error at once, each naming its key"),
                       ("show", "print the resolved config (file + environment overrides) as JSON")):
        p = csub.add_parser(name, help=what, description=what)
        p.add_argument("--config", metavar="FILE",
                       help="config file (default: ./genserve.toml, else $GENSERVE_CONFIG, else the demo catalog)")
        p.set_defaults(func=cmd_check)
    what = "print the JSON Schema of genserve.toml (shipped as docs/genserve.schema.json)"
    p = csub.add_parser("schema", help=what, description=what)
    p.set_defaults(func=cmd_schema)
