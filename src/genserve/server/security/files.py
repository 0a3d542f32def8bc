"""Files at rest that hold secrets or tenants' data: the data directory (owner only, 0700, when
genserve creates it) and the SQLite stores in it (``keys.db``, ``jobs.db``: 0600, with their
``-wal`` / ``-shm`` files).

SQLite creates a database 0644 (less the umask) and gives its ``-wal``, ``-shm`` and journal files
the database file's own mode, so creating the database file 0600 *before* SQLite opens it is what
keeps all of them private; files an older version left readable are narrowed when opened. A data
directory that already exists is the operator's: its mode is left alone, with a warning when
others may read it (``results/`` holds every tenant's outputs).
"""
from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger("genserve.security")
_warned: set[Path] = set()

DIR_MODE = 0o700
FILE_MODE = 0o600
SIDE_FILES = ("-wal", "-shm", "-journal")


def private_dir(path: Path) -> Path:
    """Create ``path`` (and missing parents) owner-only; an existing one is left as it is."""
    if not path.exists():
        path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        os.chmod(path, DIR_MODE)  # mkdir's mode is filtered by the umask; this is exact
    elif path.is_dir() and stat.S_IMODE(path.stat().st_mode) & 0o077 and path not in _warned:
        _warned.add(path)
        log.warning("data directory %s is mode %o: other users may read its files (chmod 700 to prevent it)",
                    path, stat.S_IMODE(path.stat().st_mode))
    return path


def private_db(path: Path) -> Path:
    """Make the SQLite database ``path`` (and any side file) exist owner-only before it is opened."""
    private_dir(path.parent)
    os.close(os.open(path, os.O_CREAT | os.O_RDWR, FILE_MODE))
    narrow_db(path)
    return path


def narrow_db(path: Path) -> None:
    """chmod 0600 the database and those of its side files that exist (again after WAL is on)."""
    for p in (path, *(path.with_name(path.name + s) for s in SIDE_FILES)):
        try:
            if stat.S_IMODE(p.stat().st_mode) != FILE_MODE:
                os.chmod(p, FILE_MODE)
        except FileNotFoundError:
            pass
