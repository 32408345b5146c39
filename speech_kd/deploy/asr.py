"""An exported folder as ``speech-kd evaluate`` and ``speech-kd bench`` run models: ``transcribe_batch``.

The transcription itself is :class:`speech_kd.deploy.runtime.ExportedASR`,
the code the folder's ``transcribe.py`` runs, so what is scored is what ships.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from speech_kd.deploy.runtime import (
    AUTO_CHUNK_SECONDS,
    CONFIG_NAME,
    CONTEXT_SECONDS,
    LONG_SECONDS,
    MAX_BATCH_SECONDS,
    ExportedASR,
    greedy_decode,
)

__all__ = ["DeployedASR", "is_exported_folder"]


def is_exported_folder(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` was written by ``speech-kd export`` (it holds ``deploy.json``)."""
    return (Path(folder) / CONFIG_NAME).is_file()


class DeployedASR:
    """``transcribe_batch(wavs [B, S], wav_lens [B])`` over an exported folder, like SpeechBrain's ``EncoderASR``.

    Parameters
    ----------
    folder : str or os.PathLike
        What ``speech-kd export`` wrote.
    threads : int, optional
        Runtime threads (default: ``torch.get_num_threads()``, what a PyTorch model in this process uses).
    blank_penalty : float, optional
        Replaces the folder's blank penalty at decoding.
    chunk_seconds : float, optional
        > 0: each utterance is transcribed in consecutive chunks of this many seconds
        (:meth:`~speech_kd.deploy.runtime.ExportedASR.transcribe_long`), to measure what chunking costs;
        0: each whole; ``None`` (default): as ``transcribe.py``, utterances over ``LONG_SECONDS`` (60) in
        ``AUTO_CHUNK_SECONDS`` (20) chunks, shorter ones whole (bounded memory).
    context_seconds : float, optional
        Audio before and after each chunk that the network also reads (default ``CONTEXT_SECONDS``, 2; 0: none).
    max_batch_seconds : float, optional
        Padded audio per network run (``ExportedASR``'s; 0: a batch in one run).
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        threads: int | None = None,
        blank_penalty: float | None = None,
        chunk_seconds: float | None = None,
        context_seconds: float | None = None,
        max_batch_seconds: float = MAX_BATCH_SECONDS,
    ) -> None:
        self.chunk_seconds = chunk_seconds
        self.context_seconds = CONTEXT_SECONDS if context_seconds is None else context_seconds
        threads = torch.get_num_threads() if threads is None else threads
        self.runtime = ExportedASR(
            folder,
            threads=threads,
            blank_penalty=blank_penalty,
            max_batch_seconds=max_batch_seconds,
            lm="",  # evaluate decodes itself (scoring.decoding): greedy unless asked, even with the folder's LM
        )
        self.sample_rate = self.runtime.sample_rate
        self.tokens = self.runtime.tokens
        self.exported_params = int(self.runtime.config.get("params") or 0)

    def log_probs_batch(self, wavs: torch.Tensor, wav_lens: torch.Tensor) -> list[torch.Tensor]:
        """Per-utterance ``[T', V]`` log-probabilities of padded ``wavs [B, S]`` (``wav_lens`` relative)."""
        lengths = torch.round(wav_lens * wavs.shape[1]).long().tolist()
        arrays = [wavs[i, :n].detach().cpu().float().numpy() for i, n in enumerate(lengths)]
        return [torch.from_numpy(lp) for lp in self.runtime.log_probs(arrays)]

    def transcribe_batch(self, wavs: torch.Tensor, wav_lens: torch.Tensor) -> tuple[list[str], list[list[int]]]:
        """Words and token ids of padded ``wavs [B, S]`` with relative lengths ``wav_lens [B]``."""
        lengths = torch.round(wav_lens * wavs.shape[1]).long().tolist()
        if self.chunk_seconds is None and max(lengths, default=0) > LONG_SECONDS * self.sample_rate:
            # automatic: long utterances in chunks, one at a time (batches are length-sorted: they are together)
            texts = [
                self.runtime.transcribe_long(
                    wavs[i, :n].cpu().float().numpy(), AUTO_CHUNK_SECONDS, self.context_seconds
                )
                if n > LONG_SECONDS * self.sample_rate
                else self.transcribe_batch(wavs[i : i + 1, :n], torch.ones(1))[0][0]
                for i, n in enumerate(lengths)
            ]
            return texts, [[] for _ in texts]
        if self.chunk_seconds:
            chunked = [
                self.runtime.transcribe_long(
                    wavs[i, :n].cpu().float().numpy(), self.chunk_seconds, self.context_seconds
                )
                for i, n in enumerate(lengths)
            ]
            return chunked, [[] for _ in chunked]
        ids = [
            greedy_decode(lp.numpy(), self.runtime.blank_index, self.runtime.blank_penalty)
            for lp in self.log_probs_batch(wavs, wav_lens)
        ]
        return [self.runtime.text(row) for row in ids], ids
