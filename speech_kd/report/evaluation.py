"""The per-utterance page of ``speech-kd evaluate --html``: worst utterances first."""

from __future__ import annotations

import os
from pathlib import Path

from speech_kd.report.html import Page, check_own_page
from speech_kd.report.posteriors import Student, posteriorgram_section
from speech_kd.report.run import read_rows


def _strip_sentence_header(alignment: str) -> str:
    """The jiwer alignment without its ``=== SENTENCE 1 ===`` line (one sentence per block here)."""
    return "\n".join(line for line in alignment.splitlines() if not line.startswith("=== SENTENCE")).strip("\n")


def check_page_paths(path: str | os.PathLike) -> None:
    """Refuse an ``--html`` path whose page, Markdown (``.md``) or ``<stem>_files/`` were not written by speech_kd."""
    path = Path(path)
    check_own_page(path, path.with_suffix(".md"), path.parent / (path.stem + "_files"))


def evaluation_page(
    summary: dict,
    utterances: list,
    path: str | os.PathLike,
    max_utts: int = 200,
    n_posteriorgrams: int = 3,
    device: str = "cpu",
) -> Path:
    """``speech-kd evaluate --html``: summary, posteriorgrams of the worst utterances, alignments worst first.

    Parameters
    ----------
    summary : dict
        ``EvalResult.summary`` of :func:`speech_kd.scoring.evaluate.evaluate_model`
        (``model`` and ``csv`` name the model folder and manifest).
    utterances : list of speech_kd.scoring.metrics.UtteranceErrors
        Worst first, as ``evaluate_model`` returns them.
    path : path-like
        The HTML file; the Markdown goes next to it (``.md``), its PNGs into ``<stem>_files/``.
    max_utts : int
        Alignments shown (the worst ``max_utts``).
    n_posteriorgrams : int
        Worst utterances also drawn as posteriorgrams (0: none).
    device : str
        Where the model runs for the posteriorgrams.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    path = Path(path)
    check_page_paths(path)
    page = Page(f"speech_kd evaluation: {summary.get('model', '')}", path.parent / (path.stem + "_files"))
    page.table(
        [
            "WER %",
            "CER %",
            "substitutions",
            "deletions",
            "insertions",
            "reference words",
            "utterances",
            "parameters",
            "RTF",
        ],
        [
            [
                f"{summary['wer']:.2f}",
                f"{summary['cer']:.2f}",
                summary.get("substitutions", ""),
                summary.get("deletions", ""),
                summary.get("insertions", ""),
                summary.get("ref_words", ""),
                summary["num_utts"],
                f"{summary['params']:,}",
                f"{summary['rtf']:.4f}",
            ]
        ],
    )
    page.paragraph(
        f"Model {summary.get('model', '?')} on {summary.get('csv', '?')} ({summary.get('device', '?')}); "
        "greedy CTC decoding, transcripts upper-cased and whitespace-squeezed before scoring."
    )
    rows = {r["ID"]: r for r in read_rows(Path(summary["csv"]))} if summary.get("csv") else {}
    worst = [rows[u.utt_id] for u in utterances[:n_posteriorgrams] if u.utt_id in rows]
    if worst and summary.get("model"):
        page.heading("Posteriors of the worst utterances")
        student = Student.load(Path(summary["model"]), device)
        page.paragraph(
            f"Posterior probability per token (y) and {student.frame_shift * 1000:.0f} ms frame "
            "(x, seconds); crosses mark the spikes (non-blank argmax frames)."
        )
        posteriorgram_section(page, worst, student, None, device, "worst", name="model")
    page.heading(f"Utterances, worst first ({min(max_utts, len(utterances))} of {len(utterances)})")
    for u in utterances[:max_utts]:
        page.paragraph(f"{u.utt_id} — WER {u.wer:.1f}% ({u.errors} errors / {u.ref_words} words)")
        page.preformatted(_strip_sentence_header(u.alignment))
    return page.write(path, path.with_suffix(".md"))
