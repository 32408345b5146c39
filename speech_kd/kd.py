"""``KDMixin``: add frame-level knowledge distillation to any CTC ``speechbrain.Brain``.

Put the mixin in the bases of an existing CTC Brain, either way::

    class ASR(KDMixin, sb.Brain):    # edit the class in place (was: class ASR(sb.Brain))
        ...                          # its compute_forward / compute_objectives / stage hooks, unchanged

    class KDASR(KDMixin, ASR):       # or wrap it, leaving the recipe's class untouched
        pass

    asr_brain.attach_targets(make_targets(hparams, token_strings(tokenizer)))

At construction the mixin wraps the instance's own ``compute_forward``,
``compute_objectives``, ``on_stage_start``, ``on_stage_end`` and ``fit_batch``
(whatever class in the MRO defines them), so the recipe's methods run as
written and the KD term is added around them; on training batches the loss
is ``(1 - kd_weight) * recipe_loss + kd_weight * kd``. What the wrapping does:

- outputs: the CTC log-probabilities and relative lengths are found in what
  ``compute_forward`` returns (:mod:`speech_kd.recipe_outputs`; ``kd_outputs``
  in the yaml names them where that is ambiguous);
- augmentation: every SpeechBrain ``Augmenter`` in the hparams is followed
  (:mod:`speech_kd.augment_rows`): a live teacher hears exactly the waveform
  rows the student heard (original and augmented), feature-augmented rows
  reuse their audio's targets, and cached targets are refused with
  augmentations that move samples in time (named by yaml key);
- statistics: the epoch's KD numbers (``kd_loss``, ``ctc_loss``,
  ``agreement``, ``lost_mass``, ``blank_share``, ``kd_weight``) are added to the
  ``train_stats`` the recipe gives its ``train_logger``, so they reach its
  own train log unedited;
- untranscribed utterances (empty ``wrd``): a training batch of them only is
  trained on the KD term alone (``unlabeled_kd_loss``); the recipe's
  ``compute_objectives`` never sees it;
- safety: with ``kd_weight > 0`` a training step that computed no KD term
  (e.g. a ``fit_batch`` override that bypasses ``self.compute_objectives``) is
  an error, as is a teacher that was never attached.

The teacher lives in the target strategy, not in ``modules``: it is never
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
from speech_kd.augment_rows import AugmentationRows, find_augmenters, time_changing_augmentations
from speech_kd.brain import CTCBrain
from speech_kd.checkpoints import add_random_states, make_atomic
from speech_kd.kd_stats import KDEpochTotals
from speech_kd.losses import agreement_rate, blank_frame_weights, blank_share, kd_loss, topk_restrict
from speech_kd.precision import autocast_for
from speech_kd.recipe_outputs import find_ctc_outputs
from speech_kd.schedules import linear_ramp

__all__ = ["KDMixin", "DistillBrain", "KDSetupError", "untranscribed_rows"]

logger = logging.getLogger(__name__)

_DEFAULTS = {
    "kd_weight": 0.5,
    "kd_weight_final": None,
    "temperature": 2.0,
    "temperature_final": None,
    "kd_ramp_epochs": 1,
    "kd_loss": "kl",
    "unlabeled_kd_loss": None,
    "kd_reduction": "auto",
    "kd_topk": None,
    "kd_outputs": None,
    "blank_mode": "none",
    "blank_threshold": 0.9,
    "blank_weight": 0.1,
    "blank_index": 0,
    "sample_rate": 16000,
}

_WRAPPED = ("compute_forward", "compute_objectives", "on_stage_start", "on_stage_end", "fit_batch")


class KDSetupError(ValueError):
    """KD cannot run as set up (the message says what to change; ``speech-kd`` prints it as one line)."""


def untranscribed_rows(batch) -> list[bool] | None:
    """Per utterance, whether it has no transcript (empty ``wrd``); ``None`` when the batch has no ``wrd``."""
    words = getattr(batch, "wrd", None)
    if words is None or isinstance(words, torch.Tensor):
        return None
    return [not str(w).strip() for w in words]


def _pad_units(targets, student_units: int):
    """``targets`` widened to ``student_units`` outputs; the extra ones get no teacher probability (``-inf``).

    A SentencePiece char model can have fewer pieces than ``output_neurons``
    (the stock LibriSpeech yaml's 31 on a corpus without some letter).
    """
    have = targets.log_probs.shape[-1]
    if have == student_units:
        return targets
    if have > student_units:
        raise KDSetupError(
            f"the student's CTC output has {student_units} units but its tokenizer has {have} tokens: the "
            "tokenizer given to token_strings(...) is not the one the model's output layer was sized for"
        )
    pad = targets.log_probs.new_full((*targets.log_probs.shape[:-1], student_units - have), float("-inf"))
    return type(targets)(torch.cat([targets.log_probs, pad], dim=-1), targets.mask, targets.lost_mass)


class KDMixin:
    """Mix a KD term into a CTC Brain's training objective (see the module docstring)."""

    kd_targets = None
    #: whether the host Brain's own objective handles batches mixing transcribed and untranscribed
    #: utterances (``CTCBrain`` masks its CTC per utterance); users' recipes do not
    kd_mixed_batches_ok = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        make_atomic(self.checkpointer)  # the host Brain's checkpoints survive a kill during a save
        add_random_states(self.checkpointer)  # a resumed run draws what the interrupted one would have
        self._kd_install()

    # ------------------------------------------------------------ installation
    def _kd_install(self) -> None:
        """Wrap the instance's hooks (see the module docstring) and follow the hparams' augmenters."""
        self._kd_recipe = {name: getattr(self, name) for name in _WRAPPED}
        for name in _WRAPPED:
            setattr(self, name, getattr(self, f"_kd_{name}"))
        self._kd_rows = AugmentationRows(find_augmenters(self.hparams)) if self.hparams is not None else None
        self._kd_epoch = KDEpochTotals()
        if self.checkpointer is not None and "kd_epoch_totals" not in self.checkpointer.recoverables:
            # optional: checkpoints written before the sums were saved still load
            self.checkpointer.add_recoverable("kd_epoch_totals", self._kd_epoch, optional_load=True)
        self.kd_epoch_stats: dict = {}
        self._kd_checked_frames = False
        self._wrap_train_logger()

    def _wrap_train_logger(self) -> None:
        """Add the epoch's KD numbers to the ``train_stats`` the recipe logs (its own log, unedited)."""
        train_logger = getattr(self.hparams, "train_logger", None)
        if train_logger is None or not hasattr(train_logger, "log_stats") or getattr(train_logger, "_kd_wrapped", 0):
            return
        original = train_logger.log_stats
        brain = self

        def log_stats(*args, **kwargs):
            stats = dict(brain.kd_epoch_stats)
            if stats:
                if len(args) >= 2 and isinstance(args[1], dict):
                    args = (args[0], {**args[1], **{k: v for k, v in stats.items() if k not in args[1]}}, *args[2:])
                elif isinstance(kwargs.get("train_stats"), dict):
                    given = kwargs["train_stats"]
                    kwargs["train_stats"] = {**given, **{k: v for k, v in stats.items() if k not in given}}
            return original(*args, **kwargs)

        train_logger.log_stats = log_stats
        train_logger._kd_wrapped = True

    def attach_targets(self, targets) -> None:
        """Use ``targets(batch, student_lengths, student_max) -> Targets`` (online or cached).

        Refuses, before any training, what cannot work: a mixin that is not
        first in the bases (its wrapping never ran), and cached targets with
        augmentation that moves samples in time (named by yaml key).
        """
        if not hasattr(self, "_kd_recipe"):
            raise KDSetupError(
                f"{type(self).__name__}: KDMixin.__init__ never ran, so KD would not be applied; put KDMixin FIRST in "
                f"the bases: class {type(self).__name__}(KDMixin, ...)"
            )
        if getattr(targets, "reads_cache", False):
            moving = self.kd_time_changing_augmentations()
            if moving:
                raise KDSetupError(
                    "cached teacher targets were computed on the original audio, but these augmentations move "
                    f"samples in time, so the frames would not line up: {', '.join(moving)}. Remove them from the "
                    "yaml (augmentations that keep the time axis, e.g. DropFreq, DropChunk, AddNoise, stay), or "
                    "use the live teacher (no targets_cache)"
                )
        self._kd_check_options()
        if hasattr(targets, "to"):
            targets.to(self.device)
        self.kd_targets = targets

    def _kd_check_options(self) -> None:
        """Weights outside ``[0, 1]`` would turn the recipe's loss negative; temperatures must be positive."""
        for key in ("kd_weight", "kd_weight_final"):
            value = self.kd_option(key)
            if value is not None and not 0.0 <= float(value) <= 1.0:
                raise KDSetupError(
                    f"{key}={value}: must be between 0 and 1 (loss = (1 - kd_weight) * recipe loss + kd_weight * KD)"
                )
        for key in ("temperature", "temperature_final"):
            value = self.kd_option(key)
            if value is not None and not float(value) > 0.0:
                raise KDSetupError(f"{key}={value}: must be > 0")

    def kd_time_changing_augmentations(self) -> list[str]:
        """Yaml keys of augmentations that would misalign cached targets (see ``augment_rows``)."""
        return time_changing_augmentations(self.hparams)

    # ---------------------------------------------------------------- options
    def kd_option(self, name: str):
        """A KD setting from the hparams, or its documented default."""
        value = getattr(self.hparams, name, _DEFAULTS[name])
        if name == "kd_reduction" and value in (None, "auto"):
            value = self._kd_auto_reduction()
        return value

    def _kd_auto_reduction(self) -> str:
        """``kd_reduction`` matching the scale of the recipe's CTC loss (``auto``, the mixin's default).

        SpeechBrain's ``ctc_loss(reduction="batchmean")`` (the LibriSpeech
        recipes) sums over frames and averages over utterances: KD summed the
        same way (``utterance``) mixes like with like. ``reduction="mean"``
        (its default, e.g. TIMIT) divides by the transcript lengths, the
        scale of a per-frame mean (``frame``). Found in the hparams'
        ``!name:speechbrain.nnet.losses.ctc_loss`` entries; none found:
        ``utterance``.
        """
        if getattr(self, "_kd_reduction_found", None) is None:
            import functools

            reductions = [
                value.keywords.get("reduction", "mean")
                for value in vars(self.hparams).values()
                if isinstance(value, functools.partial) and getattr(value.func, "__name__", "") == "ctc_loss"
            ]
            found = "frame" if reductions and reductions[0] == "mean" else "utterance"
            logger.info("kd_reduction=%s (auto: the recipe's CTC loss has reduction=%s)", found,
                        reductions[0] if reductions else "not found: batchmean assumed")  # fmt: skip
            self._kd_reduction_found = found
        return self._kd_reduction_found

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

        Found by :func:`speech_kd.recipe_outputs.find_ctc_outputs` (the first
        log-probability tensor and the first relative-length vector; the yaml's
        ``kd_outputs: [i, j]`` names them). Override for other layouts.
        """
        return find_ctc_outputs(predictions, self.kd_option("kd_outputs"))

    # ------------------------------------------------------------ the wrappers
    def _kd_compute_forward(self, batch, stage):
        """The recipe's ``compute_forward``, with its training batch's ``Augmenter`` calls followed."""
        rows = self._kd_rows if stage == sb.Stage.TRAIN and self.kd_targets is not None else None
        if rows is None:
            return self._kd_recipe["compute_forward"](batch, stage)
        rows.reset(len(batch.id))
        rows.active = True
        try:
            return self._kd_recipe["compute_forward"](batch, stage)
        finally:
            rows.active = False

    def _kd_compute_objectives(self, predictions, batch, stage):
        """The recipe's objective, mixed with KD on training batches."""
        recipe_objectives = self._kd_recipe["compute_objectives"]
        if stage != sb.Stage.TRAIN:
            return recipe_objectives(predictions, batch, stage)
        weight, temperature = self.kd_schedule()
        untranscribed = untranscribed_rows(batch) or []
        all_untranscribed = bool(untranscribed) and all(untranscribed)
        if weight == 0.0 and not all_untranscribed:
            return recipe_objectives(predictions, batch, stage)
        if self.kd_targets is None:
            raise KDSetupError(
                f"kd_weight={weight:g} but no teacher targets are attached: add "
                "`asr_brain.attach_targets(make_targets(hparams, token_strings(tokenizer)))` after creating the Brain"
                + (" (untranscribed utterances can only be trained with a teacher)" if all_untranscribed else "")
            )
        if all_untranscribed:  # no transcript: KD alone, the recipe's objective never sees these rows
            loss_name = self.kd_option("unlabeled_kd_loss") or self.kd_option("kd_loss")
            kd, stats = self.kd_term(predictions, batch, temperature, loss_name=loss_name)
            self._accumulate(None, kd, stats)
            self._kd_step_done = True
            return kd
        if any(untranscribed) and not self.kd_mixed_batches_ok:
            n = sum(untranscribed)
            raise KDSetupError(
                f"a training batch mixes {n} untranscribed and {len(untranscribed) - n} transcribed utterances; the "
                "recipe's compute_objectives cannot leave out the CTC of the untranscribed ones. Batch them apart "
                "(speech_kd's training data loader does), or drop the rows with an empty wrd"
            )
        ctc = recipe_objectives(predictions, batch, stage)
        kd, stats = self.kd_term(predictions, batch, temperature)
        self._accumulate(ctc, kd, stats)
        self._kd_step_done = True
        return (1.0 - weight) * ctc + weight * kd

    def _kd_on_stage_start(self, stage, epoch=None):
        """Reset the per-epoch KD statistics, then the recipe's hook.

        A training stage that starts at a step past 0 was resumed from an
        intra-epoch checkpoint: it keeps the sums that checkpoint restored.
        """
        if stage != sb.Stage.TRAIN or not getattr(self, "step", 0):
            self._kd_reset_stats()
        if stage == sb.Stage.TRAIN:
            self.kd_epoch_stats = {}
        return self._kd_recipe["on_stage_start"](stage, epoch)

    def _kd_on_stage_end(self, stage, stage_loss, epoch=None):
        """Compute the epoch's KD statistics (all processes), then the recipe's hook (which logs them)."""
        if stage == sb.Stage.TRAIN:
            self.kd_epoch_stats = self.kd_stats()
        return self._kd_recipe["on_stage_end"](stage, stage_loss, epoch)

    def _kd_fit_batch(self, batch):
        """The recipe's ``fit_batch``; with ``kd_weight > 0``, a step without a KD term is an error."""
        self._kd_step_done = False
        outputs = self._kd_recipe["fit_batch"](batch)
        weight, _ = self.kd_schedule()
        if weight > 0.0 and not self._kd_step_done:
            raise KDSetupError(
                f"kd_weight={weight:g} but this training step computed no KD term: the Brain's fit_batch did not "
                "call self.compute_objectives(predictions, batch, sb.Stage.TRAIN) (a fit_batch override that calls "
                "another loss function, or a class method directly, bypasses KD); call self.compute_objectives"
            )
        return outputs

    # ------------------------------------------------------------------- KD term
    def _kd_batch_rows(self, batch, student_rows: int) -> dict:
        """What the target strategy needs to give one target row per student row (audio, row maps)."""
        extra = {}
        rows = self._kd_rows
        augmented = rows is not None and rows.calls
        reads_cache = getattr(self.kd_targets, "reads_cache", False)
        if augmented:
            index = rows.utterance_rows if reads_cache else rows.teacher_rows
            if index is not None:
                extra["rows"] = index.to(self.device)
            if rows.wavs is not None and not reads_cache:
                extra["wavs"] = rows.wavs
        else:
            if getattr(self, "shared_features", None) is not None:
                extra["features"] = self.shared_features
            if getattr(self, "perturbed_wavs", None) is not None:
                extra["wavs"] = self.perturbed_wavs
        n_utts = len(batch.id)
        expected = n_utts
        if "rows" in extra:
            expected = extra["rows"].shape[0]
        elif "wavs" in extra:
            expected = extra["wavs"][0].shape[0]
        if student_rows != expected:
            raise KDSetupError(
                f"the student's output has {student_rows} rows for {n_utts} utterances and speech_kd cannot tell "
                "which utterance each row is: augment with SpeechBrain's Augmenter kept in the hparams (e.g. "
                "wav_augment), whose rows are followed, or set self.perturbed_wavs = (wavs, wav_lens) in "
                "compute_forward after changing the rows"
            )
        return extra

    def _kd_check_frames(self, log_probs: torch.Tensor, extra: dict, batch) -> None:
        """First training batch: the student's frame count must fit ``frame_shift`` (measured when unset)."""
        if self._kd_checked_frames:
            return
        self._kd_checked_frames = True
        wavs = extra["wavs"][0] if "wavs" in extra else batch.sig[0]
        seconds = wavs.shape[-1] / float(self.kd_option("sample_rate"))
        frames = log_probs.shape[1]
        aligner = getattr(self.kd_targets, "aligner", None)
        declared = getattr(aligner, "student_frame_shift", None) if aligner is not None else None
        if declared is None:
            declared = getattr(self.hparams, "frame_shift", None)
        if declared is None and aligner is not None:
            measured = round(seconds / frames, 3)
            aligner.set_student_frame_shift(measured)
            logger.info("student frame shift measured on the first batch: %.3f s (%d frames for %.2f s)",
                        measured, frames, seconds)  # fmt: skip
            return
        if declared is None:
            return
        expected = seconds / declared
        if not 0.8 <= frames / expected <= 1.25:
            raise KDSetupError(
                f"the student's CTC output has {frames} frames for {seconds:.2f} s of audio, about "
                f"{seconds / frames * 1000:.1f} ms per frame, but frame_shift is {declared * 1000:.1f} ms: set "
                "frame_shift to the model's output frame shift (or remove it to have it measured), or, if "
                "that output is not the CTC log-probabilities, set kd_outputs"
            )

    def kd_term(
        self, predictions, batch, temperature: float, loss_name: str | None = None
    ) -> tuple[torch.Tensor, dict]:
        """KD loss between the student's outputs and the teacher targets for ``batch``.

        ``loss_name``: the KD loss (default ``kd_loss``; ``unlabeled_kd_loss``
        for untranscribed batches).
        """
        log_probs, wav_lens = self.kd_student_outputs(predictions)
        student_max = log_probs.shape[1]
        extra = self._kd_batch_rows(batch, log_probs.shape[0])
        self._kd_check_frames(log_probs, extra, batch)
        lengths = relative_to_frames(wav_lens, student_max)
        targets = self.kd_targets(batch, lengths, student_max, **extra)
        targets = _pad_units(targets, log_probs.shape[-1])
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
                loss_name or self.kd_option("kd_loss"), log_probs, teacher, targets.mask,
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

    # ---------------------------------------------------------------- statistics
    def _kd_reset_stats(self) -> None:
        self._kd_epoch.reset()

    def _accumulate(self, ctc: torch.Tensor | None, kd: torch.Tensor, stats: dict) -> None:
        """Add this batch's numbers to the epoch's sums (:class:`speech_kd.kd_stats.KDEpochTotals`)."""
        self._kd_epoch.add(ctc, kd, stats)

    def kd_stats(self) -> dict:
        """Per-epoch means of the KD numbers (for the train logger); empty if no KD ran.

        Under DDP the sums and counts of all processes are combined, so the
        means cover every training batch of the epoch; call it on every
        process (as ``on_stage_end`` is). After a resume from an intra-epoch
        checkpoint they cover the batches before it too.
        """
        stats = self._kd_epoch.means()
        if not stats:
            return {}
        weight, temperature = self.kd_schedule()
        stats.update(kd_weight=weight, temperature=temperature)
        return stats


from speech_kd.anneal import TeacherAnnealMixin  # noqa: E402 (beside the one class that uses it)


class DistillBrain(TeacherAnnealMixin, KDMixin, CTCBrain):
    """A CTC student trained on ``(1 - kd_weight) * CTC + kd_weight * KD``.

    Attach teacher targets with ``attach_targets`` (``speech_kd.distill``
    does this from the yaml). KD statistics are logged with the training
    loss every epoch. Given the teacher's dev score (``set_teacher_dev``),
    each epoch's dev WER is compared with it and KD fades out as the student
    reaches it (``kd_anneal``, :mod:`speech_kd.anneal`).
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
