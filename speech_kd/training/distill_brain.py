"""``DistillBrain``: the package's own CTC student Brain with KD (``speech-kd distill``)."""

from __future__ import annotations

import speechbrain as sb

from speech_kd.kd.anneal import TeacherAnnealMixin
from speech_kd.kd.mixin import KDMixin
from speech_kd.training.ctc_brain import CTCBrain

__all__ = ["DistillBrain"]


class DistillBrain(TeacherAnnealMixin, KDMixin, CTCBrain):
    """A CTC student trained on ``(1 - kd_weight) * CTC + kd_weight * KD``.

    Attach teacher targets with ``attach_targets`` (``speech_kd.training.distill``
    does this from the yaml). KD statistics are logged with the training
    loss every epoch. Given the teacher's dev score (``set_teacher_dev``),
    each epoch's dev WER is compared with it and KD fades out as the student
    reaches it (``kd_anneal``, :mod:`speech_kd.kd.anneal`).
    """

    kd_mixed_batches_ok = True

    def kd_time_changing_augmentations(self) -> list[str]:
        """None: ``CTCBrain`` speed-perturbs only with ``speed_perturb: True``, which ``make_targets`` refuses."""
        return []

    def stage_stats(self, stage, stage_loss) -> dict:
        """CTC stats plus, for training, the epoch's KD numbers."""
        stats = super().stage_stats(stage, stage_loss)
        if stage == sb.Stage.TRAIN:
            stats.update(self.kd_epoch_stats)
            if self.kd_targets is not None:  # also in epochs kd_anneal brought the weight to 0 (no KD term ran)
                stats.setdefault("kd_weight", self.kd_schedule()[0])
        return stats
