"""Teacher and student posteriorgrams of a few utterances, on the student's tokens and frame rate."""

from __future__ import annotations

import logging
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from speech_kd.data.audio import read_audio
from speech_kd.data.dataio import token_strings
from speech_kd.kd.losses import collapse_greedy
from speech_kd.model_folder import load_asr
from speech_kd.report import plots
from speech_kd.report.html import Page
from speech_kd.report.run import RunFolder
from speech_kd.scoring.metrics import error_rates
from speech_kd.targets.strategies import OnlineTargets, TargetAligner
from speech_kd.targets.teachers.base import load_teacher, measure_frame_shift
from speech_kd.targets.teachers.ensemble import load_ensemble

logger = logging.getLogger(__name__)


def greedy_text(log_probs: np.ndarray, tokens: list[str], blank: int) -> str:
    """Greedy CTC transcript of ``log_probs [T, V]``: argmax, merge repeats, drop blanks.

    Examples
    --------
    >>> lp = np.log(np.array([[0.1, 0.9, 0.0], [0.1, 0.9, 0.0], [0.9, 0.1, 0.0], [0.1, 0.0, 0.9]]) + 1e-9)
    >>> greedy_text(lp, ["<blank>", "A", "B"], blank=0)
    'AB'
    """
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
class Student:
    """A loaded model folder and what the plots need from it."""

    asr: object  # speechbrain.inference.ASR.EncoderASR
    tokens: list[str]
    blank: int
    sample_rate: int
    frame_shift: float

    @classmethod
    def load(cls, folder: Path, device: str) -> Student:
        """The student model folder ``folder``, loaded on ``device``."""
        asr = load_asr(folder, device=device)
        sample_rate = int(getattr(asr.hparams, "sample_rate", 16000))
        return cls(
            asr,
            token_strings(asr.tokenizer),
            int(getattr(asr.hparams, "blank_index", 0)),
            sample_rate,
            measure_frame_shift(asr.encode_batch, sample_rate, device),
        )

    def log_probs(self, wav: torch.Tensor) -> np.ndarray:
        """``[T, V]`` frame log-posteriors of one waveform ``[S]``."""
        device = self.asr.device
        with torch.no_grad():
            out = self.asr.encode_batch(wav.unsqueeze(0).to(device), torch.ones(1, device=device))
        return out[0].float().cpu().numpy()


def load_targets(run: RunFolder, student: Student, device: str):
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

    try:
        if len(sources) == 1:
            overrides = run.resolved.get("teacher_overrides") or {}
            extra = {"overrides": dict(overrides)} if isinstance(overrides, dict) and overrides else {}
            teacher = load_teacher(sources[0], kind=run.setting("teacher_kind") or "auto", device=device, **extra)
        else:
            teacher = load_ensemble(sources, weights=run.resolved.get("ensemble_weights"), device=device)
        aligner = TargetAligner(
            teacher.tokens,
            teacher.blank_index,
            teacher.frame_shift,
            student.tokens,
            student.blank,
            student.frame_shift,
            max_unmapped_mass=1.0,
            frame_tolerance=8,
        )
        return OnlineTargets(teacher, aligner, student.sample_rate), ""
    except Exception as err:  # a report must not fail because the teacher moved or changed
        logger.warning("report: cannot load teacher %s (%s); student posteriors only", sources, err)
        return None, f"cannot load the teacher ({err.__class__.__name__}: {err}): student posteriors only"


def _teacher_on_student_grid(targets, wav: torch.Tensor, n_frames: int, device: str) -> np.ndarray:
    """``[T, V]`` teacher log-posteriors mapped to the student's tokens and its ``T = n_frames`` frames."""
    batch = types.SimpleNamespace(sig=(wav.unsqueeze(0).to(device), torch.ones(1, device=device)))
    out = targets(batch, torch.tensor([n_frames], device=device), n_frames)
    return out.log_probs[0].float().cpu().numpy()


def _utterance_figure(row: dict, student: Student, targets, device: str, name: str) -> tuple[str, bytes]:
    """(caption, PNG) of one manifest row: posteriorgram(s), transcripts, per-utterance CER, spike timing."""
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
            lines.append(
                f"{'spikes':<7} : {name} - teacher (same token, within 10 frames): median {median:+.0f} ms, "
                f"mean |shift| {mean_abs:.0f} ms, {offsets.size} spikes"
            )
    png = plots.posteriorgram(
        teacher_lp, student_lp, student.tokens, student.frame_shift, student.blank, row["ID"], student_name=name
    )
    return "\n".join(lines), png


def posteriorgram_section(
    page: Page, rows: list[dict], student: Student, targets, device: str, prefix: str, name: str = "student"
) -> int:
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
