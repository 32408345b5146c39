"""Knowledge-distillation losses for CTC students, as small pure functions.

Shapes (legend): ``B`` batch, ``T`` frames (the student's), ``V`` tokens (the
student's vocabulary).

- ``student_log_probs`` ``[B, T, V]``: the student's log-softmax outputs.
  ``softmax(log_probs / T) == softmax(logits / T)``, so log-probs are all a
  temperature needs.
- ``teacher_log_probs`` ``[B, T, V]``: the teacher's log-posteriors already
  mapped to the student's vocabulary and frame rate (``speech_kd.targets.strategies``);
  entries may be ``-inf`` after :func:`topk_restrict`.
- ``mask`` ``[B, T]`` bool: valid (non-padding) student frames.
- ``frame_weights`` ``[B, T]`` float or ``None``: per-frame weights (blank handling).

Layer losses (:func:`layer_loss`, ``kd_layers``) compare hidden states instead:
``student`` ``[B, T, D]`` (a student layer's output through its learned projection
to the teacher's width ``D``) and ``teacher`` ``[B, T, D]`` (the teacher layer's
output at the student's frame rate).

Every loss returns a scalar reduced over the valid, weighted frames by
``reduction``: ``frame`` a mean per frame, ``utterance`` a sum over each
utterance averaged over the batch (the scale of the recipe's CTC). The teacher
side is detached inside each function, so no gradient can reach the teacher.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "KD_LOSSES",
    "agreement_rate",
    "blank_frame_weights",
    "blank_share",
    "collapse_greedy",
    "collapse_path",
    "kd_ce_hard",
    "kd_ctc_collapsed",
    "kd_kl",
    "kd_loss",
    "kd_mse",
    "layer_loss",
    "soften",
    "topk_restrict",
]


REDUCTIONS = ("utterance", "frame")


def _weighted_frame_mean(
    per_frame: torch.Tensor, mask: torch.Tensor, frame_weights: torch.Tensor | None, reduction: str = "frame"
) -> torch.Tensor:
    """Reduce a ``[B, T]`` per-frame loss over the valid (``mask``), weighted frames.

    ``frame``: ``sum(loss * w * mask) / sum(w * mask)``, a mean per frame.
    ``utterance``: ``sum(loss * w * mask) / B``, a sum over each utterance's
    frames averaged over the batch: the scale of SpeechBrain's
    ``ctc_loss(reduction="batchmean")``, so ``kd_weight`` mixes like with like.
    Zero when nothing is valid.
    """
    weights = mask.to(per_frame.dtype)
    if frame_weights is not None:
        weights = weights * frame_weights.to(per_frame.dtype)
    total = (per_frame * weights).sum()
    if reduction == "frame":
        return total / weights.sum().clamp(min=1e-8)
    if reduction == "utterance":
        return total / max(1, per_frame.shape[0])
    raise ValueError(f"kd_reduction must be one of {REDUCTIONS}, not {reduction!r}")


def soften(log_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Temperature-softened log-distribution ``log_softmax(log_probs / T)`` ``[B, T, V]``.

    Examples
    --------
    >>> x = torch.log(torch.tensor([[[0.9, 0.1]]]))
    >>> torch.allclose(soften(x, 1.0).exp(), x.exp())
    True
    >>> torch.allclose(soften(x, 1e6).exp(), torch.tensor([0.5, 0.5]))
    True
    """
    return torch.log_softmax(log_probs / temperature, dim=-1)


def topk_restrict(teacher_log_probs: torch.Tensor, k: int | None) -> torch.Tensor:
    """Keep each frame's ``k`` most likely teacher tokens, renormalised; others ``-inf``.

    ``k=None`` or ``k >= V`` returns the input unchanged.

    Examples
    --------
    >>> x = torch.log(torch.tensor([[[0.5, 0.3, 0.2]]]))
    >>> torch.allclose(topk_restrict(x, 2).exp(), torch.tensor([0.625, 0.375, 0.0]))
    True
    """
    if k is None or k >= teacher_log_probs.shape[-1]:
        return teacher_log_probs
    values, index = teacher_log_probs.topk(int(k), dim=-1)
    restricted = torch.full_like(teacher_log_probs, float("-inf"))
    restricted.scatter_(-1, index, torch.log_softmax(values, dim=-1))
    return restricted


def kd_kl(
    student_log_probs: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
    frame_weights: torch.Tensor | None = None,
    reduction: str = "frame",
) -> torch.Tensor:
    """Hinton KD: ``T^2 * KL(p_teacher^T || p_student^T)`` per frame, reduced over valid frames.

    ``p^T = softmax(log_probs / T)``. The ``T^2`` factor keeps gradient
    magnitudes comparable across temperatures (Hinton et al. 2015). Teacher
    entries at ``-inf`` (top-k restricted) contribute nothing.

    Examples
    --------
    >>> s = torch.log_softmax(torch.randn(2, 5, 4), -1)
    >>> float(kd_kl(s, s, torch.ones(2, 5, dtype=torch.bool), temperature=2.0)) < 1e-6
    True
    """
    teacher = soften(teacher_log_probs.detach(), temperature)
    student = soften(student_log_probs, temperature)
    p_teacher = teacher.exp()
    # where the teacher has no mass (p == 0, log p == -inf) the term is 0; avoid 0 * -inf = nan
    log_ratio = torch.where(p_teacher > 0, teacher - student, torch.zeros_like(teacher))
    per_frame = (p_teacher * log_ratio).sum(-1)
    return temperature**2 * _weighted_frame_mean(per_frame, mask, frame_weights, reduction)


def kd_ce_hard(
    student_log_probs: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    mask: torch.Tensor,
    frame_weights: torch.Tensor | None = None,
    reduction: str = "frame",
    hard_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of the student to the teacher's best path, frame by frame.

    ``hard_labels`` ``[B, T]`` long: the teacher's best path carried to the
    student's frames (:func:`speech_kd.targets.align.transfer_path`, taken from the
    teacher's own frames before any resampling); ``None``: the argmax of
    ``teacher_log_probs`` (right only when both models share a frame rate).

    Examples
    --------
    >>> t = torch.log(torch.tensor([[[0.1, 0.9]]]))
    >>> s = torch.log(torch.tensor([[[0.5, 0.5]]]))
    >>> round(float(kd_ce_hard(s, t, torch.ones(1, 1, dtype=torch.bool))), 4)
    0.6931
    """
    target = teacher_log_probs.detach().argmax(-1) if hard_labels is None else hard_labels.to(torch.long)
    per_frame = -student_log_probs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return _weighted_frame_mean(per_frame, mask, frame_weights, reduction)


def kd_mse(
    student_log_probs: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    mask: torch.Tensor,
    frame_weights: torch.Tensor | None = None,
    reduction: str = "frame",
) -> torch.Tensor:
    """Mean squared error between log-softmax outputs, averaged over ``V`` then frames.

    ``-inf`` teacher entries are clamped to ``log(1e-8)`` first.
    """
    teacher = teacher_log_probs.detach().clamp(min=-18.42)
    per_frame = (student_log_probs - teacher).pow(2).mean(-1)
    return _weighted_frame_mean(per_frame, mask, frame_weights, reduction)


def collapse_path(path: torch.Tensor, lengths: torch.Tensor, blank_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A CTC frame path ``[B, T]`` collapsed: labels ``[B, L]`` (padded with 0) and lengths ``[B]``.

    Repeats are merged and blanks dropped, vectorised over the batch.

    Examples
    --------
    >>> collapse_path(torch.tensor([[0, 3, 3, 0, 3, 2, 2, 0]]), torch.tensor([8]), 0)
    (tensor([[3, 3, 2]]), tensor([3]))
    """
    best = path.detach().to(torch.long)
    frames = torch.arange(best.shape[1], device=best.device)
    valid = frames.unsqueeze(0) < lengths.to(best.device).unsqueeze(1)
    changed = torch.ones_like(best, dtype=torch.bool)
    changed[:, 1:] = best[:, 1:] != best[:, :-1]
    keep = changed & (best != blank_index) & valid
    out_lengths = keep.sum(1)
    width = max(int(out_lengths.max()), 1) if best.shape[0] else 1
    # position of each kept label within its row, via a cumulative count
    position = keep.long().cumsum(1) - 1
    labels = torch.zeros(best.shape[0], width, dtype=torch.long, device=best.device)
    rows = torch.arange(best.shape[0], device=best.device).unsqueeze(1).expand_as(best)
    labels[rows[keep], position[keep]] = best[keep]
    return labels, out_lengths


def collapse_greedy(
    teacher_log_probs: torch.Tensor, lengths: torch.Tensor, blank_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The greedy CTC transcript of ``[B, T, V]`` log-probs: :func:`collapse_path` of the frame argmax.

    Examples
    --------
    >>> path = torch.tensor([[0, 3, 3, 0, 3, 2, 2, 0]])
    >>> logp = torch.nn.functional.one_hot(path, 4).float().log()
    >>> collapse_greedy(logp, torch.tensor([8]), 0)
    (tensor([[3, 3, 2]]), tensor([3]))
    """
    return collapse_path(teacher_log_probs.detach().argmax(-1), lengths, blank_index)


def kd_ctc_collapsed(
    student_log_probs: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    student_lengths: torch.Tensor,
    teacher_lengths: torch.Tensor,
    blank_index: int,
    reduction: str = "utterance",
    hard_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """CTC loss of the student against the teacher's greedy transcript (a pseudo-label).

    The transcript is :func:`collapse_path` of ``hard_labels`` ``[B, T]`` (the
    teacher's best path taken on its own frames and carried to the
    student's, :func:`speech_kd.targets.align.transfer_path`), or of the argmax of
    ``teacher_log_probs`` when it is ``None`` (same frame rate only).
    ``reduction``: ``utterance`` sums each utterance's CTC and averages over
    the batch (SpeechBrain's ``ctc_loss(reduction="batchmean")``, the
    recipes' scale); ``frame`` divides the sum by the number of valid student
    frames. ``zero_infinity=True``.

    Examples
    --------
    >>> s = torch.log_softmax(torch.randn(2, 6, 4), -1)
    >>> t = torch.nn.functional.one_hot(torch.tensor([[0, 1, 0, 2, 0, 0], [3, 3, 0, 0, 0, 0]]), 4).float().log()
    >>> lens = torch.tensor([6, 4])
    >>> utt = kd_ctc_collapsed(s, t, lens, lens, 0, "utterance")
    >>> frame = kd_ctc_collapsed(s, t, lens, lens, 0, "frame")
    >>> bool(torch.isclose(utt * 2, frame * 10))
    True
    """
    path = teacher_log_probs.detach().argmax(-1) if hard_labels is None else hard_labels
    labels, label_lengths = collapse_path(path, teacher_lengths, blank_index)
    total = F.ctc_loss(
        student_log_probs.transpose(0, 1),
        labels,
        student_lengths.to(torch.long),
        label_lengths.clamp(min=0),
        blank=blank_index,
        reduction="sum",
        zero_infinity=True,
    )
    if reduction == "utterance":
        return total / max(1, student_log_probs.shape[0])
    if reduction == "frame":
        return total / student_lengths.sum().clamp(min=1).to(total.dtype)
    raise ValueError(f"kd_reduction must be one of {REDUCTIONS}, not {reduction!r}")


def blank_frame_weights(
    teacher_log_probs: torch.Tensor,
    blank_index: int,
    mode: str = "none",
    threshold: float = 0.9,
    weight: float = 0.1,
) -> torch.Tensor:
    """Per-frame weights ``[B, T]`` for blank-dominated teacher frames.

    ``none``: all ones; ``downweight``: ``weight`` where the teacher's blank
    probability exceeds ``threshold``; ``drop``: 0 there.

    Examples
    --------
    >>> t = torch.log(torch.tensor([[[0.95, 0.05], [0.2, 0.8]]]))
    >>> torch.allclose(blank_frame_weights(t, 0, "downweight", 0.9, 0.1), torch.tensor([[0.1, 1.0]]))
    True
    """
    ones = torch.ones(teacher_log_probs.shape[:2], device=teacher_log_probs.device)
    if mode == "none":
        return ones
    blanky = teacher_log_probs.detach()[..., blank_index].exp() > threshold
    if mode == "downweight":
        return torch.where(blanky, torch.full_like(ones, weight), ones)
    if mode == "drop":
        return torch.where(blanky, torch.zeros_like(ones), ones)
    raise ValueError(f"blank_mode must be none, downweight or drop, not {mode!r}")


#: ``-log sigmoid(1)``: DistilHuBERT's cosine term at a perfect match, subtracted so that a match costs 0
_COS_FLOOR = float(-F.logsigmoid(torch.tensor(1.0)))


def layer_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor,
    kind: str = "l1_cos",
    reduction: str = "frame",
) -> torch.Tensor:
    """Distance between a projected student layer and a teacher layer, per frame, reduced over valid frames.

    ``l1_cos`` (DistilHuBERT, Chang et al. 2022, arXiv 2110.01900): ``mean_D |s - t|`` plus
    ``-log sigmoid(cos(s, t))``, the latter shifted by the constant ``log sigmoid(1)`` so that a
    perfect match costs 0 (same gradient). ``mse``: ``mean_D (s - t)^2``. Computed in fp32;
    the teacher side is detached.

    Parameters
    ----------
    student, teacher : torch.Tensor
        ``[B, T, D]``: the student layer through its projection, the teacher layer.
    mask : torch.Tensor
        ``[B, T]`` bool, valid frames.
    kind : str
        ``l1_cos`` or ``mse``.
    reduction : str
        ``frame`` (mean per valid frame) or ``utterance`` (sum over frames, mean over the batch).

    Examples
    --------
    >>> t = torch.randn(2, 5, 8)
    >>> mask = torch.ones(2, 5, dtype=torch.bool)
    >>> float(layer_loss(t, t, mask)) < 1e-6, float(layer_loss(t, t, mask, "mse"))
    (True, 0.0)
    >>> float(layer_loss(-t, t, mask)) > 1.0
    True
    """
    student, teacher = student.float(), teacher.detach().float()
    if kind == "l1_cos":
        cosine = F.cosine_similarity(student, teacher, dim=-1, eps=1e-8)
        per_frame = (student - teacher).abs().mean(-1) + (-F.logsigmoid(cosine) - _COS_FLOOR)
    elif kind == "mse":
        per_frame = (student - teacher).pow(2).mean(-1)
    else:
        raise ValueError(f"kd_layer_loss must be l1_cos or mse, not {kind!r}")
    return _weighted_frame_mean(per_frame, mask, None, reduction)


KD_LOSSES = {"kl": kd_kl, "ce": kd_ce_hard, "mse": kd_mse, "ctc": kd_ctc_collapsed}


def kd_loss(
    name: str,
    student_log_probs: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    frame_weights: torch.Tensor | None = None,
    student_lengths: torch.Tensor | None = None,
    teacher_lengths: torch.Tensor | None = None,
    blank_index: int = 0,
    reduction: str = "frame",
    hard_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dispatch to the KD loss ``name`` (``kl``, ``ce``, ``mse`` or ``ctc``).

    ``reduction`` (``frame`` or ``utterance``, see ``_weighted_frame_mean``)
    applies to every loss, so each has the scale of the recipe's loss under
    ``utterance`` and a per-frame scale under ``frame``. ``hard_labels``
    ``[B, T]``: the teacher's best path on the student's frames, for the
    losses that take hard targets (``ce``, ``ctc``).
    """
    if name == "kl":
        return kd_kl(student_log_probs, teacher_log_probs, mask, temperature, frame_weights, reduction)
    if name == "ce":
        return kd_ce_hard(student_log_probs, teacher_log_probs, mask, frame_weights, reduction, hard_labels)
    if name == "mse":
        return kd_mse(student_log_probs, teacher_log_probs, mask, frame_weights, reduction)
    if name == "ctc":
        if student_lengths is None:
            student_lengths = mask.sum(1)
        if teacher_lengths is None:
            teacher_lengths = student_lengths
        return kd_ctc_collapsed(
            student_log_probs, teacher_log_probs, student_lengths, teacher_lengths, blank_index, reduction, hard_labels
        )
    raise ValueError(f"unknown kd_loss {name!r}; known: {sorted(KD_LOSSES)}")


def agreement_rate(
    student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Share of valid frames where student and teacher argmax tokens agree (0-dim tensor)."""
    agree = (student_log_probs.argmax(-1) == teacher_log_probs.argmax(-1)) & mask
    return agree.sum() / mask.sum().clamp(min=1)


def blank_share(
    teacher_log_probs: torch.Tensor, mask: torch.Tensor, blank_index: int, threshold: float
) -> torch.Tensor:
    """Share of valid frames where the teacher's blank probability exceeds ``threshold`` (0-dim tensor)."""
    blanky = (teacher_log_probs[..., blank_index].exp() > threshold) & mask
    return blanky.sum() / mask.sum().clamp(min=1)
