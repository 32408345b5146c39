"""The running sums behind an epoch's KD statistics, checkpointed with the run.

``KDMixin`` adds every training batch's numbers here and logs their means at
the end of the epoch. The sums are an :class:`~speech_kd.training.epoch_sums.EpochSums`
(the class behind CR-CTC's ``cr_loss`` too): combined over processes, and a
checkpoint recoverable, so a run resumed from an intra-epoch checkpoint goes
on summing from where the interrupted run was and the epoch's logged
``kd_loss``, ``agreement``, ... cover all its batches, not only those after
the resume. What is KD's own here: which batches count (both losses
finite), ``ctc_loss`` over transcribed batches only, ``untranscribed_share``,
and reading the sums checkpoints wrote before ``EpochSums`` served KD.
"""

from __future__ import annotations

import os

import torch
from speechbrain.utils.checkpoints import mark_as_loader, mark_as_saver, register_checkpoint_hooks

from speech_kd.training.epoch_sums import EpochSums

__all__ = ["KDEpochTotals", "KD_KEYS", "STAT_KEYS"]

#: the per-batch numbers whose epoch means are always logged (NaN when no batch counted them)
STAT_KEYS = ("ctc_loss", "kd_loss", "blank_share", "agreement", "lost_mass")
#: every number a batch's KD statistics may hold: ``STAT_KEYS``, and ``layer_loss`` with layer distillation
#: (logged when some batch counted it). Declared up front: the processes' sums are combined in this order
KD_KEYS = (*STAT_KEYS, "layer_loss")


class KDEpochTotals:
    """Sums and counts of the KD numbers of the current epoch's training batches (this process's).

    Examples
    --------
    >>> totals = KDEpochTotals()
    >>> totals.add(torch.tensor(2.0), torch.tensor(1.0), {"agreement": torch.tensor(0.5)})
    >>> totals.add(None, torch.tensor(3.0), {"agreement": torch.tensor(0.7)})  # untranscribed: no CTC
    >>> stats = totals.means()
    >>> stats["ctc_loss"], stats["kd_loss"], round(stats["agreement"], 3), stats["untranscribed_share"]
    (2.0, 2.0, 0.6, 0.5)
    """

    def __init__(self) -> None:
        self.sums = EpochSums(KD_KEYS)

    def reset(self) -> None:
        """Start an epoch: nothing summed."""
        self.sums.reset()

    def add(self, ctc: torch.Tensor | None, kd: torch.Tensor, stats: dict) -> None:
        """Add one batch: its CTC loss (``None`` for an untranscribed batch), KD loss and statistics.

        A batch whose CTC or KD loss is not finite (its update is skipped,
        see ``CTCBrain.check_loss_isfinite``) adds zeros and does not count.
        ``stats`` holds keys of :data:`KD_KEYS` (a ``kd_loss`` in it replaces ``kd``).
        """
        finite = torch.isfinite(kd.detach())
        if ctc is not None:
            finite = finite & torch.isfinite(ctc.detach()).to(finite.device)
        values = {"kd_loss": kd, **stats} if ctc is None else {"ctc_loss": ctc, "kd_loss": kd, **stats}
        self.sums.add(values, only_if=finite)

    def means(self) -> dict:
        """Epoch means over all processes (a collective under DDP: call it on every process); ``{}`` if empty.

        ``ctc_loss`` is averaged over transcribed batches only; with
        untranscribed batches in the epoch, ``untranscribed_share`` is their
        share of the counted batches.
        """
        totals = self.sums.combined()
        if not totals.batches:
            return {}
        stats = {key: totals.mean(key) for key in KD_KEYS if key in STAT_KEYS or totals.counts[key]}
        kd_count, ctc_count = totals.counts["kd_loss"], totals.counts["ctc_loss"]
        if ctc_count < kd_count:
            stats["untranscribed_share"] = 1.0 - ctc_count / kd_count
        return stats

    @mark_as_saver
    def save(self, path: str | os.PathLike) -> None:
        """Every process's sums (:meth:`EpochSums.save <speech_kd.training.epoch_sums.EpochSums.save>`)."""
        self.sums.save(path)

    @mark_as_loader
    def load(self, path: str | os.PathLike, end_of_epoch: bool = False) -> None:
        """Restore this process's sums from ``path`` (``KDMixin`` keeps them only for an epoch resumed mid-way)."""
        del end_of_epoch
        self.sums.restore(path, upgrade=_from_kd_layout)


def _from_kd_layout(entry: dict) -> dict:
    """An entry of the layout ``KDEpochTotals`` saved before ``EpochSums`` served it, in ``EpochSums``'s.

    That layout: ``{"keys", "values", "batches"}`` with ``values`` the sums of
    ``keys`` then two shared counts, of the counted batches and of the
    counted transcribed ones (``ctc_loss``'s).
    """
    *sums, kd_count, ctc_count = entry["values"]
    counts = [ctc_count if key == "ctc_loss" else kd_count for key in entry["keys"]]
    return {"keys": entry["keys"], "sums": sums, "counts": counts, "batches": entry["batches"]}


register_checkpoint_hooks(KDEpochTotals, save_on_main_only=False)
