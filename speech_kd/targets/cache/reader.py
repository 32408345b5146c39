"""Reading a soft-target cache: dense teacher log-posteriors for any batch of utterance IDs."""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from speech_kd.targets.cache.folder import meta_differences, shard_problem
from speech_kd.targets.cache.format import (
    BLOCK_CACHE,
    FORMAT_VERSION,
    HIDDEN_LAYOUT,
    MANIFEST_NAME,
    META_NAME,
    PAD_LOG_PROB,
    SHARD_MAGIC,
    CacheError,
    CacheMissError,
    decode_hidden,
    decode_into,
    decompress_block,
    from_codes,
    hidden_nbytes,
    read_shard_header,
)
from speech_kd.targets.cache.storage import read_json
from speech_kd.targets.teachers.base import TeacherOutput

logger = logging.getLogger(__name__)


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
        self._meta = read_json(self.out_dir / META_NAME)
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
        self._entries: list[dict] = read_json(manifest)["shards"] if manifest.exists() else []
        self.vocab_size = len(self._meta["teacher_tokens"])
        self.blank_index = int(self._meta["blank_index"])
        self._index: dict[str, _Where] | None = None
        self._hidden_at: dict[str, tuple[int, int, int]] = {}
        self._data: dict[str, tuple[float, int]] = {}
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

    def hidden_spec(self) -> dict:
        """What hidden states the cache stores: ``layers``, ``dims``, ``dtype``, ``depth``, ... (``{}``: none).

        From ``meta.json``'s ``scheme.hidden`` (``cache-targets --hidden_layers``). Hidden states of
        another layout than :data:`~speech_kd.targets.cache.format.HIDDEN_LAYOUT` are a :class:`CacheError`.
        """
        spec = dict(self._meta.get("scheme", {}).get("hidden") or {})
        if spec and spec.get("layout") != HIDDEN_LAYOUT:
            raise CacheError(
                f"cache {self.out_dir} stores teacher hidden states in layout {spec.get('layout', 1)}, this code "
                f"reads {HIDDEN_LAYOUT} (int8 scaled per channel and frame): rebuild it into a new folder with "
                "speech-kd cache-targets ... --hidden_layers (docs/cache.md)"
            )
        return spec

    def num_frames(self, utt_id: str) -> int:
        """Teacher frames stored for ``utt_id``."""
        return self._locate([utt_id])[0].frames

    def utt_data(self) -> dict[str, tuple[float, int]]:
        """ID -> ``(duration, audio file bytes)`` each stored utterance was computed from.

        Caches written before these were recorded have none (an empty dict).
        """
        self._where()
        return dict(self._data)

    def _where(self) -> dict[str, _Where]:
        """utt_id -> location, built from the shard headers on first use."""
        if self._index is None:
            index, layout, data, hidden_at = {}, [], {}, {}
            for number, entry in enumerate(self._entries):
                path = self.out_dir / entry["name"]
                size = path.stat().st_size if path.exists() else -1
                if size != entry["bytes"]:
                    raise CacheError(
                        f"{entry['name']}: {size} bytes, {entry['bytes']} listed in {MANIFEST_NAME} "
                        "(truncated or missing; run CacheReader.verify() or rebuild)"
                    )
                header = read_shard_header(path)
                dtype = np.dtype(header["id_dtype"]).newbyteorder("<")
                totals = np.zeros((len(header["blocks"]), 3), dtype=np.int64)  # codes, ids, probs per block
                for uid, block, frames, n_codes, n_ids, n_probs, *source in header["utts"]:
                    if len(source) >= 2:
                        data[uid] = (float(source[0]), int(source[1]))
                    c, i, p = totals[block]
                    index[uid] = _Where(
                        number, block, frames, slice(c, c + n_codes), slice(i, i + n_ids), slice(p, p + n_probs)
                    )
                    totals[block] += (n_codes, n_ids, n_probs)
                start = len(SHARD_MAGIC) + 8 + header["header_bytes"]
                blocks = [(start + offset, size) for offset, size in header["blocks"]]
                layout.append({"blocks": blocks, "totals": totals, "dtype": dtype})
                for row, (offset, size) in zip(header["utts"], header.get("hidden") or []):
                    hidden_at[row[0]] = (number, start + offset, size)
            self._index, self._layout, self._data, self._hidden_at = index, layout, data, hidden_at
        return self._index

    def _shard_map(self, shard: int) -> np.ndarray:
        """The memory map of one shard file (opened once per process)."""
        if self._pid != os.getpid():
            self._maps, self._blocks, self._pid = {}, OrderedDict(), os.getpid()
        if shard not in self._maps:
            self._maps[shard] = np.memmap(self.out_dir / self._entries[shard]["name"], dtype=np.uint8, mode="r")
        return self._maps[shard]

    def hidden(self, utt_id: str, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """Stored hidden states of one utterance: layer -> ``[T, D]`` float32 (teacher frames).

        Raises :class:`CacheError` for a layer the cache does not store or an utterance stored without them.
        """
        spec = self.hidden_spec()
        stored = list(spec.get("layers") or [])
        missing = [layer for layer in layers if layer not in stored]
        if missing:
            raise CacheError(f"cache {self.out_dir} stores no hidden states of teacher layers {missing}")
        (where,) = self._locate([utt_id])
        if utt_id not in self._hidden_at:
            raise CacheError(f"cache {self.out_dir}: {utt_id} was stored without hidden states; rebuild the cache")
        shard, offset, size = self._hidden_at[utt_id]
        name = self._entries[shard]["name"]
        data = decompress_block(self._shard_map(shard)[offset : offset + size], f"{name} hidden states of {utt_id}")
        out, position = {}, 0
        for layer, dim in zip(stored, spec["dims"]):
            size = hidden_nbytes(where.frames, int(dim), spec["dtype"])
            if layer in layers:
                chunk = data[position : position + size]
                out[layer] = torch.from_numpy(decode_hidden(chunk, where.frames, int(dim), spec["dtype"]))
            position += size
        if position != len(data):
            raise CacheError(f"{name}: hidden states of {utt_id} are {len(data)} bytes, {position} expected")
        return out

    def _block(self, shard: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The decompressed ``codes``, ``ids`` and ``probs`` streams of one block (kept for reuse)."""
        shard_map = self._shard_map(shard)
        key = (shard, block)
        if key in self._blocks:
            self._blocks.move_to_end(key)
            return self._blocks[key]
        name = self._entries[shard]["name"]
        lay = self._layout[shard]
        offset, size = lay["blocks"][block]
        data = np.frombuffer(decompress_block(shard_map[offset : offset + size], f"{name} block {block}"), np.uint8)
        n_codes, n_ids, n_probs = (int(n) for n in lay["totals"][block])
        id_bytes = n_ids * lay["dtype"].itemsize
        if len(data) != n_codes + id_bytes + n_probs:
            raise CacheError(f"{name} block {block}: {len(data)} bytes, header says {n_codes + id_bytes + n_probs}")
        streams = (data[:n_codes], data[n_codes : n_codes + id_bytes].view(lay["dtype"]), data[n_codes + id_bytes :])
        self._blocks[key] = streams
        if len(self._blocks) > BLOCK_CACHE:
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
        counts, frame_ids, frame_probs = from_codes(codes[where.codes], ids[where.ids], probs)
        if len(counts) != where.frames:
            name = self._entries[where.shard]["name"]
            raise CacheError(f"{name}: corrupt entry ({len(counts)} frames decoded, {where.frames} listed)")
        decode_into(out, counts, frame_ids, frame_probs)

    def get(self, utt_id: str) -> torch.Tensor:
        """Dense ``[T, V]`` float32 log-posteriors of one utterance (teacher tokens and frame rate)."""
        (where,) = self._locate([utt_id])
        out = np.empty((where.frames, self.vocab_size), dtype=np.float32)
        self._decode_into(out, where)
        return torch.from_numpy(out)

    def batch(
        self, utt_ids: Sequence[str], device: str | torch.device = "cpu", hidden_layers: Sequence[int] = ()
    ) -> TeacherOutput:
        """Padded targets of several utterances, as a teacher would return them.

        Parameters
        ----------
        utt_ids : sequence of str
            Utterance IDs; any missing one raises :class:`CacheMissError` listing them all.
        device : str or torch.device
            Where the returned tensors live.
        hidden_layers : sequence of int
            Teacher layers whose stored hidden states to return too (``TeacherOutput.hiddens``).

        Returns
        -------
        TeacherOutput
            ``log_probs [B, Tmax, V]`` float32 and ``lengths [B]`` int64. Padding
            frames hold the blank token with probability 1: log-prob ``0`` on
            blank and ``log(1e-8)`` (:data:`PAD_LOG_PROB`) elsewhere. Hidden states
            ``[B, Tmax, D]`` are zero on padding frames.
        """
        wheres = self._locate(list(utt_ids))
        longest = max((w.frames for w in wheres), default=0)
        out = np.empty((len(wheres), longest, self.vocab_size), dtype=np.float32)
        for row, where in enumerate(wheres):
            self._decode_into(out[row, : where.frames], where)
            out[row, where.frames :] = PAD_LOG_PROB
            out[row, where.frames :, self.blank_index] = 0.0
        lengths = torch.tensor([w.frames for w in wheres], dtype=torch.int64)
        hiddens = (
            padded_hiddens([self.hidden(uid, hidden_layers) for uid in utt_ids], device) if hidden_layers else None
        )
        return TeacherOutput(torch.from_numpy(out).to(device), lengths.to(device), hiddens)

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
            "teacher_fingerprint": teacher_fingerprint,
            "teacher_tokens": teacher_tokens,
            "data_fingerprint": data_ids_fingerprint,
            "frame_shift": frame_shift,
        }
        wanted = {key: value for key, value in wanted.items() if value is not None}
        if student_tokens is not None and self._meta.get("student_tokens") is not None:
            wanted["student_tokens"] = student_tokens
        diffs = meta_differences(self._meta, wanted)
        if diffs:
            raise CacheError(f"cache {self.out_dir} does not match (cache != given): " + "; ".join(diffs))

    def verify(self) -> list[str]:
        """Recompute each shard's size and sha256; one ``"shard-NNNNN.bin: problem"`` line per bad shard."""
        problems = [shard_problem(self.out_dir / e["name"], e) for e in self._entries]
        return [p for p in problems if p]


class CacheUnion:
    """Several caches of one teacher read as one (``targets_cache: A,B``), e.g. transcribed + untranscribed audio.

    Each folder is a :class:`CacheReader`; they must hold the same teacher
    (fingerprint, tokens, blank, frame shift), which is checked when opened.
    An utterance ID found in several caches is read from the first one listed.
    Same reading interface as :class:`CacheReader` (``metadata``, ``ids``,
    ``batch``, ``get``, ``check_compatible``), so :class:`~speech_kd.targets.strategies.CachedTargets`
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
            diffs = meta_differences(other._meta, {key: first._meta.get(key) for key in self._SAME})
            if diffs:
                raise CacheError(
                    f"caches {first.out_dir} and {other.out_dir} were made by different teachers or "
                    "settings: " + "; ".join(diffs)
                )
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

    def hidden_spec(self) -> dict:
        """The hidden states every cache stores: the first cache's spec, cut to the layers all of them hold.

        ``layers`` and ``dims`` stay in step (each kept layer with its width). Caches of different
        layer lists of the teacher (``stack``) have none in common.
        """
        specs = [reader.hidden_spec() for reader in self.readers]
        if not all(specs) or len({spec.get("stack") for spec in specs}) > 1:
            return {}
        kept = [
            (layer, dim)
            for layer, dim in zip(specs[0]["layers"], specs[0]["dims"])
            if all(layer in spec["layers"] for spec in specs)
        ]
        return {**specs[0], "layers": [layer for layer, _ in kept], "dims": [dim for _, dim in kept]}

    def hidden(self, utt_id: str, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """:meth:`CacheReader.hidden` from the cache that holds ``utt_id``."""
        reader = self._owners().get(utt_id)
        if reader is None:
            raise CacheMissError([utt_id], self.out_dir)
        return reader.hidden(utt_id, layers)

    @property
    def metadata(self) -> dict:
        """The first cache's ``meta.json``, with ``csv`` listing every cache's manifest."""
        meta = self.readers[0].metadata
        meta["csv"] = ", ".join(str(r.metadata.get("csv")) for r in self.readers)
        return meta

    def utt_data(self) -> dict[str, tuple[float, int]]:
        """:meth:`CacheReader.utt_data` of the cache each ID is read from."""
        out: dict[str, tuple[float, int]] = {}
        for reader in reversed(self.readers):  # the first cache listed wins
            out.update(reader.utt_data())
        return out

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

    def batch(
        self, utt_ids: Sequence[str], device: str | torch.device = "cpu", hidden_layers: Sequence[int] = ()
    ) -> TeacherOutput:
        """Padded targets of several utterances, as :meth:`CacheReader.batch` returns them."""
        owners = self._owners()
        missing = [uid for uid in utt_ids if uid not in owners]
        if missing:
            raise CacheMissError(missing, self.out_dir)
        readers = {id(owners[uid]) for uid in utt_ids}
        if len(readers) == 1:  # the usual case: a batch from one pool
            return owners[utt_ids[0]].batch(utt_ids, device=device, hidden_layers=hidden_layers)
        rows = [owners[uid].get(uid) for uid in utt_ids]
        longest = max(len(row) for row in rows)
        out = torch.full((len(rows), longest, self.vocab_size), PAD_LOG_PROB, dtype=torch.float32)
        out[:, :, self.blank_index] = 0.0
        for i, row in enumerate(rows):
            out[i, : len(row)] = row
        lengths = torch.tensor([len(row) for row in rows], dtype=torch.int64)
        hiddens = (
            padded_hiddens([self.hidden(uid, hidden_layers) for uid in utt_ids], device) if hidden_layers else None
        )
        return TeacherOutput(out.to(device), lengths.to(device), hiddens)

    def check_compatible(self, **kwargs) -> None:
        """:meth:`CacheReader.check_compatible` on every cache."""
        for reader in self.readers:
            reader.check_compatible(**kwargs)


def padded_hiddens(rows: list[dict[int, torch.Tensor]], device: str | torch.device) -> dict[int, torch.Tensor]:
    """Per layer, the utterances' ``[T_i, D]`` hidden states as one zero-padded ``[B, Tmax, D]`` on ``device``."""
    out = {}
    for layer in rows[0]:
        longest = max(row[layer].shape[0] for row in rows)
        batch = torch.zeros(len(rows), longest, rows[0][layer].shape[1])
        for i, row in enumerate(rows):
            batch[i, : row[layer].shape[0]] = row[layer]
        out[layer] = batch.to(device)
    return out


def open_cache(spec: str | os.PathLike) -> CacheReader | CacheUnion:
    """A :class:`CacheReader` for one folder, a :class:`CacheUnion` for comma-separated folders ``A,B,...``."""
    dirs = [part.strip() for part in str(spec).split(",") if part.strip()]
    return CacheReader(dirs[0]) if len(dirs) == 1 else CacheUnion(dirs)
