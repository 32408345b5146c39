"""``history.jsonl``: one JSON line per finished epoch of a run (read by the report and ``bench-kd``).

A run writes an epoch's line before its checkpoint (so a kill in between
repeats the epoch rather than leaving a checkpointed epoch without a line).
A repeated epoch therefore finds its own line, or lines of later epochs from
a run resumed from an older checkpoint, already in the file:
:func:`write_history_line` replaces them, so the file always holds one line
per epoch, in order, and never a torn one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def _epoch_of(line: bytes) -> int | None:
    """The ``epoch`` of one line, or ``None`` for a line that is not a whole JSON record (cut by a crash)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    epoch = record.get("epoch") if isinstance(record, dict) else None
    return epoch if isinstance(epoch, int) else None


def write_history_line(path: str | os.PathLike, record: dict) -> None:
    """Write ``record`` (with an integer ``"epoch"``) as the line of its epoch in ``path``.

    Lines of earlier epochs are kept byte for byte; a line of the same or a
    later epoch, and a torn last line, are dropped. The file is replaced
    atomically (written beside it, then renamed), so a kill at any moment
    leaves either the old file or the new one.

    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "history.jsonl"
    >>> for epoch in (1, 2, 2, 3):
    ...     write_history_line(path, {"epoch": epoch, "lr": epoch / 10})
    >>> [json.loads(line)["epoch"] for line in path.read_text().splitlines()]
    [1, 2, 3]
    """
    path = Path(path)
    epoch = int(record["epoch"])
    kept = []
    if path.exists():
        for line in path.read_bytes().splitlines():
            before = _epoch_of(line)
            if before is not None and before < epoch:
                kept.append(line + b"\n")
    kept.append((json.dumps(record, default=float) + "\n").encode())
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as fh:
        fh.write(b"".join(kept))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(partial, path)
