"""Evaluate a model folder: WER/CER (jiwer), parameters and real-time factor.

The model is loaded exactly as a user would, with SpeechBrain's
``EncoderASR`` and network access disabled, so what is measured is what ships.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from tqdm import tqdm

from speech_kd.data.audio import AudioError, read_audio
from speech_kd.data.dataio import read_csv_rows, token_strings
from speech_kd.data.prepare import prepare_split
from speech_kd.deploy.asr import DeployedASR, is_exported_folder
from speech_kd.deploy.runtime import (
    AUTO_CHUNK_SECONDS,
    CONTEXT_SECONDS,
    LONG_SECONDS,
    MIN_SAMPLE_RATE,
    chunk_windows,
)
from speech_kd.kd.losses import collapse_greedy
from speech_kd.model_folder import count_parameters, load_asr
from speech_kd.scoring.decoding import DecodingError, make_decoder
from speech_kd.scoring.lm import load_lm
from speech_kd.scoring.metrics import error_rates, normalize_text, utterance_errors, write_utterances
from speech_kd.targets.teachers.ensemble import load_ensemble, teacher_sources
from speech_kd.targets.teachers.sb import sb_blank_index

__all__ = [
    "evaluate_model",
    "EvalResult",
    "EnsembleASR",
    "read_manifest",
    "read_scored_audio",
    "load_checked_batch",
    "DecodingASR",
    "model_log_probs",
    "pad_log_probs",
    "model_tokens",
    "dev_split_of",
    "DEFAULT_LM_BEAM",
]

logger = logging.getLogger(__name__)

#: default longest utterance scored (seconds); longer ones are skipped with a warning (memory bound)
MAX_DURATION = 60.0
#: beam size when a language model is given without ``beam_size`` (SpeechBrain's searchers' default)
DEFAULT_LM_BEAM = 100


class EnsembleASR:
    """Greedy CTC transcription from the averaged posteriors of several model folders.

    What ``evaluate --asr A,B,...`` runs (and ``--asr HF_FOLDER``: one member,
    any folder :func:`~speech_kd.targets.teachers.base.load_teacher` reads), so that a
    teacher is scored exactly as distillation sees it (:class:`~speech_kd.targets.teachers.ensemble.EnsembleTeacher`:
    probabilities averaged on the first member's vocabulary and frame rate).
    Word delimiters ``|`` / ``\u2581`` become spaces. ``mods`` holds every
    member's modules, as ``EncoderASR.mods`` does for one model.
    """

    def __init__(self, folders: list[str], device: str = "cpu") -> None:
        self.teacher = load_ensemble(folders, device=device)
        self.sample_rate = self.teacher.sample_rate
        self.device = device
        self.mods = torch.nn.ModuleList(
            member.asr.mods if hasattr(member, "asr") else member for member in self.teacher.members
        )

    def transcribe_batch(self, wavs: torch.Tensor, wav_lens: torch.Tensor) -> tuple[list[str], list[list[int]]]:
        """Words and token ids of ``wavs [B, S]`` with relative lengths ``wav_lens [B]``."""
        out = self.teacher(wavs.to(self.device), wav_lens.to(self.device))
        labels, lengths = collapse_greedy(out.log_probs, out.lengths, self.teacher.blank_index)
        ids = [row[:length].tolist() for row, length in zip(labels.cpu(), lengths.cpu())]
        texts = (_delimiters_to_spaces("".join(self.teacher.tokens[t] for t in row)) for row in ids)
        return [" ".join(text.split()) for text in texts], ids


def _delimiters_to_spaces(text: str) -> str:
    """Word delimiter tokens (``|`` of wav2vec2, ``▁`` of SentencePiece) as spaces."""
    return text.replace("|", " ").replace("▁", " ")


def model_characters(asr) -> set[str] | None:
    """Upper-cased characters the model can write (word delimiters ``|``/``▁`` as spaces), or ``None``.

    From ``EncoderASR.tokenizer`` or an :class:`EnsembleASR`'s teacher tokens;
    special tokens such as ``<blank>`` are left out.
    """
    tokens = getattr(getattr(asr, "teacher", None), "tokens", None) or getattr(asr, "tokens", None)
    if tokens is None:
        tokens = list(getattr(getattr(asr, "tokenizer", None), "lab2ind", {}) or [])
    chars = set()
    for token in tokens:
        token = str(token)
        if token.startswith("<") and token.endswith(">") and len(token) > 2:
            continue
        chars |= set(_delimiters_to_spaces(token).upper())
    return chars or None


def _warn_unreachable_characters(asr, refs: list[str], csv_path) -> None:
    """Warn when references use characters the model cannot output: each one is an error it cannot avoid."""
    chars = model_characters(asr)
    if chars is None:
        return
    bad = [ref for ref in refs if set(normalize_text(ref)) - chars - {" "}]
    if bad:
        extra = sorted(set(normalize_text(" ".join(bad))) - chars - {" "})
        logger.warning(
            "%s: %d of %d reference transcripts use characters the model cannot output (%s); "
            "they are scored as they are, so each counts as an error",
            csv_path,
            len(bad),
            len(refs),
            "".join(extra),
        )


def model_tokens(asr) -> tuple[list[str], int]:
    """The units (index order, blank included) and blank index of a loaded model of any kind ``evaluate`` runs."""
    if isinstance(asr, DeployedASR):
        return list(asr.tokens), int(asr.runtime.blank_index)
    if isinstance(asr, EnsembleASR):
        return list(asr.teacher.tokens), int(asr.teacher.blank_index)
    tokens = token_strings(asr.tokenizer)
    return tokens, sb_blank_index(asr, tokens)


def model_log_probs(asr, wavs: torch.Tensor, wav_lens: torch.Tensor) -> list[np.ndarray]:
    """Per-utterance ``[T'_i, V]`` natural-log posteriors of padded ``wavs [B, S]`` (``wav_lens [B]`` relative).

    An exported folder's are its runtime's (its blank penalty subtracted from the blank, as its greedy
    decoding does; with ``chunk_seconds`` the chunks' frames concatenated); an ensemble's the averaged
    members'; an ``EncoderASR``'s ``encode_batch`` (log-softmax applied when it returns logits).
    """
    if isinstance(asr, DeployedASR):
        if asr.chunk_seconds:
            lengths = torch.round(wav_lens * wavs.shape[1]).long().tolist()
            arrays = [
                np.concatenate(
                    list(
                        asr.runtime.stream_log_probs(
                            wavs[i, :n].cpu().float().numpy(), asr.chunk_seconds, asr.context_seconds
                        )
                    )
                )
                for i, n in enumerate(lengths)
            ]
        else:
            arrays = [lp.numpy() for lp in asr.log_probs_batch(wavs, wav_lens)]
        blank, penalty = asr.runtime.blank_index, asr.runtime.blank_penalty
        out = []
        for lp in arrays:
            lp = np.array(lp, dtype=np.float32)
            lp[:, blank] -= penalty
            out.append(lp)
        return out
    with torch.no_grad():
        if isinstance(asr, EnsembleASR):
            result = asr.teacher(wavs.to(asr.device), wav_lens.to(asr.device))
            log_probs, lengths = result.log_probs, result.lengths
        else:
            log_probs = asr.encode_batch(wavs, wav_lens).float()
            if not torch.allclose(log_probs.exp().sum(-1), torch.ones(()), atol=1e-3):
                log_probs = log_probs.log_softmax(-1)
            lengths = torch.round(wav_lens.to(log_probs.device) * log_probs.shape[1]).long()
    log_probs = log_probs.float().cpu().numpy()
    return [log_probs[i, : max(int(n), 1)] for i, n in enumerate(lengths.cpu().tolist())]


def pad_log_probs(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``[B, T, V]`` of ``[T_i, V]`` arrays (padding never decoded) and their lengths ``[B]``."""
    width = max((a.shape[0] for a in arrays), default=1)
    vocab = arrays[0].shape[1] if arrays else 1
    batch = np.zeros((len(arrays), width, vocab), dtype=np.float32)
    for i, a in enumerate(arrays):
        batch[i, : a.shape[0]] = a
    return batch, np.array([a.shape[0] for a in arrays], dtype=np.int64)


def model_frame_shift(asr, folder: str | os.PathLike, sample_rate: int) -> float:
    """Seconds per output frame of a loaded PyTorch model (``speech_kd.json``, the teacher's, else measured).

    Measured from two lengths (the frames of 4 s minus those of 2 s of silence, over 2 s), so a front
    end's edge frames do not bias it.
    """
    info = Path(folder) / "speech_kd.json"
    recorded = json.loads(info.read_text()).get("frame_shift") if info.exists() else None
    if recorded is not None:
        return float(recorded)
    if isinstance(asr, EnsembleASR):
        return float(asr.teacher.frame_shift)
    frames = [model_log_probs(asr, torch.zeros(1, s * sample_rate), torch.ones(1))[0].shape[0] for s in (2, 4)]
    return 2.0 / max(frames[1] - frames[0], 1)


def chunked_log_probs(
    asr, wav: torch.Tensor, frame_shift: float, sample_rate: int, chunk_seconds: float, context_seconds: float
) -> np.ndarray:
    """``[T', V]`` log-posteriors of one long waveform ``wav [S]``, chunk by chunk (bounded memory).

    The rule of the exported ``transcribe.py`` (``stream_log_probs``) for PyTorch models: chunks of
    ``chunk_seconds`` (whole output frames), each run with ``context_seconds`` of audio on both sides,
    only its own frames kept.
    """
    pieces = []
    for first, last, skip, keep in chunk_windows(
        wav.shape[0], frame_shift, sample_rate, chunk_seconds, context_seconds
    ):
        out = model_log_probs(asr, wav[first:last][None], torch.ones(1))[0]
        pieces.append(out[skip:] if keep is None else out[skip : skip + keep])
    return np.concatenate(pieces)


@dataclass(frozen=True)
class Chunking:
    """How :func:`evaluate_model` reads long files of a PyTorch model: in chunks of ``chunk_seconds``.

    ``every``: every utterance (``--chunk_seconds`` > 0); else only those over ``LONG_SECONDS``.
    """

    frame_shift: float
    chunk_seconds: float
    context_seconds: float
    every: bool


def transcribe_rows(
    asr, runner, decoder, padded: torch.Tensor, lengths: torch.Tensor, sample_rate: int, chunking: Chunking | None
) -> list[str]:
    """Transcripts of a loaded batch ``padded [B, S]`` (``lengths [B]`` samples): long files in chunks.

    The utterances ``chunking`` selects are run by :func:`chunked_log_probs` and decoded by ``decoder``;
    the others together by ``runner.transcribe_batch`` (the model, or :class:`DecodingASR`).
    """
    long = set()
    if chunking is not None:
        limit = LONG_SECONDS * sample_rate
        long = {i for i, n in enumerate(lengths.tolist()) if chunking.every or n > limit}
    words = [""] * len(lengths)
    short = [i for i in range(len(lengths)) if i not in long]
    if short:
        index = torch.tensor(short)
        part = lengths[index]
        texts, _ = runner.transcribe_batch(padded[index, : int(part.max())], part / part.max())
        for i, text in zip(short, texts):
            words[i] = text
    for i in sorted(long):
        wav = padded[i, : int(lengths[i])]
        lp = chunked_log_probs(
            asr, wav, chunking.frame_shift, sample_rate, chunking.chunk_seconds, chunking.context_seconds
        )
        words[i] = decoder.decode(lp[None], np.array([lp.shape[0]]))[0]
    return words


class DecodingASR:
    """A loaded model decoded by a :class:`~speech_kd.scoring.decoding.Decoder`: ``transcribe_batch`` as ``EncoderASR``.

    Parameters
    ----------
    asr
        What :func:`evaluate_model` loads (``EncoderASR``, :class:`EnsembleASR`, ``DeployedASR``).
    decoder : speech_kd.scoring.decoding.Decoder
        Made for the model's units (:func:`model_tokens`).
    """

    def __init__(self, asr, decoder) -> None:
        self.asr = asr
        self.decoder = decoder
        self.mods = getattr(asr, "mods", None)

    def transcribe_batch(self, wavs: torch.Tensor, wav_lens: torch.Tensor) -> tuple[list[str], list[list[int]]]:
        """Words of padded ``wavs [B, S]`` (``wav_lens [B]`` relative) by the decoder; no token ids."""
        log_probs, lengths = pad_log_probs(model_log_probs(self.asr, wavs, wav_lens))
        texts = self.decoder.decode(log_probs, lengths)
        return texts, [[] for _ in texts]


def dev_split_of(split: str) -> str:
    """The dev split beside a test split: ``test-clean`` -> ``dev-clean``, ``test`` -> ``dev``.

    Examples
    --------
    >>> dev_split_of("test-other"), dev_split_of("test")
    ('dev-other', 'dev')
    """
    if "test" not in split:
        raise ValueError(f"--tune_lm: no dev split beside --split {split} (no 'test' in its name); give --dev_csv")
    return split.replace("test", "dev", 1)


def _collect_log_probs(asr, rows: list[dict], sample_rate: int, batch_seconds: float, progress: bool):
    """``[B, T, V]`` log-posteriors, lengths ``[B]`` and references of manifest rows (for tuning)."""
    arrays, refs = [], []
    for batch in tqdm(
        duration_batches(rows, batch_seconds), desc="dev", unit="batch", disable=None if progress else True
    ):
        batch, padded, lengths, _ = load_checked_batch(batch, sample_rate)  # a bad dev file: named, left out
        if not batch:
            continue
        arrays += model_log_probs(asr, padded, lengths / lengths.max())
        refs += [r["wrd"] for r in batch]
    log_probs, frames = pad_log_probs(arrays)
    return log_probs, frames, refs


def read_manifest(csv_path: str | os.PathLike) -> list[dict]:
    """Rows of a SpeechBrain CSV (``ID,wav,wrd``; ``duration`` optional).

    Checked by :func:`~speech_kd.data.dataio.read_csv_rows` (``ValueError`` naming file and row).
    """
    rows = read_csv_rows(csv_path, required=("ID", "wav", "wrd"))
    if not rows:
        raise ValueError(f"{csv_path}: empty manifest")
    return rows


def _audio_seconds(row: dict) -> float:
    """The row's duration, else the file's (from its header); 0 when neither is known (reading reports the file)."""
    if (row.get("duration") or "").strip():
        return float(row["duration"])
    import soundfile as sf

    try:
        info = sf.info(row["wav"])
    except Exception:  # noqa: BLE001 - unreadable files are reported, with their path, when read
        return 0.0
    return info.frames / max(info.samplerate, 1)


def skip_long(rows: list[dict], max_duration: float | None, csv_path) -> list[dict]:
    """``rows`` without the utterances longer than ``max_duration`` seconds, each named in a warning (memory bound)."""
    if not max_duration:
        return rows
    kept = []
    for row in rows:
        seconds = _audio_seconds(row)
        if seconds > max_duration:
            logger.warning(
                "%s: skipping %s (%s): %.1f s, longer than max_duration=%.1f s (not scored)",
                csv_path,
                row["ID"],
                row["wav"],
                seconds,
                max_duration,
            )
        else:
            kept.append(row)
    if not kept:
        raise ValueError(f"{csv_path}: every utterance is longer than max_duration={max_duration} s")
    return kept


def check_writable(*paths: str | os.PathLike | None) -> None:
    """Raise ``OSError`` now, before any work, for an output path that cannot be written (folder made if missing)."""
    for out in paths:
        if not out:
            continue
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            raise IsADirectoryError(f"{path}: is a folder, not a file to write")
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".write_test_"):
            pass


def write_outputs(result: EvalResult, json_path=None, utts_path=None) -> None:
    """Write the summary JSON and the per-utterance file of an :class:`EvalResult`."""
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result.summary, indent=2) + "\n")
    if utts_path:
        write_utterances(result.utterances, utts_path, decoder=result.summary.get("decoder"))


def duration_batches(rows: list[dict], batch_seconds: float) -> list[list[dict]]:
    """Length-sorted batches of at most ``batch_seconds`` of audio each."""
    rows = sorted(rows, key=lambda r: -float(r.get("duration") or 0.0))
    batches, current, total = [], [], 0.0
    for row in rows:
        dur = float(row.get("duration") or 0.0)
        longest = float(current[0].get("duration") or 0.0) if current else dur
        if current and longest * (len(current) + 1) > batch_seconds:
            batches.append(current)
            current, total = [], 0.0
        current.append(row)
        total += dur
    if current:
        batches.append(current)
    return batches


@dataclass
class EvalResult:
    """Everything ``evaluate_model`` measured."""

    summary: dict
    utterances: list
    #: ``(ID, path, reason)`` of each manifest row whose audio could not be used (not scored)
    failed: list = field(default_factory=list)


def _warn_converted_audio(rows: list[dict], sample_rate: int, csv_path) -> None:
    """Warn when files are not mono at the model's rate: they are resampled / averaged, which can cost accuracy."""
    import soundfile as sf

    other_rate, multi = [], []
    for row in rows:
        try:
            info = sf.info(row["wav"])
        except Exception:  # noqa: BLE001 - unreadable files are reported, with their path, when read
            continue
        if info.samplerate != sample_rate:
            other_rate.append(f"{row['wav']}: {info.samplerate} Hz")
        if info.channels != 1:
            multi.append(f"{row['wav']}: {info.channels} channels")
    if other_rate:
        logger.warning(
            "%s: %d of %d files are not at the model's %d Hz and are resampled (e.g. %s); audio "
            "recorded at a lower rate lacks the high band the model was trained on",
            csv_path,
            len(other_rate),
            len(rows),
            sample_rate,
            other_rate[0],
        )
    if multi:
        logger.warning(
            "%s: %d of %d files have several channels and are averaged to mono (e.g. %s)",
            csv_path,
            len(multi),
            len(rows),
            multi[0],
        )


def load_batch(batch: list[dict], sample_rate: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded waveforms ``[B, S]`` and lengths in samples ``[B]`` of one batch of manifest rows."""
    wavs = [read_audio(r["wav"], sample_rate) for r in batch]
    lengths = torch.tensor([w.shape[0] for w in wavs], dtype=torch.float32)
    return torch.nn.utils.rnn.pad_sequence(wavs, batch_first=True), lengths


#: largest ``old x new`` of a sample-rate ratio in lowest terms that is resampled (the resampler's table)
MAX_RATE_RATIO = 4_000_000


def read_scored_audio(path: str | os.PathLike, sample_rate: int) -> torch.Tensor:
    """Mono float32 samples ``[S]`` of an audio file at ``sample_rate``, checked as ``transcribe.py`` checks them.

    Raises :class:`~speech_kd.data.audio.AudioError` (a ``ValueError``; one line starting with the path) for a
    missing file, a folder, an empty (0-byte), unreadable or sample-less file, NaN or infinite samples (never
    scored as an empty transcript), a rate below 4 kHz, or a rate with no small ratio to ``sample_rate``
    (e.g. 44101 Hz). Any other rate is resampled (:func:`~speech_kd.data.audio.read_audio`, torchaudio's sinc);
    ``evaluate_model`` notes the resampled files in a warning.
    """
    if os.path.isdir(path):
        raise AudioError(path, "a folder, not an audio file")
    if os.path.exists(path) and os.path.getsize(path) == 0:
        raise AudioError(path, "empty file (0 bytes)")
    try:
        rate = sf.info(str(path)).samplerate
    except Exception:  # noqa: BLE001 - read_audio names what is wrong with the file
        rate = sample_rate
    if rate != sample_rate:
        if rate < MIN_SAMPLE_RATE:
            raise AudioError(path, f"{rate} Hz is too low for speech; this model takes {sample_rate} Hz")
        g = math.gcd(int(rate), int(sample_rate))
        if (rate // g) * (sample_rate // g) > MAX_RATE_RATIO:
            raise AudioError(
                path,
                f"{rate} Hz: no small ratio to {sample_rate} Hz; resample the file first "
                f"(sox IN -r {sample_rate} OUT.wav)",
            )
    return read_audio(path, sample_rate)


def load_checked_batch(batch: list[dict], sample_rate: int) -> tuple[list[dict], torch.Tensor, torch.Tensor, list]:
    """:func:`load_batch` that skips unusable files: ``(rows read, padded [B, S], lengths [B], failed)``.

    ``failed`` lists ``(ID, path, reason)`` of each row whose audio :func:`read_scored_audio` refused; each is
    also logged as a one-line warning naming the file.
    """
    kept, wavs, failed = [], [], []
    for row in batch:
        try:
            wavs.append(read_scored_audio(row["wav"], sample_rate))
        except AudioError as error:
            logger.warning("%s: not scored (%s): %s", error.path, row["ID"], error.reason)
            failed.append((row["ID"], error.path, error.reason))
            continue
        kept.append(row)
    if not wavs:
        return kept, torch.zeros(0, 0), torch.zeros(0), failed
    lengths = torch.tensor([w.shape[0] for w in wavs], dtype=torch.float32)
    return kept, torch.nn.utils.rnn.pad_sequence(wavs, batch_first=True), lengths, failed


def evaluate_model(
    asr_folder: str | os.PathLike,
    csv_path: str | os.PathLike | None = None,
    data_folder: str | os.PathLike | None = None,
    split: str | None = None,
    device: str = "cpu",
    batch_seconds: float = 60.0,
    json_path: str | os.PathLike | None = None,
    utts_path: str | os.PathLike | None = None,
    progress: bool = True,
    max_duration: float | None = MAX_DURATION,
    blank_penalty: float | None = None,
    chunk_seconds: float | None = None,
    context_seconds: float | None = None,
    beam_size: int | None = None,
    lm: str | os.PathLike | None = None,
    lm_weight: float | None = None,
    word_bonus: float | None = None,
    tune_lm: bool = False,
    dev_csv: str | os.PathLike | None = None,
) -> EvalResult:
    """Transcribe a test set with the model folder and score it.

    ``asr_folder`` may name several folders separated by commas: their
    ensemble (:class:`EnsembleASR`) is scored, ``params`` counting all members.
    Give either ``csv_path`` (a SpeechBrain manifest) or ``data_folder`` and
    ``split`` (a LibriSpeech-layout folder, prepared on the fly; unusable
    utterances are reported and skipped). Writes ``json_path`` (keys ``wer``,
    ``cer``, ``num_utts``, ``params``, ``rtf``, ...) and ``utts_path`` (one
    block per utterance, worst first, with jiwer's alignment) when given.
    Long files are read in chunks by default, so memory stays bounded whatever
    their length: ``chunk_seconds`` ``None`` (the default) reads utterances over
    ``LONG_SECONDS`` (60 s) in ``AUTO_CHUNK_SECONDS`` (20 s) chunks with
    ``context_seconds`` (default 2) of audio on both sides, as ``transcribe.py``
    does, for every kind of model folder; ``chunk_seconds`` > 0 chunks every
    utterance; 0 reads each whole, and then utterances longer than
    ``max_duration`` seconds (default 60; ``None`` or 0: no limit) are skipped
    with a warning naming each file. A folder written by ``speech-kd export``
    (ONNX or TorchScript) is run by :class:`~speech_kd.deploy.asr.DeployedASR`
    (its ``transcribe.py`` code), ``blank_penalty`` replacing the folder's;
    ``chunk_seconds`` > 0 transcribes each utterance in chunks of that many seconds, each read with
    ``context_seconds`` (default 2) of audio on both sides (``None``: utterances over 60 s in 20 s
    chunks, as ``transcribe.py``; 0: each whole). Each file that cannot be used (:func:`read_scored_audio`:
    missing, empty, unreadable, NaN/Inf samples, a rate below 4 kHz) is logged in one line naming it and
    left out; the scores cover the others and :attr:`EvalResult.failed` lists the rows left out
    (``ValueError`` when every file fails).

    Decoding is greedy unless ``beam_size`` > 1 or ``lm`` is given: then
    :class:`~speech_kd.scoring.decoding.BeamDecoder` (SpeechBrain's ``CTCBeamSearcher``, ``beam_size``
    default :data:`DEFAULT_LM_BEAM` with an LM) with the KenLM ``lm`` fused at ``lm_weight``/``word_bonus``.
    The LM file is checked before the model loads, and against the model's units before any audio is
    run. ``tune_lm`` picks ``lm_weight``/``word_bonus`` on ``dev_csv`` (default with ``data_folder``: the
    dev split beside ``split``, :func:`dev_split_of`) by :func:`~speech_kd.scoring.decoding.tune_lm`'s
    grid. The summary's ``"decoder"`` records the decoder (and ``"tune_lm"`` the grid); the
    per-utterance file's first line too; ``rtf`` includes the decoding time.
    """
    check_writable(json_path, utts_path)  # before the work: a path that cannot be written fails now, not after it
    if beam_size is not None and (isinstance(beam_size, bool) or not isinstance(beam_size, int) or beam_size < 1):
        raise DecodingError(f"--beam_size must be a positive integer, got {beam_size!r}")
    if lm is not None:
        load_lm(lm)  # a missing or corrupt file is told now, before the model loads
    elif tune_lm or lm_weight is not None or word_bonus is not None:
        raise DecodingError("--tune_lm, --lm_weight and --word_bonus need a language model (--lm)")
    if tune_lm and dev_csv is None:
        if data_folder is None or split is None:
            raise DecodingError("--tune_lm needs a dev set: --dev_csv, or --data_folder and --split (its dev split)")
        dev_split = dev_split_of(split)
        if not (Path(data_folder) / dev_split).is_dir():
            raise DecodingError(f"--tune_lm: {Path(data_folder) / dev_split}: no such dev split; give --dev_csv")
    if csv_path is None:
        if data_folder is None or split is None:
            raise ValueError("give --csv, or --data_folder and --split")

        tmp = tempfile.mkdtemp(prefix="speechkd_eval_")
        csv_path = prepare_split(data_folder, split, tmp).csv_files[split]
    if tune_lm and dev_csv is None:
        dev_csv = prepare_split(data_folder, dev_split, tempfile.mkdtemp(prefix="speechkd_dev_")).csv_files[dev_split]
    whole_files = chunk_seconds is not None and not chunk_seconds  # --chunk_seconds 0: each file read whole
    rows = skip_long(read_manifest(csv_path), max_duration if whole_files else None, csv_path)
    dev_rows = skip_long(read_manifest(dev_csv), max_duration, dev_csv) if tune_lm else []
    folders = teacher_sources(asr_folder)
    if not folders:
        raise ValueError("--asr names no model folder")

    if len(folders) == 1 and is_exported_folder(folders[0]):
        if not str(device).startswith("cpu"):
            raise ValueError(f"{folders[0]}: an exported folder runs on the CPU; use --device=cpu")
        asr = DeployedASR(
            folders[0], blank_penalty=blank_penalty, chunk_seconds=chunk_seconds, context_seconds=context_seconds
        )
        sample_rate = asr.sample_rate
    elif blank_penalty is not None:
        raise ValueError("--blank_penalty applies to folders written by speech-kd export")
    elif len(folders) > 1 or not (Path(folders[0]) / "hyperparams.yaml").exists():
        # several folders, or one that is not a SpeechBrain folder (a Hugging Face CTC model): the teacher loader
        asr = EnsembleASR(folders, device=device)
        sample_rate = asr.sample_rate
    else:
        asr = load_asr(folders[0], device=device)
        sample_rate = int(getattr(asr.hparams, "sample_rate", 16000))

    tokens, blank = model_tokens(asr)
    chunking = None  # an exported folder's runtime chunks long files itself (its chunk_seconds)
    if not isinstance(asr, DeployedASR) and not whole_files:
        chunking = Chunking(
            frame_shift=model_frame_shift(asr, folders[0], sample_rate),
            chunk_seconds=float(chunk_seconds) if chunk_seconds else AUTO_CHUNK_SECONDS,
            context_seconds=CONTEXT_SECONDS if context_seconds is None else float(context_seconds),
            every=bool(chunk_seconds),
        )
    if beam_size is None:
        beam_size = DEFAULT_LM_BEAM if lm is not None else 1
    weights = {k: v for k, v in (("lm_weight", lm_weight), ("word_bonus", word_bonus)) if v is not None}
    decoder = make_decoder(tokens, blank, beam_size, lm, **weights)  # the LM checked against the units here
    runner = asr if decoder.name == "greedy" else DecodingASR(asr, decoder)
    tuned = None
    if tune_lm:
        start = time.perf_counter()
        dev_lp, dev_frames, dev_refs = _collect_log_probs(asr, dev_rows, sample_rate, batch_seconds, progress)
        result = decoder.tune(dev_lp, dev_frames, dev_refs)
        logger.info("%s (dev %s, %d utterances)", result.summary(), dev_csv, len(dev_refs))
        tuned = {
            "dev_csv": str(dev_csv),
            "lm_weight": result.lm_weight,
            "word_bonus": result.word_bonus,
            "dev_wer": round(result.wer, 3),
            "seconds": round(time.perf_counter() - start, 2),
            "grid": result.table,
            "summary": result.summary(),
        }

    _warn_converted_audio(rows, sample_rate, csv_path)
    ids, refs, hyps, failed = [], [], [], []
    audio_seconds = compute_seconds = 0.0
    batches = duration_batches(rows, batch_seconds)
    # audio of the next batch is read on a thread while the model runs on this one
    with ThreadPoolExecutor(max_workers=1) as reader:
        pending = reader.submit(load_checked_batch, batches[0], sample_rate) if batches else None
        for number, batch in enumerate(
            tqdm(batches, desc="evaluating", unit="batch", disable=None if progress else True)
        ):
            batch, padded, lengths, bad = pending.result()
            failed += bad
            if number + 1 < len(batches):
                pending = reader.submit(load_checked_batch, batches[number + 1], sample_rate)
            if not batch:
                continue
            start = time.perf_counter()
            words = transcribe_rows(asr, runner, decoder, padded, lengths, sample_rate, chunking)
            compute_seconds += time.perf_counter() - start
            audio_seconds += float(lengths.sum()) / sample_rate
            ids += [r["ID"] for r in batch]
            refs += [r["wrd"] for r in batch]
            hyps += list(words)

    if not ids:
        raise ValueError(f"{csv_path}: no audio file could be used ({len(failed)} refused, each named above)")
    _warn_unreachable_characters(asr, refs, csv_path)
    rates = error_rates(refs, hyps)
    summary = {
        "wer": round(rates.wer, 3),
        "cer": round(rates.cer, 3),
        "num_utts": rates.num_utts,
        "params": count_parameters(asr),
        "rtf": round(compute_seconds / max(audio_seconds, 1e-9), 5),
        "audio_seconds": round(audio_seconds, 2),
        "compute_seconds": round(compute_seconds, 3),
        "utts_per_second": round(len(ids) / max(compute_seconds, 1e-9), 2),
        "word_errors": rates.word_errors,
        "ref_words": rates.ref_words,
        "substitutions": rates.substitutions,
        "deletions": rates.deletions,
        "insertions": rates.insertions,
        "model": str(asr_folder),
        "csv": str(csv_path),
        "device": device,
        "not_scored": [{"ID": uid, "wav": path, "reason": reason} for uid, path, reason in failed],
        "decoder": decoder.describe(),
    }
    if tuned is not None:
        summary["tune_lm"] = tuned
    result = EvalResult(summary, utterance_errors(ids, refs, hyps), failed)
    write_outputs(result, json_path, utts_path)
    return result
