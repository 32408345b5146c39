"""Is the KD student really better? Gap closed with a bootstrap interval.

A single test set of a hundred utterances and a single seed move a student's
WER by several points, which can be more than the whole scratch-to-teacher gap
distillation is meant to close. This module takes the per-utterance files that
``speech-kd evaluate`` writes (``--utts``, or next to ``--json``) for a teacher,
one or more scratch students and as many KD students (one per seed, paired by
position), and reports

- each model's WER, and the mean over seeds of the scratch and KD students;
- the share of the WER gap KD closes, ``(scratch - kd) / (scratch - teacher)``
  on those means, when there is a gap: a teacher that is not better than the
  scratch students (a teacher trained too briefly, on other data) is reported
  as "teacher worse than scratch", with how far, never as a negative or
  undefined share; KD is then judged by its WER difference from scratch alone;
- with per-utterance files of several decoders (greedy, beam + LM: the ``# decoder:`` line
  ``evaluate`` writes), each decoder's comparison, and the gap closed under each side by side
  (:func:`compare_decoder_files`);
- a bootstrap interval for that share and for the WER difference, resampling
  the test utterances (the same draw for every model, so the comparison is
  paired) and, with two or more seed pairs, the seed pairs too, so that both
  test-set noise and training noise are in the interval.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from speech_kd.scoring.metrics import read_utterance_decoder, read_utterance_errors

__all__ = [
    "read_utterance_errors",
    "GapComparison",
    "gap_closed",
    "no_gap_label",
    "compare_gap",
    "compare_files",
    "format_comparison",
    "decoder_label",
    "group_by_decoder",
    "compare_decoder_files",
    "format_decoder_comparisons",
]


@dataclass
class GapComparison:
    """Result of :func:`compare_gap`; WERs in %, shares as fractions."""

    num_utts: int
    teacher_wer: float
    scratch_wers: list[float]
    kd_wers: list[float]
    scratch_mean: float
    kd_mean: float
    gap_closed: float
    gap_closed_interval: tuple[float, float]
    wer_gain: float
    wer_gain_interval: tuple[float, float]
    prob_kd_better: float
    prob_half_gap: float
    resample_seeds: bool
    confidence: float
    draws: int
    teacher_advantage: float = float("nan")
    teacher_advantage_interval: tuple[float, float] = (float("nan"), float("nan"))
    prob_no_gap: float = float("nan")

    @property
    def teacher_better(self) -> bool:
        """Whether the teacher beats the mean scratch student (there is a gap for KD to close)."""
        return self.teacher_advantage > 0

    def to_dict(self) -> dict:
        """The fields as a JSON-ready dict."""
        return dict(self.__dict__)


def gap_closed(scratch_wer: float, kd_wer: float, teacher_wer: float) -> float:
    """Share of the scratch-to-teacher WER gap that KD closes (1.0 = reaches the teacher).

    Examples
    --------
    >>> gap_closed(60.0, 40.0, 20.0)
    0.5
    """
    gap = scratch_wer - teacher_wer
    return (scratch_wer - kd_wer) / gap if gap > 0 else float("nan")


def no_gap_label(scratch_wer: float, teacher_wer: float) -> str | None:
    """What to show instead of a share when the teacher is not better than the scratch student, else ``None``.

    Examples
    --------
    >>> no_gap_label(50.77, 57.00), no_gap_label(60.0, 60.0), no_gap_label(60.0, 40.0)
    ('teacher worse than scratch', 'teacher = scratch (no gap)', None)
    """
    if scratch_wer > teacher_wer:
        return None
    return "teacher worse than scratch" if scratch_wer < teacher_wer else "teacher = scratch (no gap)"


def _matrix(runs: list[dict[str, tuple[int, int]]], ids: list[str], names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Errors ``[R, N]`` and reference words ``[N]``; every run must cover exactly ``ids``."""
    words = np.array([runs[0][u][1] for u in ids], dtype=np.float64)
    errors = np.zeros((len(runs), len(ids)))
    for r, (run, name) in enumerate(zip(runs, names)):
        missing, extra = set(ids) - set(run), set(run) - set(ids)
        if missing or extra:
            raise ValueError(
                f"{name}: scored on different utterances than {names[0]} "
                f"({len(missing)} missing, e.g. {sorted(missing)[:3]}; {len(extra)} extra, e.g. {sorted(extra)[:3]})"
            )
        if any(run[u][1] != runs[0][u][1] for u in ids):
            raise ValueError(f"{name}: reference word counts differ from {names[0]}: not the same test set")
        errors[r] = [run[u][0] for u in ids]
    return errors, words


def compare_gap(
    teacher: dict[str, tuple[int, int]],
    scratch: list[dict[str, tuple[int, int]]],
    kd: list[dict[str, tuple[int, int]]],
    draws: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    names: list[str] | None = None,
) -> GapComparison:
    """Share of the scratch-to-teacher WER gap closed by KD, with a paired bootstrap interval.

    Arguments are :func:`read_utterance_errors` results; ``scratch[i]`` and
    ``kd[i]`` are the same seed, so the counts must match unless one side is a
    single run. Seed pairs are resampled too when there are at least two.

    Example
    -------
    >>> t = {"a": (1, 10), "b": (2, 10), "c": (1, 10)}
    >>> s = {"a": (5, 10), "b": (4, 10), "c": (6, 10)}
    >>> k = {"a": (3, 10), "b": (3, 10), "c": (3, 10)}
    >>> round(compare_gap(t, [s], [k], draws=200).gap_closed, 3)
    0.545
    """
    if not scratch or not kd:
        raise ValueError("need at least one scratch and one KD run")
    if len(scratch) != len(kd) and min(len(scratch), len(kd)) > 1:
        raise ValueError(f"{len(scratch)} scratch runs and {len(kd)} KD runs: give one of each per seed, paired")
    runs = [teacher, *scratch, *kd]
    names = names or ["teacher"] + [f"scratch[{i}]" for i in range(len(scratch))] + [f"kd[{i}]" for i in range(len(kd))]
    ids = sorted(teacher)
    errors, words = _matrix(runs, ids, names)
    n, n_s = len(ids), len(scratch)

    def shares(weights: np.ndarray, seed_rows: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Gap share (NaN: teacher not better), WER gain and teacher advantage per row of ``weights [D, N]``."""
        wer = 100.0 * (weights @ errors.T) / (weights @ words)[:, None]  # [D, R]
        t, s, k = wer[:, 0], wer[:, 1 : 1 + n_s], wer[:, 1 + n_s :]
        if seed_rows is not None:
            s = np.take_along_axis(s, seed_rows, axis=1)
            k = np.take_along_axis(k, seed_rows, axis=1)
        gain, advantage = s.mean(1) - k.mean(1), s.mean(1) - t
        with np.errstate(divide="ignore", invalid="ignore"):
            share = np.where(advantage > 0, gain / advantage, np.nan)  # no gap: no share (not a negative one)
        return share, gain, advantage

    share0, gain0, advantage0 = shares(np.ones((1, n)), None)
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n, np.full(n, 1.0 / n), size=draws).astype(np.float64)
    resample_seeds = len(scratch) == len(kd) and len(scratch) >= 2
    seed_rows = rng.integers(0, n_s, size=(draws, n_s)) if resample_seeds else None
    share, gain, advantage = shares(weights, seed_rows)
    lo, hi = 50.0 * (1 - confidence), 100.0 - 50.0 * (1 - confidence)
    wer = 100.0 * errors.sum(1) / words.sum()
    # the share's interval over the draws that have a gap, and only when the measured teacher has one
    finite = share[np.isfinite(share)] if advantage0[0] > 0 else np.array([])
    return GapComparison(
        num_utts=n,
        teacher_wer=float(wer[0]),
        scratch_wers=[float(x) for x in wer[1 : 1 + n_s]],
        kd_wers=[float(x) for x in wer[1 + n_s :]],
        scratch_mean=float(wer[1 : 1 + n_s].mean()),
        kd_mean=float(wer[1 + n_s :].mean()),
        gap_closed=float(share0[0]),
        gap_closed_interval=(_percentile(finite, lo), _percentile(finite, hi)),
        wer_gain=float(gain0[0]),
        wer_gain_interval=(float(np.percentile(gain, lo)), float(np.percentile(gain, hi))),
        prob_kd_better=float((gain > 0).mean()),
        prob_half_gap=float((finite >= 0.5).mean()) if finite.size else float("nan"),
        resample_seeds=resample_seeds,
        confidence=confidence,
        draws=draws,
        teacher_advantage=float(advantage0[0]),
        teacher_advantage_interval=(float(np.percentile(advantage, lo)), float(np.percentile(advantage, hi))),
        prob_no_gap=float((advantage <= 0).mean()),
    )


def _percentile(values: np.ndarray, q: float) -> float:
    """``q``-th percentile, NaN for no values (every draw had no gap to close)."""
    return float(np.percentile(values, q)) if values.size else float("nan")


def format_comparison(result: GapComparison) -> str:
    """A short Markdown summary of a :class:`GapComparison`."""
    pct = round(100 * result.confidence)
    what = "utterances and seed pairs" if result.resample_seeds else "utterances"
    lines = [
        f"test utterances: {result.num_utts}",
        "",
        "| model | WER % |",
        "|---|---:|",
        f"| teacher | {result.teacher_wer:.2f} |",
        *[f"| scratch [{i}] | {w:.2f} |" for i, w in enumerate(result.scratch_wers)],
        *[f"| kd [{i}] | {w:.2f} |" for i, w in enumerate(result.kd_wers)],
        f"| scratch, mean | {result.scratch_mean:.2f} |",
        f"| kd, mean | {result.kd_mean:.2f} |",
        "",
    ]
    adv_lo, adv_hi = result.teacher_advantage_interval
    if result.teacher_better:
        lines += [
            f"teacher better than scratch by {result.teacher_advantage:.2f} WER points "
            f"({pct} % interval {adv_lo:.2f} to {adv_hi:.2f}; draws with no gap: {result.prob_no_gap:.3f})",
            f"WER gap closed by KD: {100 * result.gap_closed:.0f} % ({pct} % interval "
            f"{100 * result.gap_closed_interval[0]:.0f} to {100 * result.gap_closed_interval[1]:.0f} %)",
        ]
    else:
        lines += [
            f"{no_gap_label(result.scratch_mean, result.teacher_wer)}: the teacher's WER is "
            f"{-result.teacher_advantage:.2f} points above the scratch students' mean ({pct} % interval "
            f"{-adv_hi:.2f} to {-adv_lo:.2f}), so there is no gap for KD to close and no share is given: judge KD "
            "by its WER against scratch below (KD pulls the student toward the teacher; see kd_anneal)",
        ]
    verdict = "better" if result.wer_gain > 0 else "worse"
    lines += [
        f"KD WER gain over scratch: {result.wer_gain:.2f} points, KD {verdict} "
        f"({pct} % interval {result.wer_gain_interval[0]:.2f} to {result.wer_gain_interval[1]:.2f})",
        f"share of bootstrap draws with KD better than scratch: {result.prob_kd_better:.3f}"
        + (f"; closing at least half of the gap: {result.prob_half_gap:.3f}" if result.teacher_better else ""),
        f"({result.draws} bootstrap draws over {what})",
    ]
    return "\n".join(lines)


def _finite_or_none(value):
    """``value`` with every NaN/inf float replaced by ``None``: strict JSON has no NaN (no gap to close -> null)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def compare_files(
    teacher: str | os.PathLike,
    scratch: list[str | os.PathLike],
    kd: list[str | os.PathLike],
    json_path: str | os.PathLike | None = None,
    draws: int = 2000,
) -> GapComparison:
    """:func:`compare_gap` on utterance files; optionally writes the result as JSON."""
    paths = [teacher, *scratch, *kd]
    runs = [read_utterance_errors(p) for p in paths]
    result = compare_gap(
        runs[0], runs[1 : 1 + len(scratch)], runs[1 + len(scratch) :], draws=draws, names=[str(p) for p in paths]
    )
    if json_path:
        data = result.to_dict() | {"teacher_better": result.teacher_better}
        data |= {"files": {"teacher": str(teacher), "scratch": [str(p) for p in scratch], "kd": [str(p) for p in kd]}}
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(_finite_or_none(data), indent=2, allow_nan=False) + "\n")
    return result


def decoder_label(path: str | os.PathLike) -> str:
    """The decoder a per-utterance file was made with: its ``# decoder:`` record's name, ``greedy`` without one."""
    record = read_utterance_decoder(path)
    return "greedy" if record is None else str(record.get("name") or "greedy")


def group_by_decoder(teacher: list, scratch: list, kd: list) -> dict[str, tuple[str | os.PathLike, list, list]]:
    """``{decoder: (teacher file, scratch files, kd files)}``, decoders in the teacher files' order.

    Raises
    ------
    ValueError
        Two teacher files of one decoder, or a decoder without a teacher, scratch or KD file.
    """
    groups: dict[str, tuple] = {}
    for path in teacher:
        label = decoder_label(path)
        if label in groups:
            raise ValueError(f"{path}: a second teacher file decoded with {label} ({groups[label][0]} is the first)")
        groups[label] = (path, [], [])
    for role, paths in (("scratch", scratch), ("kd", kd)):
        for path in paths:
            label = decoder_label(path)
            if label not in groups:
                raise ValueError(f"{path}: decoded with {label}, but no --teacher file is ({', '.join(groups)})")
            groups[label][1 if role == "scratch" else 2].append(path)
    for label, (_, s, k) in groups.items():
        if not s or not k:
            raise ValueError(f"decoder {label}: needs at least one --scratch and one --kd file decoded with it")
    return groups


def compare_decoder_files(
    teacher: list,
    scratch: list,
    kd: list,
    json_path: str | os.PathLike | None = None,
    draws: int = 2000,
) -> dict[str, GapComparison]:
    """:func:`compare_files` for each decoder the files were made with (:func:`group_by_decoder`).

    Writes ``json_path`` as ``{"decoders": {name: comparison}}`` when given.
    """
    groups = group_by_decoder(teacher, scratch, kd)
    results = {label: compare_files(t, s, k, draws=draws) for label, (t, s, k) in groups.items()}
    if json_path:
        data = {
            "decoders": {
                label: results[label].to_dict()
                | {"teacher_better": results[label].teacher_better}
                | {"files": {"teacher": str(t), "scratch": [str(p) for p in s], "kd": [str(p) for p in k]}}
                for label, (t, s, k) in groups.items()
            }
        }
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(_finite_or_none(data), indent=2, allow_nan=False) + "\n")
    return results


def format_decoder_comparisons(results: dict[str, GapComparison]) -> str:
    """Each decoder's :func:`format_comparison`, then one table of the gap closed under each."""
    lines = []
    for label, result in results.items():
        lines += [f"## {label}", "", format_comparison(result), ""]
    lines += [
        "## gap closed under each decoder",
        "",
        "| decoder | teacher WER % | scratch WER % | KD WER % | gap closed by KD |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, r in results.items():
        share = (
            f"{100 * r.gap_closed:.0f} % ({100 * r.gap_closed_interval[0]:.0f} to {100 * r.gap_closed_interval[1]:.0f})"
            if r.teacher_better
            else no_gap_label(r.scratch_mean, r.teacher_wer)
        )
        lines.append(f"| {label} | {r.teacher_wer:.2f} | {r.scratch_mean:.2f} | {r.kd_mean:.2f} | {share} |")
    return "\n".join(lines)
