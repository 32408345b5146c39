"""WER and CER with jiwer, computed once per run, with per-utterance detail."""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import jiwer

__all__ = [
    "ErrorRates",
    "UtteranceErrors",
    "normalize_text",
    "error_rates",
    "utterance_errors",
    "write_utterances",
    "read_utterance_errors",
    "read_utterance_decoder",
    "DECODER_LINE",
]


def normalize_text(text: str) -> str:
    """Upper-case and squeeze whitespace (LibriSpeech's transcript convention).

    Examples
    --------
    >>> normalize_text(" hello   world ")
    'HELLO WORLD'
    """
    return " ".join(text.upper().split())


@dataclass
class ErrorRates:
    """Corpus-level error rates in percent."""

    wer: float
    cer: float
    num_utts: int
    word_errors: int
    ref_words: int
    substitutions: int
    deletions: int
    insertions: int

    def to_dict(self) -> dict:
        """Plain-dict view for JSON."""
        return asdict(self)


@dataclass
class UtteranceErrors:
    """One utterance: reference, hypothesis and its word errors."""

    utt_id: str
    ref: str
    hyp: str
    errors: int
    ref_words: int
    wer: float
    alignment: str


def error_rates(refs: list[str], hyps: list[str]) -> ErrorRates:
    """Corpus WER and CER (percent) of ``hyps`` against ``refs`` after normalisation.

    Empty references are allowed (their words count as insertions).

    Examples
    --------
    >>> r = error_rates(["THE CAT SAT", "A DOG"], ["THE CAT SAT", "A DOT"])
    >>> round(r.wer, 2), round(r.cer, 2)
    (20.0, 6.25)
    """
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    refs = [normalize_text(r) for r in refs]
    hyps = [normalize_text(h) for h in hyps]
    pairs = [(r, h) for r, h in zip(refs, hyps) if r]
    empty_ref_words = sum(len(h.split()) for r, h in zip(refs, hyps) if not r)
    empty_ref_chars = sum(len(h) for r, h in zip(refs, hyps) if not r)
    if pairs:
        words = jiwer.process_words([p[0] for p in pairs], [p[1] for p in pairs])
        chars = jiwer.process_characters([p[0] for p in pairs], [p[1] for p in pairs])
        subs, dels, ins = words.substitutions, words.deletions, words.insertions + empty_ref_words
        ref_words = sum(len(p[0].split()) for p in pairs)
        ref_chars = sum(len(p[0]) for p in pairs)
        char_errors = chars.substitutions + chars.deletions + chars.insertions + empty_ref_chars
    else:
        subs = dels = 0
        ins, ref_words, ref_chars, char_errors = empty_ref_words, 0, 0, empty_ref_chars
    word_errors = subs + dels + ins
    return ErrorRates(
        wer=100.0 * word_errors / max(1, ref_words),
        cer=100.0 * char_errors / max(1, ref_chars),
        num_utts=len(refs),
        word_errors=word_errors,
        ref_words=ref_words,
        substitutions=subs,
        deletions=dels,
        insertions=ins,
    )


def utterance_errors(ids: list[str], refs: list[str], hyps: list[str]) -> list[UtteranceErrors]:
    """Per-utterance word errors with jiwer's alignment, worst first."""
    out = []
    for uid, ref, hyp in zip(ids, refs, hyps):
        ref, hyp = normalize_text(ref), normalize_text(hyp)
        if ref:
            res = jiwer.process_words(ref, hyp)
            errors = res.substitutions + res.deletions + res.insertions
            alignment = jiwer.visualize_alignment(res, show_measures=False).strip()
        else:
            errors = len(hyp.split())
            alignment = f"REF: \nHYP: {hyp}"
        n = len(ref.split())
        out.append(UtteranceErrors(uid, ref, hyp, errors, n, 100.0 * errors / max(1, n), alignment))
    out.sort(key=lambda u: (-u.wer, -u.errors, u.utt_id))
    return out


#: first line of a per-utterance file naming its decoder (``# decoder: {json}``); files without it are greedy
DECODER_LINE = "# decoder: "


def write_utterances(per_utt: list, path: str | os.PathLike, decoder: dict | None = None) -> None:
    """Per-utterance reference/hypothesis/errors, worst first; ``decoder`` (its record) as a first line."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        if decoder is not None:
            fh.write(DECODER_LINE + json.dumps(decoder, sort_keys=True) + "\n\n")
        for u in per_utt:
            fh.write(f"{u.utt_id}  WER {u.wer:.1f}%  ({u.errors} errors / {u.ref_words} words)\n")
            fh.write(u.alignment + "\n\n")


#: the header line of each utterance in :func:`write_utterances`' file
_UTTERANCE_HEADER = re.compile(r"^(\S+)  WER [0-9.]+%  \((\d+) errors / (\d+) words\)$")


def read_utterance_decoder(path: str | os.PathLike) -> dict | None:
    """The decoder record of a :func:`write_utterances` file (its first line), None when it has none (greedy)."""
    with open(path, encoding="utf-8") as fh:
        first = fh.readline()
    if not first.startswith(DECODER_LINE):
        return None
    try:
        record = json.loads(first[len(DECODER_LINE) :])
    except ValueError as err:
        raise ValueError(f"{path}: unreadable decoder line ({err})") from err
    if not isinstance(record, dict):
        raise ValueError(f"{path}: the decoder line is not a JSON object")
    return record


def read_utterance_errors(path: str | os.PathLike) -> dict[str, tuple[int, int]]:
    """``{utt_id: (word_errors, reference_words)}`` from a file of :func:`write_utterances` (``--utts``)."""
    out: dict[str, tuple[int, int]] = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            match = _UTTERANCE_HEADER.match(line.rstrip("\n"))
            if match:
                out[match.group(1)] = (int(match.group(2)), int(match.group(3)))
    if not out:
        raise ValueError(f"{path}: no per-utterance lines (expected the --utts file of speech-kd evaluate)")
    return out
