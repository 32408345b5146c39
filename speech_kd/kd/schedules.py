"""Schedules: learning rate per step, KD weight and temperature per epoch."""

from __future__ import annotations

import math

import torch
from speechbrain.utils import checkpoints

__all__ = ["WarmupCosine", "linear_ramp"]


@checkpoints.register_checkpoint_hooks
class WarmupCosine:
    """Linear warm-up to ``lr``, then cosine decay to ``lr * final_ratio``.

    The decay length is the whole run, which is only known once the data is
    loaded: the Brain calls :meth:`set_total_steps` at the start of fitting.
    Call the object with the optimizer once per optimizer step.

    Examples
    --------
    >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    >>> sched = WarmupCosine(lr=1.0, warmup_steps=2, final_ratio=0.0)
    >>> sched.set_total_steps(4)
    >>> [round(sched(opt), 3) for _ in range(5)]
    [0.5, 1.0, 0.5, 0.0, 0.0]
    """

    def __init__(self, lr: float, warmup_steps: int, final_ratio: float = 0.02) -> None:
        self.lr = lr
        self.warmup_steps = warmup_steps
        self.final_ratio = final_ratio
        self.total_steps = 10**9
        self.current_step = 0

    def set_total_steps(self, total_steps: int) -> None:
        """Set the number of optimizer steps of the whole run."""
        self.total_steps = max(int(total_steps), self.warmup_steps + 1)

    def value(self, step: int) -> float:
        """Learning rate at (1-based) optimizer step ``step``."""
        if step <= self.warmup_steps:
            return self.lr * step / max(1, self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        floor = self.lr * self.final_ratio
        return floor + (self.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def __call__(self, optimizer: torch.optim.Optimizer) -> float:
        """Advance one step and set the optimizer's learning rate; return it."""
        self.current_step += 1
        lr = self.value(self.current_step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    @checkpoints.mark_as_saver
    def save(self, path: str) -> None:
        """Save the step counter (the rest comes from the yaml)."""
        torch.save({"current_step": self.current_step, "total_steps": self.total_steps}, path)

    @checkpoints.mark_as_loader
    def load(self, path: str, end_of_epoch: bool = False) -> None:
        """Restore the step counter."""
        del end_of_epoch
        state = torch.load(path)
        self.current_step = state["current_step"]
        self.total_steps = state["total_steps"]


def linear_ramp(start: float, end: float | None, epoch: int, ramp_epochs: int) -> float:
    """Value at 1-based ``epoch`` moving linearly from ``start`` to ``end``.

    ``end=None`` or ``ramp_epochs <= 1`` keeps ``start`` constant. Used for the
    KD weight and temperature schedules.

    Examples
    --------
    >>> [linear_ramp(1.0, 0.0, e, 3) for e in (1, 2, 3, 4)]
    [1.0, 0.5, 0.0, 0.0]
    """
    if end is None or ramp_epochs <= 1:
        return start
    frac = min(1.0, max(0.0, (epoch - 1) / (ramp_epochs - 1)))
    return start + (end - start) * frac
