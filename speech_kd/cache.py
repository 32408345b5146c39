"""Soft-target cache: run the teacher once, read its posteriors for many epochs.

:func:`write_cache` runs a :class:`~speech_kd.teachers.base.Teacher` over a
CSV manifest and stores a compact copy of its frame posteriors, keyed by
utterance ID; :class:`CacheReader` turns them back into dense log-posteriors
for any batch (any order, subset, shuffling or DDP split), at the cost of a
memory-mapped read, the decompression of a small block and a scatter. Targets stay in the teacher's token space
and frame rate; ``speech_kd.targets.TargetAligner`` maps them to the student.

Storage scheme (per teacher frame ``t`` with probabilities ``p_t [V]``)
-------------------------------------------------------------------------
1. Sort the tokens by probability and keep the smallest prefix whose
   cumulative probability reaches ``mass`` (default 0.98), at most ``top_k``
   tokens (default 8, at most 127).
2. Quantise each kept probability to one byte, ``q = floor(255 p + 1/2)``
   (``round(255 p)``, halves up), so ``|q/255 - p| <= 1/510``. Trailing kept
   tokens with ``q == 0`` are dropped (the most probable token is always kept).
3. A frame whose top token alone reaches ``mass`` (or rounds to ``q == 255``)
   is *certain*: it stores its token id and no probability, which is implied
   to be one. Every other frame stores its ``k`` kept token ids and their
   ``q`` bytes. :func:`encode` returns this per-frame form
   (:class:`EncodedFrames`: ``counts`` is ``0`` for a certain frame).
4. In the shard file each utterance becomes *codes*: a byte ``k`` (1..127)
   for an uncertain frame, or ``128 + n - 1`` for a run of ``n`` (1..128)
   consecutive certain frames of the same token, stored with a single id.
   CTC posteriors are mostly long runs of confident blanks, so a run of
   blanks costs two bytes whatever its length.
5. The codes, ids (``uint8`` when ``V <= 256``, else little-endian
   ``uint16``) and ``q`` bytes of ``block_utts`` (default 16) consecutive
   utterances are concatenated stream by stream and compressed with ``zlib``
   (DEFLATE, level 9, with its Adler-32 checksum, so a damaged block is an
   error when read, not wrong targets): ids and probability bytes are far
   from uniform, and the entropy coder takes advantage of it.

Measured on the demo's cache (the shipped 3.15M teacher over the 1-hour demo
corpus, 83,999 frames, 29 tokens; README "The soft-target cache"): 3.57
bytes per frame for the whole folder (5.8 with format 1, which had neither
runs nor compression), against 116 for fp32 posteriors.
``tests/unit/test_cache.py`` measures the folder size for peaky character
posteriors and the payload for a peaky 5,000-token vocabulary.

Reconstruction (:func:`decode`): the ``k`` stored tokens get ``q/255`` (a
certain frame's token gets 1); the residual ``r = max(1 - sum q/255, 1e-6)``
is spread uniformly over the other ``V - k`` tokens (none when ``k == V``);
the frame is then renormalised by ``sum q/255 + r``. Each frame sums to one
and every probability is positive, except a stored token whose byte is 0
(only possible as the top token of a near-uniform frame over more than 510
tokens), whose log-probability is clamped at ``log(1e-30)``.

Error. With ``m`` the true mass of the tokens not stored and ``k`` tokens
stored, every probability of the frame satisfies::

    |p_hat - p| <= m + (k + 1) / 510 + 1e-6

Stored tokens are off by at most ``1/510`` (quantisation) plus the
renormalisation, which is zero unless the rounded probabilities sum above one
and then at most ``k/510 + 1e-6``; the other tokens are off by at most
``m`` (the truncated mass, ``<= 1 - mass`` unless the ``top_k`` cap stopped
first) plus the rounding error folded into the residual. A certain frame is
off by at most ``m <= 1 - mass`` (plus the ``1e-6`` floor). In practice the
rounding errors cancel and the largest error is close to ``max(1/510, m)``.

Layout of ``CACHE_DIR``
-----------------------
``meta.json``
    ``format_version``, ``teacher_name``, ``teacher_fingerprint``,
    ``teacher_tokens``, ``blank_index``, ``frame_shift``, ``sample_rate``,
    ``scheme`` (``top_k``, ``mass``, ``prob_levels`` 255, ``id_dtype``,
    ``residual_floor``, ``certain``, ``max_run``, ``block_utts``,
    ``compression``), ``student_tokens`` (or null), ``data_fingerprint``
    (:func:`data_fingerprint` of the manifest's IDs and durations), ``csv``,
    ``utterances``, ``frames`` (null until complete), ``complete``,
    ``created`` and ``completed`` (ISO times).
``shards.json``
    ``{"format_version": 2, "shards": [{"name", "sha256", "bytes",
    "utterances", "frames"}, ...]}``: only finished shards, replaced
    atomically after each one.
``shard-00000.bin``, ...
    One self-contained file per shard: the magic ``b"SKDCACH2"``, a
    little-endian ``uint64`` header length, the header (zlib-compressed
    UTF-8 JSON), then the compressed blocks back to back. The header holds
    ``frames``, ``id_dtype``, ``blocks`` (``[offset, bytes]`` of each block,
    the offset counted from the end of the header) and ``utts``: ``[utt_id, block, num_frames, codes, ids, probs]``
    rows, the last three being the utterance's lengths in each stream of its
    block (utterances appear in a block in the order of the rows).

Reading memory-maps the shard and decompresses one block (16 utterances,
tens of microseconds) per utterance asked for; the last 64 decoded blocks of
each process are kept. Writing is atomic (temporary name, fsync,
``os.replace``) and resumable: a rerun skips the utterances of listed shards
whose size and sha256 still match, and refuses a folder made for another
teacher, data or scheme. One writer per folder at a time.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import logging
import math
import os
import time
import zlib
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from speech_kd.teachers.base import Teacher, TeacherOutput

__all__ = [
    "CacheError",
    "CacheMissError",
    "CacheReader",
    "CacheUnion",
    "EncodedFrames",
    "cache_targets",
    "data_fingerprint",
    "decode",
    "decode_into",
    "encode",
    "open_cache",
    "write_cache",
    "FORMAT_VERSION",
    "PAD_LOG_PROB",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
PROB_LEVELS = 255
RESIDUAL_FLOOR = 1e-6
#: log-probability of the non-blank tokens on padding frames (blank gets 0)
PAD_LOG_PROB = math.log(1e-8)
SHARD_MAGIC = b"SKDCACH2"
#: utterances per compressed block of a shard
BLOCK_UTTS = 16
#: longest run of certain frames one code byte holds
MAX_RUN = 128
#: decoded blocks kept per reader process
_BLOCK_CACHE = 64
META_NAME = "meta.json"
MANIFEST_NAME = "shards.json"
SHARD_PATTERN = "shard-{:05d}.bin"
_TINY = 1e-30  # probabilities are clamped here before a log
#: meta.json keys that must agree before a rerun may add to a folder
_IDENTITY_KEYS = (
    "format_version", "teacher_fingerprint", "teacher_tokens", "blank_index", "frame_shift", "sample_rate",
    "scheme", "student_tokens", "data_fingerprint",
)  # fmt: skip


class CacheError(RuntimeError):
    """A cache that cannot be written or used, with the reason."""


class CacheMissError(CacheError):
    """Utterance IDs asked for that the cache does not hold (``missing`` lists them)."""

    def __init__(self, missing: Sequence[str], cache_dir: str | os.PathLike) -> None:
        self.missing = list(missing)
        shown = ", ".join(self.missing[:20]) + (f", ... ({len(self.missing)} in all)" if len(self.missing) > 20 else "")
        super().__init__(f"cache {cache_dir} has no targets for {len(self.missing)} utterance(s): {shown}")


# --------------------------------------------------------------------------- encoding


@dataclass
class EncodedFrames:
    """The stored form of one utterance's posteriors.

    Attributes
    ----------
    counts : np.ndarray
        ``[T]`` uint8: tokens kept per frame; ``0`` marks a certain frame
        (one token id, no probability byte, the probability implied to be one).
    ids : np.ndarray
        ``[E]`` uint8 or uint16 token ids, ``E = sum(max(counts, 1))``.
    probs : np.ndarray
        ``[P]`` uint8 quantised probabilities ``round(255 p)``, ``P = sum(counts)``.
    """

    counts: np.ndarray
    ids: np.ndarray
    probs: np.ndarray

    @property
    def num_frames(self) -> int:
        """Number of teacher frames ``T``."""
        return len(self.counts)

    @property
    def nbytes(self) -> int:
        """Bytes of the per-frame form, before run-length coding and compression."""
        return self.counts.nbytes + self.ids.nbytes + self.probs.nbytes


def id_dtype(vocab_size: int) -> np.dtype:
    """Token id type: ``uint8`` up to 256 tokens, else ``uint16`` (up to 65,536)."""
    if vocab_size <= 256:
        return np.dtype(np.uint8)
    if vocab_size <= 65536:
        return np.dtype(np.uint16)
    raise CacheError(f"vocabulary of {vocab_size} tokens is too large for the cache (max 65536)")


def _check_scheme(top_k: int, mass: float) -> None:
    if not 1 <= top_k <= 127:
        raise CacheError(f"top_k must be in 1..127, got {top_k}")
    if not 0.0 < mass <= 1.0:
        raise CacheError(f"mass must be in (0, 1], got {mass}")


def encode(log_probs: torch.Tensor, top_k: int = 8, mass: float = 0.98) -> EncodedFrames:
    """Compress ``[T, V]`` log-posteriors of one utterance (see the module docstring).

    Parameters
    ----------
    log_probs : torch.Tensor
        ``[T, V]`` log-probabilities (renormalised here), on any device.
    top_k : int
        Most tokens kept per frame (1..127).
    mass : float
        Cumulative probability at which a frame stops keeping tokens.

    Returns
    -------
    EncodedFrames
        The per-frame counts, token ids and probability bytes.
    """
    _check_scheme(top_k, mass)
    if log_probs.dim() != 2:
        raise CacheError(f"encode expects [T, V] log-probs, got shape {tuple(log_probs.shape)}")
    num_tokens = log_probs.shape[1]
    k = min(top_k, num_tokens)
    top_lp, top_ids = torch.log_softmax(log_probs.float(), dim=-1).topk(k, dim=-1)
    top_p = top_lp.exp()
    needed = ((top_p.cumsum(-1) < mass).sum(-1) + 1).clamp(max=k)
    quant = torch.floor(top_p * PROB_LEVELS + 0.5).clamp(0, PROB_LEVELS)
    nonzero = (quant > 0).sum(-1)  # quant is non-increasing along the row
    kept = torch.minimum(needed, nonzero).clamp(min=1)
    certain = (needed == 1) | ((kept == 1) & (quant[:, 0] == PROB_LEVELS))
    keep = torch.arange(k, device=kept.device)[None, :] < kept[:, None]
    return EncodedFrames(
        counts=torch.where(certain, 0, kept).to(torch.uint8).cpu().numpy(),
        ids=top_ids[keep].cpu().numpy().astype(id_dtype(num_tokens)),
        probs=quant[keep & ~certain[:, None]].to(torch.uint8).cpu().numpy(),
    )


def _dequantise(counts: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-entry frame index, per-entry probability and per-frame id count."""
    n_ids = np.maximum(counts.astype(np.int64), 1)
    frame = np.repeat(np.arange(len(counts)), n_ids)
    entry_p = np.ones(len(frame), dtype=np.float64)
    entry_p[np.repeat(counts > 0, n_ids)] = probs / PROB_LEVELS
    return frame, entry_p, n_ids


def _log_parts(
    counts: np.ndarray, ids: np.ndarray, probs: np.ndarray, vocab_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Reconstruction in the log domain (module docstring), without building dense probabilities.

    Returns
    -------
    tuple of np.ndarray
        Entry frame indices ``[E]``, entry token ids ``[E]``, entry
        log-probabilities ``[E]`` and, per frame, the log-probability of every
        token not stored ``[T]``.
    """
    frame, entry_p, n_ids = _dequantise(counts, probs)
    if len(ids) != len(frame) or len(probs) != int(counts.sum(dtype=np.int64)):
        raise CacheError(
            f"corrupt entry: {len(counts)} frames need {len(frame)} ids / {counts.sum()} probs, "
            f"found {len(ids)} / {len(probs)}"
        )
    if len(ids) and int(ids.max()) >= vocab_size:
        raise CacheError(f"corrupt entry: token id {int(ids.max())} outside the {vocab_size}-token vocabulary")
    stored = np.bincount(frame, weights=entry_p, minlength=len(counts))
    others = vocab_size - n_ids
    residual = np.where(others > 0, np.maximum(1.0 - stored, RESIDUAL_FLOOR), 0.0)
    log_total = np.log(np.maximum(stored + residual, _TINY))
    log_fill = np.log(np.maximum(residual / np.maximum(others, 1), _TINY)) - log_total
    log_entry = np.log(np.maximum(entry_p, _TINY)) - log_total[frame]
    return frame, ids.astype(np.int64), log_entry, log_fill


def decode_into(out: np.ndarray, counts: np.ndarray, ids: np.ndarray, probs: np.ndarray) -> None:
    """Write the dense log-probabilities of stored frames into ``out [T, V]`` (float32, e.g. a batch row)."""
    frame, tokens, log_entry, log_fill = _log_parts(counts, ids, probs, out.shape[1])
    out[:] = log_fill[:, None]
    out[frame, tokens] = log_entry


def decode(encoded: EncodedFrames, vocab_size: int) -> torch.Tensor:
    """Dense ``[T, V]`` float32 log-probabilities of one encoded utterance.

    Stored tokens get their dequantised probabilities, the residual mass
    ``max(1 - sum, 1e-6)`` is spread uniformly over the other tokens and the
    frame is renormalised (module docstring, with its error bound).
    """
    out = np.empty((encoded.num_frames, vocab_size), dtype=np.float32)
    decode_into(out, encoded.counts, encoded.ids, encoded.probs)
    return torch.from_numpy(out)


def to_codes(enc: EncodedFrames) -> tuple[np.ndarray, np.ndarray]:
    """Run-length code one utterance: ``codes [C]`` uint8 and the ids they use.

    An uncertain frame keeps its code ``k`` and its ``k`` ids; consecutive
    certain frames of the same token become one code ``128 + n - 1``
    (``n <= 128``) and one id. Probability bytes are unchanged.

    Examples
    --------
    >>> enc = EncodedFrames(np.array([0, 0, 0, 2, 0], np.uint8), np.array([0, 0, 0, 5, 0, 7], np.uint8),
    ...                     np.array([200, 50], np.uint8))
    >>> codes, ids = to_codes(enc)
    >>> codes.tolist(), ids.tolist()
    ([130, 2, 128], [0, 5, 0, 7])
    """
    counts = enc.counts
    frames = len(counts)
    if frames == 0:
        return np.zeros(0, np.uint8), enc.ids[:0]
    n_ids = np.maximum(counts, 1).astype(np.int64)
    first_id = enc.ids[np.cumsum(n_ids) - n_ids]
    certain = counts == 0
    same = np.zeros(frames, dtype=bool)
    same[1:] = certain[1:] & certain[:-1] & (first_id[1:] == first_id[:-1])
    run_start = np.flatnonzero(~same)
    pos = np.arange(frames) - np.repeat(run_start, np.diff(np.append(run_start, frames)))
    opens = ~same | (pos % MAX_RUN == 0)  # a frame that starts a code
    starts = np.flatnonzero(opens)
    lengths = np.diff(np.append(starts, frames))
    codes = np.where(certain[starts], 127 + lengths, counts[starts]).astype(np.uint8)
    return codes, enc.ids[np.repeat(opens, n_ids)]


def from_codes(codes: np.ndarray, ids: np.ndarray, num_probs: int) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`to_codes`: per-frame ``counts`` and the ids of every frame.

    Raises :class:`CacheError` when the codes do not fit the number of ids
    and probability bytes stored with them.
    """
    codes = codes.astype(np.int64)
    run = codes >= 128
    frames_per_code = np.where(run, codes - 127, 1)
    ids_per_code = np.where(run, 1, codes)
    if (codes == 0).any() or int(ids_per_code.sum()) != len(ids) or int(np.where(run, 0, codes).sum()) != num_probs:
        raise CacheError(
            f"corrupt entry: {len(codes)} codes do not match {len(ids)} ids and {num_probs} probability bytes"
        )
    counts = np.repeat(np.where(run, 0, codes), frames_per_code).astype(np.uint8)
    return counts, np.repeat(ids, np.repeat(np.where(run, frames_per_code, 1), ids_per_code))


# --------------------------------------------------------------------------- files


def data_fingerprint(ids_and_durations: Iterable[tuple[str, float]]) -> str:
    """sha256 (first 16 hex digits) of the sorted ``(utterance ID, duration)`` pairs.

    Durations are rounded to milliseconds, so a manifest rewritten with
    other float formatting keeps its fingerprint.
    """
    digest = hashlib.sha256()
    for uid, duration in sorted((str(u), round(float(d), 3)) for u, d in ids_and_durations):
        digest.update(f"{uid}\t{duration:.3f}\n".encode())
    return digest.hexdigest()[:16]


def _file_sha256(path: Path) -> str:
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


def _write_atomic(path: Path, pieces: Iterable[bytes | memoryview]) -> None:
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


def _write_json(path: Path, obj: dict) -> None:
    _write_atomic(path, [json.dumps(obj, indent=1).encode()])


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as err:
        raise CacheError(f"{path}: unreadable ({err.__class__.__name__}: {err})") from err


def _compress(data: bytes) -> bytes:
    """A block or a shard header in zlib format: DEFLATE plus an Adler-32 checksum, so damage is caught when read."""
    return zlib.compress(data, 9)


def _decompress(data: bytes | memoryview, where: str) -> bytes:
    try:
        return zlib.decompress(data)
    except zlib.error as err:
        raise CacheError(
            f"{where}: damaged compressed block ({err}); run CacheReader.verify() or rebuild the cache"
        ) from err


def _shard_pieces(utts: list[tuple[str, EncodedFrames]], vocab_size: int) -> list[bytes]:
    """The bytes of one shard file holding ``utts`` (layout in the module docstring)."""
    dtype = id_dtype(vocab_size).newbyteorder("<")
    rows, blocks = [], []
    for first in range(0, len(utts), BLOCK_UTTS):
        streams: tuple[list, list, list] = ([], [], [])
        for uid, enc in utts[first : first + BLOCK_UTTS]:
            codes, ids = to_codes(enc)
            rows.append([uid, len(blocks), enc.num_frames, len(codes), len(ids), len(enc.probs)])
            for stream, part in zip(streams, (codes, ids.astype(dtype), enc.probs)):
                stream.append(part.tobytes())
        blocks.append(_compress(b"".join(b"".join(stream) for stream in streams)))
    header = {"frames": sum(enc.num_frames for _, enc in utts), "id_dtype": id_dtype(vocab_size).name, "utts": rows}
    offsets = np.cumsum([0] + [len(b) for b in blocks])[:-1].tolist()  # from the end of the header
    header["blocks"] = [[offset, len(block)] for offset, block in zip(offsets, blocks)]
    blob = _compress(json.dumps(header, separators=(",", ":")).encode())
    return [SHARD_MAGIC, np.uint64(len(blob)).astype("<u8").tobytes(), blob, *blocks]


def _read_shard_header(path: Path) -> dict:
    """The JSON header of a shard file (raises :class:`CacheError` naming it when unreadable)."""
    try:
        with open(path, "rb") as fh:
            magic = fh.read(len(SHARD_MAGIC))
            if magic != SHARD_MAGIC:
                old = " (a cache of an older format: rebuild it)" if magic.startswith(SHARD_MAGIC[:7]) else ""
                raise CacheError(f"{path.name}: not a cache shard (bad magic {magic!r}){old}")
            (size,) = np.frombuffer(fh.read(8), dtype="<u8")
            header = json.loads(zlib.decompress(fh.read(int(size))))
            header["header_bytes"] = int(size)
    except (OSError, ValueError, zlib.error) as err:
        raise CacheError(f"{path.name}: unreadable shard header ({err.__class__.__name__}: {err})") from err
    return header


def _dir_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- compatibility


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


@dataclass(frozen=True)
class _Utt:
    uid: str
    duration: float
    wav: str


def _read_manifest(csv_path: str | os.PathLike) -> list[_Utt]:
    """Utterances of a SpeechBrain CSV (``ID``, ``duration``, ``wav``), checked for duplicates."""
    with open(csv_path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = {"ID", "duration", "wav"} - set(reader.fieldnames or [])
        if missing:
            raise CacheError(f"{csv_path}: missing column(s) {sorted(missing)}")
        utts = [_Utt(row["ID"], float(row["duration"]), row["wav"]) for row in reader]
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
    """Create ``out_dir`` or check that it holds a cache of the same inputs; return the meta to keep."""
    out_dir.mkdir(parents=True, exist_ok=True)
    meta_path = out_dir / META_NAME
    if not meta_path.exists():
        others = [p.name for p in out_dir.iterdir() if ".tmp." not in p.name]
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
    return old


def _verified_shards(out_dir: Path, entries: list[dict]) -> tuple[list[dict], set[str]]:
    """Listed shards whose size and sha256 still match, and the utterance IDs they hold."""
    good, done = [], set()
    for entry in entries:
        path = out_dir / entry["name"]
        problem = _shard_problem(path, entry)
        if problem:
            logger.warning("cache: %s; its utterances will be recomputed", problem)
            path.unlink(missing_ok=True)
            continue
        good.append(entry)
        done.update(row[0] for row in _read_shard_header(path)["utts"])
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


def _write_shard(out_dir: Path, number: int, utts: list[tuple[str, EncodedFrames]], vocab_size: int) -> dict:
    """Write one shard atomically and return its ``shards.json`` entry."""
    path = out_dir / SHARD_PATTERN.format(number)
    pieces = _shard_pieces(utts, vocab_size)
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
    meta = _open_out_dir(out_dir, _new_meta(teacher, utts, csv_path, top_k, mass, student_tokens))
    entries = _read_json(out_dir / MANIFEST_NAME)["shards"] if (out_dir / MANIFEST_NAME).exists() else []
    _remove_leftovers(out_dir, {e["name"] for e in entries})
    entries, done = _verified_shards(out_dir, entries)
    todo = [u for u in utts if u.uid not in done]
    if done:
        logger.info("cache %s: resuming, %d of %d utterances already stored", out_dir, len(done), len(utts))
    teacher.to(device)
    next_number = 1 + max((int(e["name"][6:11]) for e in entries), default=-1)
    with _progress(len(todo), progress) as bar:
        for first in range(0, len(todo), shard_utts):
            chunk, stored = todo[first : first + shard_utts], []
            for batch in _batches(chunk, batch_seconds):
                stored += zip((u.uid for u in batch), _encode_batch(teacher, batch, device, top_k, mass))
                bar.update(len(batch))
            entries.append(_write_shard(out_dir, next_number, stored, len(teacher.tokens)))
            next_number += 1
            _save_manifest(out_dir, entries)
    _save_manifest(out_dir, entries)
    frames = sum(e["frames"] for e in entries)
    meta.update(frames=frames, complete=True, completed=meta.get("completed") or _now())
    _write_json(out_dir / META_NAME, meta)
    return _summary(out_dir, meta, entries, len(todo), len(done), time.monotonic() - start)


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


@dataclass(frozen=True)
class _Where:
    """Where one utterance lives: its shard and block, and its slices of the block's three streams."""

    shard: int
    block: int
    frames: int
    codes: slice
    ids: slice
    probs: slice


class CacheReader:
    """Read cached teacher posteriors by utterance ID.

    Shard files are memory-mapped lazily, once per process, and a reader
    decompresses only the blocks it is asked for (keeping the last 64): it
    can be handed to DataLoader workers (fork or spawn); no open file,
    memory map or decoded block is pickled.

    Parameters
    ----------
    out_dir : path-like
        A folder written by :func:`write_cache`.
    verify : bool
        Recompute every shard's sha256 now; raise :class:`CacheError` naming
        the truncated or corrupted ones.
    allow_incomplete : bool
        Accept a cache whose writing was interrupted (missing utterances then
        raise :class:`CacheMissError` when asked for).
    """

    def __init__(self, out_dir: str | os.PathLike, verify: bool = False, allow_incomplete: bool = False) -> None:
        self.out_dir = Path(out_dir)
        if not (self.out_dir / META_NAME).exists():
            raise CacheError(f"{self.out_dir}: not a targets cache (no {META_NAME}); make one with cache-targets")
        self._meta = _read_json(self.out_dir / META_NAME)
        if self._meta.get("format_version") != FORMAT_VERSION:
            raise CacheError(
                f"{self.out_dir}: cache format {self._meta.get('format_version')}, "
                f"this code reads {FORMAT_VERSION}; rebuild the cache"
            )
        if not self._meta.get("complete") and not allow_incomplete:
            raise CacheError(
                f"{self.out_dir}: incomplete cache (writing was interrupted); "
                "rerun cache-targets with the same arguments to finish it"
            )
        manifest = self.out_dir / MANIFEST_NAME
        self._entries: list[dict] = _read_json(manifest)["shards"] if manifest.exists() else []
        self.vocab_size = len(self._meta["teacher_tokens"])
        self.blank_index = int(self._meta["blank_index"])
        self._index: dict[str, _Where] | None = None
        self._layout: list[dict] = []
        self._maps: dict[int, np.ndarray] = {}
        self._blocks: OrderedDict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()
        self._pid = os.getpid()
        if verify:
            problems = self.verify()
            if problems:
                raise CacheError(f"{self.out_dir}: damaged shard(s): " + "; ".join(problems))

    # -- pickling: never ship memory maps to workers
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_maps"], state["_blocks"] = {}, OrderedDict()
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()

    @property
    def metadata(self) -> dict:
        """The cache's ``meta.json`` (a copy)."""
        return json.loads(json.dumps(self._meta))

    @property
    def ids(self) -> set[str]:
        """Utterance IDs with stored targets."""
        return set(self._where())

    def __contains__(self, utt_id: object) -> bool:
        return utt_id in self._where()

    def __len__(self) -> int:
        return len(self._where())

    def num_frames(self, utt_id: str) -> int:
        """Teacher frames stored for ``utt_id``."""
        return self._locate([utt_id])[0].frames

    def _where(self) -> dict[str, _Where]:
        """utt_id -> location, built from the shard headers on first use."""
        if self._index is None:
            index, layout = {}, []
            for number, entry in enumerate(self._entries):
                path = self.out_dir / entry["name"]
                size = path.stat().st_size if path.exists() else -1
                if size != entry["bytes"]:
                    raise CacheError(
                        f"{entry['name']}: {size} bytes, {entry['bytes']} listed in {MANIFEST_NAME} "
                        "(truncated or missing; run CacheReader.verify() or rebuild)"
                    )
                header = _read_shard_header(path)
                dtype = np.dtype(header["id_dtype"]).newbyteorder("<")
                totals = np.zeros((len(header["blocks"]), 3), dtype=np.int64)  # codes, ids, probs per block
                for uid, block, frames, n_codes, n_ids, n_probs in header["utts"]:
                    c, i, p = totals[block]
                    index[uid] = _Where(number, block, frames, slice(c, c + n_codes), slice(i, i + n_ids),
                                        slice(p, p + n_probs))  # fmt: skip
                    totals[block] += (n_codes, n_ids, n_probs)
                start = len(SHARD_MAGIC) + 8 + header["header_bytes"]
                blocks = [(start + offset, size) for offset, size in header["blocks"]]
                layout.append({"blocks": blocks, "totals": totals, "dtype": dtype})
            self._index, self._layout = index, layout
        return self._index

    def _block(self, shard: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The decompressed ``codes``, ``ids`` and ``probs`` streams of one block (kept for reuse)."""
        if self._pid != os.getpid():
            self._maps, self._blocks, self._pid = {}, OrderedDict(), os.getpid()
        key = (shard, block)
        if key in self._blocks:
            self._blocks.move_to_end(key)
            return self._blocks[key]
        name = self._entries[shard]["name"]
        if shard not in self._maps:
            self._maps[shard] = np.memmap(self.out_dir / name, dtype=np.uint8, mode="r")
        lay = self._layout[shard]
        offset, size = lay["blocks"][block]
        data = np.frombuffer(_decompress(self._maps[shard][offset : offset + size], f"{name} block {block}"), np.uint8)
        n_codes, n_ids, n_probs = (int(n) for n in lay["totals"][block])
        id_bytes = n_ids * lay["dtype"].itemsize
        if len(data) != n_codes + id_bytes + n_probs:
            raise CacheError(f"{name} block {block}: {len(data)} bytes, header says {n_codes + id_bytes + n_probs}")
        streams = (data[:n_codes], data[n_codes : n_codes + id_bytes].view(lay["dtype"]), data[n_codes + id_bytes :])
        self._blocks[key] = streams
        if len(self._blocks) > _BLOCK_CACHE:
            self._blocks.popitem(last=False)
        return streams

    def _locate(self, utt_ids: Sequence[str]) -> list[_Where]:
        index = self._where()
        missing = [uid for uid in utt_ids if uid not in index]
        if missing:
            raise CacheMissError(missing, self.out_dir)
        return [index[uid] for uid in utt_ids]

    def _decode_into(self, out: np.ndarray, where: _Where) -> None:
        codes, ids, probs = self._block(where.shard, where.block)
        probs = probs[where.probs]
        counts, frame_ids = from_codes(codes[where.codes], ids[where.ids], len(probs))
        if len(counts) != where.frames:
            name = self._entries[where.shard]["name"]
            raise CacheError(f"{name}: corrupt entry ({len(counts)} frames decoded, {where.frames} listed)")
        decode_into(out, counts, frame_ids, probs)

    def get(self, utt_id: str) -> torch.Tensor:
        """Dense ``[T, V]`` float32 log-posteriors of one utterance (teacher tokens and frame rate)."""
        (where,) = self._locate([utt_id])
        out = np.empty((where.frames, self.vocab_size), dtype=np.float32)
        self._decode_into(out, where)
        return torch.from_numpy(out)

    def batch(self, utt_ids: Sequence[str], device: str | torch.device = "cpu") -> TeacherOutput:
        """Padded targets of several utterances, as a teacher would return them.

        Parameters
        ----------
        utt_ids : sequence of str
            Utterance IDs; any missing one raises :class:`CacheMissError` listing them all.
        device : str or torch.device
            Where the returned tensors live.

        Returns
        -------
        TeacherOutput
            ``log_probs [B, Tmax, V]`` float32 and ``lengths [B]`` int64. Padding
            frames hold the blank token with probability 1: log-prob ``0`` on
            blank and ``log(1e-8)`` (:data:`PAD_LOG_PROB`) elsewhere.
        """
        wheres = self._locate(list(utt_ids))
        longest = max((w.frames for w in wheres), default=0)
        out = np.empty((len(wheres), longest, self.vocab_size), dtype=np.float32)
        for row, where in enumerate(wheres):
            self._decode_into(out[row, : where.frames], where)
            out[row, where.frames :] = PAD_LOG_PROB
            out[row, where.frames :, self.blank_index] = 0.0
        lengths = torch.tensor([w.frames for w in wheres], dtype=torch.int64)
        return TeacherOutput(torch.from_numpy(out).to(device), lengths.to(device))

    def check_compatible(
        self,
        teacher_fingerprint: str | None = None,
        teacher_tokens: Sequence[str] | None = None,
        student_tokens: Sequence[str] | None = None,
        data_ids_fingerprint: str | None = None,
        frame_shift: float | None = None,
    ) -> None:
        """Raise :class:`CacheError` saying what differs between the cache and what is given.

        Only the arguments given are checked. ``student_tokens`` is checked
        only when the cache recorded the student it was made for (targets are
        stored in the teacher's token space, so any student can use them).
        """
        wanted = {
            "teacher_fingerprint": teacher_fingerprint, "teacher_tokens": teacher_tokens,
            "data_fingerprint": data_ids_fingerprint, "frame_shift": frame_shift,
        }  # fmt: skip
        wanted = {key: value for key, value in wanted.items() if value is not None}
        if student_tokens is not None and self._meta.get("student_tokens") is not None:
            wanted["student_tokens"] = student_tokens
        diffs = _differences(self._meta, wanted)
        if diffs:
            raise CacheError(f"cache {self.out_dir} does not match (cache != given): " + "; ".join(diffs))

    def verify(self) -> list[str]:
        """Recompute each shard's size and sha256; one ``"shard-NNNNN.bin: problem"`` line per bad shard."""
        problems = [_shard_problem(self.out_dir / e["name"], e) for e in self._entries]
        return [p for p in problems if p]


class CacheUnion:
    """Several caches of one teacher read as one (``targets_cache: A,B``), e.g. transcribed + untranscribed audio.

    Each folder is a :class:`CacheReader`; they must hold the same teacher
    (fingerprint, tokens, blank, frame shift), which is checked when opened.
    An utterance ID found in several caches is read from the first one listed.
    Same reading interface as :class:`CacheReader` (``metadata``, ``ids``,
    ``batch``, ``get``, ``check_compatible``), so :class:`~speech_kd.targets.CachedTargets`
    takes either.

    Parameters
    ----------
    out_dirs : sequence of path-like
        Cache folders written by :func:`write_cache`.
    """

    _SAME = ("teacher_fingerprint", "teacher_tokens", "blank_index", "frame_shift", "sample_rate")

    def __init__(self, out_dirs: Sequence[str | os.PathLike]) -> None:
        self.readers = [CacheReader(d) for d in out_dirs]
        if not self.readers:
            raise CacheError("CacheUnion needs at least one cache folder")
        first = self.readers[0]
        for other in self.readers[1:]:
            diffs = _differences(other._meta, {key: first._meta.get(key) for key in self._SAME})
            if diffs:
                raise CacheError(f"caches {first.out_dir} and {other.out_dir} were made by different teachers or "
                                 "settings: " + "; ".join(diffs))  # fmt: skip
        self.out_dir = ",".join(str(r.out_dir) for r in self.readers)
        self.vocab_size = first.vocab_size
        self.blank_index = first.blank_index
        self._owner: dict[str, CacheReader] | None = None

    def _owners(self) -> dict[str, CacheReader]:
        if self._owner is None:
            self._owner = {}
            for reader in reversed(self.readers):  # the first cache listed wins
                self._owner.update(dict.fromkeys(reader.ids, reader))
        return self._owner

    @property
    def metadata(self) -> dict:
        """The first cache's ``meta.json``, with ``csv`` listing every cache's manifest."""
        meta = self.readers[0].metadata
        meta["csv"] = ", ".join(str(r.metadata.get("csv")) for r in self.readers)
        return meta

    @property
    def ids(self) -> set[str]:
        """Utterance IDs stored in any of the caches."""
        return set(self._owners())

    def __contains__(self, utt_id: object) -> bool:
        return utt_id in self._owners()

    def __len__(self) -> int:
        return len(self._owners())

    def get(self, utt_id: str) -> torch.Tensor:
        """Dense ``[T, V]`` log-posteriors of one utterance, from the cache that holds it."""
        reader = self._owners().get(utt_id)
        if reader is None:
            raise CacheMissError([utt_id], self.out_dir)
        return reader.get(utt_id)

    def batch(self, utt_ids: Sequence[str], device: str | torch.device = "cpu") -> TeacherOutput:
        """Padded targets of several utterances, as :meth:`CacheReader.batch` returns them."""
        owners = self._owners()
        missing = [uid for uid in utt_ids if uid not in owners]
        if missing:
            raise CacheMissError(missing, self.out_dir)
        readers = {id(owners[uid]) for uid in utt_ids}
        if len(readers) == 1:  # the usual case: a batch from one pool
            return owners[utt_ids[0]].batch(utt_ids, device=device)
        rows = [owners[uid].get(uid) for uid in utt_ids]
        longest = max(len(row) for row in rows)
        out = torch.full((len(rows), longest, self.vocab_size), PAD_LOG_PROB, dtype=torch.float32)
        out[:, :, self.blank_index] = 0.0
        for i, row in enumerate(rows):
            out[i, : len(row)] = row
        lengths = torch.tensor([len(row) for row in rows], dtype=torch.int64)
        return TeacherOutput(out.to(device), lengths.to(device))

    def check_compatible(self, **kwargs) -> None:
        """:meth:`CacheReader.check_compatible` on every cache."""
        for reader in self.readers:
            reader.check_compatible(**kwargs)


def open_cache(spec: str | os.PathLike) -> CacheReader | CacheUnion:
    """A :class:`CacheReader` for one folder, a :class:`CacheUnion` for comma-separated folders ``A,B,...``."""
    dirs = [part.strip() for part in str(spec).split(",") if part.strip()]
    return CacheReader(dirs[0]) if len(dirs) == 1 else CacheUnion(dirs)
