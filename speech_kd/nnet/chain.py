"""Run a waveform batch through a yaml's chain of modules (``encoder_chain``) to frame log-probabilities.

Each module gets the keyword arguments its ``forward`` takes (relative
lengths, the epoch), so SpeechBrain's modules and plain ``torch.nn`` ones mix
in one list; used by :class:`speech_kd.training.ctc_brain.CTCBrain` and the teachers built
from this package's yamls.
"""

from __future__ import annotations

import functools
import inspect

import torch

from speech_kd.nnet.features import fast_fbank, fast_fbank_applies

__all__ = ["run_chain"]


@functools.cache
def _parameter_names(func) -> frozenset:
    try:
        return frozenset(inspect.signature(func).parameters)
    except (TypeError, ValueError):
        return frozenset()


def _accepts(module: torch.nn.Module, name: str) -> bool:
    """Whether ``module.forward`` takes ``name`` (memoised per class: this runs for every module of every batch).

    A DDP/DataParallel wrapper is looked through: its own ``forward(*inputs,
    **kwargs)`` names no argument, and judging by it would silently drop the
    lengths (and with them the padding masks) of every wrapped module.
    """
    if isinstance(module, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        module = module.module
    forward = getattr(type(module), "forward", None) or getattr(module, "forward", module)
    return name in _parameter_names(forward)


def run_chain(
    modules: dict,
    chain: list[str],
    wavs: torch.Tensor,
    wav_lens: torch.Tensor,
    after: dict | None = None,
    epoch: int | None = None,
) -> torch.Tensor:
    """Run ``wavs [B, S]`` through the named modules; return frame log-probs ``[B, T, V]``.

    Each module receives the relative lengths when its ``forward`` takes
    ``lengths`` or ``wav_lens`` (as ``LengthsCapableSequential`` does), and
    the epoch when it takes ``epoch`` (``InputNormalization``). ``after`` maps
    a module name to a callable applied to its output (augmentation hooks);
    a hook that changes the rows (CR-CTC's two views of each utterance,
    ``[B, ...] -> [2B, ...]``) returns ``(output, relative lengths of its rows)``,
    and the modules after it get those lengths.
    A plain SpeechBrain ``Fbank`` is computed by :func:`~speech_kd.nnet.features.fast_fbank`
    (same output, fewer passes over memory).
    """
    x = wavs
    for name in chain:
        module = modules[name]
        kwargs = {}
        if _accepts(module, "lengths"):
            kwargs["lengths"] = wav_lens
        elif _accepts(module, "wav_lens"):
            kwargs["wav_lens"] = wav_lens
        if epoch is not None and _accepts(module, "epoch"):
            kwargs["epoch"] = epoch
        if x.dim() == 2 and fast_fbank_applies(module):
            x = fast_fbank(module, x)
        else:
            x = module(x, **kwargs)
        if after and name in after:
            x = after[name](x)
            if isinstance(x, tuple):
                x, wav_lens = x
    return x
