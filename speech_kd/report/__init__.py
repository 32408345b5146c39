"""Run reports: what distillation did, as pictures (``speech-kd report RUN_DIR``).

:func:`build_report` reads a run folder written by ``speech-kd train`` or
``speech-kd distill`` (``history.jsonl``, ``hyperparams.yaml``, ``model/``,
``dev.csv``/``test.csv``, ``kd_setup.txt``) and writes

- ``RUN_DIR/report.html``: self-contained (PNG images inlined as data URIs,
  no script or style from the network);
- ``RUN_DIR/report.md`` with its images in ``RUN_DIR/report_files/``.

Both contain the learning curves, teacher/student posteriorgrams of a few
dev utterances, a WER/CER table and chart (teacher, this student, any
``compare`` models such as the scratch student, with parameters and RTF),
and the run's configuration. :func:`evaluation_page` renders the
per-utterance view of ``speech-kd evaluate --html``.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from speech_kd.report import plots
from speech_kd.report.html import Page

__all__ = ["build_report", "evaluation_page", "load_history"]

logger = logging.getLogger(__name__)


def load_history(run_dir: str | os.PathLike) -> list[dict]:
    """The per-epoch rows of ``RUN_DIR/history.jsonl`` (the last row per epoch wins, as after a resume)."""
    path = Path(run_dir) / "history.jsonl"
    if not path.exists():
        return []
    rows = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[row["epoch"]] = row
    return [rows[e] for e in sorted(rows)]


def _hparams_text(run_dir: Path) -> str:
    path = run_dir / "hyperparams.yaml"
    return path.read_text() if path.exists() else ""


def _run_setting(run_dir: Path, text: str, key: str) -> str:
    """A KD setting of the run: from ``kd_run.json`` (resolved values), else the saved hyperparams.yaml."""
    resolved = run_dir / "kd_run.json"
    if resolved.exists():
        value = json.loads(resolved.read_text()).get(key)
        if value is not None:
            return str(value)
    return _yaml_value(text, key)


def _yaml_value(text: str, key: str) -> str:
    """Top-level scalar ``key: value`` of the run's saved hyperparams.yaml (no yaml evaluation)."""
    for line in text.splitlines():
        if line.startswith(f"{key}:"):
            value = line.split(":", 1)[1].split("#", 1)[0].strip()
            return value.strip("'\"")
    return ""


def _read_rows(csv_path: Path, limit: int | None) -> list[dict]:
    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return rows[:limit] if limit else rows


def _subset_csv(csv_path: Path, limit: int | None, out: Path) -> Path:
    """``csv_path`` cut to its first ``limit`` rows (the whole file when ``limit`` is falsy)."""
    if not limit:
        return csv_path
    rows = _read_rows(csv_path, limit)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out


def _greedy_text(log_probs: np.ndarray, tokens: list[str], blank: int) -> str:
    best = log_probs.argmax(-1)
    keep = [int(b) for i, b in enumerate(best) if b != blank and (i == 0 or b != best[i - 1])]
    return "".join(tokens[i] for i in keep).strip()


def _posteriorgrams(run_dir: Path, hp_text: str, model_dir: Path, n_utts: int, device: str) -> list[tuple[str, bytes]]:
    """(caption, PNG) for the first ``n_utts`` dev utterances: teacher vs student posteriors."""
    from speech_kd.audio import read_audio
    from speech_kd.dataio import token_strings
    from speech_kd.evaluate import load_asr
    from speech_kd.teachers.base import measure_frame_shift

    dev_csv = run_dir / "dev.csv"
    if not dev_csv.exists():
        return []
    asr = load_asr(model_dir, device=device)
    tokens = token_strings(asr.tokenizer)
    blank = int(_run_setting(run_dir, hp_text, "blank_index") or 0)
    sample_rate = int(getattr(asr.hparams, "sample_rate", 16000))
    frame_shift = measure_frame_shift(asr.encode_batch, sample_rate, device)
    teacher = aligner = None
    source = _run_setting(run_dir, hp_text, "teacher_source").split(",")[0].strip()
    if source and Path(source).exists():
        from speech_kd.targets import TargetAligner
        from speech_kd.teachers.base import load_teacher

        try:
            teacher = load_teacher(source, device=device)
        except Exception as err:  # a report must not fail because the teacher moved
            logger.warning("report: cannot load teacher %s (%s); student posteriors only", source, err)
    figures = []
    for row in _read_rows(dev_csv, n_utts):
        wav = read_audio(row["wav"], sample_rate)
        with torch.no_grad():
            student = asr.encode_batch(wav.unsqueeze(0), torch.ones(1))[0].float().cpu()
        teacher_lp = None
        if teacher is not None:
            if aligner is None:
                aligner = TargetAligner(teacher.tokens, teacher.blank_index, teacher.frame_shift, tokens, blank,
                                        frame_shift, frame_tolerance=3)  # fmt: skip
            out = teacher(wav.unsqueeze(0).to(device), torch.ones(1, device=device))
            targets = aligner(out, torch.tensor([student.shape[0]]), student.shape[0])
            teacher_lp = targets.log_probs[0].cpu().numpy()
        student_np = student.numpy()
        caption = f"{row['ID']}\nREF     : {row['wrd']}\n"
        if teacher_lp is not None:
            caption += f"teacher : {_greedy_text(teacher_lp, tokens, blank)}\n"
        caption += f"student : {_greedy_text(student_np, tokens, blank)}"
        figures.append((caption, plots.posteriorgram(teacher_lp, student_np, tokens, frame_shift, blank, row["ID"])))
    return figures


def _scoring_csv(run_dir: Path) -> Path:
    """The run's test manifest (``data/test*.csv`` as written by prepare), else its dev manifest."""
    tests = [p for p in sorted((run_dir / "data").glob("test*.csv")) if not p.stem.endswith("_skipped")]
    for candidate in [run_dir / "test.csv", *tests, run_dir / "dev.csv"]:
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"{run_dir}: no test or dev manifest to score the models on")


def _evaluate_models(models: dict[str, Path], test_csv: Path, device: str) -> list[dict]:
    from speech_kd.evaluate import evaluate_model

    rows = []
    for name, folder in models.items():
        s = evaluate_model(folder, test_csv, device=device, progress=False).summary
        rows.append({"name": name, "wer": s["wer"], "cer": s["cer"], "params": s["params"], "rtf": s["rtf"],
                     "num_utts": s["num_utts"], "folder": str(folder)})  # fmt: skip
    return rows


def _cache_stats(run_dir: Path, hp_text: str) -> dict | None:
    cache_dir = _run_setting(run_dir, hp_text, "targets_cache")
    if not cache_dir or not (Path(cache_dir) / "meta.json").exists():
        return None
    from speech_kd.cache import CacheReader

    meta = CacheReader(cache_dir).metadata
    size = sum(p.stat().st_size for p in Path(cache_dir).iterdir() if p.is_file())
    frames = meta.get("frames") or 0
    return {"folder": cache_dir, "teacher": meta.get("teacher_name"), "utterances": meta.get("utterances"),
            "frames": frames, "bytes": size, "bytes_per_frame": round(size / frames, 2) if frames else None,
            "fp32_bytes_per_frame": 4 * len(meta.get("teacher_tokens", [])), "scheme": meta.get("scheme")}  # fmt: skip


def build_report(
    run_dir: str | os.PathLike,
    compare: dict[str, str | os.PathLike] | None = None,
    max_utts: int | None = 200,
    n_posteriorgrams: int = 3,
    evaluate: bool = True,
    device: str = "cpu",
) -> Path:
    """Write ``RUN_DIR/report.html`` and ``RUN_DIR/report.md``; return the HTML path.

    ``compare`` adds model folders to the WER table (e.g. ``{"scratch":
    "results/scratch/model"}``); ``max_utts`` caps the test utterances each
    model is scored on (``None``: all); ``evaluate=False`` skips scoring.
    """
    run_dir = Path(run_dir)
    model_dir = run_dir / "model"
    if not model_dir.exists():
        raise FileNotFoundError(f"{run_dir}: no model/ folder (is this a finished speech-kd run?)")
    hp_text = _hparams_text(run_dir)
    page = Page(f"speech_kd report: {run_dir.name}", run_dir / "report_files")

    page.heading("Learning curves")
    history = load_history(run_dir)
    if history:
        page.image("learning_curves.png", plots.learning_curves(history), "Loss, dev error rates and learning rate")
        last = history[-1].get("train", {})
        kd_keys = [k for k in ("kd_weight", "temperature", "blank_share", "agreement", "lost_mass") if k in last]
        if kd_keys:
            page.table(["epoch", *kd_keys], [[h["epoch"], *[f"{h['train'].get(k, float('nan')):.3g}" for k in kd_keys]]
                                             for h in history])  # fmt: skip
    else:
        page.paragraph("No history.jsonl in this run.")

    page.heading("Teacher and student posteriors (dev utterances)")
    page.paragraph(
        "Posterior probability per token (y) and 40 ms frame (x), teacher on the student's token set and frame "
        "rate; circles mark the teacher's spikes (non-blank argmax frames), crosses the student's."
    )
    for i, (caption, png) in enumerate(_posteriorgrams(run_dir, hp_text, model_dir, n_posteriorgrams, device)):
        page.image(f"posteriorgram_{i}.png", png, caption.splitlines()[0])
        page.preformatted(caption)

    if evaluate:
        page.heading("Accuracy, size and speed")
        test_csv = _scoring_csv(run_dir)
        models: dict[str, Path] = {}
        source = _run_setting(run_dir, hp_text, "teacher_source").split(",")[0].strip()
        if source and (Path(source) / "hyperparams.yaml").exists():
            models["teacher"] = Path(source)
        models[run_dir.name] = model_dir
        for name, folder in (compare or {}).items():
            models[name] = Path(folder)
        subset = _subset_csv(test_csv, max_utts, run_dir / "report_files" / "eval_subset.csv")
        rows = _evaluate_models(models, subset, device)
        page.paragraph(f"Scored on {rows[0]['num_utts']} utterances of {test_csv.name} (greedy decoding, jiwer).")
        page.table(["model", "WER %", "CER %", "parameters", "RTF"],
                   [[r["name"], f"{r['wer']:.2f}", f"{r['cer']:.2f}", f"{r['params']:,}", f"{r['rtf']:.4f}"]
                    for r in rows])  # fmt: skip
        page.image("error_rates.png", plots.wer_bars(rows), "Test WER and CER per model")
        if len(rows) >= 3:
            page.image("size_vs_wer.png", plots.size_vs_wer(rows), "Parameters against WER")
        (run_dir / "report_files" / "scores.json").write_text(json.dumps(rows, indent=2) + "\n")

    page.heading("Configuration")
    setup = run_dir / "kd_setup.txt"
    if setup.exists():
        page.paragraph("Teacher vocabulary and frame-rate mapping (kd_setup.txt):")
        page.preformatted(setup.read_text())
    stats = _cache_stats(run_dir, hp_text)
    if stats:
        page.paragraph("Soft-target cache:")
        page.table(["key", "value"], [[k, str(v)] for k, v in stats.items()])
    if (run_dir / "kd_run.json").exists():
        page.details("kd_run.json (resolved KD settings)", (run_dir / "kd_run.json").read_text())
    page.details("hyperparams.yaml", hp_text or "(missing)")
    html = page.write(run_dir / "report.html", run_dir / "report.md")
    logger.info("report written to %s", html)
    return html


def evaluation_page(summary: dict, utterances: list, path: str | os.PathLike, max_utts: int = 200) -> Path:
    """``speech-kd evaluate --html``: summary and per-utterance alignments, worst first."""
    path = Path(path)
    page = Page(f"speech_kd evaluation: {summary.get('model', '')}", path.parent / (path.stem + "_files"))
    page.table(["WER %", "CER %", "utterances", "parameters", "RTF"],
               [[f"{summary['wer']:.2f}", f"{summary['cer']:.2f}", summary["num_utts"], f"{summary['params']:,}",
                 f"{summary['rtf']:.4f}"]])  # fmt: skip
    page.heading("Utterances, worst first")
    for u in utterances[:max_utts]:
        page.paragraph(f"{u.utt_id} — WER {u.wer:.1f}% ({u.errors} errors / {u.ref_words} words)")
        page.preformatted(u.alignment)
    return page.write(path, path.with_suffix(".md"))
