"""Writing a soft-target cache: run a teacher over a manifest, shard by shard, resumable (cache-targets)."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from speech_kd.cache.format import (
    _IDENTITY_KEYS,
    BLOCK_UTTS,
    FORMAT_VERSION,
    MANIFEST_NAME,
    MAX_RUN,
    META_NAME,
    PROB_LEVELS,
    RESIDUAL_FLOOR,
    SHARD_PATTERN,
    CacheError,
    EncodedFrames,
    _check_scheme,
    _read_shard_header,
    _shard_pieces,
    data_fingerprint,
    describe_data_differences,
    encode,
    id_dtype,
    utt_data_differs,
)
from speech_kd.cache.storage import _dir_bytes, _file_sha256, _now, _read_json, _write_atomic, _write_json
from speech_kd.checkpoints import LOCK_NAME, FolderLock
from speech_kd.teachers.base import Teacher

logger = logging.getLogger(__name__)


def _describe_tokens(name: str, a: Sequence[str] | None, b: Sequence[str] | None) -> str:
    if a is None or b is None:
        return f"{name} {'recorded' if a is not None else 'none'} != {'given' if b is not None else 'none'}"
    if len(a) != len(b):
        return f"{name} differ: {len(a)} != {len(b)} tokens"
    first = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    return f"{name} differ at index {first}: {a[first]!r} != {b[first]!r}"


def _differences(cached: dict, wanted: dict) -> list[str]:
    """Human-readable ``key cached != wanted`` lines for every key of ``wanted`` that differs."""
    out = []
    for key, value in wanted.items():
        have = cached.get(key)
        if key in ("teacher_tokens", "student_tokens"):
            if (list(have) if have is not None else None) != (list(value) if value is not None else None):
                out.append(_describe_tokens(key.replace("_", " "), have, value))
        elif key == "frame_shift":
            if have is None or abs(float(have) - float(value)) > 1e-6:
                out.append(f"frame shift {have} != {value}")
        elif have != value:
            out.append(f"{key.replace('_', ' ')} {have} != {value}")
    return out


# --------------------------------------------------------------------------- writing


#: default longest utterance cache-targets runs the teacher on (seconds); longer ones are skipped with a warning
MAX_DURATION = 60.0


@dataclass(frozen=True)
class _Utt:
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


def _read_manifest(csv_path: str | os.PathLike) -> list[_Utt]:
    """Utterances of a SpeechBrain CSV (``ID``, ``duration``, ``wav``), checked for duplicates.

    Raises :class:`CacheError` naming the file (and row) for a missing
    column, a duration that is not a number, or duplicate IDs.
    """
    from speech_kd.dataio import read_csv_rows

    try:
        rows = read_csv_rows(csv_path, required=("ID", "duration", "wav"))
    except ValueError as err:
        raise CacheError(str(err)) from err
    utts = [_Utt(row["ID"], float(row["duration"]), row["wav"], file_size(row["wav"])) for row in rows]
    if not utts:
        raise CacheError(f"{csv_path}: no utterances")
    dups = sorted(uid for uid, n in Counter(u.uid for u in utts).items() if n > 1)
    if dups:
        raise CacheError(f"{csv_path}: duplicate utterance IDs {dups[:10]}")
    return utts


def _new_meta(teacher: Teacher, utts: list[_Utt], csv_path, top_k: int, mass: float, student_tokens) -> dict:
    return {
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
            "prob_levels": PROB_LEVELS,
            "id_dtype": id_dtype(len(teacher.tokens)).name,
            "residual_floor": RESIDUAL_FLOOR,
            "certain": "top token >= mass",
            "max_run": MAX_RUN,
            "block_utts": BLOCK_UTTS,
            "compression": "zlib-9",
        },  # fmt: skip
        "student_tokens": list(student_tokens) if student_tokens is not None else None,
        "data_fingerprint": data_fingerprint((u.uid, u.duration) for u in utts),
        "csv": str(csv_path),
        "utterances": len(utts),
        "frames": None,
        "complete": False,
        "created": _now(),
        "completed": None,
    }


def _open_out_dir(out_dir: Path, meta: dict) -> dict:
    """Create ``out_dir`` or check that it holds a cache of the same teacher and scheme; return the meta to keep.

    The data is checked per utterance (:func:`_check_stored_data`), so a
    manifest that gained or lost rows resumes.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    meta_path = out_dir / META_NAME
    if not meta_path.exists():
        others = [p.name for p in out_dir.iterdir() if ".tmp." not in p.name and p.name != LOCK_NAME]
        if others:
            raise CacheError(
                f"{out_dir} is not empty and holds no cache {META_NAME} (found {others[:5]}); "
                "use an empty or new folder"
            )
        _write_json(meta_path, meta)
        return meta
    old = _read_json(meta_path)
    diffs = _differences(old, {key: meta[key] for key in _IDENTITY_KEYS})
    if diffs:
        raise CacheError(
            f"{out_dir} holds a cache made from other inputs (cache != requested): "
            + "; ".join(diffs)
            + ". Use another folder, or delete this one to rebuild it."
        )
    old.update(csv=meta["csv"], data_fingerprint=meta["data_fingerprint"])  # the manifest this run writes from
    return old


def _check_stored_data(out_dir: Path, utts: list[_Utt], done: dict[str, tuple[float, int] | None], csv_path) -> None:
    """Raise :class:`CacheError` naming the IDs whose stored targets were computed from other audio than the CSV's."""
    diffs = [(u.uid, done[u.uid], (u.duration, u.bytes)) for u in utts
             if u.uid in done and utt_data_differs(done[u.uid], (u.duration, u.bytes))]  # fmt: skip
    if diffs:
        raise CacheError(
            f"{out_dir} holds targets of other audio than {csv_path}: "
            + describe_data_differences(diffs, "csv")
            + ". A cache holds one audio per ID: use another folder, or delete this one to rebuild it."
        )


def _verified_shards(out_dir: Path, entries: list[dict]) -> tuple[list[dict], dict[str, tuple[float, int] | None]]:
    """Listed shards whose size and sha256 still match, and the utterances they hold (ID -> duration, bytes)."""
    good: list[dict] = []
    done: dict[str, tuple[float, int] | None] = {}
    for entry in entries:
        path = out_dir / entry["name"]
        problem = _shard_problem(path, entry)
        if problem:
            logger.warning("cache: %s; its utterances will be recomputed", problem)
            path.unlink(missing_ok=True)
            continue
        good.append(entry)
        for row in _read_shard_header(path)["utts"]:
            done[row[0]] = (float(row[6]), int(row[7])) if len(row) >= 8 else None
    return good, done


def _shard_problem(path: Path, entry: dict) -> str | None:
    """Why a listed shard is unusable (missing, wrong size, wrong sha256), or ``None``."""
    if not path.exists():
        return f"{path.name}: missing"
    size = path.stat().st_size
    if size != entry["bytes"]:
        how = "truncated" if size < entry["bytes"] else "grown"
        return f"{path.name}: {size} bytes, {entry['bytes']} listed ({how})"
    if _file_sha256(path) != entry["sha256"]:
        return f"{path.name}: sha256 mismatch (corrupted)"
    return None


def _remove_leftovers(out_dir: Path, listed: set[str]) -> None:
    """Delete temporary files and shard files that no finished-shard list names (a killed run's)."""
    for path in out_dir.iterdir():
        if ".tmp." in path.name or (path.name.startswith("shard-") and path.name not in listed):
            logger.info("cache: removing leftover %s", path.name)
            path.unlink(missing_ok=True)


def _batches(utts: list[_Utt], batch_seconds: float) -> Iterator[list[_Utt]]:
    """Consecutive batches of length-sorted ``utts`` whose padded audio ``B * longest <= batch_seconds``."""
    batch: list[_Utt] = []
    for utt in utts:
        if batch and (len(batch) + 1) * max(utt.duration, batch[-1].duration) > batch_seconds:
            yield batch
            batch = []
        batch.append(utt)
    if batch:
        yield batch


def _load_wavs(batch: list[_Utt], sample_rate: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-padded waveforms ``[B, S]`` and relative lengths ``[B]``."""
    from speech_kd.audio import read_audio

    sigs = [read_audio(utt.wav, sample_rate) for utt in batch]
    longest = max(len(s) for s in sigs)
    wavs = torch.zeros(len(sigs), longest)
    for i, sig in enumerate(sigs):
        wavs[i, : len(sig)] = sig
    return wavs, torch.tensor([len(s) / longest for s in sigs])


def _encode_batch(teacher: Teacher, batch: list[_Utt], device: str, top_k: int, mass: float) -> list[EncodedFrames]:
    """Run the teacher on one batch and encode each utterance's valid frames."""
    wavs, wav_lens = _load_wavs(batch, teacher.sample_rate)
    with torch.no_grad():
        out = teacher(wavs.to(device), wav_lens.to(device))
    return [encode(out.log_probs[i, : int(out.lengths[i])], top_k, mass) for i in range(len(batch))]


def _write_shard(
    out_dir: Path, number: int, utts: list[tuple[str, EncodedFrames]], vocab_size: int,
    data: dict[str, tuple[float, int]] | None = None,
) -> dict:  # fmt: skip
    """Write one shard atomically and return its ``shards.json`` entry."""
    path = out_dir / SHARD_PATTERN.format(number)
    pieces = _shard_pieces(utts, vocab_size, data)
    _write_atomic(path, pieces)
    digest = hashlib.sha256()
    for piece in pieces:
        digest.update(piece)
    return {
        "name": path.name, "sha256": digest.hexdigest(), "bytes": sum(len(p) for p in pieces),
        "utterances": len(utts), "frames": sum(enc.num_frames for _, enc in utts),
    }  # fmt: skip


def _save_manifest(out_dir: Path, entries: list[dict]) -> None:
    _write_json(out_dir / MANIFEST_NAME, {"format_version": FORMAT_VERSION, "shards": entries})


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="utt", desc="caching teacher targets", disable=not enabled)


def write_cache(
    teacher: Teacher,
    csv_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    batch_seconds: float = 120.0,
    shard_utts: int = 2000,
    top_k: int = 8,
    mass: float = 0.98,
    device: str = "cpu",
    student_tokens: Sequence[str] | None = None,
    progress: bool = True,
    max_duration: float | None = MAX_DURATION,
) -> dict:
    """Run ``teacher`` once over a manifest and store its soft targets in ``out_dir``.

    Parameters
    ----------
    teacher : Teacher
        Any teacher; it runs in eval mode without gradients on ``device``.
    csv_path : path-like
        SpeechBrain CSV with at least ``ID``, ``duration`` and ``wav``.
    out_dir : path-like
        Cache folder: new, empty, or a previous (possibly interrupted) cache
        of the same teacher, data and scheme, which is completed.
    batch_seconds : float
        Padded audio per teacher batch (``B * longest duration``).
    shard_utts : int
        Utterances per shard file.
    top_k, mass : int, float
        Storage scheme (module docstring).
    device : str
        Where the teacher runs.
    student_tokens : sequence of str, optional
        Recorded in ``meta.json`` so readers can check what the cache was made for.
    progress : bool
        Show a tqdm progress bar.
    max_duration : float, optional
        Utterances longer than this (seconds, by the manifest) are skipped
        with a warning naming each file, so one long recording cannot
        exhaust memory; ``None`` or 0: no limit.

    Returns
    -------
    dict
        ``utterances``, ``frames``, ``bytes`` (whole folder), ``bytes_per_frame``,
        ``fp32_bytes`` (``frames * V * 4``), ``compression_ratio``, ``seconds``,
        plus ``shards``, ``teacher_utterances`` (run now) and ``reused_utterances``.
    """
    start = time.monotonic()
    _check_scheme(top_k, mass)
    if shard_utts < 1 or batch_seconds <= 0:
        raise CacheError(f"shard_utts ({shard_utts}) and batch_seconds ({batch_seconds}) must be positive")
    out_dir = Path(out_dir)
    utts = sorted(_read_manifest(csv_path), key=lambda u: (u.duration, u.uid))
    if max_duration:
        too_long = [u for u in utts if u.duration > max_duration]
        for utt in too_long:
            logger.warning("cache: skipping %s (%s): %.1f s, longer than max_duration=%.1f s", utt.uid, utt.wav,
                           utt.duration, max_duration)  # fmt: skip
        utts = [u for u in utts if u.duration <= max_duration]
        if not utts:
            raise CacheError(f"{csv_path}: every utterance is longer than max_duration={max_duration} s")
    with FolderLock(out_dir, "cache folder"):
        return _write_locked(teacher, csv_path, out_dir, utts, start, batch_seconds, shard_utts, top_k, mass, device,
                             student_tokens, progress)  # fmt: skip


def _write_locked(
    teacher: Teacher, csv_path, out_dir: Path, utts: list[_Utt], start: float, batch_seconds: float,
    shard_utts: int, top_k: int, mass: float, device: str, student_tokens, progress: bool,
) -> dict:  # fmt: skip
    """:func:`write_cache`'s work, under the folder's lock."""
    meta = _open_out_dir(out_dir, _new_meta(teacher, utts, csv_path, top_k, mass, student_tokens))
    entries = _read_json(out_dir / MANIFEST_NAME)["shards"] if (out_dir / MANIFEST_NAME).exists() else []
    _remove_leftovers(out_dir, {e["name"] for e in entries})
    entries, done = _verified_shards(out_dir, entries)
    _check_stored_data(out_dir, utts, done, csv_path)
    todo = [u for u in utts if u.uid not in done]
    if done:
        wanted = sum(1 for u in utts if u.uid in done)
        logger.info("cache %s: resuming, %d of %d utterances already stored (%d stored in all)", out_dir, wanted,
                    len(utts), len(done))  # fmt: skip
    teacher.to(device)
    next_number = 1 + max((int(e["name"][6:11]) for e in entries), default=-1)
    with _progress(len(todo), progress) as bar:
        for first in range(0, len(todo), shard_utts):
            chunk, stored = todo[first : first + shard_utts], []
            for batch in _batches(chunk, batch_seconds):
                stored += zip((u.uid for u in batch), _encode_batch(teacher, batch, device, top_k, mass))
                bar.update(len(batch))
            data = {u.uid: (u.duration, u.bytes) for u in chunk}
            entries.append(_write_shard(out_dir, next_number, stored, len(teacher.tokens), data))
            next_number += 1
            _save_manifest(out_dir, entries)
    _save_manifest(out_dir, entries)
    frames = sum(e["frames"] for e in entries)
    meta.update(frames=frames, complete=True, completed=meta.get("completed") or _now(),
                utterances=sum(e["utterances"] for e in entries))  # fmt: skip
    _write_json(out_dir / META_NAME, meta)
    return _summary(out_dir, meta, entries, len(todo), len(utts) - len(todo), time.monotonic() - start)


def _summary(out_dir: Path, meta: dict, entries: list[dict], ran: int, reused: int, seconds: float) -> dict:
    frames = meta["frames"]
    size = _dir_bytes(out_dir)
    fp32 = frames * len(meta["teacher_tokens"]) * 4
    return {
        "out_dir": str(out_dir), "utterances": sum(e["utterances"] for e in entries), "frames": frames,
        "bytes": size, "bytes_per_frame": size / max(frames, 1), "fp32_bytes": fp32,
        "compression_ratio": fp32 / max(size, 1), "seconds": round(seconds, 3), "shards": len(entries),
        "teacher_utterances": ran, "reused_utterances": reused,
    }  # fmt: skip


def cache_targets(
    teacher_source: str | os.PathLike, csv_path: str | os.PathLike, out_dir: str | os.PathLike, *,
    kind: str = "auto", teacher_overrides: dict | None = None, **kw,
) -> dict:  # fmt: skip
    """Load a teacher (one folder, or comma-separated folders: an ensemble) and :func:`write_cache` its targets.

    ``teacher_overrides`` replace keys of a SpeechBrain teacher's
    ``hyperparams.yaml`` (the ``teacher_overrides`` of the distillation yaml).
    """
    from speech_kd.teachers.ensemble import load_teachers

    teacher = load_teachers(teacher_source, kind=kind, device=kw.get("device", "cpu"), overrides=teacher_overrides)
    return write_cache(teacher, csv_path, out_dir, **kw)


# --------------------------------------------------------------------------- reading
