"""The report's numbers: WER/CER of each model, gap closed, the run summary, the teacher comparison."""

from __future__ import annotations

import json
from pathlib import Path

from speech_kd.report import plots
from speech_kd.report.html import Page
from speech_kd.report.run import RunFolder, scoring_csv, subset_csv
from speech_kd.scoring.compare import gap_closed, no_gap_label
from speech_kd.scoring.evaluate import evaluate_model
from speech_kd.scoring.teacher_check import read_teacher_score
from speech_kd.targets.cache import CacheReader


def _evaluate_models(models: dict[str, Path], test_csv: Path, device: str, lm: dict | None = None) -> list[dict]:
    """Greedy scores of each model, and with ``lm`` (``evaluate_model``'s decoding settings) beam + LM ones too."""
    rows = []
    for name, folder in models.items():
        s = evaluate_model(folder, test_csv, device=device, progress=False).summary
        row = {
            "name": name,
            "wer": s["wer"],
            "cer": s["cer"],
            "params": s["params"],
            "rtf": s["rtf"],
            "num_utts": s["num_utts"],
            "folder": str(folder),
        }
        if lm is not None:
            fused = evaluate_model(folder, test_csv, device=device, progress=False, **lm).summary
            row["lm"] = {"wer": fused["wer"], "cer": fused["cer"], "rtf": fused["rtf"], "decoder": fused["decoder"]}
        rows.append(row)
    return rows


def run_lm_settings(run: RunFolder) -> dict | None:
    """The run's ``test_lm`` decoding (``evaluate_model`` keywords), None when it has none or the file is gone."""
    lm = run.setting("test_lm")
    if not lm or lm in ("null", "None", "~") or not Path(lm).is_file():
        return None

    def number(key: str, default: float) -> float:
        try:
            return float(run.setting(key) or default)
        except ValueError:
            return default

    return {
        "beam_size": int(number("test_beam_size", 100)),
        "lm": lm,
        "lm_weight": number("test_lm_weight", 0.5),
        "word_bonus": number("test_word_bonus", 1.5),
    }


def gap_closed_by_run(rows: list[dict], run_name: str) -> dict[str, str]:
    """``WER gap closed`` of the KD student: (scratch - KD) / (scratch - teacher), when both references exist.

    A teacher that is not better than the scratch student leaves no gap to
    close: the cell then says so (``teacher worse than scratch``), never a
    negative or undefined share.
    """
    by_name = {r["name"]: r for r in rows}
    teacher, scratch, kd = by_name.get("teacher"), by_name.get("scratch"), by_name.get(run_name)
    if not (teacher and scratch and kd):
        return {}
    label = no_gap_label(scratch["wer"], teacher["wer"])
    if label is not None:
        return {run_name: label}
    return {run_name: f"{100 * gap_closed(scratch['wer'], kd['wer'], teacher['wer']):.0f} %"}


def scores_section(page: Page, run: RunFolder, compare: dict, max_utts: int | None, device: str) -> None:
    """Add the WER/CER table and chart of the run, its teacher and the ``compare`` models to ``page``."""
    test_csv = scoring_csv(run.folder)
    models: dict[str, Path] = {}
    sources = [s for s in run.teacher_sources() if (Path(s) / "hyperparams.yaml").exists()]  # EncoderASR folders
    for i, source in enumerate(sources):
        models["teacher" if len(sources) == 1 else f"teacher{i + 1}"] = Path(source)
    models[run.folder.name] = run.folder / "model"
    for name, folder in (compare or {}).items():
        models[name] = Path(folder)
    subset = subset_csv(test_csv, max_utts, run.folder / "report_files" / "eval_subset.csv")
    lm = run_lm_settings(run)
    rows = _evaluate_models(models, subset, device, lm)
    with_lm = (
        f" and CTC beam search ({lm['beam_size']} beams) with the run's test_lm {Path(lm['lm']).name} "
        f"(lm_weight {lm['lm_weight']:g}, word_bonus {lm['word_bonus']:g}), side by side"
        if lm
        else ""
    )
    page.paragraph(
        f"Scored on {rows[0]['num_utts']} utterances of {test_csv.name} (greedy CTC decoding{with_lm}, jiwer, "
        f"upper-cased; RTF = compute seconds / audio seconds on {device}, decoding included)."
    )
    gap = gap_closed_by_run(rows, run.folder.name)
    lm_gap = gap_closed_by_run([{**r, **r["lm"]} for r in rows], run.folder.name) if lm else {}
    if gap.get(run.folder.name, "").startswith("teacher"):
        by_name = {r["name"]: r for r in rows}
        teacher, scratch, kd = by_name["teacher"], by_name["scratch"], by_name[run.folder.name]
        verdict = "better" if kd["wer"] < scratch["wer"] else "worse" if kd["wer"] > scratch["wer"] else "no different"
        page.paragraph(
            f"The teacher (WER {teacher['wer']:.2f}) is not better than the student from scratch ({scratch['wer']:.2f})"
            f" on this test set: there is no gap for KD to close, so no share is given. This KD student "
            f"({kd['wer']:.2f}) is {verdict} than scratch by {abs(kd['wer'] - scratch['wer']):.2f} points; on a few "
            "hundred utterances and one seed a point or two is noise (`speech-kd compare` gives an interval)."
        )
    header = ["model", "WER %", "CER %", "parameters", "RTF"] + (["WER gap closed"] if gap else [])
    if lm:
        header += ["WER % beam+LM", "CER % beam+LM", "RTF beam+LM"] + (["gap closed, beam+LM"] if lm_gap else [])
    page.table(
        header,
        [
            [
                r["name"],
                f"{r['wer']:.2f}",
                f"{r['cer']:.2f}",
                f"{r['params']:,}",
                f"{r['rtf']:.4f}",
                *([gap.get(r["name"], "")] if gap else []),
                *(
                    [f"{r['lm']['wer']:.2f}", f"{r['lm']['cer']:.2f}", f"{r['lm']['rtf']:.4f}"]
                    + ([lm_gap.get(r["name"], "")] if lm_gap else [])
                    if lm
                    else []
                ),
            ]
            for r in rows
        ],
    )
    page.image("error_rates.png", plots.wer_bars(rows), "Test WER and CER per model")
    students = [r for r in rows if not r["name"].startswith("teacher")]
    if len(students) >= 2:
        page.image("size_vs_wer.png", plots.size_vs_wer(rows), "Parameters against WER")
    (run.folder / "report_files" / "scores.json").write_text(json.dumps(rows, indent=2) + "\n")


def cache_stats(cache_dir: str) -> dict | None:
    """Size and coverage of a soft-target cache, or ``None`` without one."""
    if not cache_dir or not (Path(cache_dir) / "meta.json").exists():
        return None

    meta = CacheReader(cache_dir).metadata
    size = sum(p.stat().st_size for p in Path(cache_dir).iterdir() if p.is_file())
    frames = meta.get("frames") or 0
    return {
        "folder": cache_dir,
        "teacher": meta.get("teacher_name"),
        "utterances": meta.get("utterances"),
        "frames": frames,
        "bytes": size,
        "bytes_per_frame": round(size / frames, 2) if frames else None,
        "fp32_bytes_per_frame": 4 * len(meta.get("teacher_tokens", [])),
        "scheme": meta.get("scheme"),
    }


def summary_rows(run: RunFolder, history: list[dict]) -> list[list[str]]:
    """The run summary table: folder, epochs, final losses and error rates."""
    rows = [["run folder", str(run.folder.resolve())], ["epochs", str(len(history))]]
    if history:
        valid = history[-1].get("valid", {})
        wer, cer = valid.get("WER", float("nan")), valid.get("CER", float("nan"))
        rows.append(["last dev WER / CER %", f"{wer:.2f} / {cer:.2f}"])
    if run.kd:
        rows.append(["teacher", ", ".join(run.teacher_sources()) or "(cache only)"])
        cache = run.setting("targets_cache")
        rows.append(["targets", f"cache {cache}" if cache else "live teacher"])
        for key in ("kd_loss", "kd_weight", "temperature", "kd_reduction", "blank_mode"):
            if run.setting(key):
                rows.append([key, run.setting(key)])
        teacher = read_teacher_score(run.folder)
        if teacher is not None:
            how = "decoded from the targets cache" if teacher.source == "cache" else "live teacher"
            rows.append(
                [
                    "teacher dev WER / CER %",
                    f"{teacher.wer:.2f} / {teacher.cer:.2f} ({how}, {teacher.num_utts} utterances, before training)",
                ]
            )
            rows.append(["student vs teacher on dev", _versus_teacher(history, teacher.wer)])
        anneal = run.setting("kd_anneal")
        if anneal:
            rows.append(["kd_anneal", f"{anneal} (margin {run.setting('kd_anneal_margin') or '?'})"])
    else:
        rows.append(["teacher", "none (no KD in this run)"])
    cr = run.setting("cr_ctc_weight")
    if cr and _positive(cr):
        rows.append(["cr_ctc_weight (CR-CTC: two SpecAugment views per utterance)", cr])
    return rows


def _positive(text: str) -> bool:
    """Whether a setting's text is a number above 0."""
    try:
        return float(text) > 0
    except ValueError:
        return False


def reached_teacher_epoch(history: list[dict], teacher_wer: float) -> int | None:
    """First epoch whose dev WER is at or below the teacher's dev WER, or ``None``.

    Examples
    --------
    >>> rows = [{"epoch": e, "valid": {"WER": w}} for e, w in ((1, 90.0), (2, 60.0), (3, 55.0))]
    >>> reached_teacher_epoch(rows, 60.0), reached_teacher_epoch(rows, 50.0)
    (2, None)
    """
    for row in history:
        wer = row.get("valid", {}).get("WER")
        if wer is not None and wer <= teacher_wer:
            return int(row["epoch"])
    return None


def _versus_teacher(history: list[dict], teacher_wer: float) -> str:
    """One line: when the student reached the teacher on dev, or how far above it it ended."""
    wers = [row["valid"]["WER"] for row in history if "WER" in row.get("valid", {})]
    if not wers:
        return "no dev WER in history.jsonl"
    epoch = reached_teacher_epoch(history, teacher_wer)
    if epoch is not None:
        return (
            f"reached the teacher at epoch {epoch} (best dev WER {min(wers):.2f} against the teacher's "
            f"{teacher_wer:.2f}; see the note below)"
        )
    return f"best dev WER {min(wers):.2f}, {min(wers) - teacher_wer:.2f} points above the teacher's {teacher_wer:.2f}"
