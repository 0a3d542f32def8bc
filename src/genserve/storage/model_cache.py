"""Model sources on object storage: ``source = "s3://bucket/path/to/diffusers-dir"`` is downloaded
once per node into a local cache and loaded from there (nodes without a shared disk).

Safe when several workers on one node ask at once: a file lock serialises the download, which
goes to a temporary directory renamed into place only when complete, so a reader never sees half
a model, and a download cut off by a crash leaves only a temporary directory (removed next time).
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_CACHE = "/tmp/genserve-model-cache"


def parse_s3(source: str) -> tuple[str, str]:
    """``s3://bucket/dir`` -> (bucket, "dir/")."""
    if not source.startswith("s3://"):
        raise ValueError(f"not an s3:// source: {source!r}")
    bucket, _, prefix = source[5:].partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {source!r}")
    prefix = prefix.strip("/")
    return bucket, (prefix + "/") if prefix else ""


def cache_dir(source: str, root: str | Path) -> Path:
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    tail = source.rstrip("/").rpartition("/")[2] or "model"
    return Path(root) / f"{tail}-{digest}"


def fetch_model(source: str, root: str | Path | None = None, *, endpoint_url: str | None = None,
                region: str | None = None) -> tuple[Path, bool]:
    """The local directory holding ``source``, and whether this call downloaded it."""
    root = Path(root or os.environ.get("GENSERVE_MODEL_CACHE") or DEFAULT_CACHE)
    root.mkdir(parents=True, exist_ok=True)
    final = cache_dir(source, root)
    if final.is_dir():
        return final, False
    with open(root / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one download per node; the others wait and find it done
        try:
            if final.is_dir():
                return final, False
            for stale in root.glob(f".{final.name}.tmp-*"):  # a download a crash cut off
                shutil.rmtree(stale, ignore_errors=True)
            tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}.tmp-"))
            try:
                _download(source, tmp, endpoint_url, region)
                os.rename(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return final, True


def _download(source: str, into: Path, endpoint_url: str | None, region: str | None) -> None:
    import boto3

    bucket, prefix = parse_s3(source)
    client = boto3.client("s3", endpoint_url=endpoint_url, region_name=region)
    n = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(prefix):]
            if not rel or rel.endswith("/"):
                continue
            dest = (into / rel).resolve()
            if into.resolve() not in dest.parents:
                raise ValueError(f"object key {obj['Key']!r} escapes the model directory")
            dest.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, obj["Key"], str(dest))
            n += 1
    if n == 0:
        raise FileNotFoundError(f"no objects under {source}")


def fetch_object(source: str, *, endpoint_url: str | None = None, region: str | None = None) -> bytes:
    """One object's bytes from an ``s3://bucket/key`` URL (a LoRA adapter's file)."""
    import boto3

    bucket, key = parse_s3(source)
    client = boto3.client("s3", endpoint_url=endpoint_url, region_name=region)
    return client.get_object(Bucket=bucket, Key=key.rstrip("/"))["Body"].read()
