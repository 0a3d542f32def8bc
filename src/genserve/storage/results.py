"""Result store: where workers write outputs and the API reads them back, by job id only."""
from __future__ import annotations

import os
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

OUTPUT_TYPES = {"image": "image/png", "video": "video/mp4"}


def output_name(kind: str) -> str:
    """A job's output key within its directory: one fixed name per kind, so running a job again
    overwrites its output instead of adding a second one."""
    return "output.png" if kind == "image" else "output.mp4"


_JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass(frozen=True)
class ResultRef:
    key: str  # store-relative: "<job_id>/<name>"
    content_type: str
    bytes: int

    def to_dict(self) -> dict:
        return asdict(self)


class ResultStore(Protocol):
    def put(self, job_id: str, name: str, data: bytes, content_type: str) -> ResultRef: ...
    def local_path(self, key: str) -> Path: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> int:
        """Remove one result; returns the bytes freed (0 if it was not there). Idempotent."""
        ...


class LocalResultStore:
    """A directory tree ``root/<job_id>/<name>``. Writes are atomic (temp file + rename), so a
    crash never leaves a half-written output where a reader could find it."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, job_id: str, name: str) -> Path:
        if not _JOB_ID.fullmatch(job_id) or not _NAME.fullmatch(name) or name.startswith("."):
            raise ValueError(f"invalid result key {job_id!r}/{name!r}")
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

    def delete(self, key: str) -> int:
        """Remove the result at ``key`` (and its job's directory once empty). Returns the bytes
        freed, 0 if it was already gone: deleting twice is harmless."""
        path = self.local_path(key)
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        try:
            path.parent.rmdir()  # only when empty: another output of the job may remain
        except OSError:
            pass
        return size
