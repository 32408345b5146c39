"""Running sums behind an epoch's training statistics, combined over processes and checkpointed.

One class, :class:`EpochSums`, for every per-epoch mean a Brain logs with
its training loss (``history.jsonl``, the train log): ``CTCBrain`` keeps
CR-CTC's ``cr_loss`` in one, ``speech_kd.kd.stats.KDEpochTotals`` the KD
numbers (``kd_loss``, ``agreement``, ...) in another. Every training batch
adds its numbers; at the end of the epoch their means cover all processes'
batches. The sums are a checkpoint recoverable, so a run resumed from an
intra-epoch checkpoint logs the mean of all the epoch's batches, not only of
those after the resume.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from speechbrain.utils.checkpoints import mark_as_loader, mark_as_saver, register_checkpoint_hooks

from speech_kd.training.distributed import gather_objects, rank, sum_across, world_size

__all__ = ["EpochSums", "EpochTotals"]

logger = logging.getLogger(__name__)

#: what :meth:`EpochSums.restore` may be given to read an entry saved in an older layout: ``entry -> entry``
Upgrade = Callable[[dict], dict]


@dataclass(frozen=True)
class EpochTotals:
    """An epoch's sums over all processes (:meth:`EpochSums.combined`).

    Attributes
    ----------
    sums, counts : dict of str to float
        Per declared key: the sum of its counted values, and how many batches counted.
    batches : int
        Batches added, counted or not.
    """

    sums: dict[str, float]
    counts: dict[str, float]
    batches: int

    def mean(self, key: str) -> float:
        """``sums[key] / counts[key]``; NaN when no batch counted."""
        return self.sums[key] / self.counts[key] if self.counts[key] else float("nan")


class EpochSums:
    """Sums and counts of named per-batch numbers over the current epoch (this process's batches).

    Each key has its own count: the batches that added a finite value of it
    (and passed ``only_if``, see :meth:`add`). Values are kept as detached
    0-dim tensors on their batch's device, so adding a batch never
    synchronises the host with an accelerator.

    Parameters
    ----------
    keys : sequence of str
        Every number that may be added, declared up front and the same on
        every process: the processes' sums are combined as one tensor in this
        order, and a key one process met late (or never) would misalign it.

    Examples
    --------
    >>> sums = EpochSums(("cr_loss",))
    >>> sums.add({"cr_loss": torch.tensor(1.0)}); sums.add({"cr_loss": torch.tensor(3.0)})
    >>> sums.add({"cr_loss": torch.tensor(float("nan"))})  # not counted
    >>> sums.means(), sums.combined().batches
    ({'cr_loss': 2.0}, 3)
    """

    def __init__(self, keys: Sequence[str]) -> None:
        self.keys = tuple(keys)
        if len(set(self.keys)) != len(self.keys):
            raise ValueError(f"EpochSums: a key is declared twice in {self.keys}")
        self.reset()

    def reset(self) -> None:
        """Start an epoch: nothing summed."""
        self.sums: dict[str, torch.Tensor | float] = {key: 0.0 for key in self.keys}
        self.counts: dict[str, torch.Tensor | float] = {key: 0.0 for key in self.keys}
        self.batches = 0

    def add(self, values: Mapping[str, torch.Tensor | float], only_if: torch.Tensor | None = None) -> None:
        """Add one batch's numbers (0-dim tensors or floats, by declared key).

        A value counts (is summed, and its key's count goes up by one) when it
        is finite and ``only_if`` (a 0-dim bool tensor, e.g. "this batch's loss
        is finite, its update was not skipped") is true; otherwise it adds 0.

        Raises
        ------
        ValueError
            A key that was not declared.
        """
        unknown = [key for key in values if key not in self.sums]
        if unknown:  # refused before anything is added
            raise ValueError(
                f"EpochSums: {unknown[0]!r} is not one of the declared keys {self.keys} (declared up front: the "
                "processes' sums are combined in that order)"
            )
        self.batches += 1
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().to(torch.float64)
            else:
                value = torch.tensor(
                    float(value), dtype=torch.float64, device=None if only_if is None else only_if.device
                )
            counted = torch.isfinite(value)
            if only_if is not None:
                counted = counted & only_if.detach().to(counted.device)
            self.sums[key] = self.sums[key] + torch.where(counted, value, torch.zeros_like(value))
            self.counts[key] = self.counts[key] + counted.to(torch.float64)

    def _local(self) -> tuple[list[float], list[float]]:
        """The sums and counts of this process in declared order, as floats (one host sync per number)."""
        sums = [float(torch.as_tensor(self.sums[k], dtype=torch.float64).cpu()) for k in self.keys]
        counts = [float(torch.as_tensor(self.counts[k], dtype=torch.float64).cpu()) for k in self.keys]
        return sums, counts

    def combined(self) -> EpochTotals:
        """The sums, counts and batches of all processes (one all-reduce: call it on every process under DDP)."""
        sums, counts = self._local()
        totals = sum_across(torch.tensor([*sums, *counts, float(self.batches)], dtype=torch.float64)).tolist()
        n = len(self.keys)
        return EpochTotals(
            sums=dict(zip(self.keys, totals[:n])),
            counts=dict(zip(self.keys, totals[n : 2 * n])),
            batches=int(totals[-1]),
        )

    def means(self) -> dict[str, float]:
        """Epoch means over all processes (a collective under DDP: call it on every process).

        A key no batch counted is left out.
        """
        totals = self.combined()
        return {key: totals.mean(key) for key in self.keys if totals.counts[key]}

    @mark_as_saver
    def save(self, path: str | os.PathLike) -> None:
        """Every process's sums (gathered: runs on all processes); the main process writes them.

        Layout: ``{"processes": [{"keys", "sums", "counts", "batches"}, ...]}``, one entry per rank.
        """
        sums, counts = self._local()
        everyone = gather_objects({"keys": list(self.keys), "sums": sums, "counts": counts, "batches": self.batches})
        if rank() == 0:
            torch.save({"processes": everyone}, path)

    @mark_as_loader
    def load(self, path: str | os.PathLike, end_of_epoch: bool = False) -> None:
        """Restore this process's sums from ``path`` (a Brain keeps them only for an epoch resumed mid-way)."""
        del end_of_epoch
        self.restore(path)

    def restore(self, path: str | os.PathLike, upgrade: Upgrade | None = None) -> None:
        """Restore this process's sums from ``path``, reading older layouts too.

        An entry without ``sums`` was written by an older version: ``upgrade``
        turns it into the current layout, else the first layout of this class
        (``{"keys", "values"}``: the sums, then one count per key) is read.
        Saved keys that are not declared are left out; declared keys that were
        not saved start at 0. Saved by another number of processes: nothing is
        restored (with a warning), the epoch's means then cover its batches
        after the resume.
        """
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
        if "sums" not in mine:
            mine = upgrade(mine) if upgrade is not None else _from_first_layout(mine)
        for key, total, count in zip(mine["keys"], mine["sums"], mine["counts"]):
            if key in self.sums and math.isfinite(total):
                self.sums[key] = torch.tensor(total, dtype=torch.float64)
                self.counts[key] = torch.tensor(count, dtype=torch.float64)
        self.batches = int(mine.get("batches", 0))


def _from_first_layout(entry: dict) -> dict:
    """``{"keys", "values": sums + one count per key}`` (this class's first layout) in the current one."""
    n = len(entry["keys"])
    values = entry["values"]
    return {"keys": entry["keys"], "sums": values[:n], "counts": values[n : 2 * n], "batches": 0}


register_checkpoint_hooks(EpochSums, save_on_main_only=False)
