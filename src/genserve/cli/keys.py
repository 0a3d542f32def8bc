"""``genserve keys create|list|revoke``: API keys where the server keeps them (``keys.db`` in its data
directory, or the PostgreSQL database of ``[store]``)."""
from __future__ import annotations

import argparse
import sys
import time


def _config(a: argparse.Namespace):
    from ..config.env import find_config
    from ..config.load import ConfigError, load_config

    try:
        return load_config(find_config(a.config)).with_overrides(data_dir=a.data_dir)
    except ConfigError as e:
        print(f"genserve: invalid config: {e}", file=sys.stderr)
        return None


def cmd_keys(a: argparse.Namespace) -> int:
    from ..server.security.auth import open_key_store
    from .db import upgrade

    config = _config(a)
    if config is None:
        return 2
    if config.store.backend == "postgres":
        upgrade(config)  # the api_keys table comes with the store's migrations
    store = open_key_store(config)
    try:
        if a.keys_cmd == "create":
            try:
                key_id, key = store.create(a.tenant, a.scope, a.name)
            except ValueError as e:
                print(f"genserve: {e}", file=sys.stderr)
                return 2
            print(f"created {key_id} for tenant {a.tenant} (scope {a.scope}) in {store.path}")
            print("the key is shown once; store it now:")
            print(key)  # the last line, alone: scripts read it with `| tail -n 1`
            return 0
        if a.keys_cmd == "list":
            rows = store.list()
            print(f"{'ID':<18} {'TENANT':<20} {'SCOPE':<6} {'CREATED':<20} {'REVOKED':<20} NAME")
            for r in rows:
                when = (lambda t: "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)))
                print(f"{r['id']:<18} {r['tenant']:<20} {r['scope']:<6} {when(r['created']):<20} "
                      f"{when(r['revoked']):<20} {r['name'] or ''}")
            return 0
        if not store.revoke(a.key_id):
            print(f"genserve: no active key {a.key_id!r}", file=sys.stderr)
            return 1
        print(f"revoked {a.key_id}; a running server refuses it from its next request")
        return 0
    finally:
        store.close()


def add_parsers(sub) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    k = sub.add_parser("keys", help="create, list and revoke API keys (stored hashed in the data directory)",
                       formatter_class=fmt, description="Create, list and revoke API keys.",
                       epilog="examples:\n  genserve keys create --tenant acme\n"
                              "  genserve keys create --tenant ops --scope admin --name on-call\n"
                              "  genserve keys list\n  genserve keys revoke KEY_ID")
    ks = k.add_subparsers(dest="keys_cmd", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", metavar="FILE",
                       help="genserve.toml whose data directory holds the keys (default: ./genserve.toml, else "
                            "$GENSERVE_CONFIG)")
        p.add_argument("--data-dir", help="the server's data directory (overrides the config)")
        p.set_defaults(func=cmd_keys)

    c = ks.add_parser("create", help="create a key; it is printed once, as the last line",
                      description="Create a key for a tenant. The key is printed once, as the last line: store it.")
    c.add_argument("--tenant", required=True, help="the tenant its jobs belong to")
    c.add_argument("--scope", choices=["jobs", "admin"], default="jobs",
                   help="jobs: submit and read the tenant's own jobs; admin: everything")
    c.add_argument("--name", help="a label for `keys list`")
    common(c)
    common(ks.add_parser("list", help="list keys (never the keys themselves)",
                         description="List keys: id, tenant, scope, name, created, revoked (never the keys)."))
    r = ks.add_parser("revoke", help="revoke a key by id",
                      description="Revoke a key by id; a running server refuses it from its next request.")
    r.add_argument("key_id", help="the id `genserve keys list` shows")
    common(r)
