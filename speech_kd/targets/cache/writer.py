"""Writing a soft-target cache: run a teacher over a manifest, shard by shard, resumable (cache-targets)."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from speech_kd.data.audio import read_audio
from speech_kd.nnet.layers import LayerStackError, teacher_layers_spec
from speech_kd.targets.cache.folder import (
    CacheUtt,
    check_out_dir,
    check_stored_data,
    new_meta,
    open_out_dir,
    read_cache_manifest,
    remove_leftovers,
    verified_shards,
)
from speech_kd.targets.cache.format import (
    DEFAULT_MAX_TEMPERATURE,
    FORMAT_VERSION,
    HIDDEN_DTYPES,
    HIDDEN_LAYOUT,
    MANIFEST_NAME,
    META_NAME,
    SHARD_PATTERN,
    CacheError,
    EncodedFrames,
    check_scheme,
    encode,
    encode_hidden,
    shard_pieces,
)
from speech_kd.targets.cache.storage import dir_bytes, read_json, utc_now, write_atomic, write_json
from speech_kd.targets.teachers.base import Teacher, TeacherError
from speech_kd.targets.teachers.ensemble import load_teachers
from speech_kd.training.checkpoints import FolderLock

logger = logging.getLogger(__name__)

#: default longest utterance cache-targets runs the teacher on (seconds); longer ones are skipped with a warning
MAX_DURATION = 60.0


def _batches(utts: list[CacheUtt], batch_seconds: float) -> Iterator[list[CacheUtt]]:
    """Consecutive batches of length-sorted ``utts`` whose padded audio ``B * longest <= batch_seconds``."""
    batch: list[CacheUtt] = []
    for utt in utts:
        if batch and (len(batch) + 1) * max(utt.duration, batch[-1].duration) > batch_seconds:
            yield batch
            batch = []
        batch.append(utt)
    if batch:
        yield batch


def _load_wavs(batch: list[CacheUtt], sample_rate: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-padded waveforms ``[B, S]`` and relative lengths ``[B]``."""
    sigs = [read_audio(utt.wav, sample_rate) for utt in batch]
    longest = max(len(s) for s in sigs)
    wavs = torch.zeros(len(sigs), longest)
    for i, sig in enumerate(sigs):
        wavs[i, : len(sig)] = sig
    return wavs, torch.tensor([len(s) / longest for s in sigs])


def _encode_batch(
    teacher: Teacher,
    batch: list[CacheUtt],
    device: str,
    scheme: tuple[int, float, float],
    hidden: dict | None = None,
) -> tuple[list[EncodedFrames], list[bytes] | None]:
    """Run the teacher on one batch; encode each utterance's valid frames (and its stored layers' hidden states)."""
    wavs, wav_lens = _load_wavs(batch, teacher.sample_rate)
    layers = hidden["layers"] if hidden else ()
    with torch.no_grad():
        out = teacher(wavs.to(device), wav_lens.to(device), hidden_layers=layers)
    lengths = [int(n) for n in out.lengths]
    encoded = [encode(out.log_probs[i, :n], *scheme) for i, n in enumerate(lengths)]
    if not hidden:
        return encoded, None
    chunks = [
        b"".join(encode_hidden(out.hiddens[layer][i, :n], hidden["dtype"]) for layer in layers)
        for i, n in enumerate(lengths)
    ]
    return encoded, chunks


def hidden_spec(
    teacher: Teacher, layers: str | Sequence[int], dtype: str, device: str, stack: str | None = None
) -> dict:
    """``scheme.hidden`` of a cache storing ``layers`` (``1,3,5``, ``all``, ``auto:N`` or a list) of ``teacher``.

    ``stack``: the dotted path of the teacher's layer list (``--teacher_layers``, as ``kd_teacher_layers``);
    ``None``: the teacher's own (found). Recorded as ``stack``, so that a run naming another list is
    refused. The layers' widths are measured on one second of silence. Raises :class:`CacheError`
    (one line) for a teacher without layers (an ensemble), a layer past its depth or an unknown ``dtype``.
    """
    if dtype not in HIDDEN_DTYPES:
        raise CacheError(f"hidden_dtype must be one of {', '.join(HIDDEN_DTYPES)}, not {dtype!r}")
    teacher.layer_path = stack
    try:
        depth = teacher.layer_count()
        spec = layers if isinstance(layers, str) else ",".join(str(int(layer)) for layer in layers)
        chosen = teacher_layers_spec(spec, depth)
    except (LayerStackError, TeacherError) as err:
        raise CacheError(f"--hidden_layers{' / --teacher_layers' if stack else ''}: {err}") from None
    teacher.to(device)
    probe = torch.zeros(1, teacher.sample_rate, device=device)
    out = teacher(probe, torch.ones(1, device=device), hidden_layers=chosen)
    dims = [int(out.hiddens[layer].shape[-1]) for layer in chosen]
    return {
        "layers": chosen,
        "dims": dims,
        "dtype": dtype,
        "depth": depth,
        "layout": HIDDEN_LAYOUT,
        "stack": teacher.layer_stack_name,
    }


def _write_shard(
    out_dir: Path,
    number: int,
    utts: list[tuple[str, EncodedFrames]],
    vocab_size: int,
    data: dict[str, tuple[float, int]] | None = None,
    hidden: dict[str, bytes] | None = None,
) -> dict:
    """Write one shard atomically and return its ``shards.json`` entry."""
    path = out_dir / SHARD_PATTERN.format(number)
    pieces = shard_pieces(utts, vocab_size, data, hidden)
    write_atomic(path, pieces)
    digest = hashlib.sha256()
    for piece in pieces:
        digest.update(piece)
    return {
        "name": path.name,
        "sha256": digest.hexdigest(),
        "bytes": sum(len(p) for p in pieces),
        "utterances": len(utts),
        "frames": sum(enc.num_frames for _, enc in utts),
    }


def _save_manifest(out_dir: Path, entries: list[dict]) -> None:
    write_json(out_dir / MANIFEST_NAME, {"format_version": FORMAT_VERSION, "shards": entries})


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    # disable=None: drawn on a terminal only, so a log file is not filled with redraws
    return tqdm(total=total, unit="utt", desc="caching teacher targets", disable=None if enabled else True)


def write_cache(
    teacher: Teacher,
    csv_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    batch_seconds: float = 120.0,
    shard_utts: int = 2000,
    top_k: int = 8,
    mass: float = 0.98,
    max_temperature: float = DEFAULT_MAX_TEMPERATURE,
    device: str = "cpu",
    student_tokens: Sequence[str] | None = None,
    progress: bool = True,
    max_duration: float | None = MAX_DURATION,
    hidden_layers: str | Sequence[int] | None = None,
    hidden_dtype: str = "int8",
    teacher_layers: str | None = None,
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
    top_k, mass, max_temperature : int, float, float
        Storage scheme (:mod:`speech_kd.targets.cache.format`): at most ``top_k``
        tokens per frame, enough to hold ``mass`` of the distribution softened
        at ``max_temperature``, the largest KD temperature the cache serves.
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
    hidden_layers : str or sequence of int, optional
        Also store these encoder layers' hidden states (layer distillation, ``kd_layers``):
        ``1,3,5`` (0-based), ``all``, or ``auto:N`` (the layers ``kd_layers: auto`` maps a student of
        ``N`` layers to). Recorded in ``meta.json`` (``scheme.hidden``).
    hidden_dtype : str
        ``int8`` (a byte per value, scaled per channel and per frame) or ``fp16`` (docs/cache.md measures both).
    teacher_layers : str, optional
        Dotted path of the teacher's layer list ``hidden_layers`` counts in (``kd_teacher_layers``; for a
        teacher with several); ``None``: found. Only with ``hidden_layers``.

    Returns
    -------
    dict
        ``utterances``, ``frames``, ``bytes`` (whole folder), ``bytes_per_frame``,
        ``fp32_bytes`` (``frames * (V + stored hidden widths) * 4``), ``compression_ratio``, ``seconds``,
        plus ``shards``, ``teacher_utterances`` (run now), ``reused_utterances`` and
        ``hidden_layers`` (the teacher layers stored, or ``None``).
    """
    start = time.monotonic()
    check_scheme(top_k, mass, max_temperature)
    if shard_utts < 1 or batch_seconds <= 0:
        raise CacheError(f"shard_utts ({shard_utts}) and batch_seconds ({batch_seconds}) must be positive")
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    utts = sorted(read_cache_manifest(csv_path), key=lambda u: (u.duration, u.uid))
    if max_duration:
        too_long = [u for u in utts if u.duration > max_duration]
        for utt in too_long:
            logger.warning(
                "cache: skipping %s (%s): %.1f s, longer than max_duration=%.1f s",
                utt.uid,
                utt.wav,
                utt.duration,
                max_duration,
            )
        utts = [u for u in utts if u.duration <= max_duration]
        if not utts:
            raise CacheError(f"{csv_path}: every utterance is longer than max_duration={max_duration} s")
    if teacher_layers and not hidden_layers:
        raise CacheError(
            f"--teacher_layers {teacher_layers}: names the layer list that --hidden_layers stores layers of; "
            "give --hidden_layers too (or leave both out)"
        )
    hidden = hidden_spec(teacher, hidden_layers, hidden_dtype, device, teacher_layers) if hidden_layers else None
    with FolderLock(out_dir, "cache folder"):
        scheme = (top_k, mass, max_temperature)
        return _write_locked(
            teacher,
            csv_path,
            out_dir,
            utts,
            start,
            batch_seconds,
            shard_utts,
            scheme,
            device,
            student_tokens,
            progress,
            hidden,
        )


def _write_locked(
    teacher: Teacher,
    csv_path,
    out_dir: Path,
    utts: list[CacheUtt],
    start: float,
    batch_seconds: float,
    shard_utts: int,
    scheme: tuple[int, float, float],
    device: str,
    student_tokens,
    progress: bool,
    hidden: dict | None = None,
) -> dict:
    """:func:`write_cache`'s work, under the folder's lock."""
    meta = open_out_dir(out_dir, new_meta(teacher, utts, csv_path, *scheme, student_tokens, hidden))
    entries = read_json(out_dir / MANIFEST_NAME)["shards"] if (out_dir / MANIFEST_NAME).exists() else []
    remove_leftovers(out_dir, {e["name"] for e in entries})
    entries, done = verified_shards(out_dir, entries)
    check_stored_data(out_dir, utts, done, csv_path)
    todo = [u for u in utts if u.uid not in done]
    if done:
        wanted = sum(1 for u in utts if u.uid in done)
        logger.info(
            "cache %s: resuming, %d of %d utterances already stored (%d stored in all)",
            out_dir,
            wanted,
            len(utts),
            len(done),
        )
    teacher.to(device)
    next_number = 1 + max((int(e["name"][6:11]) for e in entries), default=-1)
    with _progress(len(todo), progress) as bar:
        for first in range(0, len(todo), shard_utts):
            chunk, stored, hiddens = todo[first : first + shard_utts], [], {}
            for batch in _batches(chunk, batch_seconds):
                encoded, chunks = _encode_batch(teacher, batch, device, scheme, hidden)
                stored += zip((u.uid for u in batch), encoded)
                if chunks is not None:
                    hiddens.update(zip((u.uid for u in batch), chunks))
                bar.update(len(batch))
            data = {u.uid: (u.duration, u.bytes) for u in chunk}
            entries.append(
                _write_shard(out_dir, next_number, stored, len(teacher.tokens), data, hiddens if hidden else None)
            )
            next_number += 1
            _save_manifest(out_dir, entries)
    _save_manifest(out_dir, entries)
    frames = sum(e["frames"] for e in entries)
    meta.update(
        frames=frames,
        complete=True,
        completed=meta.get("completed") or utc_now(),
        utterances=sum(e["utterances"] for e in entries),
    )
    write_json(out_dir / META_NAME, meta)
    return _summary(out_dir, meta, entries, len(todo), len(utts) - len(todo), time.monotonic() - start)


def _summary(out_dir: Path, meta: dict, entries: list[dict], ran: int, reused: int, seconds: float) -> dict:
    frames = meta["frames"]
    size = dir_bytes(out_dir)
    hidden = meta["scheme"].get("hidden") or {}
    fp32 = frames * (len(meta["teacher_tokens"]) + sum(hidden.get("dims") or [])) * 4  # what it stores, as fp32
    return {
        "out_dir": str(out_dir),
        "utterances": sum(e["utterances"] for e in entries),
        "frames": frames,
        "bytes": size,
        "bytes_per_frame": size / max(frames, 1),
        "fp32_bytes": fp32,
        "compression_ratio": fp32 / max(size, 1),
        "seconds": round(seconds, 3),
        "shards": len(entries),
        "teacher_utterances": ran,
        "reused_utterances": reused,
        "hidden_layers": hidden.get("layers"),
    }


def cache_targets(
    teacher_source: str | os.PathLike,
    csv_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    kind: str = "auto",
    teacher_overrides: dict | None = None,
    **kw,
) -> dict:
    """Load a teacher (one folder, or comma-separated folders: an ensemble) and :func:`write_cache` its targets.

    ``teacher_overrides`` replace keys of a SpeechBrain teacher's
    ``hyperparams.yaml`` (the ``teacher_overrides`` of the distillation yaml).
    """
    check_out_dir(out_dir)  # before the teacher is loaded (minutes for a large one)
    teacher = load_teachers(teacher_source, kind=kind, device=kw.get("device", "cpu"), overrides=teacher_overrides)
    return write_cache(teacher, csv_path, out_dir, **kw)
