"""Soft-target cache: run the teacher once, read its posteriors for many epochs.

:func:`write_cache` (``speech-kd cache-targets``) runs a teacher over a CSV
manifest and stores a compact copy of its frame posteriors, keyed by utterance
ID (and, with ``hidden_layers``, chosen encoder layers' hidden states for layer
distillation); :class:`CacheReader` turns them back into dense log-posteriors for any
batch. One module per job:

- :mod:`speech_kd.targets.cache.format`: the frame encoding (top-k tokens, one byte per
  probability, runs of certain frames), its error bound and the shard layout;
- :mod:`speech_kd.targets.cache.storage`: crash-safe writes (temp file, fsync, rename);
- :mod:`speech_kd.targets.cache.folder`: a cache folder's metadata, the manifest it is
  written from, and the checks a rerun makes before adding to it;
- :mod:`speech_kd.targets.cache.writer`: the resumable writer and its checks;
- :mod:`speech_kd.targets.cache.reader`: the memory-mapped reader, several caches read as one.
"""

from speech_kd.targets.cache.format import (
    FORMAT_VERSION,
    PAD_LOG_PROB,
    CacheError,
    CacheMissError,
    EncodedFrames,
    data_fingerprint,
    decode,
    decode_into,
    encode,
)
from speech_kd.targets.cache.reader import CacheReader, CacheUnion, open_cache
from speech_kd.targets.cache.writer import cache_targets, write_cache

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
