"""``build_report``: one run folder -> ``report.html`` and ``report.md``."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from speech_kd.report import plots
from speech_kd.report.html import Page, check_own_page
from speech_kd.report.posteriors import Student, load_targets, posteriorgram_section
from speech_kd.report.run import RunFolder, load_history, read_rows
from speech_kd.report.scores import cache_stats, reached_teacher_epoch, scores_section, summary_rows
from speech_kd.scoring.teacher_check import REACHED_ADVICE, read_teacher_score

logger = logging.getLogger(__name__)


def build_report(
    run_dir: str | os.PathLike,
    compare: dict[str, str | os.PathLike] | None = None,
    max_utts: int | None = 200,
    n_posteriorgrams: int = 3,
    evaluate: bool = True,
    device: str = "cpu",
) -> Path:
    """Write ``RUN_DIR/report.html`` and ``RUN_DIR/report.md``; return the HTML path.

    Parameters
    ----------
    run_dir : path-like
        A finished ``speech-kd train``/``distill`` output folder (with ``model/``).
    compare : dict, optional
        ``{name: model folder}`` added to the WER table (e.g. ``{"scratch":
        "results/scratch/model"}``; a model named ``scratch`` also gives the
        "WER gap closed" column).
    max_utts : int, optional
        Test utterances each model is scored on (``None``: all).
    n_posteriorgrams : int
        Dev utterances drawn as teacher/student posteriorgrams.
    evaluate : bool
        ``False`` skips scoring (the table then shows ``test_results.json``).
    device : str
        Where the models run.

    Returns
    -------
    pathlib.Path
        ``RUN_DIR/report.html``.
    """
    folder = Path(run_dir)
    check_own_page(folder / "report.html", folder / "report.md", folder / "report_files")  # before any work
    run = RunFolder.read(folder)
    model_dir = run.folder / "model"
    if not model_dir.exists():
        raise FileNotFoundError(f"{run.folder}: no model/ folder (is this a finished speech-kd run?)")
    page = Page(f"speech_kd report: {run.folder.name}", run.folder / "report_files")
    history = load_history(run.folder)
    page.table(["run", ""], summary_rows(run, history), numeric=False)
    teacher = read_teacher_score(run.folder) if run.kd else None
    reached = reached_teacher_epoch(history, teacher.wer) if teacher is not None else None
    if reached is not None:
        page.paragraph(
            f"Note: the student reached its teacher on dev at epoch {reached} (teacher dev WER "
            f"{teacher.wer:.2f}): {REACHED_ADVICE}."
        )

    page.heading("Learning curves")
    if history:
        reduction = run.setting("kd_reduction") or "utterance"  # kd_run.json has it resolved; older runs: the yaml's
        page.image(
            "learning_curves.png",
            plots.learning_curves(history, reduction, teacher_wer=teacher.wer if teacher else None),
            "Loss, dev error rates and learning rate",
        )  # the dashed line: the teacher's dev WER
        last = history[-1].get("train", {})
        kd_keys = [k for k in ("kd_weight", "temperature", "blank_share", "agreement", "lost_mass") if k in last]
        if kd_keys:
            lines = ["epoch  " + "  ".join(f"{k:>11}" for k in kd_keys)]
            lines += [
                f"{h['epoch']:>5}  " + "  ".join(f"{h['train'].get(k, float('nan')):>11.4g}" for k in kd_keys)
                for h in history
            ]
            page.details("KD diagnostics per epoch (training)", "\n".join(lines))
    else:
        page.paragraph("No history.jsonl in this run.")

    page.heading("Teacher and student posteriors (dev utterances)")
    dev_csv = run.folder / "dev.csv"
    if dev_csv.exists() and n_posteriorgrams > 0:
        student = Student.load(model_dir, device)
        targets, why = load_targets(run, student, device)
        page.paragraph(
            f"Posterior probability per token (y) and {student.frame_shift * 1000:.0f} ms frame (x, seconds). "
            + (
                "The teacher is shown on the student's token set and frame rate, as the KD loss sees it; hollow "
                "circles mark the teacher's spikes (non-blank argmax frames), crosses the student's, in both panels: "
                "a cross beside a circle is a timing shift."
                if targets is not None
                else why
            )
        )
        posteriorgram_section(page, read_rows(dev_csv, n_posteriorgrams), student, targets, device, "posteriorgram")
    else:
        page.paragraph("No dev.csv in this run.")

    page.heading("Accuracy, size and speed")
    if evaluate:
        scores_section(page, run, compare or {}, max_utts, device)
    else:
        results = run.folder / "test_results.json"
        if results.exists():
            page.paragraph("Not re-scored (--no-eval); the run's own test scores from training (test_results.json):")
            scores = json.loads(results.read_text())
            with_lm = any(isinstance(v.get("beam_lm"), dict) for v in scores.values())
            page.table(
                ["split", "WER %", "CER %", "loss"] + (["WER % beam+LM", "CER % beam+LM"] if with_lm else []),
                [
                    [
                        k,
                        f"{v.get('WER', float('nan')):.2f}",
                        f"{v.get('CER', float('nan')):.2f}",
                        f"{v.get('loss', float('nan')):.3g}",
                        *(
                            [
                                f"{v.get('beam_lm', {}).get('WER', float('nan')):.2f}",
                                f"{v.get('beam_lm', {}).get('CER', float('nan')):.2f}",
                            ]
                            if with_lm
                            else []
                        ),
                    ]
                    for k, v in scores.items()
                ],
            )
        else:
            page.paragraph("Not scored (--no-eval) and no test_results.json in this run.")

    page.heading("Configuration")
    setup = run.folder / "kd_setup.txt"
    if setup.exists():
        page.paragraph("Teacher vocabulary and frame-rate mapping (kd_setup.txt):")
        page.preformatted(setup.read_text())
    stats = cache_stats(run.setting("targets_cache")) if run.kd else None
    if stats:
        page.paragraph("Soft-target cache:")
        page.table(["key", "value"], [[k, str(v)] for k, v in stats.items()], numeric=False)
    if run.resolved:
        page.details("kd_run.json (resolved KD settings)", json.dumps(run.resolved, indent=2), "json")
    page.details("hyperparams.yaml", run.hparams_text or "(missing)", "yaml")
    html = page.write(run.folder / "report.html", run.folder / "report.md")
    logger.info("report written to %s", html)
    return html
