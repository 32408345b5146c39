"""What a split's CSV was made from (``prepare_SPLIT.json``): settings and each file's size and mtime."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from speech_kd.data.prepare.splits import AUDIO_EXTENSIONS


def read_stamp(path: Path) -> dict | None:
    """The stamp at ``path``, or ``None`` when missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_stamp(path: Path, stamp: dict) -> None:
    """Write ``stamp`` to ``path`` atomically (a temporary file of its own, then ``os.replace``)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")  # a new name, made with "x"
    out = open(tmp, "x")  # outside the try: a name that exists is never removed
    try:
        with out as fh:
            fh.write(json.dumps(stamp, separators=(",", ":")))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def split_files(folder: Path, deep: bool = False) -> dict[str, list[int]]:
    """``relative path -> [size, mtime_ns]`` of the split's audio and transcript files (links followed).

    LibriSpeech layout: the files in ``SPLIT/SPK/CHAPTER/``; ``deep``
    (untranscribed splits): every audio file at any depth. Recorded in
    ``prepare_SPLIT.json``: a file replaced, edited in place, added or removed
    changes it, and the split is prepared again. Cost: one ``stat`` per file
    (docs/robustness.md has the measurement on a 100-hour-sized tree).
    """
    out: dict[str, list[int]] = {}
    if not folder.is_dir():
        return out
    if deep:
        for path, _, names in os.walk(folder, followlinks=True):
            for name in names:
                if name.endswith(AUDIO_EXTENSIONS):
                    full = os.path.join(path, name)
                    out[os.path.relpath(full, folder)] = _size_mtime(full)
        return out
    for speaker in os.scandir(folder):
        if not speaker.is_dir():
            continue
        for chapter in os.scandir(speaker.path):
            if not chapter.is_dir():
                continue
            for entry in os.scandir(chapter.path):
                if entry.name.endswith((*AUDIO_EXTENSIONS, ".trans.txt")):
                    out[f"{speaker.name}/{chapter.name}/{entry.name}"] = _size_mtime(entry.path)
    return dict(sorted(out.items()))


def _size_mtime(path: str) -> list[int]:
    try:
        info = os.stat(path)
    except OSError:
        return [-1, -1]  # a dangling link: prepare reports the file as missing
    return [info.st_size, info.st_mtime_ns]


def what_changed(old: dict, new: dict) -> str:
    """``settings differ: ...`` or ``N files changed (a, b, ...)`` between two prepare stamps."""
    keys = [key for key in new if key != "files" and old.get(key) != new[key]]
    if keys:
        return "settings differ: " + ", ".join(keys)
    before, after = old.get("files") or {}, new["files"]
    changed = sorted(name for name in set(before) | set(after) if before.get(name) != after.get(name))
    if not changed:
        return "no file record"
    return (
        f"{len(changed)} file(s) changed, added or removed: "
        + ", ".join(changed[:3])
        + (", ..." if len(changed) > 3 else "")
    )
