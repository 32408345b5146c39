"""CTC decoders for scoring: greedy, and SpeechBrain's beam searchers with an optional KenLM word n-gram.

A :class:`Decoder` turns ``log_probs [B, T, V]`` (natural-log posteriors) and
``lengths [B]`` (valid frames) into transcripts, and :meth:`Decoder.describe`
gives the ``"decoder"`` record of evaluation JSON: ``{"name", "beam_size",
"lm", "lm_weight", "word_bonus"}``. :class:`BeamDecoder` wraps
``speechbrain.decoders.ctc.CTCBeamSearcher`` (``"beam"``) or
``CTCPrefixBeamSearcher`` (``"prefix"``); the LM is checked
(:func:`speech_kd.scoring.lm.load_lm`, :func:`speech_kd.scoring.lm.check_lm_units`) when the
decoder is made, before any decoding. :func:`tune_lm` picks the LM weight and
word bonus on a dev set by a small grid.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from speech_kd.scoring.lm import LMError, check_lm_units, load_lm
from speech_kd.scoring.metrics import error_rates

__all__ = [
    "DecodingError",
    "Decoder",
    "GreedyDecoder",
    "BeamDecoder",
    "TuneResult",
    "tune_lm",
    "make_decoder",
    "DEFAULT_GRID",
]

#: the grid :func:`tune_lm` searches by default: 4 LM weights x 3 word bonuses
DEFAULT_GRID = {"lm_weight": (0.3, 0.5, 0.8, 1.2), "word_bonus": (0.0, 1.0, 2.0)}
_SEARCHERS = ("beam", "prefix")


class DecodingError(ValueError):
    """Decoder settings or inputs that cannot be decoded (one line)."""


def _texts(ids_per_utt: Iterable[Sequence[int]], tokens: list[str]) -> list[str]:
    out = []
    for ids in ids_per_utt:
        text = "".join(tokens[i] for i in ids).replace("|", " ").replace("\u2581", " ")
        out.append(" ".join(text.split()))
    return out


def _as_numpy(log_probs, lengths) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(log_probs, torch.Tensor):
        log_probs = log_probs.detach().float().cpu().numpy()
    if isinstance(lengths, torch.Tensor):
        lengths = lengths.detach().cpu().numpy()
    log_probs = np.asarray(log_probs, dtype=np.float32)
    if log_probs.ndim != 3:
        raise DecodingError(f"log_probs must be [B, T, V], got shape {tuple(log_probs.shape)}")
    lengths = np.asarray(lengths if lengths is not None else [log_probs.shape[1]] * log_probs.shape[0])
    if lengths.shape != (log_probs.shape[0],):
        raise DecodingError(f"lengths must be [B] = [{log_probs.shape[0]}], got shape {tuple(lengths.shape)}")
    if np.issubdtype(lengths.dtype, np.floating) and lengths.size and lengths.max() <= 1.0:
        lengths = np.round(lengths * log_probs.shape[1])  # SpeechBrain's relative lengths
    return log_probs, np.clip(lengths.astype(np.int64), 0, log_probs.shape[1])


class Decoder:
    """Base of the CTC decoders: ``decode(log_probs [B, T, V], lengths [B]) -> list of transcripts``.

    Parameters
    ----------
    tokens : list of str
        The model's units in index order, the blank included
        (:func:`speech_kd.data.dataio.token_strings`).
    blank : int
        The blank's index.
    """

    name = "base"

    def __init__(self, tokens: list[str], blank: int):
        tokens = list(tokens)
        if isinstance(blank, bool) or not isinstance(blank, (int, np.integer)) or not 0 <= blank < len(tokens):
            raise DecodingError(f"blank index {blank!r} is outside the model's {len(tokens)} units")
        self.tokens = tokens
        self.blank = int(blank)

    def _check_width(self, log_probs: np.ndarray) -> None:
        if log_probs.shape[-1] != len(self.tokens):
            raise DecodingError(
                f"log_probs have {log_probs.shape[-1]} units per frame, the decoder's vocabulary {len(self.tokens)}"
            )

    def decode(self, log_probs, lengths=None) -> list[str]:
        """Transcripts of a batch (upper/lower case as the units spell them, single spaces)."""
        raise NotImplementedError

    def describe(self) -> dict:
        """The ``"decoder"`` record: ``{"name", "beam_size", "lm", "lm_weight", "word_bonus"}``."""
        raise NotImplementedError


class GreedyDecoder(Decoder):
    """Best unit per frame, repeats merged, blanks dropped; word markers (``|``, ``▁``) become spaces.

    Examples
    --------
    >>> lp = np.log(np.array([[[0.1, 0.9, 0.0], [0.9, 0.1, 0.0], [0.1, 0.0, 0.9], [0.1, 0.9, 0.0]]]) + 1e-9)
    >>> GreedyDecoder(["<blank>", "A", " "], 0).decode(lp, [4])
    ['A A']
    >>> GreedyDecoder(["<blank>", "A", " "], 0).describe()
    {'name': 'greedy', 'beam_size': None, 'lm': None, 'lm_weight': None, 'word_bonus': None}
    """

    name = "greedy"

    def decode(self, log_probs, lengths=None) -> list[str]:
        """Greedy transcripts of ``log_probs [B, T, V]`` over ``lengths [B]`` frames."""
        log_probs, lengths = _as_numpy(log_probs, lengths)
        self._check_width(log_probs)
        ids = []
        for lp, n in zip(log_probs, lengths):
            best = lp[: int(n)].argmax(-1)
            keep = np.ones_like(best, dtype=bool)
            keep[1:] = best[1:] != best[:-1]
            ids.append(best[keep & (best != self.blank)].tolist())
        return _texts(ids, self.tokens)

    def describe(self) -> dict:
        """``{"name": "greedy", ...}`` with no beam or LM."""
        return {"name": "greedy", "beam_size": None, "lm": None, "lm_weight": None, "word_bonus": None}


def _check_number(name: str, value, low: float | None = None) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float, np.integer, np.floating))
        or not math.isfinite(float(value))
    ):
        raise DecodingError(f"--{name} must be a finite number, got {value!r}")
    if low is not None and float(value) < low:
        raise DecodingError(f"--{name} must be >= {low:g}, got {value!r}")
    return float(value)


def _space_token(tokens: list[str], blank: int) -> str:
    for token in (" ", "|"):
        if token in tokens and tokens.index(token) != blank:
            return token
    return " "


class BeamDecoder(Decoder):
    """CTC beam search with SpeechBrain's searchers, with a KenLM word n-gram fused when ``lm_path`` is given.

    Parameters
    ----------
    tokens : list of str
        The model's units in index order, the blank included.
    blank : int
        The blank's index.
    beam_size : int
        Beams kept per frame (>= 1).
    lm_path : path-like, optional
        ARPA (plain or ``.gz``) or KenLM binary file; its words must be
        spelt by ``tokens`` (:func:`speech_kd.scoring.lm.check_lm_units`).
    lm_weight : float
        Weight of the LM's natural-log probability (SpeechBrain's ``alpha``, >= 0).
    word_bonus : float
        Score added per word (SpeechBrain's ``beta``).
    searcher : str
        ``"beam"`` (``CTCBeamSearcher``) or ``"prefix"`` (``CTCPrefixBeamSearcher``).
    beam_prune_logp, token_prune_min_logp : float
        SpeechBrain's pruning thresholds (its defaults).
    unigrams : iterable of str, optional
        The LM's words (default: read from the file, binary files included).

    Raises
    ------
    DecodingError
        Bad settings (``beam_size`` 0, a negative ``lm_weight``, an unknown searcher).
    speech_kd.scoring.lm.LMError
        A missing, corrupt or mismatched LM, or no ``kenlm`` module.
    """

    def __init__(
        self,
        tokens: list[str],
        blank: int,
        beam_size: int = 100,
        lm_path: str | os.PathLike | None = None,
        lm_weight: float = 0.5,
        word_bonus: float = 1.5,
        searcher: str = "beam",
        beam_prune_logp: float = -10.0,
        token_prune_min_logp: float = -5.0,
        unigrams: Iterable[str] | None = None,
    ):
        super().__init__(tokens, blank)
        if isinstance(beam_size, bool) or not isinstance(beam_size, (int, np.integer)) or beam_size < 1:
            raise DecodingError(f"--beam_size must be a positive integer, got {beam_size!r}")
        if searcher not in _SEARCHERS:
            raise DecodingError(f"searcher must be one of {', '.join(_SEARCHERS)}, got {searcher!r}")
        self.beam_size = int(beam_size)
        self.lm_weight = _check_number("lm_weight", lm_weight, low=0.0)
        self.word_bonus = _check_number("word_bonus", word_bonus)
        self.searcher_name = searcher
        self.lm_path = None if lm_path is None else Path(lm_path)
        self.space_token = _space_token(self.tokens, self.blank)
        kenlm_path = None
        if self.lm_path is not None:
            info = load_lm(self.lm_path)
            check_lm_units(info, self.tokens, self.blank)
            if unigrams is None:
                unigrams = list(info.words) if info.words is not None else None
            try:
                import kenlm  # noqa: F401
            except ImportError as err:
                raise LMError(
                    f"{self.lm_path}: decoding with an LM needs the kenlm module; run scripts/install_kenlm.sh"
                ) from err
            kenlm_path = str(self.lm_path)
        from speechbrain.decoders.ctc import CTCBeamSearcher, CTCPrefixBeamSearcher

        cls = CTCBeamSearcher if searcher == "beam" else CTCPrefixBeamSearcher
        try:
            self.searcher = cls(
                blank_index=self.blank,
                vocab_list=self.tokens,
                space_token=self.space_token,
                kenlm_model_path=kenlm_path,
                unigrams=None if unigrams is None else list(unigrams),
                alpha=self.lm_weight,
                beta=self.word_bonus,
                beam_size=self.beam_size,
                beam_prune_logp=beam_prune_logp,
                token_prune_min_logp=token_prune_min_logp,
            )
        except ImportError as err:  # SpeechBrain's KenLM scorer also imports pygtrie, and re-raises as "kenlm"
            cause = err.__context__ if isinstance(err.__context__, ImportError) else err
            raise LMError(
                f"{self.lm_path}: decoding with an LM needs the {cause.name or 'kenlm'} module, which is "
                "not installed; run scripts/install_kenlm.sh"
            ) from err
        except (OSError, RuntimeError) as err:  # kenlm's loading errors
            first = str(err).strip().splitlines()[:1] or [type(err).__name__]
            raise LMError(f"{self.lm_path}: KenLM cannot read it: {first[0][:200]}") from err

    @property
    def name(self) -> str:
        """``"beam"``/``"prefix"``, ``+lm`` with a language model."""
        return self.searcher_name + ("+lm" if self.lm_path is not None else "")

    def set_lm_weights(self, lm_weight: float, word_bonus: float) -> None:
        """Change the LM weight and word bonus without reloading the LM."""
        self.lm_weight = _check_number("lm_weight", lm_weight, low=0.0)
        self.word_bonus = _check_number("word_bonus", word_bonus)
        self.searcher.alpha, self.searcher.beta = self.lm_weight, self.word_bonus
        if self.searcher.lm is not None:
            self.searcher.lm.alpha, self.searcher.lm.beta = self.lm_weight, self.word_bonus

    def decode(self, log_probs, lengths=None) -> list[str]:
        """Beam-search transcripts of ``log_probs [B, T, V]`` over ``lengths [B]`` frames."""
        log_probs, lengths = _as_numpy(log_probs, lengths)
        self._check_width(log_probs)
        texts = []
        for lp, n in zip(log_probs, lengths):
            hyps = self.searcher.decode_log_probs(lp, int(n))
            texts.append(" ".join(hyps[0].text.split()) if hyps else "")
        return texts

    def describe(self) -> dict:
        """The searcher, beam size, and the LM file with its weights (None without an LM)."""
        with_lm = self.lm_path is not None
        return {
            "name": self.name,
            "beam_size": self.beam_size,
            "lm": str(self.lm_path) if with_lm else None,
            "lm_weight": self.lm_weight if with_lm else None,
            "word_bonus": self.word_bonus if with_lm else None,
        }

    def tune(self, log_probs, lengths, references: list[str], grid: dict | None = None) -> TuneResult:
        """:func:`tune_lm` on this decoder's LM; the picked weights are kept."""
        if self.lm_path is None:
            raise DecodingError("--tune_lm needs a language model (--lm)")

        def decode(lp, lens, lm_weight, word_bonus):
            self.set_lm_weights(lm_weight, word_bonus)
            return self.decode(lp, lens)

        result = tune_lm(decode, log_probs, lengths, references, grid)
        self.set_lm_weights(result.lm_weight, result.word_bonus)
        return result


def make_decoder(
    tokens: list[str],
    blank: int,
    beam_size: int = 1,
    lm_path=None,
    lm_weight: float = 0.5,
    word_bonus: float = 1.5,
    searcher: str = "beam",
) -> Decoder:
    """Greedy for ``beam_size == 1`` without an LM (the default), else :class:`BeamDecoder`.

    Examples
    --------
    >>> make_decoder(["<blank>", "A", " "], 0).describe()["name"]
    'greedy'
    >>> make_decoder(["<blank>", "A", " "], 0, beam_size=0)
    Traceback (most recent call last):
    ...
    speech_kd.scoring.decoding.DecodingError: --beam_size must be a positive integer, got 0
    """
    if isinstance(beam_size, bool) or not isinstance(beam_size, (int, np.integer)) or beam_size < 1:
        raise DecodingError(f"--beam_size must be a positive integer, got {beam_size!r}")
    if beam_size == 1 and lm_path is None:
        return GreedyDecoder(tokens, blank)
    return BeamDecoder(tokens, blank, beam_size, lm_path, lm_weight, word_bonus, searcher)


@dataclass
class TuneResult:
    """The LM weight and word bonus :func:`tune_lm` picked, and every grid point's dev WER/CER."""

    lm_weight: float
    word_bonus: float
    wer: float
    cer: float
    table: list[dict] = field(default_factory=list)

    def summary(self) -> str:
        """One line saying what was picked and out of what."""
        worst = max(row["wer"] for row in self.table)
        return (
            f"tune_lm: lm_weight {self.lm_weight:g}, word_bonus {self.word_bonus:g} picked by dev WER "
            f"{self.wer:.2f} (grid of {len(self.table)}, worst {worst:.2f})"
        )


def tune_lm(
    decode_fn: Callable[[np.ndarray, np.ndarray, float, float], list[str]],
    log_probs,
    lengths,
    references: list[str],
    grid: dict | None = None,
) -> TuneResult:
    """Pick the LM weight and word bonus with the lowest dev WER on a small grid.

    Ties go to the lower CER, then to the smaller LM weight and word bonus
    (the grid's first point of equal scores).

    Parameters
    ----------
    decode_fn : callable
        ``decode_fn(log_probs, lengths, lm_weight, word_bonus) -> transcripts``.
    log_probs, lengths
        The dev set's ``[B, T, V]`` log-posteriors and ``[B]`` frames (as
        :meth:`Decoder.decode` takes them).
    references : list of str
        The dev transcripts.
    grid : dict, optional
        ``{"lm_weight": [...], "word_bonus": [...]}`` (default :data:`DEFAULT_GRID`).

    Returns
    -------
    TuneResult

    Examples
    --------
    >>> fn = lambda lp, n, a, b: ["A B" if a > 0.4 else "A"]
    >>> result = tune_lm(fn, None, None, ["A B"], {"lm_weight": [0.2, 0.5], "word_bonus": [1.0]})
    >>> result.lm_weight, result.word_bonus, result.wer
    (0.5, 1.0, 0.0)
    """
    grid = dict(DEFAULT_GRID if grid is None else grid)
    weights = [_check_number("lm_weight", w, low=0.0) for w in grid.get("lm_weight", ())]
    bonuses = [_check_number("word_bonus", b) for b in grid.get("word_bonus", ())]
    if not weights or not bonuses:
        raise DecodingError("the tuning grid needs at least one lm_weight and one word_bonus")
    if not references:
        raise DecodingError("--tune_lm needs dev utterances with transcripts")
    table = []
    for weight in sorted(set(weights)):
        for bonus in sorted(set(bonuses)):
            hyps = decode_fn(log_probs, lengths, weight, bonus)
            rates = error_rates(list(references), list(hyps))
            table.append({"lm_weight": weight, "word_bonus": bonus, "wer": rates.wer, "cer": rates.cer})
    best = min(table, key=lambda row: (row["wer"], row["cer"]))
    return TuneResult(best["lm_weight"], best["word_bonus"], best["wer"], best["cer"], table)
