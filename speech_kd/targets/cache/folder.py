"""A cache folder's metadata, the manifest it is written from, and the checks a run makes before adding to it.

Same teacher and scheme (``meta.json``), same audio under each utterance ID, listed shards intact.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from speech_kd.data.dataio import read_csv_rows
from speech_kd.targets.cache.format import (
    BLOCK_UTTS,
    FORMAT_VERSION,
    IDENTITY_KEYS,
    MAX_RUN,
    META_NAME,
    RESIDUAL_FLOOR,
    CacheError,
    data_fingerprint,
    describe_data_differences,
    id_dtype,
    read_shard_header,
    utt_data_differs,
)
from speech_kd.targets.cache.storage import file_sha256, read_json, utc_now, write_json
from speech_kd.targets.teachers.base import Teacher
from speech_kd.training.checkpoints import LOCK_NAME

logger = logging.getLogger(__name__)


def _describe_tokens(name: str, a: Sequence[str] | None, b: Sequence[str] | None) -> str:
    if a is None or b is None:
        return f"{name} {'recorded' if a is not None else 'none'} != {'given' if b is not None else 'none'}"
    if len(a) != len(b):
        return f"{name} differ: {len(a)} != {len(b)} tokens"
    first = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    return f"{name} differ at index {first}: {a[first]!r} != {b[first]!r}"


def meta_differences(cached: dict, wanted: dict) -> list[str]:
    """Human-readable ``key cached != wanted`` lines for every key of ``wanted`` that differs.

    A mapping (the coding ``scheme``) is compared key by key, so the line names what differs, not
    both whole mappings.

    Examples
    --------
    >>> meta_differences({"scheme": {"top_k": 8, "mass": 0.98}}, {"scheme": {"top_k": 8, "mass": 0.98, "hidden": 1}})
    ['scheme hidden None != 1']
    """
    out = []
    for key, value in wanted.items():
        have = cached.get(key)
        if isinstance(value, dict) and isinstance(have, dict):
            out += [f"{key.replace('_', ' ')} {line}" for line in meta_differences(have, value)]
            out += [f"{key.replace('_', ' ')} {extra} {have[extra]} != None" for extra in have if extra not in value]
        elif key in ("teacher_tokens", "student_tokens"):
            if (list(have) if have is not None else None) != (list(value) if value is not None else None):
                out.append(_describe_tokens(key.replace("_", " "), have, value))
        elif key == "frame_shift":
            if have is None or abs(float(have) - float(value)) > 1e-6:
                out.append(f"frame shift {have} != {value}")
        elif have != value:
            out.append(f"{key.replace('_', ' ')} {have} != {value}")
    return out


@dataclass(frozen=True)
class CacheUtt:
    """One manifest row to cache: ID, duration (s), audio path, and the audio file's size in bytes."""

    uid: str
    duration: float
    wav: str
    bytes: int = -1


def file_size(path: str | os.PathLike) -> int:
    """Size in bytes of the file ``path`` points to (links followed), ``-1`` when it cannot be looked at."""
    try:
        return os.stat(path).st_size
    except OSError:
        return -1


def read_cache_manifest(csv_path: str | os.PathLike) -> list[CacheUtt]:
    """Utterances of a SpeechBrain CSV (``ID``, ``duration``, ``wav``), checked for duplicates.

    Raises :class:`CacheError` naming the file (and row) for a missing
    column, a duration that is not a number, or duplicate IDs.
    """
    try:
        rows = read_csv_rows(csv_path, required=("ID", "duration", "wav"))
    except ValueError as err:
        raise CacheError(str(err)) from err
    utts = [CacheUtt(row["ID"], float(row["duration"]), row["wav"], file_size(row["wav"])) for row in rows]
    if not utts:
        raise CacheError(f"{csv_path}: no utterances")
    dups = sorted(uid for uid, n in Counter(u.uid for u in utts).items() if n > 1)
    if dups:
        raise CacheError(f"{csv_path}: duplicate utterance IDs {dups[:10]}")
    return utts


def new_meta(
    teacher: Teacher,
    utts: list[CacheUtt],
    csv_path,
    top_k: int,
    mass: float,
    max_temperature: float,
    student_tokens,
    hidden: dict | None = None,
) -> dict:
    """The ``meta.json`` of a new cache of ``teacher`` over ``utts`` with this storage scheme.

    ``hidden`` (``layers``, ``dims``, ``dtype``, ``depth``): the teacher hidden states stored too, recorded
    as ``scheme.hidden`` (in the scheme, so a rerun, or an older writer, adding to the folder must store
    the same ones).
    """
    meta = {
        "format_version": FORMAT_VERSION,
        "teacher_name": teacher.name,
        "teacher_fingerprint": teacher.fingerprint(),
        "teacher_tokens": list(teacher.tokens),
        "blank_index": int(teacher.blank_index),
        "frame_shift": float(teacher.frame_shift),
        "sample_rate": int(teacher.sample_rate),
        "scheme": {
            "top_k": int(top_k),
            "mass": float(mass),
            "max_temperature": float(max_temperature),
            "prob_bytes": "log domain, LOG_STEP nats, 255 = zero",
            "id_dtype": id_dtype(len(teacher.tokens)).name,
            "residual_floor": RESIDUAL_FLOOR,
            "kept": "tokens holding mass of the distribution softened at max_temperature",
            "max_run": MAX_RUN,
            "block_utts": BLOCK_UTTS,
            "compression": "zlib-9",
        },
        "student_tokens": list(student_tokens) if student_tokens is not None else None,
        "data_fingerprint": data_fingerprint((u.uid, u.duration) for u in utts),
        "csv": str(Path(csv_path).resolve()),  # absolute: the rebuild hints name it from any directory
        "utterances": len(utts),
        "frames": None,
        "complete": False,
        "created": utc_now(),
        "completed": None,
    }
    if hidden:
        meta["scheme"]["hidden"] = dict(hidden)
    return meta


def check_out_dir(out_dir: str | os.PathLike) -> None:
    """Refuse an ``out_dir`` that is a file, or a non-empty folder that holds no cache of ours; nothing is changed.

    A cache of ours (``meta.json`` with the keys this package writes) is
    completed by the caller; anything else would have its files replaced or
    its ``shard-*``/temporary files removed, so it is a :class:`CacheError`
    naming the folder (checked before the teacher is loaded, and again under
    the folder's lock).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CacheError(f"{out_dir}: a file, not a folder; choose a new folder for the cache")
    if not out_dir.is_dir():
        return
    meta_path = out_dir / META_NAME
    if meta_path.is_file():
        meta = read_json(meta_path)
        if not isinstance(meta, dict) or not {"format_version", "teacher_fingerprint", "scheme"} <= set(meta):
            raise CacheError(
                f"{meta_path}: not the {META_NAME} of a speech-kd cache; nothing changed: use an empty or new folder"
            )
        return
    # what a run killed before its meta.json was in place leaves: the lock, meta.json's temporary file
    others = [p.name for p in out_dir.iterdir() if p.name != LOCK_NAME and not p.name.startswith(f"{META_NAME}.tmp.")]
    if others:
        raise CacheError(
            f"{out_dir} is not empty and holds no cache {META_NAME} (found {sorted(others)[:5]}); nothing changed: "
            "use an empty or new folder"
        )


def open_out_dir(out_dir: Path, meta: dict) -> dict:
    """Create ``out_dir`` or check that it holds a cache of the same teacher and scheme; return the meta to keep.

    The data is checked per utterance (:func:`check_stored_data`), so a
    manifest that gained or lost rows resumes.
    """
    check_out_dir(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta_path = out_dir / META_NAME
    if not meta_path.exists():
        write_json(meta_path, meta)
        return meta
    old = read_json(meta_path)
    diffs = meta_differences(old, {key: meta[key] for key in IDENTITY_KEYS})
    if diffs:
        raise CacheError(
            f"{out_dir} holds a cache made from other inputs (cache != requested): "
            + "; ".join(diffs)
            + ". Use another folder, or delete this one to rebuild it."
        )
    old.update(csv=meta["csv"], data_fingerprint=meta["data_fingerprint"])  # the manifest this run writes from
    return old


def check_stored_data(out_dir: Path, utts: list[CacheUtt], done: dict[str, tuple[float, int] | None], csv_path) -> None:
    """Raise :class:`CacheError` naming the IDs whose stored targets were computed from other audio than the CSV's."""
    diffs = [
        (u.uid, done[u.uid], (u.duration, u.bytes))
        for u in utts
        if u.uid in done and utt_data_differs(done[u.uid], (u.duration, u.bytes))
    ]
    if diffs:
        raise CacheError(
            f"{out_dir} holds targets of other audio than {csv_path}: "
            + describe_data_differences(diffs, "csv")
            + ". A cache holds one audio per ID: use another folder, or delete this one to rebuild it."
        )


def verified_shards(out_dir: Path, entries: list[dict]) -> tuple[list[dict], dict[str, tuple[float, int] | None]]:
    """Listed shards whose size and sha256 still match, and the utterances they hold (ID -> duration, bytes)."""
    good: list[dict] = []
    done: dict[str, tuple[float, int] | None] = {}
    for entry in entries:
        path = out_dir / entry["name"]
        problem = shard_problem(path, entry)
        if problem:
            logger.warning("cache: %s; its utterances will be recomputed", problem)
            path.unlink(missing_ok=True)
            continue
        good.append(entry)
        for row in read_shard_header(path)["utts"]:
            done[row[0]] = (float(row[6]), int(row[7])) if len(row) >= 8 else None
    return good, done


def shard_problem(path: Path, entry: dict) -> str | None:
    """Why a listed shard is unusable (missing, wrong size, wrong sha256), or ``None``."""
    if not path.exists():
        return f"{path.name}: missing"
    size = path.stat().st_size
    if size != entry["bytes"]:
        how = "truncated" if size < entry["bytes"] else "grown"
        return f"{path.name}: {size} bytes, {entry['bytes']} listed ({how})"
    if file_sha256(path) != entry["sha256"]:
        return f"{path.name}: sha256 mismatch (corrupted)"
    return None


def remove_leftovers(out_dir: Path, listed: set[str]) -> None:
    """Delete temporary files and shard files that no finished-shard list names (a killed run's)."""
    for path in out_dir.iterdir():
        if ".tmp." in path.name or (path.name.startswith("shard-") and path.name not in listed):
            logger.info("cache: removing leftover %s", path.name)
            path.unlink(missing_ok=True)
