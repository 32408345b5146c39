"""What several verbs check the same way before any work: the device (numbers: :mod:`speech_kd.argtypes`)."""

from __future__ import annotations

import torch

__all__ = ["check_device"]


def check_device(device: str) -> None:
    """Refuse ``cuda`` devices when this process sees no CUDA GPU (one line instead of a traceback later)."""
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"--device={device}: no CUDA GPU is available to this process (torch.cuda.is_available() "
            "is False); use --device=cpu"
        )
