"""The KD term of one training batch as pure functions: the teacher's rows for the student's, the loss.

:func:`kd_term_loss` is what :class:`speech_kd.kd.mixin.KDMixin` computes for a
training batch once it has the student's outputs and the teacher's targets for
the same rows; the helpers around it widen targets to the student's units
(:func:`pad_units`), leave out tokens no teacher reaches
(:func:`restrict_to_reached`), tell untranscribed utterances
(:func:`untranscribed_rows`) and measure the student's frame shift
(:func:`measured_frame_shift`). :func:`layer_term_loss` is the layer-to-layer
part of the KD term (``kd_layers``). Nothing here holds state.
"""

from __future__ import annotations

import logging

import torch

from speech_kd.kd.config import KDConfig, KDSetupError
from speech_kd.kd.losses import agreement_rate, blank_frame_weights, blank_share, kd_loss, layer_loss, topk_restrict
from speech_kd.targets.strategies import Targets
from speech_kd.training.precision import autocast_for

__all__ = [
    "FRAME_SHIFT_GRID",
    "MIN_MEASURED_FRAMES",
    "kd_term_loss",
    "layer_term_loss",
    "measured_frame_shift",
    "pad_units",
    "restrict_to_reached",
    "untranscribed_rows",
]

logger = logging.getLogger(__name__)


def untranscribed_rows(batch) -> list[bool] | None:
    """Per utterance, whether it has no transcript (empty ``wrd``); ``None`` when the batch has no ``wrd``."""
    words = getattr(batch, "wrd", None)
    if words is None or isinstance(words, torch.Tensor):
        return None
    return [not str(w).strip() for w in words]


def pad_units(targets: Targets, student_units: int) -> Targets:
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
#: fewest output frames a batch must have to measure the frame shift from (an edge frame is then under 5 %)
MIN_MEASURED_FRAMES = 20


def measured_frame_shift(seconds: float, frames: int) -> float:
    """The student's seconds per output frame from one padded batch, snapped to the 5 ms grid.

    ``seconds / frames`` is biased low on short batches: a front end adds a
    frame or two at the edges (26 frames for 1 s at 40 ms). Front ends hop in
    multiples of 5 ms, so a ratio within 10 % of a grid point is that point;
    one farther from every grid point is kept to the millisecond. Below
    ``MIN_MEASURED_FRAMES`` frames one edge frame is more than that margin:
    such a batch is refused (set ``frame_shift`` in the yaml) rather than
    guessed.

    Examples
    --------
    >>> measured_frame_shift(1.0, 26), measured_frame_shift(8.0, 201), measured_frame_shift(2.0, 100)
    (0.04, 0.04, 0.02)
    >>> measured_frame_shift(1.0, 33)
    0.03
    """
    if frames < MIN_MEASURED_FRAMES:
        raise KDSetupError(
            f"the first training batch has {frames} output frames ({seconds:.2f} s): too short to measure the "
            "student's frame shift; set frame_shift (seconds per output frame) in the yaml"
        )
    raw = seconds / frames
    snapped = max(FRAME_SHIFT_GRID, round(raw / FRAME_SHIFT_GRID) * FRAME_SHIFT_GRID)
    if abs(snapped - raw) <= 0.1 * snapped:
        return round(snapped, 6)
    return round(raw, 3)


def kd_term_loss(
    log_probs: torch.Tensor,
    lengths: torch.Tensor,
    targets: Targets,
    config: KDConfig,
    temperature: float,
    reduction: str,
    loss_name: str | None = None,
) -> tuple[torch.Tensor, dict]:
    """The KD loss of a batch and its statistics, in fp32 whatever autocast is open.

    Parameters
    ----------
    log_probs : torch.Tensor
        ``[B, T, V]`` the student's CTC log-probabilities.
    lengths : torch.Tensor
        ``[B]`` valid student frames.
    targets : Targets
        The teacher's targets for the same rows (``[B, T, V']``, ``V' <= V``).
    config : KDConfig
        The KD options (loss, top-k, blank handling, blank index).
    temperature : float
        This epoch's temperature.
    reduction : str
        ``utterance`` or ``frame`` (``auto`` already resolved by the caller).
    loss_name : str, optional
        The KD loss (default ``config.kd_loss``; ``unlabeled_kd_loss`` for untranscribed batches);
        ``none``: 0 (only the layers are distilled), the statistics still computed.

    Returns
    -------
    loss : torch.Tensor
        0-dim.
    stats : dict
        ``blank_share``, ``agreement`` (0-dim tensors) and ``lost_mass`` (float).
    """
    targets = pad_units(targets, log_probs.shape[-1])
    blank = config.blank_index
    # the KD term in fp32 whatever --precision says: small probabilities and the T^2 scale need it
    with autocast_for(log_probs.device.type, "fp32"):
        log_probs = log_probs.float()
        teacher = topk_restrict(targets.log_probs.float(), config.kd_topk)
        weights = blank_frame_weights(
            targets.log_probs, blank, config.blank_mode, config.blank_threshold, config.blank_weight
        )
        student, teacher, hard, kd_blank = restrict_to_reached(
            log_probs, teacher, targets.hard_labels, targets.reached, blank
        )
        name = loss_name or config.kd_loss
        loss = (
            log_probs.new_zeros(())
            if name == "none"
            else kd_loss(
                name,
                student,
                teacher,
                targets.mask,
                temperature=temperature,
                frame_weights=weights,
                student_lengths=lengths,
                teacher_lengths=lengths,
                blank_index=kd_blank,
                reduction=reduction,
                hard_labels=hard,
            )
        )
    stats = {
        "blank_share": blank_share(targets.log_probs, targets.mask, blank, config.blank_threshold),
        "agreement": agreement_rate(log_probs.detach(), targets.log_probs, targets.mask),
        "lost_mass": targets.lost_mass,
    }
    return loss, stats


def layer_term_loss(
    projected: dict[int, torch.Tensor],
    teacher: dict[int, torch.Tensor],
    pairs: dict[int, int],
    mask: torch.Tensor,
    kind: str,
    reduction: str,
) -> torch.Tensor:
    """The layer loss of a batch: :func:`~speech_kd.kd.losses.layer_loss` averaged over the mapped pairs, fp32.

    The mean over pairs (DistilHuBERT sums its three heads) keeps ``kd_layer_weight`` meaning the
    same whatever the number of pairs. A pair whose student layer gave no output this batch (skipped
    by LayerDrop) is left out of the mean.

    Parameters
    ----------
    projected : dict of int to torch.Tensor
        Student layer -> its output through its projection, ``[B, T, D_t]``.
    teacher : dict of int to torch.Tensor
        Teacher layer -> its hidden states at the student's frames, ``[B, T, D_t]`` (``Targets.hiddens``).
    pairs : dict of int to int
        Student layer -> teacher layer.
    mask : torch.Tensor
        ``[B, T]`` bool, the student's valid frames.
    kind, reduction : str
        ``kd_layer_loss`` (``l1_cos`` | ``mse``); ``utterance`` or ``frame`` (as the KD term).

    Returns
    -------
    torch.Tensor
        0-dim.

    Examples
    --------
    >>> h = torch.randn(2, 4, 3)
    >>> float(layer_term_loss({0: h}, {5: h}, {0: 5}, torch.ones(2, 4, dtype=torch.bool), "l1_cos", "frame")) < 1e-6
    True
    """
    present = [(s, t) for s, t in sorted(pairs.items()) if s in projected]
    if not present:
        return mask.new_zeros((), dtype=torch.float32)
    with autocast_for(mask.device.type, "fp32"):
        losses = [layer_loss(projected[s], teacher[t], mask, kind, reduction) for s, t in present]
    return torch.stack(losses).mean()
