"""Transcribe 16 kHz audio with an exported speech_kd model folder: numpy, soundfile and onnxruntime (or torch).

This file is self-contained: ``speech-kd export`` copies it into every exported
folder as ``transcribe.py``, which needs neither speechbrain nor speech_kd::

    python DIR/transcribe.py a.wav b.flac [--threads 1] [--max_batch_seconds 16] [--blank_penalty 0]
    python DIR/transcribe.py long.wav        # over LONG_SECONDS (60 s): 20 s chunks with 2 s of context
    python DIR/transcribe.py a.wav --beam_size 100 --lm LM.arpa --lm_weight 0.5 --word_bonus 1.5

or, from Python, ``ExportedASR(DIR).transcribe_files(["a.wav"])``.

Input checks (:func:`read_audio`, :func:`check_samples`): a missing, empty (0 bytes), unreadable or
sample-less file, or one with NaN or infinite samples, is refused in one line naming it (never an empty
transcript); audio at another sample rate is resampled to the model's (:func:`resample`, the band-limited
sinc of ``torchaudio.functional.resample`` that ``speech-kd evaluate`` uses, so both score the same
samples) with a note on stderr. Of several files each good one is transcribed and each bad one reported;
the exit status is 1 when any failed, 2 for a bad option or model folder (one line, no traceback).

Pipeline: audio (mono, the folder's sample rate) -> log-mel fbank computed
here in numpy (:func:`fbank`; the same numbers as SpeechBrain's ``Fbank``
within 1e-4 dB, tested) -> the network (``model.onnx`` or ``model.ts``:
normalisation, convolution front end, conformer, CTC output layer,
log-softmax) -> greedy CTC decoding (:func:`greedy_decode`), or CTC beam search
(:func:`ctc_beam_search`, SpeechBrain's ``CTCBeamSearcher`` ported to numpy) with a
KenLM word n-gram fused (``--lm``, or the folder's own ``lm.*`` copied by ``speech-kd export --lm``,
used by default with the weights ``deploy.json`` records). Each utterance's
result does not depend on what else is in its batch.

Shapes: ``S`` samples, ``T`` fbank frames, ``F`` mel bins, ``T'`` output
frames (``frame_shift`` seconds each), ``V`` tokens, ``B`` batch.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import gzip
import heapq
import json
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path

if __name__ == "__main__":  # before numpy loads its BLAS: one BLAS thread (see ExportedASR._one_blas_thread)
    for _name in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_name, "1")

import numpy as np

__all__ = [
    "ExportedASR",
    "fbank",
    "mel_blocks",
    "best_tokens",
    "greedy_decode",
    "ctc_beam_search",
    "KenLMScorer",
    "read_lm_words",
    "lm_spelling_share",
    "LM_NAMES",
    "DEFAULT_BEAM_SIZE",
    "read_audio",
    "check_samples",
    "resample",
    "run_groups",
    "build_parser",
    "main",
    "TranscribeError",
    "AudioFileError",
    "CONFIG_NAME",
    "CONTEXT_SECONDS",
    "MAX_BATCH_SECONDS",
    "LONG_SECONDS",
    "AUTO_CHUNK_SECONDS",
]

#: the exported folder's description (tokens, frame shift, fbank settings, model file)
CONFIG_NAME = "deploy.json"
#: window and mel filters of the fbank, as SpeechBrain builds them
FEATURES_NAME = "fbank.npz"
#: fbank frames computed at a time: the whole utterance's spectrum at once is a few MB of temporaries whose
#: fresh pages fault in on every call; pieces reuse memory (docs/deploy.md)
FBANK_PIECE = 64
#: audio (seconds) read before and after each chunk of a long file (``--context_seconds``)
CONTEXT_SECONDS = 2.0
#: files longer than this (seconds) are transcribed in chunks of AUTO_CHUNK_SECONDS by default (self-attention's
#: memory grows with the square of the length; measured in docs/deploy.md)
LONG_SECONDS = 60.0
#: chunk length (seconds) of the files longer than LONG_SECONDS when --chunk_seconds is not given
AUTO_CHUNK_SECONDS = 20.0
#: most runtime threads --threads accepts
MAX_THREADS = 1024
#: lowest sample rate (Hz) resampled to the model's; lower ones are refused (not speech audio)
MIN_SAMPLE_RATE = 4000
#: padded audio (seconds) per network run: utterances are run longest first, in groups of at most this much
#: (padding included): a larger padded batch's activations no longer fit in the CPU's cache (docs/deploy.md,
#: ``speech-kd bench --max_batch_seconds 0``)
MAX_BATCH_SECONDS = 16.0
#: names ``speech-kd export --lm`` gives the language model it copies (ARPA, gzipped ARPA, KenLM binary)
LM_NAMES = ("lm.arpa", "lm.arpa.gz", "lm.bin")
#: beams kept when a language model is used and no --beam_size is given (SpeechBrain's searchers' default)
DEFAULT_BEAM_SIZE = 100
#: the LM weight and word bonus without recorded or given ones (SpeechBrain's ``alpha``, ``beta`` defaults)
DEFAULT_LM_WEIGHT, DEFAULT_WORD_BONUS = 0.5, 1.5


def mel_blocks(mel: np.ndarray, blocks: int = 4) -> list[tuple[int, int, int, int, np.ndarray]]:
    """The mel filters ``mel [n_fft // 2 + 1, F]`` as a few dense blocks that skip the matrix's zeros.

    Each filter touches a few neighbouring bins only; cutting the filters into ``blocks`` runs of
    consecutive filters, each block needs the bins its filters touch. Returns
    ``(first_bin, end_bin, first_filter, end_filter, weights [end_bin - first_bin, end_filter - first_filter])``
    per block; the products of the blocks are the dense product's (same sums, float64).

    Example
    -------
    >>> mel = np.zeros((6, 2)); mel[0:3, 0] = 1; mel[3:6, 1] = 1
    >>> [(a, b, c, d) for a, b, c, d, _ in mel_blocks(mel, blocks=2)]
    [(0, 3, 0, 1), (3, 6, 1, 2)]
    """
    out = []
    bounds = np.linspace(0, mel.shape[1], min(blocks, mel.shape[1]) + 1).round().astype(int)
    for first, end in zip(bounds[:-1], bounds[1:]):
        rows = np.flatnonzero(np.any(mel[:, first:end] != 0, axis=1))
        lo, hi = (int(rows[0]), int(rows[-1]) + 1) if rows.size else (0, 0)
        out.append((lo, hi, int(first), int(end), np.ascontiguousarray(mel[lo:hi, first:end])))
    return out


def fbank(
    wav: np.ndarray,
    window: np.ndarray,
    mel: np.ndarray | list,
    hop: int,
    amin: float = 1e-10,
    top_db: float = 80.0,
    ref_value: float = 1.0,
) -> np.ndarray:
    """Log-mel filterbank ``[T, F]`` (float32) of one waveform ``wav [S]``, as SpeechBrain's ``Fbank``.

    Centred frames (``n_fft // 2`` zeros at both ends), ``T = 1 + S // hop``; power spectrum of each frame
    times ``window [n_fft]``; ``mel [n_fft // 2 + 1, F]`` filters (or their :func:`mel_blocks`, faster);
    ``10 log10(max(x, amin)) - 10 log10(max(amin, ref_value))``, floored at the utterance's maximum minus
    ``top_db``. Computed in float64.
    """
    n_fft = window.shape[0]
    padded = np.pad(wav.astype(np.float64), (n_fft // 2, n_fft // 2))
    frames = 1 + wav.shape[0] // hop
    windows = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop][:frames]  # a view: no copy
    blocks = mel_blocks(mel, blocks=1) if isinstance(mel, np.ndarray) else mel
    energies = np.empty((frames, blocks[-1][3]))
    for start in range(0, frames, FBANK_PIECE):  # small temporaries: reused memory, not fresh pages each call
        spectrum = np.fft.rfft(windows[start : start + FBANK_PIECE] * window, n=n_fft, axis=1)
        power = spectrum.real**2 + spectrum.imag**2
        for lo, hi, first, end, weights in blocks:
            energies[start : start + FBANK_PIECE, first:end] = power[:, lo:hi] @ weights
    db = 10.0 * np.log10(np.maximum(energies, amin)) - 10.0 * np.log10(max(amin, ref_value))
    return np.maximum(db, db.max() - top_db).astype(np.float32)


def best_tokens(log_probs: np.ndarray, blank: int, blank_penalty: float = 0.0) -> np.ndarray:
    """Best token per frame ``[T']`` of ``log_probs [T', V]``, ``blank_penalty`` subtracted from the blank first."""
    scores = log_probs
    if blank_penalty:
        scores = log_probs.copy()
        scores[:, blank] -= blank_penalty
    return scores.argmax(axis=-1)


def greedy_decode(log_probs: np.ndarray, blank: int, blank_penalty: float = 0.0, previous: int = -1) -> list[int]:
    """Best path of ``log_probs [T', V]``, repeats merged and blanks removed (token ids).

    ``blank_penalty`` is subtracted from the blank's log-probability first (> 0: fewer deletions).
    ``previous`` is the best token of the frame before the first (a chunk's predecessor; -1: none), so that a
    token whose frames straddle two chunks is emitted once.
    """
    best = best_tokens(log_probs, blank, blank_penalty)
    keep = np.ones_like(best, dtype=bool)
    keep[1:] = best[1:] != best[:-1]
    if best.shape[0]:
        keep[0] = best[0] != previous
    return [int(t) for t in best[keep & (best != blank)]]


def chunk_windows(
    samples: int, frame_shift: float, sample_rate: int, chunk_seconds: float, context_seconds: float
) -> list[tuple[int, int, int, int | None]]:
    """How a long file is read in chunks: ``(first, last, skip, keep)`` per chunk.

    Chunks of ``chunk_seconds`` (whole output frames) each run with up to ``context_seconds`` of audio on
    both sides: samples ``[first, last)`` go in, and of the output frames the ``keep`` after the first
    ``skip`` are the chunk's own (``None``: all the rest, for the last chunk). Concatenated they have the
    whole file's frame count.

    Example
    -------
    >>> chunk_windows(16000 * 5, 0.04, 16000, 2.0, 1.0)
    [(0, 48000, 0, 50), (16000, 80000, 25, 50), (48000, 80000, 25, None)]
    """
    stride = max(round(frame_shift * sample_rate), 1)  # samples per output frame
    core = max(round(chunk_seconds * sample_rate / stride), 1) * stride
    context = max(round(context_seconds * sample_rate / stride), 0) * stride
    windows = []
    for start in range(0, max(samples, 1), core):
        first = max(start - context, 0)
        last_chunk = start + core >= samples
        windows.append(
            (
                first,
                min(start + core + context, samples),
                (start - first) // stride,
                None if last_chunk else core // stride,
            )
        )
    return windows


def run_groups(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices of utterances of ``lengths`` frames, longest first, in groups of at most ``budget`` padded frames.

    A group's padded size is its longest utterance times its count; an utterance longer than ``budget`` runs
    alone. Sorting by length keeps the padding small.

    Example
    -------
    >>> run_groups([300, 640, 500, 610, 420], budget=1300)
    [[1, 3], [2, 4], [0]]
    """
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if groups and lengths[groups[-1][0]] * (len(groups[-1]) + 1) <= budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


# ------------------------------------------------------------------ CTC beam search with a word n-gram
# A port of SpeechBrain 1.1's ``speechbrain.decoders.ctc.CTCBeamSearcher`` (itself adapted from pyctcdecode),
# step for step: the same token and beam pruning, beam merging, history pruning, LM shallow fusion (``alpha``
# times the natural-log LM score plus ``beta`` per word, ``unk_score_offset`` for out-of-vocabulary and
# partial words) and the same floating-point operations on the same numpy types, so it returns SpeechBrain's
# transcripts (tests/unit/test_lm_decoding.py). Like SpeechBrain's searcher it does not add the
# end-of-sentence probability at the end of an utterance. numpy and the standard library; ``kenlm`` only
# when a language model is given. speech_kd.deploy.lm_runtime re-exports these (one copy, this one).

#: the first bytes of a KenLM binary file
_LM_BINARY_MAGIC = b"mmap lm "
#: how much of a KenLM binary file's end is searched for its vocabulary strings
_BINARY_VOCAB_TAIL = 256 * 1024 * 1024
#: ARPA/KenLM pseudo-words that are not words of the text
_LM_SPECIALS = ("<s>", "</s>", "<unk>")


def read_lm_words(path: str | os.PathLike) -> list[str] | None:
    r"""The words of a KenLM binary or (optionally gzipped) ARPA file, ``<s>``/``</s>``/``<unk>`` left out.

    An ARPA file's words are its ``\1-grams:`` section. A KenLM binary file
    keeps its vocabulary as NUL-separated strings at its end, after
    ``<unk>``; None when they cannot be found there.

    Parameters
    ----------
    path : path-like
        The language model.

    Returns
    -------
    list of str or None
        The words, in file order.
    """
    path = os.fspath(path)
    with open(path, "rb") as fh:
        head = fh.read(len(_LM_BINARY_MAGIC))
    if head == _LM_BINARY_MAGIC:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            fh.seek(max(0, size - _BINARY_VOCAB_TAIL))
            tail = fh.read()
        start = tail.rfind(b"<unk>\x00")
        if start < 0:
            return None
        words = tail[start:].rstrip(b"\x00").split(b"\x00")
        return [w.decode("utf-8", "replace") for w in words if w.decode("utf-8", "replace") not in _LM_SPECIALS]
    opener = gzip.open if head[:2] == b"\x1f\x8b" else open
    words = []
    with opener(path, "rt", encoding="utf-8", errors="replace") as fh:
        in_unigrams = False
        for line in fh:
            line = line.strip()
            if line == "\\1-grams:":
                in_unigrams = True
                continue
            if in_unigrams:
                if not line:
                    continue
                if line.startswith("\\"):
                    break
                parts = line.split()
                if len(parts) >= 2 and parts[1] not in _LM_SPECIALS:
                    words.append(parts[1])
    return words


class KenLMScorer:
    """A KenLM n-gram for :func:`ctc_beam_search` (SpeechBrain's ``KenlmScorer``, same scores).

    Parameters
    ----------
    path : path-like
        KenLM binary or ARPA file.
    alpha : float
        LM weight (on natural-log probabilities).
    beta : float
        Bonus per word.
    unigrams : iterable of str, optional
        Known words; read from the file when None (:func:`read_lm_words`).
    unk_score_offset : float
        Added to the log10 score of an unknown word, and (unweighted) to a
        partial word that begins no known word.
    score_boundary : bool
        Start each utterance in the sentence-start context ``<s>``.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        alpha: float = 0.5,
        beta: float = 1.5,
        unigrams=None,
        unk_score_offset: float = -10.0,
        score_boundary: bool = True,
    ):
        try:
            import kenlm
        except ImportError as err:
            raise ImportError(
                "decoding with a language model needs the kenlm module: pip install kenlm "
                "(speech_kd's scripts/install_kenlm.sh installs it)"
            ) from err
        self._kenlm = kenlm
        self.model = kenlm.Model(os.fspath(path))
        if unigrams is None:
            unigrams = read_lm_words(path)
        known = {w for w in (unigrams or ()) if w in self.model}
        self.unigrams = known
        self._sorted = sorted(known) if unigrams is not None else None
        self.alpha = alpha
        self.beta = beta
        self.unk_score_offset = unk_score_offset
        self.score_boundary = score_boundary
        self.order = int(self.model.order)

    def start_state(self):
        """The LM state an utterance starts in."""
        state = self._kenlm.State()
        if self.score_boundary:
            self.model.BeginSentenceWrite(state)
        else:
            self.model.NullContextWrite(state)
        return state

    def _is_prefix(self, partial: str) -> bool:
        if self._sorted is None:
            return False
        i = bisect.bisect_left(self._sorted, partial)
        return i < len(self._sorted) and self._sorted[i].startswith(partial)

    def score_partial(self, partial: str) -> float:
        """Penalty of a word still being spelt: ``unk_score_offset`` unless it begins a known word."""
        unk = self.unk_score_offset * int(not self._is_prefix(partial))
        if len(partial) > 6:
            unk = unk * len(partial) / 6
        return unk

    def score(self, state, word: str, is_last_word: bool = False):
        """Weighted score of ``word`` after ``state``, and the state after it."""
        end_state = self._kenlm.State()
        lm_score = self.model.BaseScore(state, word, end_state)
        if len(self.unigrams) > 0 and word not in self.unigrams or word not in self.model:
            lm_score += self.unk_score_offset
        if is_last_word and self.score_boundary:
            lm_score = lm_score + self.model.BaseScore(end_state, "</s>", self._kenlm.State())
        lm_score = self.alpha * lm_score * 1.0 / math.log10(math.e) + self.beta
        return lm_score, end_state


def _join(text: str, word: str) -> str:
    if len(word) == 0:
        return text
    if len(text) == 0:
        return word
    return text + " " + word


# A beam during the frame loop: (text, next_word, partial_word, last_token, score); after LM scoring the
# same with next_word folded into text and the fused score appended: (text, partial_word, last_token, score,
# lm_score).


def _merge(beams: list) -> list:
    """Beams with the same text, partial word and last token become one (probabilities added)."""
    merged: dict = {}
    for beam in beams:
        key = (_join(beam[0], beam[1]), beam[2], beam[3])
        if key not in merged:
            merged[key] = beam
        else:
            merged[key] = beam[:4] + (np.logaddexp(merged[key][4], beam[4]),)
    return list(merged.values())


def _lm_beams(beams: list, lm: KenLMScorer | None, lm_cache: dict, partial_cache: dict) -> list:
    """Fold each beam's next word into its text and add the LM's score (the CTC score when no LM)."""
    out = []
    for text, next_word, partial, last, score in beams:
        new_text = _join(text, next_word)
        if lm is None:
            out.append((new_text, partial, last, score, score))
            continue
        key = (new_text, False)
        if key not in lm_cache:
            prev_score, state = lm_cache[(text, False)]
            word_score, end_state = lm.score(state, next_word, is_last_word=False)
            lm_cache[key] = (prev_score + word_score, end_state)
        lm_score = lm_cache[key][0]
        if len(partial) > 0:
            if partial not in partial_cache:
                partial_cache[partial] = lm.score_partial(partial)
            lm_score += partial_cache[partial]
        out.append((new_text, partial, last, score, score + lm_score))
    return out


def _prune(scored: list, beam_size: int, beam_prune_logp: float) -> list:
    best = max(b[4] for b in scored)
    kept = [b for b in scored if b[4] >= best + beam_prune_logp]
    return heapq.nlargest(beam_size, kept, key=lambda b: b[4])


def ctc_beam_search(
    log_probs: np.ndarray,
    tokens: list[str],
    blank: int,
    beam_size: int = 100,
    lm: KenLMScorer | None = None,
    space_token: str = " ",
    beam_prune_logp: float = -10.0,
    token_prune_min_logp: float = -5.0,
    prune_history: bool = True,
    spm_token: str = "\u2581",
) -> str:
    """Best transcript of one utterance's CTC ``log_probs [T, V]`` by beam search, with ``lm`` fused when given.

    Parameters
    ----------
    log_probs : numpy.ndarray
        ``[T, V]`` log-posteriors of the valid frames.
    tokens : list of str
        Unit strings in index order, the blank included.
    blank : int
        Index of the CTC blank.
    beam_size : int
        Beams kept after each frame.
    lm : KenLMScorer, optional
        Word n-gram fused into the search.
    space_token : str
        The word-delimiter unit (ignored with SentencePiece units, whose
        words begin with ``spm_token``).
    beam_prune_logp : float
        Beams more than this below the best are dropped.
    token_prune_min_logp : float
        Units below this log-probability on a frame are not tried (the best one always is).
    prune_history : bool
        Keep one beam per LM context (the last ``order - 1`` words).
    spm_token : str
        SentencePiece's word-start marker.

    Returns
    -------
    str
        The words, single spaces between them.

    Examples
    --------
    >>> lp = np.log(np.array([[0.1, 0.8, 0.1], [0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], dtype=np.float32))
    >>> ctc_beam_search(lp, ["<blank>", "A", "B"], blank=0, beam_size=4)
    'AB'
    """
    is_spm = any(str(t).startswith(spm_token) for t in tokens)
    space_index = tokens.index(space_token) if (not is_spm and space_token in tokens) else -1
    lm_cache: dict = {}
    if lm is not None:
        lm_cache[("", False)] = (0.0, lm.start_state())
    partial_cache: dict = {}
    vocab = set(range(len(tokens)))
    history = max(1, (1 if lm is None else lm.order) - 1)
    beams = [("", "", "", None, 0.0)]  # (text, next_word, partial_word, last_token, score)
    for column in log_probs:
        if column[blank] > 0.0:  # SpeechBrain's blank_skip_threshold of 1.0: never true for log-probabilities
            continue
        candidates = (set(np.where(column > token_prune_min_logp)[0]) | {column.argmax()}) & vocab
        grown = []
        for index in candidates:
            p = column[index]
            token = tokens[index]
            for text, next_word, partial, last, score in beams:
                if index == blank or last == token:
                    grown.append((text, next_word, partial, token, score + p))
                elif is_spm and token[:1] == spm_token:
                    grown.append((text, partial, token[1:], token, score + p))
                elif not is_spm and index == space_index:
                    grown.append((text, partial, "", token, score + p))
                else:
                    grown.append((text, next_word, partial + token, token, score + p))
        scored = _prune(_lm_beams(_merge(grown), lm, lm_cache, partial_cache), beam_size, beam_prune_logp)
        if prune_history:
            seen, beams = set(), []
            for text, partial, last, score, _ in scored:
                key = (tuple(text.split()[-history:]), partial, last)
                if key not in seen:
                    seen.add(key)
                    beams.append((text, "", partial, last, score))
        else:
            beams = [(text, "", partial, last, score) for text, partial, last, score, _ in scored]
    final = _merge([(text, partial, "", None, score) for text, _, partial, _, score in beams])
    best = _prune(_lm_beams(final, lm, lm_cache, partial_cache), beam_size, beam_prune_logp)
    return " ".join(best[0][0].split())


def lm_spelling_share(words: list[str], tokens: list[str], blank: int) -> float:
    """Share of the LM's ``words`` spelt with the characters of the model's ``tokens`` (specials, blank aside).

    Examples
    --------
    >>> lm_spelling_share(["AB", "ba", "<s>"], ["<blank>", " ", "A", "B"], 0)
    0.5
    """
    units = [t for i, t in enumerate(tokens) if i != blank and not (len(t) > 2 and t[0] + t[-1] in ("<>", "[]"))]
    alphabet = {c for t in units for c in t} - {" ", "|", "\u2581"}
    words = [w for w in words if w and not (len(w) > 2 and w[0] + w[-1] == "<>")]
    return sum(set(w) <= alphabet for w in words) / len(words) if words else 0.0


class TranscribeError(ValueError):
    """An input this script cannot use (audio file, model folder, option), told in one line naming it."""


class AudioFileError(TranscribeError):
    """An audio file that cannot be transcribed; the message starts with its path."""


def _one_line(error: BaseException) -> str:
    """``Type: message`` of an exception on one line."""
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def check_samples(wav: np.ndarray, name: str = "audio") -> np.ndarray:
    """``wav [S]`` as float32 when usable; :class:`AudioFileError` for no samples or NaN/infinite ones.

    A non-finite sample would reach the fbank as NaN and the network would give an empty or arbitrary
    transcript, so it is refused instead, naming the count.

    Example
    -------
    >>> try:
    ...     check_samples(np.array([0.0, np.nan]), "x.wav")
    ... except AudioFileError as error:
    ...     print(error)
    x.wav: 1 of 2 samples are NaN or infinite; refused (fix or re-encode the file)
    """
    wav = np.asarray(wav)
    if wav.ndim != 1 or not (np.issubdtype(wav.dtype, np.floating) or np.issubdtype(wav.dtype, np.integer)):
        raise AudioFileError(f"{name}: expected one channel of real samples, got {wav.dtype} {list(wav.shape)}")
    if wav.shape[0] == 0:
        raise AudioFileError(f"{name}: no audio samples")
    with np.errstate(all="ignore"):
        wav = wav.astype(np.float32, copy=False)
    bad = int(wav.shape[0] - np.count_nonzero(np.isfinite(wav)))
    if bad:
        raise AudioFileError(
            f"{name}: {bad} of {wav.shape[0]} samples are NaN or infinite; refused (fix or re-encode the file)"
        )
    return wav


def resample(wav: np.ndarray, rate: int, new_rate: int) -> np.ndarray:
    """``wav [S]`` at ``rate`` Hz resampled to ``new_rate`` Hz ``[ceil(S * new_rate / rate)]`` (float32).

    Band-limited sinc interpolation with a Hann window, 6 zero crossings, cut-off 0.99 of the lower Nyquist
    frequency: ``torchaudio.functional.resample``'s defaults, in numpy (polyphase, float64, computed in
    pieces: memory a few MB beyond the output).
    """
    g = math.gcd(int(rate), int(new_rate))
    orig, new = int(rate) // g, int(new_rate) // g
    if orig == new:
        return np.asarray(wav, dtype=np.float32)
    if orig * new > 4_000_000:  # a table of new x (orig + 2 width) weights: refuse odd rate pairs
        raise ValueError(
            f"{rate} Hz: no small ratio to {new_rate} Hz; resample the file first (e.g. sox IN -r {new_rate} OUT.wav)"
        )
    zeros, rolloff = 6, 0.99
    base = min(orig, new) * rolloff
    width = math.ceil(zeros * orig / base)
    t = (np.arange(0, -new, -1)[:, None] / new + np.arange(-width, width + orig)[None] / orig) * base
    t = np.clip(t, -zeros, zeros)
    window = np.cos(t * np.pi / zeros / 2) ** 2
    t *= np.pi
    kernels = np.where(t == 0, 1.0, np.sin(t) / np.where(t == 0, 1.0, t)) * window * (base / orig)  # [new, K]
    padded = np.pad(np.asarray(wav, dtype=np.float64), (width, width + orig))
    frames = np.lib.stride_tricks.sliding_window_view(padded, kernels.shape[1])[::orig]  # [M, K], a view
    out = np.empty(frames.shape[0] * new, dtype=np.float32)
    rows = max(1, (1 << 18) // kernels.shape[1])
    for start in range(0, frames.shape[0], rows):
        out[start * new : (start + rows) * new] = (frames[start : start + rows] @ kernels.T).reshape(-1)
    return out[: math.ceil(new * wav.shape[0] / orig)]


def read_audio(path: str | os.PathLike, sample_rate: int, note=None) -> np.ndarray:
    """Mono float32 samples ``[S]`` of an audio file at ``sample_rate`` (channels averaged), checked.

    Raises :class:`AudioFileError` (one line starting with the path) for a missing, empty (0 bytes),
    unreadable or sample-less file and for NaN or infinite samples. Audio at another rate is resampled
    (:func:`resample`); ``note(message)`` is then called (the script prints it on stderr).
    """
    import soundfile as sf

    name = str(path)
    if not os.path.exists(path):
        raise AudioFileError(f"{name}: no such file")
    if os.path.isdir(path):
        raise AudioFileError(f"{name}: a folder, not an audio file")
    if os.path.getsize(path) == 0:
        raise AudioFileError(f"{name}: empty file (0 bytes)")
    try:
        wav, rate = sf.read(name, dtype="float32", always_2d=True)
    except Exception as error:  # soundfile raises several types for what it cannot decode
        raise AudioFileError(f"{name}: not readable audio ({_one_line(error)})") from None
    with np.errstate(all="ignore"):
        wav = check_samples(wav[:, 0] if wav.shape[1] == 1 else wav.mean(axis=1), name)
    if rate != sample_rate:
        if rate < MIN_SAMPLE_RATE:
            raise AudioFileError(f"{name}: {rate} Hz is too low for speech; this model takes {sample_rate} Hz")
        try:
            wav = resample(wav, rate, sample_rate)
        except ValueError as error:
            raise AudioFileError(f"{name}: {error}") from None
        if note is not None:
            note(f"{name}: {rate} Hz audio resampled to the model's {sample_rate} Hz")
    return wav


def _seconds(value: float, name: str, zero: bool = True) -> float:
    """``value`` as a finite float >= 0 (> 0 when not ``zero``), else :class:`TranscribeError` naming ``name``."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TranscribeError(f"{name} {value!r}: not a number") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        raise TranscribeError(f"{name} {value}: must be a finite number {'>= 0' if zero else '> 0'}")
    return value


def _read_config(folder: Path) -> dict:
    """``deploy.json`` of ``folder``, its values checked; :class:`TranscribeError` naming the file otherwise."""
    path = folder / CONFIG_NAME
    if not folder.is_dir():
        raise TranscribeError(f"{folder}: no such folder (give the folder speech-kd export wrote)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TranscribeError(f"{path}: missing; {folder} is not a folder written by speech-kd export") from None
    except (OSError, ValueError) as error:  # unreadable, not UTF-8, not JSON
        raise TranscribeError(f"{path}: not readable JSON ({_one_line(error)})") from None
    try:
        fb = config["fbank"]
        good = (
            isinstance(config["tokens"], list)
            and all(isinstance(t, str) for t in config["tokens"])
            and 0 <= int(config["blank_index"]) < len(config["tokens"])
            and int(config["sample_rate"]) > 0
            and float(config["frame_shift"]) > 0
            and int(config["min_samples"]) >= 0
            and int(fb["hop_length"]) > 0
            and float(fb["amin"]) > 0
            and math.isfinite(float(fb["top_db"]))
            and float(fb["ref_value"]) > 0
            and isinstance(config["model_file"], str)
            and config["format"] in ("onnx", "torchscript")
        )
    except (KeyError, TypeError, ValueError, OverflowError) as error:
        raise TranscribeError(
            f"{path}: a value is missing or of the wrong type ({_one_line(error)}); export the model again"
        ) from None
    if not good:
        raise TranscribeError(
            f"{path}: values out of range (tokens, blank_index, sample_rate, frame_shift, fbank, "
            "format); export the model again"
        )
    return config


class ExportedASR:
    """An exported folder, loaded: waveforms in, log-probabilities or text out.

    Parameters
    ----------
    folder : str or os.PathLike
        What ``speech-kd export`` wrote (``deploy.json``, ``fbank.npz``, ``model.onnx`` or ``model.ts``).
    threads : int, optional
        Intra-op threads of the runtime (default: ``$OMP_NUM_THREADS``, else the runtime's own choice).
    blank_penalty : float, optional
        Subtracted from the blank's log-probability at decoding (default: the folder's ``blank_penalty``).
    max_batch_seconds : float, optional
        Padded audio per network run (default :data:`MAX_BATCH_SECONDS`); the utterances given together are
        run longest first in groups of at most this much (:func:`run_groups`). 0: all in one padded batch.
    beam_size : int, optional
        Above 1: CTC beam search (:func:`ctc_beam_search`) instead of greedy decoding (default: 1, or the
        folder's recorded beam size, else :data:`DEFAULT_BEAM_SIZE`, when a language model is used).
    lm : str or os.PathLike, optional
        Word n-gram (ARPA, ``.arpa.gz`` or KenLM binary; needs the ``kenlm`` module) fused into the beam
        search. Default: the folder's own (``deploy.json`` ``"lm"``, copied by ``speech-kd export --lm``)
        with its recorded weights; ``""`` or ``"none"``: no LM.
    lm_weight, word_bonus : float, optional
        Weight of the LM's natural-log probability and score per word (default: the recorded ones for the
        folder's LM, else 0.5 and 1.5).

    Raises
    ------
    TranscribeError
        A missing or corrupt ``deploy.json``, ``fbank.npz`` or model file, or an option out of range (one
        line naming the file or option).
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        threads: int | None = None,
        blank_penalty: float | None = None,
        max_batch_seconds: float = MAX_BATCH_SECONDS,
        beam_size: int | None = None,
        lm: str | os.PathLike | None = None,
        lm_weight: float | None = None,
        word_bonus: float | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.config = _read_config(self.folder)
        try:
            arrays = np.load(self.folder / FEATURES_NAME)
            self.window, self.mel = np.asarray(arrays["window"], np.float64), np.asarray(arrays["mel"], np.float64)
        except Exception as error:  # missing, not an npz (numpy's message would suggest unsafe loading), keys missing
            raise TranscribeError(
                f"{self.folder / FEATURES_NAME}: missing or corrupt ({type(error).__name__}); export the model again"
            ) from None
        if self.window.ndim != 1 or self.mel.ndim != 2 or self.mel.shape[0] != self.window.shape[0] // 2 + 1:
            raise TranscribeError(
                f"{self.folder / FEATURES_NAME}: window and mel filters of other shapes than an "
                "fbank's; export the model again"
            )
        self._mel_blocks = mel_blocks(self.mel)
        try:  # numpy's BLAS held to one thread while the fbank runs (_one_blas_thread)
            from threadpoolctl import ThreadpoolController

            self._blas = ThreadpoolController()
        except ImportError:  # a script run sets OPENBLAS_NUM_THREADS itself
            self._blas = None
        self.tokens: list[str] = self.config["tokens"]
        self.blank_index = int(self.config["blank_index"])
        self.sample_rate = int(self.config["sample_rate"])
        self.frame_shift = float(self.config["frame_shift"])
        self.blank_penalty = float(self.config.get("blank_penalty", 0.0) if blank_penalty is None else blank_penalty)
        if not math.isfinite(self.blank_penalty):
            raise TranscribeError(f"blank_penalty {self.blank_penalty}: must be a finite number")
        self.max_batch_seconds = _seconds(max_batch_seconds, "max_batch_seconds")
        self._set_decoder(beam_size, lm, lm_weight, word_bonus)
        whole = isinstance(threads, (int, np.integer)) and not isinstance(threads, bool)
        if threads is not None and (not whole or threads < 1):
            raise TranscribeError(f"threads {threads!r}: must be a whole number >= 1")
        if threads is None:
            omp = os.environ.get("OMP_NUM_THREADS", "")
            threads = int(omp) if omp.isdigit() else 0  # unset or not a plain count: the runtime's own choice
        self.threads = threads or os.cpu_count() or 1
        model = self.folder / self.config["model_file"]
        if not model.is_file():
            raise TranscribeError(f"{model}: missing; export the model again")
        self.format = self.config["format"]
        if self.format == "onnx":
            try:
                import onnxruntime as ort
            except ImportError:
                raise TranscribeError("onnxruntime is not installed: pip install onnxruntime") from None

            def session(intra_op_threads: int) -> ort.InferenceSession:
                options = ort.SessionOptions()
                options.intra_op_num_threads = intra_op_threads
                options.inter_op_num_threads = 1
                return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])

            self._new_session = session
            try:
                self._session = session(threads)
            except Exception as error:  # onnxruntime's InvalidProtobuf, Fail, ... for what is not a model
                raise TranscribeError(
                    f"{model}: not a loadable ONNX model ({_one_line(error)[:300]}); export the model again"
                ) from None
            self._one_thread_session = self._session if self.threads == 1 else None  # made when first needed
        else:
            import torch

            if threads:
                torch.set_num_threads(threads)
            import warnings

            try:
                with warnings.catch_warnings():  # torch >= 2.9 calls TorchScript deprecated; it loads and runs
                    warnings.simplefilter("ignore", FutureWarning)
                    self._module = torch.jit.load(str(model), map_location="cpu").eval()
            except Exception as error:
                raise TranscribeError(
                    f"{model}: not a loadable TorchScript model ({_one_line(error)[:300]}); export the model again"
                ) from None

    def _set_decoder(self, beam_size, lm, lm_weight, word_bonus) -> None:
        """Greedy, or beam search with the LM checked and loaded (:class:`TranscribeError` naming the file)."""
        recorded = self.config.get("lm") if isinstance(self.config.get("lm"), dict) else {}
        own = lm is None and bool(recorded.get("file"))
        if own:
            lm = self.folder / str(recorded["file"])
        elif lm is not None and str(lm).strip().lower() in ("", "none"):
            lm = None
        self.lm_path = None if lm is None else Path(lm)
        defaults = recorded if own else {}
        self.lm_weight = float(defaults.get("lm_weight", DEFAULT_LM_WEIGHT) if lm_weight is None else lm_weight)
        self.word_bonus = float(defaults.get("word_bonus", DEFAULT_WORD_BONUS) if word_bonus is None else word_bonus)
        if beam_size is None:
            beam_size = int(defaults.get("beam_size", DEFAULT_BEAM_SIZE)) if self.lm_path is not None else 1
        if isinstance(beam_size, bool) or not isinstance(beam_size, (int, np.integer)) or beam_size < 1:
            raise TranscribeError(f"beam_size {beam_size!r}: must be a whole number >= 1")
        if not (math.isfinite(self.lm_weight) and self.lm_weight >= 0 and math.isfinite(self.word_bonus)):
            raise TranscribeError(
                f"lm_weight {self.lm_weight} / word_bonus {self.word_bonus}: must be finite, lm_weight >= 0"
            )
        self.beam_size = int(beam_size)
        self.space_token = next((t for t in (" ", "|") if t in self.tokens), " ")
        self.lm = None
        if self.lm_path is None:
            return
        path = self.lm_path
        if not path.is_file():
            raise TranscribeError(f"{path}: no such language model file")
        try:
            words = read_lm_words(path)
        except (OSError, EOFError, ValueError) as error:
            raise TranscribeError(f"{path}: not a readable language model ({_one_line(error)})") from None
        if not words:
            raise TranscribeError(f"{path}: corrupt or not a language model (no words found: ARPA or KenLM binary)")
        if not any(t in (" ", "|") or t.startswith("\u2581") for t in self.tokens):
            raise TranscribeError(
                f"{path}: the model's units have no word boundary (no ' ' or '|' unit, no '\u2581' pieces)"
            )
        share = lm_spelling_share(words, self.tokens, self.blank_index)
        if share < 0.5:
            upper = lm_spelling_share([w.upper() for w in words], self.tokens, self.blank_index)
            hint = "; its words are lower case, the model's units upper case" if upper >= 0.5 else ""
            raise TranscribeError(
                f"{path}: only {100 * share:.0f}% of the LM's {len(words)} words are spelt with the model's units{hint}"
            )
        try:
            self.lm = KenLMScorer(path, alpha=self.lm_weight, beta=self.word_bonus, unigrams=words)
        except ImportError as error:
            raise TranscribeError(f"{path}: {_one_line(error)}") from None
        except Exception as error:  # kenlm's OSError/RuntimeError on a corrupt file
            raise TranscribeError(f"{path}: KenLM cannot read it ({_one_line(error)[:200]})") from None

    def decode(self, log_probs: np.ndarray) -> str:
        """Transcript of one utterance's ``[T', V]`` log-probabilities: greedy, or beam search (with the LM)."""
        if self.beam_size == 1 and self.lm is None:
            return self.text(greedy_decode(log_probs, self.blank_index, self.blank_penalty))
        log_probs = np.array(log_probs, dtype=np.float32)
        log_probs[:, self.blank_index] -= self.blank_penalty
        return ctc_beam_search(
            log_probs, self.tokens, self.blank_index, self.beam_size, self.lm, space_token=self.space_token
        )

    def features(self, wav: np.ndarray) -> np.ndarray:
        """Fbank ``[T, F]`` of ``wav [S]``; audio shorter than ``min_samples`` is zero-padded to it first."""
        fb = self.config["fbank"]
        wav = np.asarray(wav, dtype=np.float32)
        if wav.shape[0] < int(self.config["min_samples"]):
            wav = np.pad(wav, (0, int(self.config["min_samples"]) - wav.shape[0]))
        return fbank(wav, self.window, self._mel_blocks, fb["hop_length"], fb["amin"], fb["top_db"], fb["ref_value"])

    def _one_blas_thread(self) -> contextlib.AbstractContextManager:
        """Limit numpy's BLAS to one thread (with threadpoolctl, when installed) while the fbank runs.

        The fbank's matrix products are small: BLAS threads gain nothing on them and spin after each call,
        taking the cores from the runtime's own threads (measured: the exported student with 2 threads ran
        3.3x faster than the PyTorch teacher with numpy's BLAS on 2 threads, 9.0x with 1).
        """
        return self._blas.limit(limits=1, user_api="blas") if self._blas is not None else contextlib.nullcontext()

    def _one_thread(self) -> onnxruntime.InferenceSession:  # noqa: F821
        """The one-thread ONNX session that groups run side by side on (made on first use: start-up stays one load)."""
        if self._one_thread_session is None:
            self._one_thread_session = self._new_session(1)
        return self._one_thread_session

    def run(self, feats: np.ndarray, lengths: np.ndarray, one_thread: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The network on padded ``feats [B, T, F]`` (float32) and ``lengths [B]`` (int64).

        Returns ``log_probs [B, T', V]`` and ``out_lengths [B]``. ``one_thread``: on the one-thread ONNX session
        (for runs made side by side from several threads).
        """
        if self.format == "onnx":
            session = self._one_thread() if one_thread else self._session
            log_probs, out_lengths = session.run(None, {"feats": feats, "lengths": lengths})
            return log_probs, out_lengths
        import torch

        with torch.inference_mode():
            log_probs, out_lengths = self._module(torch.from_numpy(feats), torch.from_numpy(lengths))
        return log_probs.numpy(), out_lengths.numpy()

    def log_probs(self, wavs: list[np.ndarray]) -> list[np.ndarray]:
        """Per-utterance ``[T', V]`` log-probabilities of waveforms ``[S]``, in the order given.

        Padded batches of at most ``max_batch_seconds`` (longest first, :func:`run_groups`) when the folder's
        network is exact per utterance in a batch (fp32); otherwise (``batch_exact`` false: int8's activation
        scales are taken over the whole batch) one by one. With ``threads`` > 1 (ONNX) that many groups run
        side by side, one thread each, instead of one group over all threads: the student's matrices are too
        small to split well. Either way an utterance's result does not depend on the others.
        """
        wavs = [check_samples(w, f"utterance {i}") for i, w in enumerate(wavs)]  # NaN: refused, not decoded
        with self._one_blas_thread():
            feats = [self.features(w) for w in wavs]
        lengths = [f.shape[0] for f in feats]
        if not self.config.get("batch_exact", True):
            groups = [[i] for i in range(len(feats))]
        elif self.max_batch_seconds > 0:
            hop = int(self.config["fbank"]["hop_length"])  # samples per fbank frame
            groups = run_groups(lengths, max(int(self.max_batch_seconds * self.sample_rate / hop), 1))
        else:
            groups = [list(range(len(feats)))] if feats else []
        side_by_side = self.format == "onnx" and self.threads > 1 and len(groups) > 1
        if side_by_side:
            self._one_thread()  # made here, before the threads share it

        def run_group(group: list[int]) -> list[np.ndarray]:
            batch = np.zeros((len(group), max(lengths[i] for i in group), feats[group[0]].shape[1]), dtype=np.float32)
            for row, i in enumerate(group):
                batch[row, : lengths[i]] = feats[i]
            log_probs, out_lengths = self.run(
                batch, np.array([lengths[i] for i in group], dtype=np.int64), one_thread=side_by_side
            )
            return [log_probs[row, : int(out_lengths[row])] for row in range(len(group))]

        if side_by_side:  # groups run at once, one thread each: a small network splits badly over threads
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(min(self.threads, len(groups))) as pool:
                results = list(pool.map(run_group, groups))
        else:
            results = [run_group(group) for group in groups]
        out: list[np.ndarray] = [np.empty(0)] * len(feats)
        for group, pieces in zip(groups, results):
            for i, piece in zip(group, pieces):
                out[i] = piece
        return out

    def text(self, ids: list[int]) -> str:
        """Words of token ids (``|`` and ``\u2581`` word delimiters as spaces, spaces squeezed)."""
        text = "".join(self.tokens[i] for i in ids).replace("|", " ").replace("\u2581", " ")
        return " ".join(text.split())

    def transcribe(self, wavs: list[np.ndarray]) -> list[str]:
        """Transcripts of waveforms ``[S]`` at the folder's sample rate (as :meth:`log_probs` runs them)."""
        return [self.decode(lp) for lp in self.log_probs(wavs)]

    def stream_log_probs(
        self, wav: np.ndarray, chunk_seconds: float = 20.0, context_seconds: float = CONTEXT_SECONDS
    ) -> Iterator[np.ndarray]:
        """Log-probabilities ``[T'_i, V]`` of a long waveform ``wav [S]``, chunk after chunk (bounded memory).

        The file is cut into consecutive chunks of ``chunk_seconds`` (rounded to whole output frames); each
        is run with up to ``context_seconds`` of the audio before and after it, and only the chunk's own
        output frames are kept. Concatenated, the pieces have the frame count of the whole file run at once,
        and each frame has seen at least ``context_seconds`` on both sides (or the file's edge). Memory and
        time per chunk depend on ``chunk_seconds + 2 * context_seconds``, not on the file's length;
        ``context_seconds=0`` gives independent chunks (a word cut by a boundary may be lost).
        """
        chunk_seconds = _seconds(chunk_seconds, "chunk_seconds", zero=False)
        context_seconds = _seconds(context_seconds, "context_seconds")
        wav = check_samples(wav, "audio")
        windows = chunk_windows(wav.shape[0], self.frame_shift, self.sample_rate, chunk_seconds, context_seconds)
        for first, last, skip, keep in windows:
            out = self.log_probs([wav[first:last]])[0]
            yield out[skip:] if keep is None else out[skip : skip + keep]

    def transcribe_long(
        self, wav: np.ndarray, chunk_seconds: float = 20.0, context_seconds: float = CONTEXT_SECONDS
    ) -> str:
        """Transcript of a long waveform ``[S]`` from :meth:`stream_log_probs` (bounded memory).

        Greedy decoding runs across chunk boundaries (a token repeated over a boundary is merged as within a
        chunk), keeping only the last frame's best token between chunks; beam search runs on the chunks'
        frames put together.
        """
        if self.beam_size > 1 or self.lm is not None:
            pieces = list(self.stream_log_probs(wav, chunk_seconds, context_seconds))
            return self.decode(np.concatenate(pieces) if pieces else np.zeros((0, len(self.tokens)), np.float32))
        ids: list[int] = []
        previous = -1
        for piece in self.stream_log_probs(wav, chunk_seconds, context_seconds):
            ids += greedy_decode(piece, self.blank_index, self.blank_penalty, previous=previous)
            if piece.shape[0]:
                previous = int(best_tokens(piece[-1:], self.blank_index, self.blank_penalty)[0])
        return self.text(ids)

    def transcribe_files(self, paths: list[str], batch: int = 32) -> list[str]:
        """Transcripts of audio files, read ``batch`` at a time (each read run as :meth:`log_probs` runs them).

        A file that cannot be used raises :class:`AudioFileError` (the script instead reports it and goes on).
        """
        out: list[str] = []
        for start in range(0, len(paths), batch):
            out += self.transcribe([read_audio(p, self.sample_rate) for p in paths[start : start + batch]])
        return out


def _number(kind: type, low: float, low_ok: bool, meaning: str, high: float = math.inf):
    """An argparse type: a finite ``kind`` above ``low`` (or equal to it when ``low_ok``), at most ``high``."""

    def parse(text: str):
        try:
            value = kind(text)
        except (TypeError, ValueError):
            what = "whole number" if kind is int else "number"
            raise argparse.ArgumentTypeError(f"{text!r} is not a {what}") from None
        if not math.isfinite(value) or value < low or (value == low and not low_ok) or value > high:
            raise argparse.ArgumentTypeError(f"{text!r}: {meaning}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def build_parser() -> argparse.ArgumentParser:
    """The options of ``python transcribe.py`` (every number range-checked: one-line errors, exit status 2)."""
    parser = argparse.ArgumentParser(
        description="Transcribe audio files with this exported model folder. "
        "Exit status: 0 all transcribed, 1 some file failed (reported on stderr), "
        "2 bad option or model folder."
    )
    parser.add_argument(
        "files",
        nargs="+",
        help="audio files (mono or averaged to mono; other sample rates are resampled to the model's)",
    )
    parser.add_argument("--model", default=str(Path(__file__).resolve().parent), help="exported folder")
    parser.add_argument(
        "--batch",
        type=_number(int, 1, True, "must be at least 1"),
        default=32,
        help="files read at a time (run longest first, in groups of --max_batch_seconds)",
    )
    parser.add_argument(
        "--max_batch_seconds",
        type=_number(float, 0, True, "must be a finite number >= 0"),
        default=MAX_BATCH_SECONDS,
        help="padded audio per network run (0: each --batch of files in one padded batch)",
    )
    parser.add_argument(
        "--threads",
        type=_number(int, 1, True, f"must be 1 to {MAX_THREADS}", MAX_THREADS),
        default=None,
        help="runtime threads (default: $OMP_NUM_THREADS)",
    )
    parser.add_argument(
        "--blank_penalty",
        type=_number(float, -math.inf, False, "must be a finite number"),
        default=None,
        help="subtracted from blank log-probs",
    )
    parser.add_argument(
        "--chunk_seconds",
        type=_number(float, 0, True, "must be a finite number >= 0"),
        default=None,
        help=f"> 0: each file in chunks of this many seconds (bounded memory); 0: each file whole; "
        f"default: files over {LONG_SECONDS:g} s in {AUTO_CHUNK_SECONDS:g} s chunks, "
        "shorter ones whole",
    )
    parser.add_argument(
        "--context_seconds",
        type=_number(float, 0, True, "must be a finite number >= 0"),
        default=CONTEXT_SECONDS,
        help="with chunks: audio before and after each chunk also read (0: none)",
    )
    parser.add_argument(
        "--beam_size",
        type=_number(int, 1, True, "must be at least 1"),
        default=None,
        help=f"CTC beam search with this many beams (default: 1, greedy; with an LM the folder's, "
        f"else {DEFAULT_BEAM_SIZE})",
    )
    parser.add_argument(
        "--lm",
        default=None,
        help="word n-gram (ARPA or KenLM binary, needs the kenlm module) for the beam search; default: the "
        "folder's own (speech-kd export --lm) with its recorded weights; none: no LM",
    )
    parser.add_argument(
        "--lm_weight",
        type=_number(float, 0, True, "must be a finite number >= 0"),
        default=None,
        help="weight of the LM's log-probability",
    )
    parser.add_argument(
        "--word_bonus",
        type=_number(float, -math.inf, False, "must be a finite number"),
        default=None,
        help="score added per word",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """``python transcribe.py FILE ...``: one ``FILE<TAB>transcript`` line per file (stdout).

    Each file that cannot be used is reported on stderr (one line naming it) and the others are transcribed;
    returns 1 if any failed, 0 if none, 2 for a model folder that cannot be loaded.
    """
    args = build_parser().parse_args(argv)
    try:
        asr = ExportedASR(
            args.model,
            threads=args.threads,
            blank_penalty=args.blank_penalty,
            max_batch_seconds=args.max_batch_seconds,
            beam_size=args.beam_size,
            lm=args.lm,
            lm_weight=args.lm_weight,
            word_bonus=args.word_bonus,
        )
    except TranscribeError as error:
        print(f"transcribe.py: error: {error}", file=sys.stderr)
        return 2
    failed = 0
    pending: list[tuple[str, np.ndarray]] = []  # short files read, transcribed together (order kept)

    def flush() -> None:
        if not pending:
            return
        for (path, _), text in zip(pending, asr.transcribe([wav for _, wav in pending])):
            print(f"{path}\t{text}", flush=True)
        pending.clear()

    def note(message: str) -> None:
        print(f"transcribe.py: note: {message}", file=sys.stderr)

    for path in args.files:
        try:
            wav = read_audio(path, asr.sample_rate, note=note)
        except AudioFileError as error:
            print(f"transcribe.py: error: {error}", file=sys.stderr)
            failed += 1
            continue
        seconds = wav.shape[0] / asr.sample_rate
        chunk = args.chunk_seconds
        if chunk is None:  # automatic: long files in chunks (bounded memory), short ones whole and batched
            chunk = AUTO_CHUNK_SECONDS if seconds > LONG_SECONDS else 0.0
        if chunk > 0:
            flush()
            print(f"{path}\t{asr.transcribe_long(wav, chunk, args.context_seconds)}", flush=True)
            continue
        if seconds > LONG_SECONDS:  # asked for with --chunk_seconds 0; self-attention: memory ~ length squared
            note(
                f"{path}: {seconds:.0f} s in one piece (--chunk_seconds 0); attention memory grows with the "
                "square of the length (a 9-minute file took 12 GB)"
            )
        pending.append((path, wav))
        if len(pending) >= args.batch:
            flush()
    flush()
    if failed:
        print(f"transcribe.py: {failed} of {len(args.files)} file(s) not transcribed (see above)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
