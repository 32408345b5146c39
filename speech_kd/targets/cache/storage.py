"""Crash-safe file writes and small file helpers of the soft-target cache (atomic replace, fsync, JSON)."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path

from speech_kd.targets.cache.format import CacheError

logger = logging.getLogger(__name__)


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_pieces(fh, pieces: Iterable[bytes | memoryview]) -> None:
    """Write every piece to the open file ``fh`` (split out so tests can fail it)."""
    for piece in pieces:
        fh.write(piece)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not supported on every platform
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, pieces: Iterable[bytes | memoryview]) -> None:
    """Write ``pieces`` to ``path`` via a temporary file, fsync and ``os.replace``.

    On any error the temporary file is removed; a full disk (ENOSPC/EDQUOT)
    becomes a :class:`CacheError` naming the file.
    """
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            _write_pieces(fh, pieces)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CacheError(
                f"disk full while writing {path.name} in {path.parent} ({err}); the temporary file was removed "
                "and finished shards stay valid: free some space and rerun to resume"
            ) from err
        raise
    _fsync_dir(path.parent)


def write_json(path: Path, obj: dict) -> None:
    """Write ``obj`` as JSON to ``path`` atomically."""
    write_atomic(path, [json.dumps(obj, indent=1).encode()])


def read_json(path: Path) -> dict:
    """A JSON file of the cache (missing: FileNotFoundError; damaged: a :class:`CacheError` naming it)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as err:
        raise CacheError(f"{path}: unreadable ({err.__class__.__name__}: {err})") from err


def dir_bytes(folder: Path) -> int:
    """Bytes of the cache's files (the writer's ``.lock`` left out)."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.name != ".lock")


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- compatibility
