"""Running sums behind a per-epoch training statistic, combined over processes and checkpointed.

``CTCBrain`` keeps the consistency loss of CR-CTC (``cr_loss``) here: every
training batch adds its value, the epoch's mean is logged with the training
loss (``history.jsonl``, the train log). A checkpoint recoverable, so a run
resumed from an intra-epoch checkpoint logs the mean of all the epoch's
batches, not only of those after the resume (as ``speech_kd.kd.stats`` does
for the KD numbers).
"""

from __future__ import annotations

import logging
import math
import os

import torch
from speechbrain.utils.checkpoints import mark_as_loader, mark_as_saver, register_checkpoint_hooks

from speech_kd.training.distributed import gather_objects, rank, sum_across, world_size

__all__ = ["EpochSums"]

logger = logging.getLogger(__name__)


class EpochSums:
    """Sums and counts of named per-batch numbers over the current epoch (this process's batches).

    Parameters
    ----------
    keys : tuple of str
        The numbers kept (the same on every process: their sums are combined in this order).

    Examples
    --------
    >>> sums = EpochSums(("cr_loss",))
    >>> sums.add(cr_loss=torch.tensor(1.0)); sums.add(cr_loss=torch.tensor(3.0))
    >>> sums.means()
    {'cr_loss': 2.0}
    """

    def __init__(self, keys: tuple[str, ...]) -> None:
        self.keys = tuple(keys)
        self.reset()

    def reset(self) -> None:
        """Start an epoch: nothing summed."""
        self.sums: dict = {key: 0.0 for key in self.keys}
        self.counts: dict = {key: 0.0 for key in self.keys}

    def add(self, **values: torch.Tensor | float) -> None:
        """Add one batch's numbers; a non-finite one (its batch updates nothing) is not counted.

        Tensors stay detached on their device: adding never synchronises the host with an accelerator.
        """
        for key, value in values.items():
            value = torch.as_tensor(value.detach() if isinstance(value, torch.Tensor) else value, dtype=torch.float64)
            finite = torch.isfinite(value)
            self.sums[key] = self.sums[key] + torch.where(finite, value, torch.zeros_like(value))
            self.counts[key] = self.counts[key] + finite.to(torch.float64)

    def _as_floats(self) -> list[float]:
        values = [self.sums[k] for k in self.keys] + [self.counts[k] for k in self.keys]
        return [float(torch.as_tensor(v, dtype=torch.float64).cpu()) for v in values]

    def means(self) -> dict[str, float]:
        """Epoch means over all processes (a collective under DDP: call it on every process).

        A key no batch counted is left out.
        """
        totals = sum_across(torch.tensor(self._as_floats(), dtype=torch.float64))
        n = len(self.keys)
        return {key: float(totals[i]) / float(totals[n + i]) for i, key in enumerate(self.keys) if totals[n + i] > 0}

    @mark_as_saver
    def save(self, path: str | os.PathLike) -> None:
        """Every process's sums (gathered: runs on all processes); the main process writes them."""
        everyone = gather_objects({"keys": list(self.keys), "values": self._as_floats()})
        if rank() == 0:
            torch.save({"processes": everyone}, path)

    @mark_as_loader
    def load(self, path: str | os.PathLike, end_of_epoch: bool = False) -> None:
        """Restore this process's sums from ``path`` (kept by the Brain only for an epoch resumed mid-way)."""
        del end_of_epoch
        processes = torch.load(path, weights_only=False)["processes"]
        self.reset()
        if len(processes) != world_size():
            logger.warning(
                "%s: sums of %d processes, this run has %d: the resumed epoch's %s cover only its batches after "
                "the resume",
                path,
                len(processes),
                world_size(),
                ", ".join(self.keys),
            )
            return
        mine = processes[rank()]
        n = len(mine["keys"])
        for i, key in enumerate(mine["keys"]):
            if key in self.sums and math.isfinite(mine["values"][i]):
                self.sums[key] = torch.tensor(mine["values"][i], dtype=torch.float64)
                self.counts[key] = torch.tensor(mine["values"][n + i], dtype=torch.float64)


register_checkpoint_hooks(EpochSums, save_on_main_only=False)
