"""Reading audio files with checks that name the file and the problem.

``torchaudio.load`` needs torchcodec, which is not dependable here, so audio
is read with soundfile. Every failure is an :class:`AudioError` whose message
starts with the path, so a bad file in a 100k-utterance corpus is found at
once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import torch

__all__ = ["AudioError", "AudioInfo", "probe_audio", "read_audio"]


class AudioError(ValueError):
    """An audio file that cannot be used, with the path and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass(frozen=True)
class AudioInfo:
    """Header facts about an audio file."""

    path: str
    sample_rate: int
    channels: int
    frames: int

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return self.frames / self.sample_rate


def probe_audio(path: str | os.PathLike, sample_rate: int | None = None, channels: int | None = 1) -> AudioInfo:
    """Read an audio header and check it; raise :class:`AudioError` when unusable.

    Parameters
    ----------
    path : path-like
        Audio file (any format libsndfile reads: FLAC, WAV, OGG, ...).
    sample_rate : int, optional
        Required sample rate; ``None`` accepts any.
    channels : int, optional
        Required channel count; ``None`` accepts any.
    """
    if not os.path.exists(path):
        raise AudioError(path, "file does not exist")
    if os.path.getsize(path) == 0:
        raise AudioError(path, "empty file (0 bytes)")
    try:
        info = sf.info(str(path))
    except Exception as err:  # soundfile raises several types for corrupt data
        raise AudioError(path, f"unreadable audio ({err.__class__.__name__}: {err})") from err
    if info.frames <= 0:
        raise AudioError(path, "empty audio (0 samples)")
    _check_decodes(path, info.frames)
    if sample_rate is not None and info.samplerate != sample_rate:
        raise AudioError(path, f"sample rate {info.samplerate} Hz, expected {sample_rate} Hz")
    if channels is not None and info.channels != channels:
        raise AudioError(path, f"{info.channels} channels, expected {channels}")
    return AudioInfo(str(path), info.samplerate, info.channels, info.frames)


#: samples decoded at each end of a file by :func:`probe_audio` (a few ms of work per file)
PROBE_SAMPLES = 4096


def _check_decodes(path: str | os.PathLike, frames: int) -> None:
    """Decode the first and the last :data:`PROBE_SAMPLES` samples: a header alone does not show truncation.

    A FLAC cut short (a copy that stopped, a full disk) still has a header
    announcing all its samples; it fails only when the decoder reaches the
    missing part, which without this check happened mid-epoch in training.
    """
    wanted = min(PROBE_SAMPLES, frames)
    try:
        with sf.SoundFile(str(path)) as fh:
            head = fh.read(wanted, dtype="float32")
            fh.seek(frames - wanted)
            tail = fh.read(wanted, dtype="float32")
    except Exception as err:  # soundfile raises several types for corrupt data
        raise AudioError(path, f"corrupt or truncated audio ({err.__class__.__name__}: {err})") from err
    if len(head) < wanted or len(tail) < wanted:
        raise AudioError(path, f"truncated audio: the header announces {frames} samples, fewer could be decoded")


def read_audio(path: str | os.PathLike, sample_rate: int | None = None) -> torch.Tensor:
    """Read a file as a mono float32 waveform ``[samples]``.

    Multi-channel audio is averaged to mono. When ``sample_rate`` is given
    and differs from the file's, the signal is resampled (band-limited sinc,
    ``torchaudio.functional.resample``), so models always see their own rate.
    """
    if not os.path.exists(path):
        raise AudioError(path, "file does not exist")
    try:
        data, file_rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as err:
        raise AudioError(path, f"unreadable audio ({err.__class__.__name__}: {err})") from err
    if data.shape[0] == 0:
        raise AudioError(path, "empty audio (0 samples)")
    if not np.isfinite(data).all():
        raise AudioError(path, "audio contains NaN or infinite samples")
    wav = torch.from_numpy(data.mean(axis=1))
    if sample_rate is not None and file_rate != sample_rate:
        import torchaudio.functional as AF

        wav = AF.resample(wav, file_rate, sample_rate)
    return wav
