"""Numbers that must agree across the processes of a ``torchrun`` (DDP) run.

Under DDP each process trains on its own share of the batches, so anything
a process counts alone (its training loss, its KD statistics, its decoded
hypotheses) describes only its share. These helpers combine such numbers
over all processes with ``torch.distributed`` collectives; in a single
process they return their input unchanged, so the same code serves both.

Every helper is a collective: call it on every process, in the same order
(the Brain's ``on_stage_end`` hooks run on all processes, which is where
they are used).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "world_size", "rank", "sum_across", "gather_objects", "weighted_mean_across"]


def is_distributed() -> bool:
    """Whether a process group with more than one process is running.

    Examples
    --------
    >>> is_distributed()
    False
    """
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of processes (1 without a process group).

    Examples
    --------
    >>> world_size()
    1
    """
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """Rank of the calling process (0 without a process group).

    Examples
    --------
    >>> rank()
    0
    """
    return dist.get_rank() if is_distributed() else 0


def _collective_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo and mpi reduce CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_across(values: torch.Tensor) -> torch.Tensor:
    """Elementwise sum of ``values`` (any shape, float64 on return) over all processes.

    One ``all_reduce`` for the whole tensor: stack several numbers into one
    tensor rather than calling this once per number.

    Examples
    --------
    >>> sum_across(torch.tensor([1.0, 2.0]))
    tensor([1., 2.], dtype=torch.float64)
    """
    values = values.detach().to(torch.float64)
    if not is_distributed():
        return values
    original = values.device
    buffer = values.to(_collective_device())
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    return buffer.to(original)


def weighted_mean_across(value: float, weight: float) -> float:
    """Mean of each process's ``value`` weighted by its ``weight`` (e.g. a loss averaged over its batches).

    Examples
    --------
    >>> weighted_mean_across(2.5, 4)
    2.5
    """
    if not is_distributed():
        return value
    total_value, total_weight = sum_across(torch.tensor([value * weight, weight])).tolist()
    return total_value / total_weight if total_weight else value


def gather_objects(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` (picklable objects; ``[obj]`` in one process).

    Examples
    --------
    >>> gather_objects({"ids": ["a"]})
    [{'ids': ['a']}]
    """
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
