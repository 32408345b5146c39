"""The soft-target cache format: the frame encoding, its codes and the shard layout (no file I/O here).

:func:`~speech_kd.targets.cache.write_cache` runs a :class:`~speech_kd.targets.teachers.base.Teacher`
over a CSV manifest and stores a compact copy of its frame posteriors, keyed by
utterance ID; :class:`~speech_kd.targets.cache.CacheReader` turns them back into dense
log-posteriors for any batch. ``docs/cache.md`` describes the format in full
(``meta.json``, ``shards.json``, the shard files) with its measured size.

Storage scheme, per teacher frame with probabilities ``p [V]`` sorted high to
low: keep the smallest prefix of tokens that holds ``mass`` (default 0.98) of
the distribution *softened at* ``max_temperature`` (``softmax(log p / T)``;
default 1), at most ``top_k`` (default 8, at most 127). The cache is meant
for KD at temperatures up to ``max_temperature``: softening raises the tail,
so a cache for ``T = 2`` keeps more tokens per frame (``distill`` refuses a
higher temperature than the cache's). Store the kept token ids, one byte per
kept token after the first (its probability in the log domain, :func:`to_byte`:
steps of ``LOG_STEP`` nats down to 1e-8, a relative error within 3.7 %), and one
byte for the true mass of every token *not* kept (the residual, in steps of
``RESIDUAL_STEPS * LOG_STEP``: within 15.6 %). The first token's probability is implied (one minus the rest), so a
frame of one confident token costs an id and one byte. In a shard each
utterance becomes codes (:func:`to_codes`): a byte ``k`` (2..127) for a frame
of ``k`` kept tokens, or ``128 + n - 1`` for a run of ``n`` one-token frames
with the same id and residual byte, stored once; blocks of ``BLOCK_UTTS``
utterances are zlib-compressed with their checksum, so a damaged block is an
error, never wrong targets.

Teacher hidden states (optional, for layer distillation: ``cache-targets --hidden_layers``) are
stored per utterance after the posterior blocks, one zlib chunk per utterance holding each stored
layer's frames (:func:`encode_hidden`): ``int8`` (one byte per value, scaled by an fp16 scale per
channel times one per frame) or ``fp16``. Which layers, their widths, the encoding and the layout
(:data:`HIDDEN_LAYOUT`) are in ``meta.json``'s ``scheme.hidden``; readers that do not know them read
the posteriors as before.

Reconstruction (:func:`decode`): kept tokens get their stored probabilities,
the residual is spread evenly over the tokens not kept (at least
``RESIDUAL_FLOOR`` in all), the first token takes what is left, and the frame
is renormalised. The residual's *size* is exact to 15.6 %; only its shape
over the unkept tokens is lost, and the tokens were chosen so that it holds
at most ``1 - mass`` of the softened distribution. Measured on the shipped
teacher (``docs/cache.md``, with the command): per-frame ``T^2 KL(teacher ||
decoded)`` and bytes per frame for each ``max_temperature``.
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


FORMAT_VERSION = 3
#: nats per step of a probability byte: 254 steps from probability 1 down to 1e-8 (byte 255: zero)
LOG_STEP = math.log(1e8) / 254
ZERO_BYTE = 255
#: the residual byte is a multiple of this many steps (0.29 nats, its size within 15.6 %): runs of confident
#: frames then share it (docs/cache.md measures what it saves and costs)
RESIDUAL_STEPS = 4
#: least total probability spread over the tokens not kept
RESIDUAL_FLOOR = 1e-8
#: the largest temperature a cache is built for unless told otherwise
DEFAULT_MAX_TEMPERATURE = 1.0
#: log-probability of the non-blank tokens on padding frames (blank gets 0)
PAD_LOG_PROB = math.log(1e-8)
SHARD_MAGIC = b"SKDCACH3"
#: utterances per compressed block of a shard
BLOCK_UTTS = 16
#: longest run of one-token frames one code byte holds
MAX_RUN = 128
#: decoded blocks kept per reader process
BLOCK_CACHE = 64
#: encodings of stored hidden states (:func:`encode_hidden`)
HIDDEN_DTYPES = ("int8", "fp16")
#: layout of stored hidden states, ``scheme.hidden["layout"]``: 2, int8 scaled per channel and per frame
#: (:func:`encode_hidden`). The unreleased layout before it (one int8 scale per frame, no ``layout``) is
#: refused, to be rebuilt
HIDDEN_LAYOUT = 2
META_NAME = "meta.json"
MANIFEST_NAME = "shards.json"
SHARD_PATTERN = "shard-{:05d}.bin"
_TINY = 1e-30  # probabilities are clamped here before a log
#: meta.json keys that must agree before a rerun may add to a folder
IDENTITY_KEYS = (
    "format_version",
    "teacher_fingerprint",
    "teacher_tokens",
    "blank_index",
    "frame_shift",
    "sample_rate",
    "scheme",
    "student_tokens",
)


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
        ``[T]`` uint8: tokens kept per frame (1..127).
    ids : np.ndarray
        ``[E]`` uint8 or uint16 token ids, most probable first, ``E = sum(counts)``.
    probs : np.ndarray
        ``[E]`` uint8: per frame, the probability bytes of its kept tokens
        after the first, then its residual byte (:func:`to_byte`).
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


def check_scheme(top_k: int, mass: float, max_temperature: float = DEFAULT_MAX_TEMPERATURE) -> None:
    """Refuse storage settings outside their ranges (:class:`CacheError`, one line)."""
    if not 1 <= top_k <= 127:
        raise CacheError(f"top_k must be in 1..127, got {top_k}")
    if not 0.0 < mass <= 1.0:
        raise CacheError(f"mass must be in (0, 1], got {mass}")
    if not (math.isfinite(max_temperature) and max_temperature > 0):
        raise CacheError(f"max_temperature must be a positive number, got {max_temperature}")


def to_byte(log_probs: torch.Tensor) -> torch.Tensor:
    """Log-domain probability bytes: ``round(-log p / LOG_STEP)`` in 0..254, ``ZERO_BYTE`` below 1e-8.

    Examples
    --------
    >>> to_byte(torch.log(torch.tensor([1.0, 0.01, 1e-12]))).tolist()
    [0, 64, 255]
    """
    steps = torch.floor(-log_probs.double() / LOG_STEP + 0.5)
    return torch.where(steps > ZERO_BYTE - 1, torch.full_like(steps, ZERO_BYTE), steps.clamp(min=0)).to(torch.uint8)


def residual_byte(log_mass: torch.Tensor) -> torch.Tensor:
    """The residual's byte: :func:`to_byte` rounded to a multiple of ``RESIDUAL_STEPS``.

    Examples
    --------
    >>> residual_byte(torch.log(torch.tensor([0.01, 0.0]))).tolist()
    [64, 255]
    """
    byte = to_byte(log_mass).to(torch.int64)
    coarse = (torch.floor(byte.double() / RESIDUAL_STEPS + 0.5) * RESIDUAL_STEPS).clamp(max=ZERO_BYTE - 3)
    return torch.where(byte == ZERO_BYTE, byte, coarse.to(torch.int64)).to(torch.uint8)


def from_byte(codes: np.ndarray) -> np.ndarray:
    """Probabilities (float64) of log-domain bytes; ``ZERO_BYTE`` is 0."""
    codes = codes.astype(np.float64)
    return np.where(codes >= ZERO_BYTE, 0.0, np.exp(-codes * LOG_STEP))


def encode(
    log_probs: torch.Tensor, top_k: int = 8, mass: float = 0.98, max_temperature: float = DEFAULT_MAX_TEMPERATURE
) -> EncodedFrames:
    """Compress ``[T, V]`` log-posteriors of one utterance (see the module docstring).

    Parameters
    ----------
    log_probs : torch.Tensor
        ``[T, V]`` log-probabilities (renormalised here), on any device.
    top_k : int
        Most tokens kept per frame (1..127).
    mass : float
        Share of the distribution softened at ``max_temperature`` that the kept tokens hold.
    max_temperature : float
        The largest KD temperature the cache is for.

    Returns
    -------
    EncodedFrames
        The per-frame counts, token ids and probability bytes.
    """
    check_scheme(top_k, mass, max_temperature)
    if log_probs.dim() != 2:
        raise CacheError(f"encode expects [T, V] log-probs, got shape {tuple(log_probs.shape)}")
    num_tokens = log_probs.shape[1]
    k = min(top_k, num_tokens)
    lp = torch.log_softmax(log_probs.double(), dim=-1)
    sorted_lp, order = lp.sort(dim=-1, descending=True)
    softened = torch.softmax(sorted_lp / max_temperature, dim=-1)
    left_out = 1.0 - softened.cumsum(-1)  # softened mass not held by the first j + 1 tokens
    kept = ((left_out[:, : k - 1] > 1.0 - mass + 1e-12).sum(-1) + 1).clamp(max=k)  # [T]
    position = torch.arange(num_tokens, device=lp.device)[None, :]
    keep = position < kept[:, None]
    residual = torch.logsumexp(sorted_lp.masked_fill(keep, float("-inf")), dim=-1)  # [T], -inf when all kept
    token_bytes = to_byte(sorted_lp)
    # per frame: bytes of kept tokens 2..k, then the residual byte
    body = keep & (position > 0)
    per_frame = torch.cat([token_bytes.masked_fill(~body, 0), residual_byte(residual)[:, None]], dim=1)
    stored = torch.cat([body, torch.ones_like(kept, dtype=torch.bool)[:, None]], dim=1)
    return EncodedFrames(
        counts=kept.to(torch.uint8).cpu().numpy(),
        ids=order[keep].cpu().numpy().astype(id_dtype(num_tokens)),
        probs=per_frame[stored].cpu().numpy().astype(np.uint8),
    )


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
    n = counts.astype(np.int64)
    total_entries = int(n.sum())
    if (n < 1).any() or len(ids) != total_entries or len(probs) != total_entries:
        raise CacheError(
            f"corrupt entry: {len(counts)} frames need {total_entries} ids and probability bytes, "
            f"found {len(ids)} / {len(probs)}"
        )
    if len(ids) and int(ids.max()) >= vocab_size:
        raise CacheError(f"corrupt entry: token id {int(ids.max())} outside the {vocab_size}-token vocabulary")
    frame = np.repeat(np.arange(len(n)), n)
    starts = np.cumsum(n) - n
    position = np.arange(total_entries) - np.repeat(starts, n)
    values = from_byte(probs)
    residual = values[starts + n - 1]  # the last byte of each frame
    # entry j > 0 of a frame reads byte j - 1 of the frame; entry 0 (the first token) is implied
    entry_p = np.where(position > 0, values[np.maximum(np.arange(total_entries) - 1, 0)], 0.0)
    others = vocab_size - n
    residual = np.where(others > 0, np.maximum(residual, RESIDUAL_FLOOR), 0.0)
    second = np.zeros(len(n))
    has_second = n > 1
    second[has_second] = entry_p[starts[has_second] + 1]
    first = np.maximum(1.0 - np.bincount(frame, weights=entry_p, minlength=len(n)) - residual, second)
    entry_p[starts] = np.maximum(first, 1e-30)
    total = np.bincount(frame, weights=entry_p, minlength=len(n)) + residual
    log_total = np.log(total)
    log_fill = np.log(np.maximum(residual / np.maximum(others, 1), _TINY)) - log_total
    log_entry = np.log(np.maximum(entry_p, _TINY)) - log_total[frame]
    return frame, ids.astype(np.int64), log_entry, log_fill


def decode_into(out: np.ndarray, counts: np.ndarray, ids: np.ndarray, probs: np.ndarray) -> None:
    """Write the dense log-probabilities of stored frames into ``out [T, V]`` (float32, e.g. a batch row)."""
    frame, tokens, log_entry, log_fill = _log_parts(counts, ids, probs, out.shape[1])
    out[:] = log_fill[:, None]
    out[frame, tokens] = log_entry


def decode(encoded: EncodedFrames, vocab_size: int) -> torch.Tensor:
    """Dense ``[T, V]`` float32 log-probabilities of one encoded utterance (module docstring)."""
    out = np.empty((encoded.num_frames, vocab_size), dtype=np.float32)
    decode_into(out, encoded.counts, encoded.ids, encoded.probs)
    return torch.from_numpy(out)


def to_codes(enc: EncodedFrames) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run-length code one utterance: ``codes [C]`` uint8 and the ids and probability bytes they use.

    A frame of ``k >= 2`` tokens keeps its code ``k``, its ``k`` ids and ``k``
    bytes; consecutive one-token frames with the same id and residual byte
    become one code ``128 + n - 1`` (``n <= 128``), one id and one byte.

    Examples
    --------
    >>> enc = EncodedFrames(np.array([1, 1, 1, 2, 1], np.uint8), np.array([0, 0, 0, 5, 7, 0], np.uint8),
    ...                     np.array([9, 9, 9, 40, 12, 9], np.uint8))
    >>> codes, ids, probs = to_codes(enc)
    >>> codes.tolist(), ids.tolist(), probs.tolist()
    ([130, 2, 128], [0, 5, 7, 0], [9, 40, 12, 9])
    """
    counts = enc.counts.astype(np.int64)
    frames = len(counts)
    if frames == 0:
        return np.zeros(0, np.uint8), enc.ids[:0], enc.probs[:0]
    first = np.cumsum(counts) - counts
    single = counts == 1
    same = np.zeros(frames, dtype=bool)
    same[1:] = (
        single[1:]
        & single[:-1]
        & (enc.ids[first[1:]] == enc.ids[first[:-1]])
        & (enc.probs[first[1:]] == enc.probs[first[:-1]])
    )
    run_start = np.flatnonzero(~same)
    pos = np.arange(frames) - np.repeat(run_start, np.diff(np.append(run_start, frames)))
    opens = ~same | (pos % MAX_RUN == 0)  # a frame that starts a code
    starts = np.flatnonzero(opens)
    lengths = np.diff(np.append(starts, frames))
    codes = np.where(single[starts], 127 + lengths, counts[starts]).astype(np.uint8)
    kept = np.repeat(opens, counts)
    return codes, enc.ids[kept], enc.probs[kept]


def from_codes(codes: np.ndarray, ids: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of :func:`to_codes`: per-frame ``counts`` and the ids and bytes of every frame.

    Raises :class:`CacheError` when the codes do not fit the number of ids
    and probability bytes stored with them.
    """
    codes = codes.astype(np.int64)
    run = codes >= 128
    frames_per_code = np.where(run, codes - 127, 1)
    entries_per_code = np.where(run, 1, codes)
    if (codes < 2).any() or int(entries_per_code.sum()) != len(ids) or len(ids) != len(probs):
        raise CacheError(
            f"corrupt entry: {len(codes)} codes do not match {len(ids)} ids and {len(probs)} probability bytes"
        )
    counts = np.repeat(np.where(run, 1, codes), frames_per_code).astype(np.uint8)
    repeats = np.repeat(np.where(run, frames_per_code, 1), entries_per_code)
    return counts, np.repeat(ids, repeats), np.repeat(probs, repeats)


# --------------------------------------------------------------------------- hidden states


def hidden_nbytes(frames: int, dim: int, dtype: str) -> int:
    """Bytes of one utterance's ``[frames, dim]`` layer, uncompressed (:func:`encode_hidden`).

    ``int8``: ``2 dim`` (the channel scales) ``+ frames * (dim + 2)`` (a byte per value, a frame scale);
    ``fp16``: ``2 frames dim``.

    Examples
    --------
    >>> hidden_nbytes(100, 144, "int8"), hidden_nbytes(100, 144, "fp16")
    (14888, 28800)
    """
    if dtype == "int8":
        return 2 * dim + frames * (dim + 2)
    if dtype == "fp16":
        return 2 * frames * dim
    raise CacheError(f"hidden_dtype must be one of {', '.join(HIDDEN_DTYPES)}, not {dtype!r}")


def _as_stored_fp16(values: torch.Tensor) -> torch.Tensor:
    """``values`` rounded to fp16 as the file stores them (clamped to its largest finite value), as float32."""
    return values.clamp(max=65504.0).half().float()


def _divide_or_zero(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``values / scale`` (broadcast), 0 where the scale is 0 (an all-zero channel or frame)."""
    return torch.where(scale > 0, values / scale.clamp(min=1e-30), torch.zeros_like(values))


def encode_hidden(hidden: torch.Tensor, dtype: str = "int8") -> bytes:
    """One utterance's ``[T, D]`` hidden states of one layer as bytes (little-endian).

    ``int8``: a rank-1 scale per value, ``a_t * b_c``. First ``D`` fp16 channel scales
    ``b_c = max_t |x[t, c]|``, then ``T`` fp16 frame scales ``a_t = max_c |x[t, c] / b_c| / 127``, then
    ``q = round(x / (a_t b_c))`` as int8 (``T * D``): a value's error is at most ``a_t b_c / 2``, half a
    step of its own channel's range in its frame. The channel scale is what one scale per frame
    lacked: a transformer layer's few huge channels (wav2vec2 / HuBERT keep some at hundreds of times
    the others) set a per-frame step that rounded every other channel to 0; here each channel is
    measured against its own largest value. ``fp16``: the values as half floats (relative error 2^-11).

    Examples
    --------
    >>> x = torch.tensor([[1.0, -0.5, 0.25], [0.0, 0.0, 0.0]])
    >>> len(encode_hidden(x)), len(encode_hidden(x, "fp16"))
    (16, 12)
    >>> decode_hidden(encode_hidden(x), 2, 3).round(decimals=2).tolist()
    [[1.0, -0.5, 0.25], [0.0, 0.0, 0.0]]
    """
    values = hidden.detach().to("cpu", torch.float32)
    hidden_nbytes(*values.shape, dtype)  # refuses an unknown dtype
    if dtype == "fp16":
        return values.numpy().astype("<f2").tobytes()
    channel = _as_stored_fp16(values.abs().amax(0))  # [D] b_c
    relative = _divide_or_zero(values, channel)  # [T, D], |.| <= 1 up to b_c's rounding
    frame = _as_stored_fp16(relative.abs().amax(-1) / 127.0)  # [T] a_t
    quantised = torch.round(_divide_or_zero(relative, frame[:, None])).clamp(-127, 127).to(torch.int8)
    return b"".join(
        (channel.numpy().astype("<f2").tobytes(), frame.numpy().astype("<f2").tobytes(), quantised.numpy().tobytes())
    )


def decode_hidden(data: bytes | memoryview | np.ndarray, frames: int, dim: int, dtype: str = "int8") -> np.ndarray:
    """Inverse of :func:`encode_hidden`: ``[frames, dim]`` float32."""
    buffer = np.frombuffer(data, dtype=np.uint8)
    if len(buffer) != hidden_nbytes(frames, dim, dtype):
        raise CacheError(f"corrupt hidden states: {len(buffer)} bytes for {frames} frames of {dim} values ({dtype})")
    if dtype == "fp16":
        return buffer.view("<f2").astype(np.float32).reshape(frames, dim)
    channel = buffer[: 2 * dim].view("<f2").astype(np.float32)
    frame = buffer[2 * dim : 2 * (dim + frames)].view("<f2").astype(np.float32)
    values = buffer[2 * (dim + frames) :].view(np.int8).astype(np.float32).reshape(frames, dim)
    return values * frame[:, None] * channel[None, :]


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


def compress_block(data: bytes) -> bytes:
    """A block or a shard header in zlib format: DEFLATE plus an Adler-32 checksum, so damage is caught when read."""
    return zlib.compress(data, 9)


def decompress_block(data: bytes | memoryview, where: str) -> bytes:
    """A zlib block decompressed; damage is a :class:`CacheError` naming ``where``."""
    try:
        return zlib.decompress(data)
    except zlib.error as err:
        raise CacheError(
            f"{where}: damaged compressed block ({err}); run CacheReader.verify() or rebuild the cache"
        ) from err


def shard_pieces(
    utts: list[tuple[str, EncodedFrames]],
    vocab_size: int,
    data: dict[str, tuple[float, int]] | None = None,
    hidden: dict[str, bytes] | None = None,
) -> list[bytes]:
    """The bytes of one shard file holding ``utts`` (layout in the module docstring).

    ``data`` maps an utterance ID to the ``(duration, audio file bytes)`` it
    was computed from, appended to its header row (:func:`utt_data_differs`).
    ``hidden`` maps every utterance ID to its hidden states (the stored layers' :func:`encode_hidden`
    bytes, one after the other): each is compressed on its own and placed after the posterior
    blocks, its ``[offset, bytes]`` in the header's ``hidden`` list (in the order of ``utts``).
    """
    dtype = id_dtype(vocab_size).newbyteorder("<")
    rows, blocks = [], []
    data = data or {}
    for first in range(0, len(utts), BLOCK_UTTS):
        streams: tuple[list, list, list] = ([], [], [])
        for uid, enc in utts[first : first + BLOCK_UTTS]:
            codes, ids, probs = to_codes(enc)
            row = [uid, len(blocks), enc.num_frames, len(codes), len(ids), len(probs)]
            if uid in data:
                row += [round(float(data[uid][0]), 3), int(data[uid][1])]
            rows.append(row)
            for stream, part in zip(streams, (codes, ids.astype(dtype), probs)):
                stream.append(part.tobytes())
        blocks.append(compress_block(b"".join(b"".join(stream) for stream in streams)))
    header = {"frames": sum(enc.num_frames for _, enc in utts), "id_dtype": id_dtype(vocab_size).name, "utts": rows}
    posterior_blocks = len(blocks)
    if hidden is not None:
        blocks += [compress_block(hidden[uid]) for uid, _ in utts]
    offsets = np.cumsum([0] + [len(b) for b in blocks])[:-1].tolist()  # from the end of the header
    places = [[offset, len(block)] for offset, block in zip(offsets, blocks)]
    header["blocks"] = places[:posterior_blocks]
    if hidden is not None:
        header["hidden"] = places[posterior_blocks:]
    blob = compress_block(json.dumps(header, separators=(",", ":")).encode())
    return [SHARD_MAGIC, np.uint64(len(blob)).astype("<u8").tobytes(), blob, *blocks]


def read_shard_header(path: Path) -> dict:
    """The JSON header of a shard file (raises :class:`CacheError` naming it when unreadable)."""
    try:
        with open(path, "rb") as fh:
            magic = fh.read(len(SHARD_MAGIC))
            if magic != SHARD_MAGIC:
                old = (
                    " (a cache of an older format: rebuild it with speech-kd cache-targets)"
                    if magic.startswith(SHARD_MAGIC[:7])
                    else ""
                )
                raise CacheError(f"{path.name}: not a cache shard (bad magic {magic!r}){old}")
            (size,) = np.frombuffer(fh.read(8), dtype="<u8")
            header = json.loads(zlib.decompress(fh.read(int(size))))
            header["header_bytes"] = int(size)
    except (OSError, ValueError, zlib.error) as err:
        raise CacheError(f"{path.name}: unreadable shard header ({err.__class__.__name__}: {err})") from err
    return header
