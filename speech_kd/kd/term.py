"""The KD term of one training batch: the student's outputs, the teacher's rows for them, the loss.

``KDTermMixin`` is the half of :class:`speech_kd.kd.mixin.KDMixin` that computes
the term; the other half wraps the recipe's hooks and mixes it into the loss.
It needs the host's ``kd_option``, ``kd_targets``, ``_kd_rows`` (the
augmentation rows followed, :mod:`speech_kd.kd.augment_rows`) and
``_kd_checked_frames``, which ``KDMixin`` sets up.
"""

from __future__ import annotations

import logging

import torch

from speech_kd.kd.losses import agreement_rate, blank_frame_weights, blank_share, kd_loss, topk_restrict
from speech_kd.kd.recipe_outputs import find_ctc_outputs
from speech_kd.targets.align import relative_to_frames
from speech_kd.training.precision import autocast_for

__all__ = ["KDSetupError", "KDTermMixin", "untranscribed_rows"]

logger = logging.getLogger(__name__)


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
    reached = targets.reached
    if reached is not None:
        reached = torch.cat([reached, reached.new_zeros(student_units - have)])
    return type(targets)(
        torch.cat([targets.log_probs, pad], dim=-1), targets.mask, targets.lost_mass, targets.hard_labels, reached
    )


def restrict_to_reached(
    student_log_probs: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    hard_labels: torch.Tensor | None,
    reached: torch.Tensor | None,
    blank_index: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """Leave out the student tokens no teacher token reaches, renormalising both sides over the rest.

    Such a token's teacher probability is only a floor (1e-8): KL against it
    would push the student's log-probability there toward -18 although the
    teacher says nothing about it. The KD term is computed over the reached
    tokens; the recipe's own loss still trains the others.

    Returns the student ``[B, T, V']`` and teacher ``[B, T, V']``
    log-probabilities, the hard labels renumbered, and the blank's new index.

    Examples
    --------
    >>> s = torch.log_softmax(torch.zeros(1, 1, 3), -1)
    >>> t = torch.log(torch.tensor([[[0.5, 0.5, 1e-8]]]))
    >>> s2, t2, _, blank = restrict_to_reached(s, t, None, torch.tensor([True, True, False]), 0)
    >>> s2.exp(), blank
    (tensor([[[0.5000, 0.5000]]]), 0)
    """
    if reached is None or bool(reached.all()):
        return student_log_probs, teacher_log_probs, hard_labels, blank_index
    keep = reached.to(student_log_probs.device)
    index = torch.nonzero(keep).flatten()
    renumber = keep.long().cumsum(0) - 1
    student = torch.log_softmax(student_log_probs.index_select(-1, index), dim=-1)
    teacher = torch.log_softmax(teacher_log_probs.index_select(-1, index.to(teacher_log_probs.device)), dim=-1)
    labels = renumber[hard_labels.to(renumber.device)].clamp(min=0) if hard_labels is not None else None
    return student, teacher, labels, int(renumber[blank_index])


#: grid that a measured frame shift snaps to (seconds): front ends hop in multiples of 5 ms
FRAME_SHIFT_GRID = 0.005


def measured_frame_shift(seconds: float, frames: int) -> float:
    """The student's seconds per output frame from one padded batch, snapped to the 5 ms grid.

    ``seconds / frames`` is biased low on short batches: a front end adds a
    frame or two at the edges (26 frames for 1 s at 40 ms). Front ends hop in
    multiples of 5 ms, so a ratio within 10 % of a grid point is that point;
    one farther from every grid point is kept to the millisecond.

    Examples
    --------
    >>> measured_frame_shift(1.0, 26), measured_frame_shift(8.0, 201), measured_frame_shift(2.0, 100)
    (0.04, 0.04, 0.02)
    >>> measured_frame_shift(1.0, 33)
    0.03
    """
    raw = seconds / max(frames, 1)
    snapped = max(FRAME_SHIFT_GRID, round(raw / FRAME_SHIFT_GRID) * FRAME_SHIFT_GRID)
    if abs(snapped - raw) <= 0.1 * snapped:
        return round(snapped, 6)
    return round(raw, 3)


class KDTermMixin:
    """Compute the KD loss and statistics of a training batch (used through :class:`speech_kd.kd.mixin.KDMixin`)."""

    def kd_student_outputs(self, predictions) -> tuple[torch.Tensor, torch.Tensor]:
        """Student frame log-probs ``[B, T, V]`` and relative lengths ``[B]`` from ``compute_forward``.

        Found by :func:`speech_kd.kd.recipe_outputs.find_ctc_outputs` (the first
        log-probability tensor and the first relative-length vector; the yaml's
        ``kd_outputs: [i, j]`` names them). Override for other layouts.
        """
        return find_ctc_outputs(predictions, self.kd_option("kd_outputs"))

    def _kd_batch_rows(self, batch, student_rows: int) -> dict:
        """What the target strategy needs to give one target row per student row (audio, row maps)."""
        extra = {}
        rows = self._kd_rows
        augmented = rows is not None and rows.calls
        # the live teacher hears the clean utterance whenever the augmentation keeps the time axis (noise,
        # dropped chunks or frequencies), as the cache does: the student learns to map augmented audio to what
        # the teacher says of clean audio, and live and cached runs optimise the same thing
        clean = getattr(self.kd_targets, "reads_cache", False) or not self._kd_time_changing
        if augmented:
            index = rows.utterance_rows if clean else rows.teacher_rows
            if index is not None:
                extra["rows"] = index.to(self.device)
            if rows.wavs is not None and not clean:
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
            measured = measured_frame_shift(seconds, frames)
            aligner.set_student_frame_shift(measured)
            logger.info(
                "student frame shift measured on the first batch: %.3f s (%d frames for %.2f s)",
                measured,
                frames,
                seconds,
            )
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
                targets.log_probs,
                blank,
                self.kd_option("blank_mode"),
                self.kd_option("blank_threshold"),
                self.kd_option("blank_weight"),
            )
            student, teacher, hard, kd_blank = restrict_to_reached(
                log_probs, teacher, targets.hard_labels, targets.reached, blank
            )
            loss = kd_loss(
                loss_name or self.kd_option("kd_loss"),
                student,
                teacher,
                targets.mask,
                temperature=temperature,
                frame_weights=weights,
                student_lengths=lengths,
                teacher_lengths=lengths,
                blank_index=kd_blank,
                reduction=self.kd_option("kd_reduction"),
                hard_labels=hard,
            )
        stats = {
            "blank_share": blank_share(targets.log_probs, targets.mask, blank, self.kd_option("blank_threshold")),
            "agreement": agreement_rate(log_probs.detach(), targets.log_probs, targets.mask),
            "lost_mass": targets.lost_mass,
        }
        return loss, stats
