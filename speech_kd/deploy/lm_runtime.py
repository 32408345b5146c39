"""CTC beam search with an optional KenLM word n-gram, on numpy only: for runtimes without SpeechBrain or torch.

Self-contained on purpose (numpy and the standard library; the ``kenlm``
module only when a language model is given), so that it can be copied as it
is into an exported folder's single-file ``transcribe.py``.

:func:`ctc_beam_search` is a port of SpeechBrain 1.1's
``speechbrain.decoders.ctc.CTCBeamSearcher`` (itself adapted from
pyctcdecode), step for step: the same token and beam pruning, beam merging,
history pruning, LM shallow fusion (``alpha`` times the natural-log LM score
plus ``beta`` per word, ``unk_score_offset`` for out-of-vocabulary words and
partial words) and the same floating-point operations on the same numpy
types, so it returns SpeechBrain's transcripts (``tests/unit/test_lm_decoding.py``
checks it). Like SpeechBrain's searcher it does not add the end-of-sentence
probability at the end of an utterance.

``log_probs`` are ``[T, V]`` natural-log posteriors of one utterance
(float32 as a model outputs them), ``tokens`` the ``V`` unit strings in
index order (the blank included), word boundaries a space token (``" "``,
or ``"|"`` for wav2vec2-style vocabularies) or SentencePiece's ``"▁"`` prefix.
"""

from __future__ import annotations

import bisect
import gzip
import heapq
import math
import os

import numpy as np

__all__ = ["KenLMScorer", "ctc_beam_search", "read_lm_words"]

#: the first bytes of a KenLM binary file
_BINARY_MAGIC = b"mmap lm "
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
        head = fh.read(len(_BINARY_MAGIC))
    if head == _BINARY_MAGIC:
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
