"""Run reports: what distillation did, as pictures (``speech-kd report RUN_DIR``).

:func:`build_report` reads a run folder written by ``speech-kd train`` or
``speech-kd distill`` (``history.jsonl``, ``hyperparams.yaml``,
``kd_run.json``, ``model/``, ``dev.csv``/``test.csv``, ``kd_setup.txt``) and
writes

- ``RUN_DIR/report.html``: self-contained (PNG images inlined as data URIs,
  no script or style from the network);
- ``RUN_DIR/report.md`` with its images in ``RUN_DIR/report_files/``.

Both contain the learning curves, teacher/student posteriorgrams of a few
dev utterances (the teacher mapped onto the student's tokens and frame rate
as in training), a WER/CER table and chart (teacher, this student, any
``compare`` models such as the scratch student, with parameters and RTF),
and the run's configuration. :func:`evaluation_page` renders the
per-utterance view of ``speech-kd evaluate --html``.

Data flow: run folder -> models (student, teacher via ``speech_kd.targets``)
-> numbers -> :mod:`speech_kd.report.plots` (PNG bytes) ->
:class:`speech_kd.report.html.Page` (HTML + Markdown).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from speech_kd.compare import gap_closed, no_gap_label
from speech_kd.report import plots
from speech_kd.report.html import Page
from speech_kd.teacher_check import REACHED_ADVICE, read_teacher_score

__all__ = ["build_report", "evaluation_page", "load_history", "greedy_text", "spike_offsets", "reached_teacher_epoch"]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- run folder


def load_history(run_dir: str | os.PathLike) -> list[dict]:
    """The per-epoch rows of ``RUN_DIR/history.jsonl`` (the last row per epoch wins, as after a resume)."""
    path = Path(run_dir) / "history.jsonl"
    if not path.exists():
        return []
    rows = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a crash (power loss); the rerun wrote the epoch again
            logger.warning("%s line %d is not JSON (cut short?): skipped", path, number)
            continue
        rows[row["epoch"]] = row
    return [rows[e] for e in sorted(rows)]


def _yaml_value(text: str, key: str) -> str:
    """Top-level scalar ``key: value`` of the run's saved hyperparams.yaml (no yaml evaluation)."""
    for line in text.splitlines():
        if line.startswith(f"{key}:"):
            value = line.split(":", 1)[1].split("#", 1)[0].strip()
            return value.strip("'\"")
    return ""


@dataclass
class _Run:
    """What the report needs to know about a run folder."""

    folder: Path
    hparams_text: str
    resolved: dict  # kd_run.json: the KD settings as the run resolved them (empty: no KD in this run)

    @classmethod
    def read(cls, folder: Path) -> _Run:
        text = (folder / "hyperparams.yaml").read_text() if (folder / "hyperparams.yaml").exists() else ""
        resolved_path = folder / "kd_run.json"
        resolved = json.loads(resolved_path.read_text()) if resolved_path.exists() else {}
        return cls(folder, text, resolved)

    def setting(self, key: str) -> str:
        """A setting of the run: from ``kd_run.json`` (resolved values), else the saved hyperparams.yaml."""
        value = self.resolved.get(key)
        return str(value) if value is not None else _yaml_value(self.hparams_text, key)

    @property
    def kd(self) -> bool:
        """Whether the student was trained with KD (``kd_run.json`` is written only then)."""
        if self.resolved:
            return True
        try:  # a run folder older than kd_run.json
            return float(_yaml_value(self.hparams_text, "kd_weight") or 0) > 0
        except ValueError:
            return False

    def teacher_sources(self) -> list[str]:
        """The teacher folder(s) of a KD run (empty for plain training and ``kd_weight=0``)."""
        if not self.kd:
            return []
        value = self.resolved.get("teacher_source", _yaml_value(self.hparams_text, "teacher_source"))
        if isinstance(value, (list, tuple)):
            return [str(v) for v in value]
        return [s.strip() for s in str(value or "").split(",") if s.strip()]


def _read_rows(csv_path: Path, limit: int | None = None) -> list[dict]:
    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return rows[:limit] if limit else rows


def _subset_csv(csv_path: Path, limit: int | None, out: Path) -> Path:
    """``csv_path`` cut to its first ``limit`` rows (the whole file when ``limit`` is falsy or larger)."""
    rows = _read_rows(csv_path)
    if not limit or limit >= len(rows):
        return csv_path
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows[:limit])
    return out


def _scoring_csv(run_dir: Path) -> Path:
    """The run's test manifest (``test.csv``, or ``data/test*.csv`` as written by prepare), else its dev manifest."""
    tests = [p for p in sorted((run_dir / "data").glob("test*.csv")) if not p.stem.endswith("_skipped")]
    for candidate in [run_dir / "test.csv", *tests, run_dir / "dev.csv"]:
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"{run_dir}: no test or dev manifest to score the models on")


# ---------------------------------------------------------------------------------------------- posteriors


def greedy_text(log_probs: np.ndarray, tokens: list[str], blank: int) -> str:
    """Greedy CTC transcript of ``log_probs [T, V]``: argmax, merge repeats, drop blanks.

    Examples
    --------
    >>> lp = np.log(np.array([[0.1, 0.9, 0.0], [0.1, 0.9, 0.0], [0.9, 0.1, 0.0], [0.1, 0.0, 0.9]]) + 1e-9)
    >>> greedy_text(lp, ["<blank>", "A", "B"], blank=0)
    'AB'
    """
    from speech_kd.losses import collapse_greedy

    labels, lengths = collapse_greedy(
        torch.from_numpy(np.asarray(log_probs))[None], torch.tensor([len(log_probs)]), blank
    )
    return "".join(tokens[i] for i in labels[0, : int(lengths[0])].tolist()).replace("▁", " ").strip()


def spike_offsets(teacher: np.ndarray, student: np.ndarray, blank: int, max_frames: int = 10) -> np.ndarray:
    """Frame offsets ``[N]`` of the student's spikes from the nearest teacher spike of the same token.

    ``teacher`` and ``student`` are ``[T, V]`` log-posteriors on one frame
    grid; student spikes with no teacher spike of their token within
    ``max_frames`` are left out. Positive: the student fires later.

    Examples
    --------
    >>> t = np.log(np.array([[0.1, 0.9], [0.9, 0.1], [0.9, 0.1]]))
    >>> s = np.log(np.array([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9]]))
    >>> spike_offsets(t, s, blank=0).tolist()
    [2]
    """
    t_frames = plots.spike_frames(teacher, blank)
    t_tokens = teacher[t_frames].argmax(-1)
    out = []
    for frame in plots.spike_frames(student, blank):
        same = t_frames[t_tokens == student[frame].argmax()]
        if same.size:
            delta = int(frame - same[np.abs(same - frame).argmin()])
            if abs(delta) <= max_frames:
                out.append(delta)
    return np.array(out, dtype=int)


@dataclass
class _Student:
    """A loaded model folder and what the plots need from it."""

    asr: object  # speechbrain.inference.ASR.EncoderASR
    tokens: list[str]
    blank: int
    sample_rate: int
    frame_shift: float

    @classmethod
    def load(cls, folder: Path, device: str) -> _Student:
        from speech_kd.dataio import token_strings
        from speech_kd.evaluate import load_asr
        from speech_kd.teachers.base import measure_frame_shift

        asr = load_asr(folder, device=device)
        sample_rate = int(getattr(asr.hparams, "sample_rate", 16000))
        return cls(asr, token_strings(asr.tokenizer), int(getattr(asr.hparams, "blank_index", 0)), sample_rate,
                   measure_frame_shift(asr.encode_batch, sample_rate, device))  # fmt: skip

    def log_probs(self, wav: torch.Tensor) -> np.ndarray:
        """``[T, V]`` frame log-posteriors of one waveform ``[S]``."""
        device = self.asr.device
        with torch.no_grad():
            out = self.asr.encode_batch(wav.unsqueeze(0).to(device), torch.ones(1, device=device))
        return out[0].float().cpu().numpy()


def _load_targets(run: _Run, student: _Student, device: str):
    """``OnlineTargets`` for the run's teacher(s) on the student's grid, or ``(None, why)``.

    The aligner is lenient (no unmapped-mass error, wide length tolerance): a
    picture of a mismatch is more useful than a refusal; training already
    enforced the run's limits.
    """
    sources = run.teacher_sources()
    if not sources and run.kd:
        return None, "the KD targets came from a cache without a teacher folder to run: student posteriors only"
    if not sources:
        return None, "this run has no teacher (plain training or kd_weight=0): student posteriors only"
    missing = [s for s in sources if not Path(s).exists()]
    if missing:
        return None, f"teacher folder {missing[0]} not found: student posteriors only"
    from speech_kd.targets import OnlineTargets, TargetAligner
    from speech_kd.teachers.base import load_teacher

    try:
        if len(sources) == 1:
            overrides = run.resolved.get("teacher_overrides") or {}
            extra = {"overrides": dict(overrides)} if isinstance(overrides, dict) and overrides else {}
            teacher = load_teacher(sources[0], kind=run.setting("teacher_kind") or "auto", device=device, **extra)
        else:
            from speech_kd.teachers.ensemble import load_ensemble

            teacher = load_ensemble(sources, weights=run.resolved.get("ensemble_weights"), device=device)
        aligner = TargetAligner(teacher.tokens, teacher.blank_index, teacher.frame_shift, student.tokens,
                                student.blank, student.frame_shift, max_unmapped_mass=1.0,
                                frame_tolerance=8)  # fmt: skip
        return OnlineTargets(teacher, aligner, student.sample_rate), ""
    except Exception as err:  # a report must not fail because the teacher moved or changed
        logger.warning("report: cannot load teacher %s (%s); student posteriors only", sources, err)
        return None, f"cannot load the teacher ({err.__class__.__name__}: {err}): student posteriors only"


def _teacher_on_student_grid(targets, wav: torch.Tensor, n_frames: int, device: str) -> np.ndarray:
    """``[T, V]`` teacher log-posteriors mapped to the student's tokens and its ``T = n_frames`` frames."""
    batch = types.SimpleNamespace(sig=(wav.unsqueeze(0).to(device), torch.ones(1, device=device)))
    out = targets(batch, torch.tensor([n_frames], device=device), n_frames)
    return out.log_probs[0].float().cpu().numpy()


def _utterance_figure(row: dict, student: _Student, targets, device: str, name: str) -> tuple[str, bytes]:
    """(caption, PNG) of one manifest row: posteriorgram(s), transcripts, per-utterance CER, spike timing."""
    from speech_kd.audio import read_audio
    from speech_kd.metrics import error_rates

    wav = read_audio(row["wav"], student.sample_rate)
    student_lp = student.log_probs(wav)
    teacher_lp = None if targets is None else _teacher_on_student_grid(targets, wav, student_lp.shape[0], device)
    ref = row.get("wrd", "")
    seconds = wav.shape[0] / student.sample_rate
    lines = [f"{row['ID']}  ({seconds:.2f} s)", f"{'REF':<7} : {ref}"]
    for label, lp in (("teacher", teacher_lp), (name, student_lp)):
        if lp is not None:
            hyp = greedy_text(lp, student.tokens, student.blank)
            cer = error_rates([ref], [hyp]).cer if ref else float("nan")
            lines.append(f"{label:<7} : {hyp or '(empty)'}    [CER {cer:.1f} %]")
    if teacher_lp is not None:
        offsets = spike_offsets(teacher_lp, student_lp, student.blank) * student.frame_shift * 1000
        if offsets.size:
            median, mean_abs = np.median(offsets), np.abs(offsets).mean()
            lines.append(f"{'spikes':<7} : {name} - teacher (same token, within 10 frames): median {median:+.0f} ms, "
                         f"mean |shift| {mean_abs:.0f} ms, {offsets.size} spikes")  # fmt: skip
    png = plots.posteriorgram(teacher_lp, student_lp, student.tokens, student.frame_shift, student.blank, row["ID"],
                              student_name=name)  # fmt: skip
    return "\n".join(lines), png


def _posteriorgram_section(page: Page, rows: list[dict], student: _Student, targets, device: str, prefix: str,
                           name: str = "student") -> int:  # fmt: skip
    """Add one figure per row; an utterance that cannot be drawn becomes a note. Returns the figures drawn."""
    drawn = 0
    for i, row in enumerate(rows):
        try:
            caption, png = _utterance_figure(row, student, targets, device, name)
        except Exception as err:  # one unreadable file must not cost the whole report
            logger.warning("report: no posteriorgram for %s (%s)", row.get("ID"), err)
            page.paragraph(f"{row.get('ID')}: no posteriorgram ({err.__class__.__name__}: {err})")
            continue
        page.figure(f"{prefix}_{i}.png", png, row["ID"], caption)
        drawn += 1
    return drawn


# ---------------------------------------------------------------------------------------------- scores


def _evaluate_models(models: dict[str, Path], test_csv: Path, device: str) -> list[dict]:
    from speech_kd.evaluate import evaluate_model

    rows = []
    for name, folder in models.items():
        s = evaluate_model(folder, test_csv, device=device, progress=False).summary
        rows.append({"name": name, "wer": s["wer"], "cer": s["cer"], "params": s["params"], "rtf": s["rtf"],
                     "num_utts": s["num_utts"], "folder": str(folder)})  # fmt: skip
    return rows


def _gap_closed(rows: list[dict], run_name: str) -> dict[str, str]:
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


def _scores_section(page: Page, run: _Run, compare: dict, max_utts: int | None, device: str) -> None:
    test_csv = _scoring_csv(run.folder)
    models: dict[str, Path] = {}
    sources = [s for s in run.teacher_sources() if (Path(s) / "hyperparams.yaml").exists()]  # EncoderASR folders
    for i, source in enumerate(sources):
        models["teacher" if len(sources) == 1 else f"teacher{i + 1}"] = Path(source)
    models[run.folder.name] = run.folder / "model"
    for name, folder in (compare or {}).items():
        models[name] = Path(folder)
    subset = _subset_csv(test_csv, max_utts, run.folder / "report_files" / "eval_subset.csv")
    rows = _evaluate_models(models, subset, device)
    page.paragraph(
        f"Scored on {rows[0]['num_utts']} utterances of {test_csv.name} (greedy CTC decoding, jiwer, "
        f"upper-cased; RTF = compute seconds / audio seconds on {device})."
    )
    gap = _gap_closed(rows, run.folder.name)
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
    page.table(header, [[r["name"], f"{r['wer']:.2f}", f"{r['cer']:.2f}", f"{r['params']:,}", f"{r['rtf']:.4f}",
                         *([gap.get(r["name"], "")] if gap else [])] for r in rows])  # fmt: skip
    page.image("error_rates.png", plots.wer_bars(rows), "Test WER and CER per model")
    students = [r for r in rows if not r["name"].startswith("teacher")]
    if len(students) >= 2:
        page.image("size_vs_wer.png", plots.size_vs_wer(rows), "Parameters against WER")
    (run.folder / "report_files" / "scores.json").write_text(json.dumps(rows, indent=2) + "\n")


def _cache_stats(cache_dir: str) -> dict | None:
    if not cache_dir or not (Path(cache_dir) / "meta.json").exists():
        return None
    from speech_kd.cache import CacheReader

    meta = CacheReader(cache_dir).metadata
    size = sum(p.stat().st_size for p in Path(cache_dir).iterdir() if p.is_file())
    frames = meta.get("frames") or 0
    return {"folder": cache_dir, "teacher": meta.get("teacher_name"), "utterances": meta.get("utterances"),
            "frames": frames, "bytes": size, "bytes_per_frame": round(size / frames, 2) if frames else None,
            "fp32_bytes_per_frame": 4 * len(meta.get("teacher_tokens", [])), "scheme": meta.get("scheme")}  # fmt: skip


def _summary_rows(run: _Run, history: list[dict]) -> list[list[str]]:
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
            rows.append(["teacher dev WER / CER %", f"{teacher.wer:.2f} / {teacher.cer:.2f} ({how}, "
                                                    f"{teacher.num_utts} utterances, before training)"])  # fmt: skip
            rows.append(["student vs teacher on dev", _versus_teacher(history, teacher.wer)])
        anneal = run.setting("kd_anneal")
        if anneal:
            rows.append(["kd_anneal", f"{anneal} (margin {run.setting('kd_anneal_margin') or '?'})"])
    else:
        rows.append(["teacher", "none (no KD in this run)"])
    return rows


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
        return (f"reached the teacher at epoch {epoch} (best dev WER {min(wers):.2f} against the teacher's "
                f"{teacher_wer:.2f}; see the note below)")  # fmt: skip
    return f"best dev WER {min(wers):.2f}, {min(wers) - teacher_wer:.2f} points above the teacher's {teacher_wer:.2f}"


# ---------------------------------------------------------------------------------------------- pages


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
    run = _Run.read(Path(run_dir))
    model_dir = run.folder / "model"
    if not model_dir.exists():
        raise FileNotFoundError(f"{run.folder}: no model/ folder (is this a finished speech-kd run?)")
    page = Page(f"speech_kd report: {run.folder.name}", run.folder / "report_files")
    history = load_history(run.folder)
    page.table(["run", ""], _summary_rows(run, history), numeric=False)
    teacher = read_teacher_score(run.folder) if run.kd else None
    reached = reached_teacher_epoch(history, teacher.wer) if teacher is not None else None
    if reached is not None:
        page.paragraph(f"Note: the student reached its teacher on dev at epoch {reached} (teacher dev WER "
                       f"{teacher.wer:.2f}): {REACHED_ADVICE}.")  # fmt: skip

    page.heading("Learning curves")
    if history:
        reduction = run.setting("kd_reduction") or "utterance"
        page.image("learning_curves.png",
                   plots.learning_curves(history, reduction, teacher_wer=teacher.wer if teacher else None),
                   "Loss, dev error rates and learning rate")  # fmt: skip (the dashed line: the teacher's dev WER)
        last = history[-1].get("train", {})
        kd_keys = [k for k in ("kd_weight", "temperature", "blank_share", "agreement", "lost_mass") if k in last]
        if kd_keys:
            lines = ["epoch  " + "  ".join(f"{k:>11}" for k in kd_keys)]
            lines += [f"{h['epoch']:>5}  " + "  ".join(f"{h['train'].get(k, float('nan')):>11.4g}" for k in kd_keys)
                      for h in history]  # fmt: skip
            page.details("KD diagnostics per epoch (training)", "\n".join(lines))
    else:
        page.paragraph("No history.jsonl in this run.")

    page.heading("Teacher and student posteriors (dev utterances)")
    dev_csv = run.folder / "dev.csv"
    if dev_csv.exists() and n_posteriorgrams > 0:
        student = _Student.load(model_dir, device)
        targets, why = _load_targets(run, student, device)
        page.paragraph(
            f"Posterior probability per token (y) and {student.frame_shift * 1000:.0f} ms frame (x, seconds). "
            + ("The teacher is shown on the student's token set and frame rate, as the KD loss sees it; hollow "
               "circles mark the teacher's spikes (non-blank argmax frames), crosses the student's, in both panels: "
               "a cross beside a circle is a timing shift." if targets is not None else why)
        )  # fmt: skip
        _posteriorgram_section(page, _read_rows(dev_csv, n_posteriorgrams), student, targets, device, "posteriorgram")
    else:
        page.paragraph("No dev.csv in this run.")

    page.heading("Accuracy, size and speed")
    if evaluate:
        _scores_section(page, run, compare or {}, max_utts, device)
    else:
        results = run.folder / "test_results.json"
        if results.exists():
            page.paragraph("Not re-scored (--no-eval); the run's own test scores from training (test_results.json):")
            scores = json.loads(results.read_text())
            page.table(["split", "WER %", "CER %", "loss"],
                       [[k, f"{v.get('WER', float('nan')):.2f}", f"{v.get('CER', float('nan')):.2f}",
                         f"{v.get('loss', float('nan')):.3g}"] for k, v in scores.items()])  # fmt: skip
        else:
            page.paragraph("Not scored (--no-eval) and no test_results.json in this run.")

    page.heading("Configuration")
    setup = run.folder / "kd_setup.txt"
    if setup.exists():
        page.paragraph("Teacher vocabulary and frame-rate mapping (kd_setup.txt):")
        page.preformatted(setup.read_text())
    stats = _cache_stats(run.setting("targets_cache")) if run.kd else None
    if stats:
        page.paragraph("Soft-target cache:")
        page.table(["key", "value"], [[k, str(v)] for k, v in stats.items()], numeric=False)
    if run.resolved:
        page.details("kd_run.json (resolved KD settings)", json.dumps(run.resolved, indent=2), "json")
    page.details("hyperparams.yaml", run.hparams_text or "(missing)", "yaml")
    html = page.write(run.folder / "report.html", run.folder / "report.md")
    logger.info("report written to %s", html)
    return html


def _strip_sentence_header(alignment: str) -> str:
    """The jiwer alignment without its ``=== SENTENCE 1 ===`` line (one sentence per block here)."""
    return "\n".join(line for line in alignment.splitlines() if not line.startswith("=== SENTENCE")).strip("\n")


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
        ``EvalResult.summary`` of :func:`speech_kd.evaluate.evaluate_model`
        (``model`` and ``csv`` name the model folder and manifest).
    utterances : list of speech_kd.metrics.UtteranceErrors
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
    page = Page(f"speech_kd evaluation: {summary.get('model', '')}", path.parent / (path.stem + "_files"))
    page.table(["WER %", "CER %", "substitutions", "deletions", "insertions", "reference words", "utterances",
                "parameters", "RTF"],
               [[f"{summary['wer']:.2f}", f"{summary['cer']:.2f}", summary.get("substitutions", ""),
                 summary.get("deletions", ""), summary.get("insertions", ""), summary.get("ref_words", ""),
                 summary["num_utts"], f"{summary['params']:,}", f"{summary['rtf']:.4f}"]])  # fmt: skip
    page.paragraph(f"Model {summary.get('model', '?')} on {summary.get('csv', '?')} ({summary.get('device', '?')}); "
                   "greedy CTC decoding, transcripts upper-cased and whitespace-squeezed before scoring.")  # fmt: skip
    rows = {r["ID"]: r for r in _read_rows(Path(summary["csv"]))} if summary.get("csv") else {}
    worst = [rows[u.utt_id] for u in utterances[:n_posteriorgrams] if u.utt_id in rows]
    if worst and summary.get("model"):
        page.heading("Posteriors of the worst utterances")
        student = _Student.load(Path(summary["model"]), device)
        page.paragraph(f"Posterior probability per token (y) and {student.frame_shift * 1000:.0f} ms frame "
                       "(x, seconds); crosses mark the spikes (non-blank argmax frames).")  # fmt: skip
        _posteriorgram_section(page, worst, student, None, device, "worst", name="model")
    page.heading(f"Utterances, worst first ({min(max_utts, len(utterances))} of {len(utterances)})")
    for u in utterances[:max_utts]:
        page.paragraph(f"{u.utt_id} — WER {u.wer:.1f}% ({u.errors} errors / {u.ref_words} words)")
        page.preformatted(_strip_sentence_header(u.alignment))
    return page.write(path, path.with_suffix(".md"))
