"""The running sums behind an epoch's KD statistics, checkpointed with the run.

``KDMixin`` adds every training batch's numbers here and logs their means at
the end of the epoch. They are a checkpoint recoverable: a run resumed from
an intra-epoch checkpoint goes on summing from where the interrupted run was,
so the epoch's logged ``kd_loss``, ``agreement``, ... cover all its batches,
not only those after the resume.
"""

from __future__ import annotations

import logging
import os

import torch
from speechbrain.utils.checkpoints import mark_as_loader, mark_as_saver, register_checkpoint_hooks

from speech_kd.training.distributed import gather_objects, rank, sum_across, world_size

logger = logging.getLogger(__name__)

#: the per-batch numbers whose epoch means are logged (a batch's statistics may add more, e.g. ``layer_loss``
#: with layer distillation: they are summed from their first batch on)
STAT_KEYS = ("ctc_loss", "kd_loss", "blank_share", "agreement", "lost_mass")


class KDEpochTotals:
    """Sums and counts of the KD numbers of the current epoch's training batches (this process's).

    Values are kept as detached 0-d tensors on the batch's device, so adding
    a batch never synchronises the host with an accelerator.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Start an epoch: nothing summed."""
        self.totals: dict = {key: 0.0 for key in STAT_KEYS}
        self.counts: dict = {"kd": 0.0, "ctc": 0.0}
        self.batches = 0

    def add(self, ctc: torch.Tensor | None, kd: torch.Tensor, stats: dict) -> None:
        """Add one batch: its CTC loss (``None`` for an untranscribed batch), KD loss and statistics.

        A batch whose CTC or KD loss is not finite (its update is skipped,
        see ``CTCBrain.check_loss_isfinite``) adds zeros and does not count.
        """
        self.batches += 1
        finite = torch.isfinite(kd.detach())
        if ctc is not None:
            finite = finite & torch.isfinite(ctc.detach())
        counted = {"kd_loss": kd, **stats} if ctc is None else {"ctc_loss": ctc, "kd_loss": kd, **stats}
        for key, value in counted.items():
            value = value.detach() if isinstance(value, torch.Tensor) else float(value)
            value = torch.as_tensor(value, dtype=torch.float64, device=finite.device)
            self.totals[key] = self.totals.get(key, 0.0) + torch.where(finite, value, torch.zeros_like(value))
        as_count = finite.to(torch.float64)
        self.counts["kd"] = self.counts["kd"] + as_count
        if ctc is not None:
            self.counts["ctc"] = self.counts["ctc"] + as_count

    def _as_floats(self) -> tuple[list[str], list[float]]:
        keys = list(self.totals)
        values = [self.totals[k] for k in keys] + [self.counts["kd"], self.counts["ctc"]]
        return keys, [float(torch.as_tensor(v, dtype=torch.float64).cpu()) for v in values]

    def means(self) -> dict:
        """Epoch means over all processes (a collective under DDP: call it on every process); ``{}`` if empty.

        ``ctc_loss`` is averaged over transcribed batches only; with
        untranscribed batches in the epoch, ``untranscribed_share`` is their
        share of the counted batches.
        """
        if not self.batches:
            return {}
        keys, values = self._as_floats()
        totals = sum_across(torch.tensor(values, dtype=torch.float64))
        kd_count, ctc_count = float(totals[-2]), float(totals[-1])
        stats = {}
        for i, key in enumerate(keys):
            count = ctc_count if key == "ctc_loss" else kd_count
            stats[key] = float(totals[i]) / count if count else float("nan")
        if ctc_count < kd_count:
            stats["untranscribed_share"] = 1.0 - ctc_count / kd_count if kd_count else float("nan")
        return stats

    @mark_as_saver
    def save(self, path: str | os.PathLike) -> None:
        """Every process's sums (gathered: runs on all processes); the main process writes them."""
        keys, values = self._as_floats()
        everyone = gather_objects({"keys": keys, "values": values, "batches": self.batches})
        if rank() == 0:
            torch.save({"processes": everyone}, path)

    @mark_as_loader
    def load(self, path: str | os.PathLike, end_of_epoch: bool = False) -> None:
        """Restore this process's sums from ``path`` (``KDMixin`` keeps them only for an epoch resumed mid-way)."""
        del end_of_epoch
        processes = torch.load(path, weights_only=False)["processes"]
        if len(processes) != world_size():
            logger.warning(
                "%s: KD sums of %d processes, this run has %d: the resumed epoch's KD statistics cover "
                "only its batches after the resume",
                path,
                len(processes),
                world_size(),
            )
            self.reset()
            return
        mine = processes[rank()]
        self.reset()
        *sums, kd_count, ctc_count = mine["values"]
        self.totals = {key: torch.tensor(value, dtype=torch.float64) for key, value in zip(mine["keys"], sums)}
        self.counts = {
            "kd": torch.tensor(kd_count, dtype=torch.float64),
            "ctc": torch.tensor(ctc_count, dtype=torch.float64),
        }
        self.batches = int(mine["batches"])


register_checkpoint_hooks(KDEpochTotals, save_on_main_only=False)
