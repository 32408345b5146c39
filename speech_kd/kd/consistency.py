"""CR-CTC: consistency between two differently augmented views of each training utterance.

Consistency-regularised CTC (Yao et al., "CR-CTC: Consistency regularization on CTC for improved
speech recognition", ICLR 2025, arXiv 2410.05101; icefall PR #1766) trains every utterance of a
training batch twice in one forward pass, as two views that went through independent SpecAugment
draws (and, in the forward, independent dropout), and adds a term that pulls each view's frame
posteriors toward the other's::

    loss = CTC(both views) + cr_ctc_weight * CR

The term is a self-distillation without a teacher: each view is the other's (detached) target.
It is the strongest baseline without a teacher this package compares KD against, and it stacks
with KD (:class:`speech_kd.kd.mixin.KDMixin`).

Shapes (legend): ``B`` utterances of the batch, ``2B`` rows of the doubled batch (view *a* in rows
``0 .. B-1``, view *b* in rows ``B .. 2B-1``, row ``i`` and row ``i + B`` being the same
utterance), ``T`` output frames, ``F`` feature bins, ``V`` tokens.

What lives here: the option and its default (:class:`CRConfig`, one place for every Brain that
reads it), making the two views (:func:`two_views`, :func:`view_rows`), the loss
(:func:`consistency_loss`) and the check that the recipe's CTC has the scale the loss is computed
at (:func:`check_ctc_reduction`). ``speech_kd.training.ctc_brain.CTCBrain`` uses them; the decisions are
in ``docs/design.md`` ("CR-CTC").
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from speech_kd.targets.align import lengths_to_mask, relative_to_frames
from speech_kd.training.precision import autocast_for

__all__ = [
    "CTC_REDUCTION",
    "CRConfig",
    "ConsistencySetupError",
    "check_ctc_reduction",
    "consistency_loss",
    "ctc_reduction",
    "two_views",
    "view_rows",
]

#: the ``reduction`` of SpeechBrain's ``ctc_loss`` whose scale :func:`consistency_loss` has: the CTC summed over
#: each utterance's frames, averaged over the batch's rows
CTC_REDUCTION = "batchmean"


class ConsistencySetupError(ValueError):
    """CR-CTC cannot run as set up (one line saying what to change; ``speech-kd`` prints it as such)."""


@dataclass(frozen=True)
class CRConfig:
    """The CR-CTC options of a run (yaml keys of the same names).

    Attributes
    ----------
    cr_ctc_weight : float
        Weight of the consistency term: ``loss = CTC + cr_ctc_weight * CR`` (with KD,
        ``(1 - kd_weight) * CTC + kd_weight * KD + cr_ctc_weight * CR``). 0 (the default)
        turns CR-CTC off: one view per utterance, the loss of a run without it. icefall's
        CR-CTC recipes use 0.2 (``--cr-loss-scale``), on the same scale as here.
    """

    cr_ctc_weight: float = 0.0

    def __post_init__(self) -> None:
        value = self.cr_ctc_weight
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ConsistencySetupError(f"cr_ctc_weight={value!r}: must be a number >= 0 (0: off)")

    @classmethod
    def from_hparams(cls, hparams: Mapping[str, Any] | Any) -> CRConfig:
        """The CR options of ``hparams`` (a dict or SpeechBrain's hparams namespace); absent keys take the defaults.

        Examples
        --------
        >>> CRConfig.from_hparams({}).cr_ctc_weight, CRConfig.from_hparams({"cr_ctc_weight": 0.2}).enabled
        (0.0, True)
        >>> CRConfig.from_hparams({"cr_ctc_weight": -1})
        Traceback (most recent call last):
        ...
        speech_kd.kd.consistency.ConsistencySetupError: cr_ctc_weight=-1: must be a number >= 0 (0: off)
        """
        values = hparams if isinstance(hparams, Mapping) else vars(hparams) if hparams is not None else {}
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})

    @property
    def enabled(self) -> bool:
        """Whether training batches get two views and the consistency term."""
        return self.cr_ctc_weight > 0.0

    def to_dict(self) -> dict[str, Any]:
        """The options as a plain dict (for ``kd_run.json``)."""
        return asdict(self)


def view_rows(batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """For each row of the doubled batch, the utterance it is a view of: long ``[2B]``.

    Examples
    --------
    >>> view_rows(3)
    tensor([0, 1, 2, 0, 1, 2])
    """
    return torch.arange(batch_size, device=device).repeat(2)


def two_views(feats: torch.Tensor, augment: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The batch's features ``[B, T, F]`` as two independently augmented views ``[2B, T, F]``.

    ``augment`` (SpecAugment) is called twice, on a copy of ``feats`` each
    time (SpeechBrain's ``SpectrogramDrop`` masks in place): view *a* first,
    then view *b*. Each call draws its own masks, numbers of masks included,
    from the global random generator, which the checkpoints keep, so a
    resumed run draws the views the interrupted one would have.

    Examples
    --------
    >>> feats = torch.ones(2, 5, 3)
    >>> views = two_views(feats, lambda x: x * 2)
    >>> views.shape, bool((views == 2).all()), bool((feats == 1).all())
    (torch.Size([4, 5, 3]), True, True)
    """
    return torch.cat([augment(feats.clone()), augment(feats.clone())], dim=0)


def consistency_loss(log_probs: torch.Tensor, rel_lengths: torch.Tensor) -> torch.Tensor:
    """CR-CTC's consistency term of a doubled batch: each view against the other's detached posteriors.

    For utterance ``i`` with views *a* and *b* (rows ``i`` and ``i + B``), summed
    over its valid frames ``t``::

        KL(stopgrad(p_a[t]) || p_b[t]) + KL(stopgrad(p_b[t]) || p_a[t])

    the symmetric KL of the paper, each direction training only the view that
    is not the target. The sum over utterances is divided by the ``2B`` rows,
    as SpeechBrain's ``ctc_loss(reduction="batchmean")`` divides the CTC of
    the same ``2B`` rows: per utterance the mean of the two directions, summed
    over frames. With this scale ``cr_ctc_weight`` means what icefall's
    ``--cr-loss-scale`` means (there the CTC and this term are both halved sums
    over the ``2B`` rows) and the same at any utterance length. Computed in
    fp32 whatever autocast is open.

    Parameters
    ----------
    log_probs : torch.Tensor
        ``[2B, T, V]`` frame log-posteriors of the doubled batch (view *a*, then view *b*).
    rel_lengths : torch.Tensor
        ``[2B]`` SpeechBrain relative lengths (the same for both views of an utterance).

    Returns
    -------
    torch.Tensor
        0-dim, ``>= 0``; 0 when the two views' posteriors are equal.

    Examples
    --------
    >>> same = torch.log_softmax(torch.randn(1, 4, 3), -1).repeat(2, 1, 1)
    >>> float(consistency_loss(same, torch.ones(2)))
    0.0
    >>> other = torch.log_softmax(torch.randn(2, 4, 3), -1)
    >>> float(consistency_loss(other, torch.ones(2))) > 0
    True
    """
    rows = log_probs.shape[0]
    if rows % 2:
        raise ValueError(f"consistency_loss: {rows} rows, expected two views of each utterance (an even number)")
    with autocast_for(log_probs.device.type, "fp32"):
        log_probs = log_probs.float()
        # each row's target: the other view of its utterance (rows i and i + B swapped), without gradient
        other = torch.cat([log_probs[rows // 2 :], log_probs[: rows // 2]], dim=0).detach()
        target = other.exp()
        # KL(target || row) per frame; a token the target gives probability 0 adds nothing
        per_frame = torch.where(target > 0, target * (other - log_probs), torch.zeros_like(target)).sum(-1)
        mask = lengths_to_mask(relative_to_frames(rel_lengths, log_probs.shape[1]), log_probs.shape[1])
        return (per_frame * mask.to(per_frame.dtype)).sum() / rows


def ctc_reduction(ctc_cost: object) -> str | None:
    """The ``reduction`` a yaml's ``ctc_cost`` (``!name:speechbrain.nnet.losses.ctc_loss``) applies; ``None``: unknown.

    Read from the partial's keywords, else from its function's default
    (SpeechBrain's ``ctc_loss`` defaults to ``mean``). A ``ctc_cost`` that is
    not a ``functools.partial`` of a function taking ``reduction`` (a user's own
    loss) cannot be read.

    Examples
    --------
    >>> from speechbrain.nnet.losses import ctc_loss
    >>> ctc_reduction(functools.partial(ctc_loss, blank_index=0, reduction="batchmean"))
    'batchmean'
    >>> ctc_reduction(functools.partial(ctc_loss, blank_index=0)), ctc_reduction(None)
    ('mean', None)
    """
    if not isinstance(ctc_cost, functools.partial):
        return None
    if "reduction" in ctc_cost.keywords:
        return str(ctc_cost.keywords["reduction"])
    try:
        parameter = inspect.signature(ctc_cost.func).parameters.get("reduction")
    except (TypeError, ValueError):  # a builtin without a signature
        return None
    if parameter is None or parameter.default is inspect.Parameter.empty:
        return None
    return str(parameter.default)


def check_ctc_reduction(cr_ctc_weight: float, ctc_cost: object) -> None:
    """Refuse CR-CTC with a CTC loss not reduced as SpeechBrain's ``batchmean``, the scale the consistency term has.

    :func:`consistency_loss` is a per-utterance frame sum averaged over the
    ``2B`` rows, as ``ctc_loss(reduction="batchmean")`` reduces the CTC. With
    ``mean`` (each utterance's CTC divided by its transcript length) the same
    ``cr_ctc_weight`` would be about frames per token (2-4x at 40 ms
    characters) stronger against the CTC, with ``sum`` ``2B`` times weaker:
    refused rather than silently mis-weighted. A ``ctc_cost`` whose reduction
    cannot be read (:func:`ctc_reduction` is ``None``) is taken to be ``batchmean``.

    Raises
    ------
    ConsistencySetupError
        ``cr_ctc_weight > 0`` and ``ctc_cost`` reduces otherwise (one line, naming the key).

    Examples
    --------
    >>> from speechbrain.nnet.losses import ctc_loss
    >>> check_ctc_reduction(0.2, functools.partial(ctc_loss, blank_index=0, reduction="batchmean"))
    >>> check_ctc_reduction(0.0, functools.partial(ctc_loss, blank_index=0))
    >>> check_ctc_reduction(0.2, functools.partial(ctc_loss, blank_index=0))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    speech_kd.kd.consistency.ConsistencySetupError: cr_ctc_weight=0.2: ... ctc_cost has reduction: mean ...
    """
    reduction = ctc_reduction(ctc_cost)
    if cr_ctc_weight <= 0.0 or reduction is None or reduction == CTC_REDUCTION:
        return
    effect = {
        "mean": "divided by each transcript's length: CR would weigh about frames/tokens times more",
        "sum": "summed over the batch: CR would weigh 2B times less",
    }.get(reduction, "not one number per batch averaged over its utterances")
    raise ConsistencySetupError(
        f"cr_ctc_weight={cr_ctc_weight:g}: the consistency term is scaled for ctc_cost's reduction: {CTC_REDUCTION} "
        f"(CTC summed over each utterance's frames, averaged over the batch) and ctc_cost has reduction: {reduction} "
        f"({effect}); set reduction: {CTC_REDUCTION} under ctc_cost in the yaml"
    )
