"""Mixed precision: which parts run under which autocast.

SpeechBrain runs ``compute_forward`` and ``compute_objectives`` inside one
autocast context chosen by ``--precision`` (fp32, bf16 or fp16). For
distillation that context must not leak into two places:

* the teacher, which runs at its own ``teacher_precision`` (default fp32: a
  big frozen model's posteriors are the training targets, and an fp16
  teacher can overflow), and
* the KD loss and the teacher-to-student mapping (vocabulary matrix,
  frame resampling), which are computed in fp32 so that small
  probabilities and the T² scaling keep their precision.

:func:`autocast_for` builds the context for one of these regions.
"""

from __future__ import annotations

import torch

__all__ = ["PRECISIONS", "autocast_for", "check_precision"]

#: precision names as SpeechBrain's ``--precision`` spells them
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str, device_type: str, what: str = "--precision") -> None:
    """Refuse a precision the device cannot run, with what to use instead.

    fp16 autocast needs CUDA (SpeechBrain rejects it on CPU, and it has no
    gradient scaler there); bf16 runs on CUDA and, more slowly, on CPU.

    Examples
    --------
    >>> check_precision("bf16", "cpu")
    >>> check_precision("fp16", "cpu")
    Traceback (most recent call last):
    ...
    ValueError: --precision=fp16 needs a CUDA device, this run is on cpu: use --precision=bf16 (CPU autocast) or fp32
    """
    if precision not in PRECISIONS:
        raise ValueError(f"{what}={precision}: expected one of {sorted(PRECISIONS)}")
    if precision == "fp16" and device_type != "cuda":
        raise ValueError(
            f"{what}=fp16 needs a CUDA device, this run is on {device_type}: use {what}=bf16 (CPU autocast) or fp32"
        )


def autocast_for(device_type: str, precision: str = "fp32") -> torch.autocast:
    """An autocast context for ``precision``; fp32 turns autocast *off*, also inside an outer autocast.

    Examples
    --------
    >>> with torch.autocast("cpu", dtype=torch.bfloat16):
    ...     with autocast_for("cpu", "fp32"):
    ...         (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
    torch.float32
    """
    if precision == "fp32":
        return torch.autocast(device_type=device_type, enabled=False)
    return torch.autocast(device_type=device_type, dtype=PRECISIONS[precision])
