"""The soft-target cache format: the frame encoding, its codes and the shard layout (no file I/O here).

:func:`~speech_kd.targets.cache.write_cache` runs a :class:`~speech_kd.targets.teachers.base.Teacher`
over a CSV manifest and stores a compact copy of its frame posteriors, keyed by
utterance ID; :class:`~speech_kd.targets.cache.CacheReader` turns them back into dense
log-posteriors for any batch. ``docs/cache.md`` describes the format in full
(``meta.json``, ``shards.json``, the shard files) with its measured size.

Storage scheme, per teacher frame with probabilities ``p [V]``: keep the
smallest prefix of the sorted tokens whose probability reaches ``mass``
(default 0.98), at most ``top_k`` (default 8, at most 127); quantise each
kept probability to one byte ``q = round(255 p)``, so ``|q/255 - p| <= 1/510``.
A *certain* frame (its top token alone reaches ``mass``) stores only its
token id (:class:`EncodedFrames`, :func:`encode`). In a shard each utterance
becomes codes (:func:`to_codes`): a byte ``k`` for an uncertain frame, or
``128 + n - 1`` for a run of ``n`` certain frames of one token, stored with a
single id; blocks of ``BLOCK_UTTS`` utterances are zlib-compressed with their
checksum, so a damaged block is an error, never wrong targets.

Reconstruction (:func:`decode`): stored tokens get ``q/255`` (a certain
frame's token 1), the residual ``max(1 - sum q/255, 1e-6)`` is spread over the
other tokens, and the frame is renormalised. With ``m`` the true mass of the
tokens not stored and ``k`` tokens stored, every probability of the frame
satisfies::

    |p_hat - p| <= m + (k + 1) / 510 + 1e-6
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

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
    "scheme", "student_tokens",
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


def utt_data_differs(cached: tuple[float, int] | None, given: tuple[float, int]) -> bool:
    """Whether a cached utterance's ``(duration, audio bytes)`` is not the one ``given`` under the same ID.

    Durations are compared to the millisecond (manifests store three
    decimals); a size of ``-1`` (the file could not be looked at) matches any
    size. An utterance cached before these records existed (``None``) never differs.

    Examples
    --------
    >>> utt_data_differs((2.5, 1000), (2.5004, 1000)), utt_data_differs((2.5, 1000), (2.5, 1200))
    (False, True)
    """
    if cached is None:
        return False
    if abs(float(cached[0]) - float(given[0])) > 0.0015:
        return True
    return -1 not in (int(cached[1]), int(given[1])) and int(cached[1]) != int(given[1])


def describe_data_differences(diffs: list[tuple[str, tuple[float, int], tuple[float, int]]], given: str) -> str:
    """``N utterance(s) ...: ID (cache 2.100 s 33644 bytes != GIVEN 3.000 s 48044 bytes), ...`` (first five)."""
    shown = ", ".join(
        f"{uid} (cache {c[0]:.3f} s {c[1]} bytes != {given} {g[0]:.3f} s {g[1]} bytes)" for uid, c, g in diffs[:5]
    )
    more = ", ..." if len(diffs) > 5 else ""
    return f"{len(diffs)} utterance(s) with other audio under the same ID: {shown}{more}"


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


def _shard_pieces(
    utts: list[tuple[str, EncodedFrames]], vocab_size: int, data: dict[str, tuple[float, int]] | None = None
) -> list[bytes]:
    """The bytes of one shard file holding ``utts`` (layout in the module docstring).

    ``data`` maps an utterance ID to the ``(duration, audio file bytes)`` it
    was computed from, appended to its header row (:func:`utt_data_differs`).
    """
    dtype = id_dtype(vocab_size).newbyteorder("<")
    rows, blocks = [], []
    data = data or {}
    for first in range(0, len(utts), BLOCK_UTTS):
        streams: tuple[list, list, list] = ([], [], [])
        for uid, enc in utts[first : first + BLOCK_UTTS]:
            codes, ids = to_codes(enc)
            row = [uid, len(blocks), enc.num_frames, len(codes), len(ids), len(enc.probs)]
            if uid in data:
                row += [round(float(data[uid][0]), 3), int(data[uid][1])]
            rows.append(row)
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
