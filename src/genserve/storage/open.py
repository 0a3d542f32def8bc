"""Open a result store from its spec (``ResultsConfig.spec``): plain data, so the server and every
worker, on any node, open the same store."""
from __future__ import annotations

from typing import Any

from .results import LocalResultStore, ResultStore


def open_store(spec: dict[str, Any] | str) -> ResultStore:
    if isinstance(spec, str):  # a local directory
        return LocalResultStore(spec)
    if spec["store"] == "local":
        return LocalResultStore(spec["root"])
    if spec["store"] == "s3":
        from .s3 import S3ResultStore

        return S3ResultStore(spec["bucket"], spec.get("prefix") or "", endpoint_url=spec.get("endpoint_url"),
                             region=spec.get("region"), serve=spec.get("serve", "redirect"),
                             presign_expiry_s=spec.get("presign_expiry_s", 3600))
    raise ValueError(f"unknown result store {spec['store']!r}")
