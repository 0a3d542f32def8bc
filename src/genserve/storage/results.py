"""Result store: where workers write outputs and the API reads them back, by job id only."""
from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

OUTPUT_TYPES = {"image": "image/png", "video": "video/mp4"}  # each kind's default format
# An image job's ``output_format`` -> its content type (the file extension is the format's name).
IMAGE_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def output_name(kind: str, fmt: str | None = None) -> str:
    """A job's output key within its directory: one fixed name per kind and format (the job's
    ``output_format``; None: the kind's default), so running a job again overwrites its output
    instead of adding a second one."""
    if kind != "image":
        return "output.mp4"
    return f"output.{fmt or 'png'}"


def output_type(kind: str, fmt: str | None = None) -> str:
    """The content type of ``output_name(kind, fmt)``."""
    return IMAGE_TYPES[fmt or "png"] if kind == "image" else OUTPUT_TYPES[kind]


THUMBNAIL_NAME = "thumbnail.jpg"  # next to the output: "<job_id>/thumbnail.jpg"
THUMBNAIL_TYPE = "image/jpeg"


_JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def check_key(job_id: str, name: str) -> None:
    """Raise ValueError unless ``<job_id>/<name>`` is a key a store may hold (no traversal)."""
    if not _JOB_ID.fullmatch(job_id) or not _NAME.fullmatch(name) or name.startswith("."):
        raise ValueError(f"invalid result key {job_id!r}/{name!r}")


@dataclass(frozen=True)
class ResultRef:
    key: str  # store-relative: "<job_id>/<name>"
    content_type: str
    bytes: int
    thumbnail: ResultRef | None = None  # a small JPEG preview, stored next to the output

    def to_dict(self) -> dict:
        d = {"key": self.key, "content_type": self.content_type, "bytes": self.bytes}
        if self.thumbnail is not None:  # optional in the record: older records and thumbnail-less results lack it
            d["thumbnail"] = self.thumbnail.to_dict()
        return d


def stored_objects(ref: dict) -> list[tuple[str, int]]:
    """Every object a result record (a ``ResultRef`` dict) points to, with its recorded size: the
    output and its thumbnail. Deleting a result deletes all of them."""
    objs = [(ref["key"], ref["bytes"])]
    thumb = ref.get("thumbnail")
    if thumb:
        objs.append((thumb["key"], thumb["bytes"]))
    return objs


@dataclass(frozen=True)
class ObjectInfo:
    bytes: int
    mtime: float  # when it was written (epoch seconds)


class ResultStore(Protocol):
    """Keys are store-relative, ``<job_id>/<name>``: deterministic, so a job run again overwrites
    its output and a restarted server can find an output by the job id alone."""

    def put(self, job_id: str, name: str, data: bytes, content_type: str) -> ResultRef: ...
    def exists(self, key: str) -> bool: ...
    def head(self, key: str) -> ObjectInfo | None: ...
    def read(self, key: str) -> bytes: ...
    def presigned_url(self, key: str, filename: str) -> str | None:
        """A URL a client can fetch the object from directly, or None: the server streams it."""
        ...
    def delete(self, key: str) -> int:
        """Remove the object; the bytes freed (0 when it was not there: idempotent)."""
        ...


class LocalResultStore:
    """A directory tree ``root/<job_id>/<name>``. Writes are atomic (temp file + rename), so a
    crash never leaves a half-written output where a reader could find it."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, job_id: str, name: str) -> Path:
        check_key(job_id, name)
        return self.root / job_id / name

    def put(self, job_id: str, name: str, data: bytes, content_type: str) -> ResultRef:
        path = self._path(job_id, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return ResultRef(f"{job_id}/{name}", content_type, len(data))

    def local_path(self, key: str) -> Path:
        job_id, _, name = key.partition("/")
        return self._path(job_id, name)

    def exists(self, key: str) -> bool:
        try:
            return self.local_path(key).is_file()
        except ValueError:
            return False

    def head(self, key: str) -> ObjectInfo | None:
        try:
            st = self.local_path(key).stat()
        except (ValueError, OSError):
            return None
        return ObjectInfo(st.st_size, st.st_mtime)

    def read(self, key: str) -> bytes:
        return self.local_path(key).read_bytes()

    def presigned_url(self, key: str, filename: str) -> str | None:
        return None  # served from the directory by the server itself

    def delete(self, key: str) -> int:
        try:
            path = self.local_path(key)
            size = path.stat().st_size
            path.unlink()
        except (ValueError, FileNotFoundError):
            return 0
        try:
            path.parent.rmdir()  # the job's directory, once empty
        except OSError:
            pass
        return size
