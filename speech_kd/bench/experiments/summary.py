"""Results tables of an experiment: per seed, means over seeds with bootstrap intervals, the dev-WER figure."""

from __future__ import annotations

import statistics
from pathlib import Path

from speech_kd.report import load_history
from speech_kd.report.plots import seed_curves
from speech_kd.scoring.compare import compare_gap, gap_closed, no_gap_label, read_utterance_errors


def summarise_seeds(per_seed: dict, out: Path, folders: dict, variants: list[str]) -> dict:
    """Mean scores over seeds per model and, for KD variants, the gap closed with a bootstrap interval.

    The interval (:func:`speech_kd.scoring.compare.compare_gap`) resamples test
    utterances and seed pairs, on test and on dev.
    """
    keys = ("wer", "cer", "dev_wer", "dev_cer", "train_s_per_epoch")
    summary = {}
    for name in ["teacher", *variants]:
        rows = [r[name] for r in per_seed.values()]
        summary[name] = {
            k: statistics.mean(r[k] for r in rows) for k in keys if all(r.get(k) is not None for r in rows)
        }
        summary[name]["params"] = rows[0]["params"]
    if "scratch" in variants:
        for split, suffix in (("test", ""), ("dev", "_dev")):
            teacher = read_utterance_errors(out / f"eval_teacher{suffix}_utts.txt")
            scratch = [read_utterance_errors(f / f"eval_scratch{suffix}_utts.txt") for f in folders.values()]
            for name in variants:
                if name == "scratch":
                    continue
                kd = [read_utterance_errors(f / f"eval_{name}{suffix}_utts.txt") for f in folders.values()]
                gap = compare_gap(teacher, scratch, kd)
                summary[name][f"{split}_gap"] = {
                    "closed": gap.gap_closed,
                    "interval": gap.gap_closed_interval,
                    "wer_gain": gap.wer_gain,
                    "wer_gain_interval": gap.wer_gain_interval,
                    "prob_kd_better": gap.prob_kd_better,
                    "num_utts": gap.num_utts,
                    "teacher_better": gap.teacher_better,
                    "teacher_advantage": gap.teacher_advantage,
                    "teacher_advantage_interval": gap.teacher_advantage_interval,
                }
    return summary


def format_seed_summary(summary: dict, seeds: list[int]) -> str:
    """Markdown table of the means over seeds, with the bootstrap intervals of the gap closed."""

    def gap(row: dict, split: str) -> str:
        g = row.get(f"{split}_gap")
        if not g:
            return ""
        if not g.get("teacher_better", True):  # no gap to close: say so, with how far the teacher is behind
            lo, hi = g["teacher_advantage_interval"]
            return f"teacher worse than scratch by {-g['teacher_advantage']:.2f} [{-hi:.2f}, {-lo:.2f}]"
        lo, hi = g["interval"]
        return f"{100 * g['closed']:.0f} % [{100 * lo:.0f}, {100 * hi:.0f}]"

    def gain(row: dict) -> str:
        g = row.get("test_gap")
        return f"{g['wer_gain']:.2f} [{g['wer_gain_interval'][0]:.2f}, {g['wer_gain_interval'][1]:.2f}]" if g else ""

    lines = [
        f"mean over seeds {', '.join(map(str, seeds))}; [95 % bootstrap interval over test utterances and seed pairs]",
        "",
        "| model | WER % | CER % | dev WER % | dev CER % | parameters | WER gap closed | dev WER gap closed "
        "| WER gain (points) | s/epoch |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in summary.items():
        seconds = row.get("train_s_per_epoch")
        lines.append(
            f"| {name} | {row['wer']:.2f} | {row['cer']:.2f} | {row.get('dev_wer', float('nan')):.2f} | "
            f"{row.get('dev_cer', float('nan')):.2f} | {row['params']:,} | {gap(row, 'test')} | "
            f"{gap(row, 'dev')} | {gain(row)} | {f'{seconds:.1f}' if seconds else ''} |"
        )
    return "\n".join(lines)


def seed_figure(out: Path, folders: dict, variants: list[str], teacher_dev_wer: float | None) -> None:
    """``OUT/dev_wer.png``: dev WER per epoch of each variant, mean and min-max band over seeds."""
    groups = {name: [load_history(f / name) for f in folders.values()] for name in variants}
    (out / "dev_wer.png").write_bytes(seed_curves(groups, teacher=teacher_dev_wer))


def baseline_of(name: str, names) -> str:
    """The scratch run a variant is compared with: ``scratch_sp`` for ``*_sp`` variants when it ran, else ``scratch``.

    Examples
    --------
    >>> baseline_of("kd_sp", ["scratch", "scratch_sp", "kd_sp"]), baseline_of("kd_sp", ["scratch", "kd_sp"])
    ('scratch_sp', 'scratch')
    """
    return "scratch_sp" if name.endswith("_sp") and "scratch_sp" in names else "scratch"


def format_results(results: dict) -> str:
    """Markdown table; KD rows get the share of the gap between their scratch run and the teacher they close.

    ``s/epoch`` is the median wall time of a student's training stage
    (students run side by side, so their times are comparable), and
    ``vs scratch`` its ratio to the scratch student's (``scratch_sp`` for
    ``*_sp`` variants, which differ from ``scratch`` by their augmentation).
    """

    def closed(name: str, key: str) -> str:
        teacher, scratch = results.get("teacher", {}).get(key), results.get(baseline_of(name, results), {}).get(key)
        if (
            name == "teacher"
            or name.startswith("scratch")
            or teacher is None
            or scratch is None
            or key not in results[name]
        ):
            return ""
        if scratch <= teacher:  # the scratch student is already as good as the teacher: no gap to close
            return no_gap_label(scratch, teacher)
        return f"{100 * gap_closed(scratch, results[name][key], teacher):.0f} %"

    def number(row: dict, key: str) -> str:
        return f"{row[key]:.2f}" if key in row else ""

    lines = [
        "| model | WER % | CER % | parameters | RTF | WER gap closed | dev WER % | dev CER % | dev WER gap closed "
        "| s/epoch | vs scratch |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in results.items():
        seconds = s.get("train_s_per_epoch")
        base_time = results.get(baseline_of(name, results), {}).get("train_s_per_epoch")
        timing = f"{seconds:.1f} | " if seconds else " | "
        timing += f"{seconds / base_time:.2f}" if seconds and base_time else ""
        lines.append(
            f"| {name} | {s['wer']:.2f} | {s['cer']:.2f} | {s['params']:,} | {s['rtf']:.4f} | "
            f"{closed(name, 'wer')} | {number(s, 'dev_wer')} | {number(s, 'dev_cer')} | "
            f"{closed(name, 'dev_wer')} | {timing} |"
        )
    return "\n".join(lines)
