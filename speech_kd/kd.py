"""``KDMixin``: add frame-level knowledge distillation to any CTC ``speechbrain.Brain``.

Put the mixin first in the bases of an existing CTC Brain and attach a target
strategy::

    class ASR(KDMixin, sb.Brain):   # was: class ASR(sb.Brain)
        ...                         # compute_forward returns (log_probs, wav_lens)

    asr_brain = ASR(modules=..., hparams=hparams, ...)
    asr_brain.attach_targets(make_targets(hparams, student_tokens))

The Brain's own ``compute_objectives`` (its CTC loss) is kept; on training
batches the mixin returns ``(1 - kd_weight) * ctc + kd_weight * kd``. A live
teacher hears ``batch.sig``; a Brain that speed-perturbs its training audio
sets ``self.perturbed_wavs = (wavs, wav_lens)`` in ``compute_forward`` (as
``CTCBrain`` does), and the teacher hears those instead, so that their frames
line up (cached targets refuse them). The
teacher lives in the target strategy, not in ``modules``: it is never
wrapped by DDP, never saved in the student's checkpoints, and runs on the
student's device without gradients. Options are read from the hparams
(``kd_weight``, ``temperature``, ``kd_loss``, ``kd_topk``, ``blank_mode``, ...;
see ``hparams/distill.yaml``).
"""

from __future__ import annotations

import logging

import speechbrain as sb
import torch

from speech_kd.align import relative_to_frames
from speech_kd.brain import CTCBrain
from speech_kd.checkpoints import add_random_states, make_atomic
from speech_kd.distributed import sum_across
from speech_kd.losses import agreement_rate, blank_frame_weights, blank_share, kd_loss, topk_restrict
from speech_kd.precision import autocast_for
from speech_kd.schedules import linear_ramp

__all__ = ["KDMixin", "DistillBrain"]

logger = logging.getLogger(__name__)

_DEFAULTS = {
    "kd_weight": 0.5,
    "kd_weight_final": None,
    "temperature": 2.0,
    "temperature_final": None,
    "kd_ramp_epochs": 1,
    "kd_loss": "kl",
    "kd_reduction": "frame",
    "kd_topk": None,
    "blank_mode": "none",
    "blank_threshold": 0.9,
    "blank_weight": 0.1,
    "blank_index": 0,
}


class KDMixin:
    """Mix a KD term into a CTC Brain's training objective (see module docstring)."""

    kd_targets = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        make_atomic(self.checkpointer)  # the host Brain's checkpoints survive a kill during a save
        add_random_states(self.checkpointer)  # a resumed run draws what the interrupted one would have

    def attach_targets(self, targets) -> None:
        """Use ``targets(batch, student_lengths, student_max) -> Targets`` (online or cached)."""
        self.kd_targets = targets

    # ---------------------------------------------------------------- options
    def kd_option(self, name: str):
        """A KD setting from the hparams, or its documented default."""
        return getattr(self.hparams, name, _DEFAULTS[name])

    def kd_schedule(self) -> tuple[float, float]:
        """``(kd_weight, temperature)`` for the current epoch."""
        epoch = (
            max(1, getattr(self.hparams.epoch_counter, "current", 1)) if hasattr(self.hparams, "epoch_counter") else 1
        )
        ramp = self.kd_option("kd_ramp_epochs")
        weight = linear_ramp(self.kd_option("kd_weight"), self.kd_option("kd_weight_final"), epoch, ramp)
        weight *= getattr(self, "kd_weight_scale", 1.0)  # set by a remedy that anneals KD (1.0: none)
        temp = linear_ramp(self.kd_option("temperature"), self.kd_option("temperature_final"), epoch, ramp)
        return weight, temp

    def kd_student_outputs(self, predictions) -> tuple[torch.Tensor, torch.Tensor]:
        """Student frame log-probs ``[B, T, V]`` and relative lengths ``[B]`` from ``compute_forward``.

        The default reads ``predictions[0]`` and ``predictions[1]``, the
        layout of SpeechBrain's CTC recipes; override for other layouts.
        """
        return predictions[0], predictions[1]

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self):
        """Move the teacher to the student's device."""
        super().on_fit_start()
        if self.kd_targets is not None and hasattr(self.kd_targets, "to"):
            self.kd_targets.to(self.device)

    def on_stage_start(self, stage, epoch=None):
        """Reset the per-epoch KD statistics."""
        super().on_stage_start(stage, epoch)
        self._kd_totals = {"ctc_loss": 0.0, "kd_loss": 0.0, "blank_share": 0.0, "agreement": 0.0, "lost_mass": 0.0}
        self._kd_batches = 0
        self._kd_finite = 0.0

    def compute_objectives(self, predictions, batch, stage):
        """The Brain's CTC loss, mixed with KD on training batches."""
        ctc = super().compute_objectives(predictions, batch, stage)
        weight, temperature = self.kd_schedule()
        if stage != sb.Stage.TRAIN or weight == 0.0:
            return ctc
        if self.kd_targets is None:
            raise RuntimeError("kd_weight > 0 but no teacher targets attached: call brain.attach_targets(...)")
        kd, stats = self.kd_term(predictions, batch, temperature)
        self._accumulate(ctc, kd, stats)
        return (1.0 - weight) * ctc + weight * kd

    def kd_term(self, predictions, batch, temperature: float) -> tuple[torch.Tensor, dict]:
        """KD loss between the student's outputs and the teacher targets for ``batch``."""
        log_probs, wav_lens = self.kd_student_outputs(predictions)
        student_max = log_probs.shape[1]
        n_utts = len(batch.id)
        if log_probs.shape[0] != n_utts:
            raise ValueError(
                f"student batch has {log_probs.shape[0]} rows for {n_utts} utterances: KD needs one row per "
                "utterance (disable concat_original-style augmentation for distillation)"
            )
        lengths = relative_to_frames(wav_lens, student_max)
        extra = {}  # only what this Brain provides, so user target strategies need not take these keywords
        if getattr(self, "shared_features", None) is not None:
            extra["features"] = self.shared_features
        if getattr(self, "perturbed_wavs", None) is not None:
            extra["wavs"] = self.perturbed_wavs
        targets = self.kd_targets(batch, lengths, student_max, **extra)
        blank = self.kd_option("blank_index")
        # the KD term in fp32 whatever --precision says: small probabilities and the T^2 scale need it
        with autocast_for(log_probs.device.type, "fp32"):
            log_probs = log_probs.float()
            teacher = topk_restrict(targets.log_probs.float(), self.kd_option("kd_topk"))
            weights = blank_frame_weights(
                targets.log_probs, blank, self.kd_option("blank_mode"),
                self.kd_option("blank_threshold"), self.kd_option("blank_weight"),
            )  # fmt: skip
            loss = kd_loss(
                self.kd_option("kd_loss"), log_probs, teacher, targets.mask,
                temperature=temperature, frame_weights=weights,
                student_lengths=lengths, teacher_lengths=lengths, blank_index=blank,
                reduction=self.kd_option("kd_reduction"),
            )  # fmt: skip
        stats = {
            "blank_share": blank_share(targets.log_probs, targets.mask, blank, self.kd_option("blank_threshold")),
            "agreement": agreement_rate(log_probs.detach(), targets.log_probs, targets.mask),
            "lost_mass": targets.lost_mass,
        }
        return loss, stats

    def _accumulate(self, ctc: torch.Tensor, kd: torch.Tensor, stats: dict) -> None:
        """Sum this batch's numbers as detached tensors: no host-device sync in the training loop.

        A batch whose CTC or KD loss is not finite (its update is skipped,
        see ``CTCBrain.check_loss_isfinite``) is left out of the means,
        without a sync: it adds zeros and does not count.
        """
        self._kd_batches += 1
        finite = torch.isfinite(ctc.detach()) & torch.isfinite(kd.detach())
        self._kd_finite = self._kd_finite + finite.to(torch.float64)
        for key, value in {"ctc_loss": ctc, "kd_loss": kd, **stats}.items():
            value = value.detach() if isinstance(value, torch.Tensor) else float(value)
            value = torch.as_tensor(value, dtype=torch.float64, device=finite.device)
            self._kd_totals[key] = self._kd_totals[key] + torch.where(finite, value, torch.zeros_like(value))

    def kd_stats(self) -> dict:
        """Per-epoch means of the KD numbers (for the train logger); empty if no KD ran.

        Under DDP the sums and counts of all processes are combined, so the
        means cover every training batch of the epoch; call it on every
        process (as ``on_stage_end`` is).
        """
        if not getattr(self, "_kd_batches", 0):
            return {}
        keys = list(self._kd_totals)
        local = [torch.as_tensor(self._kd_totals[k], dtype=torch.float64).cpu() for k in keys]
        totals = sum_across(torch.stack([*local, torch.as_tensor(self._kd_finite, dtype=torch.float64).cpu()]))
        counted = float(totals[-1])
        stats = {key: float(totals[i]) / counted if counted else float("nan") for i, key in enumerate(keys)}
        weight, temperature = self.kd_schedule()
        stats.update(kd_weight=weight, temperature=temperature)
        return stats


class DistillBrain(KDMixin, CTCBrain):
    """A CTC student trained on ``(1 - kd_weight) * CTC + kd_weight * KD``.

    Attach teacher targets with ``attach_targets`` (``speech_kd.distill``
    does this from the yaml). KD statistics are logged with the training
    loss every epoch.
    """

    def stage_stats(self, stage, stage_loss) -> dict:
        """CTC stats plus, for training, the epoch's KD numbers."""
        stats = super().stage_stats(stage, stage_loss)
        if stage == sb.Stage.TRAIN:
            stats.update(self.kd_stats())
        return stats
