"""Teacher annealing: fade KD out as the student's dev WER reaches the teacher's.

A student that has caught up with its teacher gains nothing more from
imitating it and, when the teacher is worse than what the data can teach,
is held back at the teacher's errors. Clark et al. 2019 ("BAM! Born-Again
Multi-Task Networks") anneal from the teacher's targets to the gold labels
over training; here the fade is driven by what the teacher is worth on this
data: after every epoch, with ``t`` the teacher's dev WER
(:mod:`speech_kd.scoring.teacher_check`) and ``b`` the student's best dev WER so far,

    scale = min(previous scale, clip((b - t) / (kd_anneal_margin * t), 0, 1))

and the KD weight of the next epochs is ``kd_weight * scale`` (the CTC
weight ``1 - kd_weight * scale``). A student far behind the teacher keeps the
full KD weight (the scale stays exactly 1.0, so such runs are unchanged to
the bit); within ``kd_anneal_margin`` (relative, default 10 %) of the teacher
the weight shrinks, and a student at the teacher's WER learns from the
transcripts alone. The scale never grows back, so a student whose WER rises
once KD is gone does not oscillate between the two.

yaml keys (``hparams/distill.yaml``): ``kd_anneal`` (on/off) and
``kd_anneal_margin``. The state (scale, best WER, the epoch the student
reached the teacher) is checkpointed, so a resumed run goes on with the
same weights.
"""

from __future__ import annotations

import json
import logging
import math
import os

import speechbrain as sb
from speechbrain.utils.checkpoints import mark_as_loader, mark_as_saver, register_checkpoint_hooks

from speech_kd.kd.config import KDConfig
from speech_kd.scoring.teacher_check import REACHED_ADVICE, TeacherDevScore

__all__ = ["anneal_scale", "TeacherAnneal", "TeacherAnnealMixin"]

logger = logging.getLogger(__name__)


def anneal_scale(student_wer: float, teacher_wer: float, margin: float) -> float:
    """KD weight scale for a student at ``student_wer`` and a teacher at ``teacher_wer`` (dev WER, percent).

    1 while the student is more than ``margin`` (relative) above the teacher,
    0 at or below the teacher's WER, linear in between.

    Examples
    --------
    >>> [round(anneal_scale(w, 50.0, 0.1), 2) for w in (80.0, 55.0, 52.5, 50.0, 45.0)]
    [1.0, 1.0, 0.5, 0.0, 0.0]
    """
    width = margin * teacher_wer
    if width <= 0:
        return 1.0 if student_wer > teacher_wer else 0.0
    return min(1.0, max(0.0, (student_wer - teacher_wer) / width))


@register_checkpoint_hooks
class TeacherAnneal:
    """The annealing state of one run: a checkpoint recoverable.

    Parameters
    ----------
    enabled : bool
        ``kd_anneal``: when ``False`` the scale stays 1 (the comparison with
        the teacher is still made and logged).
    margin : float
        ``kd_anneal_margin``: relative distance to the teacher's dev WER at
        which the fade starts.
    teacher_wer : float, optional
        The teacher's dev WER (set once it is measured; ``None``: no annealing).

    Examples
    --------
    >>> state = TeacherAnneal(enabled=True, margin=0.1, teacher_wer=50.0)
    >>> [state.update(epoch, wer) for epoch, wer in enumerate((90.0, 53.0, 58.0, 49.0), 1)]
    [1.0, 0.6, 0.6, 0.0]
    >>> state.reached_epoch
    4
    """

    def __init__(self, enabled: bool = True, margin: float = 0.1, teacher_wer: float | None = None) -> None:
        if margin < 0:
            raise ValueError(f"kd_anneal_margin={margin}: must be >= 0")
        self.enabled = enabled
        self.margin = margin
        self.teacher_wer = teacher_wer
        self.scale = 1.0
        self.best_wer = math.inf
        self.reached_epoch: int | None = None

    def update(self, epoch: int, dev_wer: float) -> float:
        """Take the student's dev WER after ``epoch``; return the KD weight scale for the epochs that follow."""
        self.best_wer = min(self.best_wer, dev_wer)
        if self.teacher_wer is None:
            return self.scale
        if self.reached_epoch is None and dev_wer <= self.teacher_wer:
            self.reached_epoch = epoch
        if self.enabled:
            self.scale = min(self.scale, anneal_scale(self.best_wer, self.teacher_wer, self.margin))
        return self.scale

    def state(self) -> dict:
        """What is checkpointed."""
        best = None if math.isinf(self.best_wer) else self.best_wer
        return {
            "scale": self.scale,
            "best_wer": best,
            "reached_epoch": self.reached_epoch,
            "teacher_wer": self.teacher_wer,
        }

    @mark_as_saver
    def save(self, path: str | os.PathLike) -> None:
        """Write the state as JSON."""
        with open(path, "w") as fh:
            json.dump(self.state(), fh)

    @mark_as_loader
    def load(self, path: str | os.PathLike, end_of_epoch: bool = False) -> None:
        """Restore the state (the teacher's WER is measured again by the resumed run)."""
        del end_of_epoch
        with open(path) as fh:
            state = json.load(fh)
        self.scale = float(state["scale"])
        self.best_wer = math.inf if state["best_wer"] is None else float(state["best_wer"])
        self.reached_epoch = state["reached_epoch"]


class TeacherAnnealMixin:
    """Compare the student's dev WER with the teacher's every epoch, and anneal KD (a Brain mixin).

    Put it before :class:`~speech_kd.kd.mixin.KDMixin` in the bases (as
    ``DistillBrain`` does) and give it the teacher's dev score with
    :meth:`set_teacher_dev`. After every dev pass it adds ``teacher_WER`` to
    the dev statistics (log, ``history.jsonl``), logs the comparison, warns
    once when the student reaches the teacher (with what to do), and sets
    ``kd_weight_scale``, which ``KDMixin.kd_schedule`` multiplies the KD
    weight by.
    """

    teacher_dev: TeacherDevScore | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        config = KDConfig.from_hparams(self.hparams)  # kd_anneal, kd_anneal_margin and their defaults
        self.kd_anneal = TeacherAnneal(bool(config.kd_anneal), float(config.kd_anneal_margin))
        if self.checkpointer is not None and "kd_anneal" not in self.checkpointer.recoverables:
            self.checkpointer.add_recoverable("kd_anneal", self.kd_anneal, optional_load=True)

    @property
    def kd_weight_scale(self) -> float:
        """The factor on ``kd_weight`` (1.0 until the student nears the teacher, or with ``kd_anneal`` off)."""
        return self.kd_anneal.scale

    def set_teacher_dev(self, score: TeacherDevScore | None) -> None:
        """Compare with (and anneal toward) this teacher dev score; ``None``: no comparison."""
        self.teacher_dev = score
        self.kd_anneal.teacher_wer = None if score is None else float(score.wer)

    def stage_stats(self, stage, stage_loss) -> dict:
        """The host Brain's statistics; after a dev pass, compared with the teacher's dev WER."""
        stats = super().stage_stats(stage, stage_loss)
        if stage == sb.Stage.VALID and self.teacher_dev is not None and "WER" in stats:
            self._compare_with_teacher(stats)
        return stats

    def _compare_with_teacher(self, stats: dict) -> None:
        state, teacher = self.kd_anneal, self.teacher_dev
        epoch = self.hparams.epoch_counter.current
        before, reached_before = state.scale, state.reached_epoch
        scale = state.update(epoch, float(stats["WER"]))
        stats["teacher_WER"] = teacher.wer
        logger.info(
            "epoch %d: dev WER student %.2f, teacher %.2f (%s)",
            epoch,
            stats["WER"],
            teacher.wer,
            "student at or below the teacher"
            if stats["WER"] <= teacher.wer
            else f"{stats['WER'] - teacher.wer:.2f} points to go",
        )
        if reached_before is None and state.reached_epoch is not None:
            anneal = (
                f"kd_anneal is on: the KD weight is now {scale:.3f} x kd_weight"
                if state.enabled
                else "kd_anneal is off: the KD weight stays as configured (--kd_anneal=True fades it out)"
            )
            logger.warning(
                "epoch %d: the student has reached the teacher on dev (WER %.2f against the teacher's "
                "%.2f, %s): %s. %s",
                epoch,
                stats["WER"],
                teacher.wer,
                teacher.source,
                REACHED_ADVICE,
                anneal,
            )
        if scale != before:
            logger.info(
                "kd_anneal: KD weight scale %.3f -> %.3f (student's best dev WER %.2f, teacher's %.2f, margin %g)",
                before,
                scale,
                state.best_wer,
                teacher.wer,
                state.margin,
            )
