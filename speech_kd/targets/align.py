"""Line teacher posteriors up with the student: length masks, vocabulary and frame rate.

This module is the only place that knows how a teacher's outputs are turned
into the student's terms:

* :func:`lengths_to_mask` and :func:`relative_to_frames` turn lengths into
  frame masks and SpeechBrain's relative lengths into frame counts;
* :class:`~speech_kd.targets.vocab.VocabMap` (in :mod:`speech_kd.targets.vocab`, re-exported
  here) maps teacher tokens onto student tokens and carries teacher
  probabilities into the student's vocabulary;
* :func:`resample_frames` converts posteriors between frame shifts (e.g. a
  20 ms wav2vec2 teacher to a 40 ms student), :func:`resample_hidden` does the
  same for hidden states (layer distillation), and :func:`reconcile_lengths`
  makes the teacher time axis match the student's exactly.

Shape legend used throughout: ``B`` batch, ``T`` frames (``Tt`` teacher /
source, ``Ts`` student / destination), ``V`` tokens (``Vt`` teacher, ``Vs``
student).
"""

from __future__ import annotations

import math

import torch

from speech_kd.targets.vocab import WORD_DELIMITERS, VocabMap, VocabMappingError, unit_kind

__all__ = [
    "lengths_to_mask",
    "relative_to_frames",
    "VocabMappingError",
    "unit_kind",
    "VocabMap",
    "FrameRateError",
    "resample_frames",
    "resample_hidden",
    "transfer_path",
    "reconcile_lengths",
    "WORD_DELIMITERS",
]


# --------------------------------------------------------------------- lengths
def lengths_to_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """Boolean frame mask from absolute lengths.

    Parameters
    ----------
    lengths : torch.Tensor
        ``[B]`` integer number of valid frames per utterance.
    max_len : int
        ``T``, the padded number of frames.

    Returns
    -------
    torch.Tensor
        ``[B, T]`` bool, True on valid frames.

    Examples
    --------
    >>> lengths_to_mask(torch.tensor([1, 3]), 3)
    tensor([[ True, False, False],
            [ True,  True,  True]])
    """
    frames = torch.arange(max_len, device=lengths.device)
    return frames.unsqueeze(0) < lengths.to(frames.dtype).unsqueeze(1)


def relative_to_frames(rel_lens: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Absolute frame counts from SpeechBrain's relative lengths.

    ``round(rel * num_frames)`` (``torch.round``, as SpeechBrain's CTC loss
    does), clamped to ``[1, num_frames]``.

    Parameters
    ----------
    rel_lens : torch.Tensor
        ``[B]`` float in ``(0, 1]``, length relative to the longest utterance.
    num_frames : int
        ``T``, the padded number of frames.

    Returns
    -------
    torch.Tensor
        ``[B]`` long frame counts.

    Examples
    --------
    >>> relative_to_frames(torch.tensor([1.0, 0.5, 0.01]), 10)
    tensor([10,  5,  1])
    """
    return torch.round(rel_lens.double() * num_frames).long().clamp(1, num_frames)


# ------------------------------------------------------------------ frame rate
class FrameRateError(ValueError):
    """Teacher and student time axes cannot be lined up."""


def _frames(lengths: torch.Tensor, ratio: float) -> torch.Tensor:
    """``lengths * ratio`` rounded half up, at least 1."""
    return torch.floor(lengths.double() * ratio + 0.5).long().clamp_min(1)


def _area_average(probs: torch.Tensor, lengths: torch.Tensor, ratio: float, out_len: int) -> torch.Tensor:
    """Coarser frames: each output frame averages the valid source frames it covers, by overlap.

    ``probs`` ``[B, Tt, V]``; output frame ``j`` spans source positions
    ``[j * ratio, (j + 1) * ratio)`` with ``ratio = dst / src > 1``.
    """
    batch, src_len, _ = probs.shape
    device = probs.device
    start = torch.arange(out_len, device=device, dtype=torch.float64) * ratio  # [Ts]
    end = start + ratio
    first = torch.floor(start).long()
    num = torch.zeros(batch, out_len, probs.shape[-1], device=device, dtype=probs.dtype)
    den = torch.zeros(batch, out_len, device=device, dtype=probs.dtype)
    for k in range(math.ceil(ratio) + 1):  # source frames an output frame can touch
        idx = first + k  # [Ts]
        overlap = (torch.minimum(idx + 1.0, end) - torch.maximum(idx.double(), start)).clamp_min(0.0)
        valid = idx.unsqueeze(0) < lengths.unsqueeze(1)  # [B, Ts]
        weight = overlap.to(probs.dtype).unsqueeze(0) * valid  # [B, Ts]
        gathered = probs[:, idx.clamp_max(src_len - 1)]  # [B, Ts, V]
        num = num + weight.unsqueeze(-1) * gathered
        den = den + weight
    return num / den.clamp_min(1e-12).unsqueeze(-1)


def _linear(probs: torch.Tensor, lengths: torch.Tensor, ratio: float, out_len: int) -> torch.Tensor:
    """Finer frames: linear interpolation between frame centres, clamped to each utterance's valid frames."""
    device = probs.device
    centres = (torch.arange(out_len, device=device, dtype=torch.float64) + 0.5) / ratio - 0.5  # source positions
    last = (lengths.to(device) - 1).clamp_min(0).double().unsqueeze(1)  # [B, 1]
    pos = torch.minimum(centres.unsqueeze(0).clamp_min(0.0), last)  # [B, Ts]
    lo = torch.floor(pos).long()
    hi = torch.minimum(lo + 1, last.long())
    frac = (pos - lo.double()).to(probs.dtype).unsqueeze(-1)
    v = probs.shape[-1]
    take = lambda idx: probs.gather(1, idx.unsqueeze(-1).expand(-1, -1, v))  # noqa: E731
    return (1.0 - frac) * take(lo) + frac * take(hi)


def _ratio(src_shift: float, dst_shift: float) -> float | None:
    """Source frames per destination frame, snapped to a whole number or its inverse; ``None`` at equal shifts."""
    if src_shift <= 0 or dst_shift <= 0:
        raise FrameRateError(f"frame shifts must be positive, got {src_shift} and {dst_shift}")
    if abs(src_shift - dst_shift) < 1e-6:
        return None
    ratio = dst_shift / src_shift
    if abs(ratio - round(ratio)) < 1e-6:
        ratio = float(round(ratio))
    elif abs(1 / ratio - round(1 / ratio)) < 1e-6:
        ratio = 1.0 / round(1 / ratio)
    return ratio


def _resampled_lengths(
    lengths: torch.Tensor, frames: torch.Tensor, ratio: float
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Source lengths clamped to ``frames [B, Tt, ...]``, destination lengths and the destination's padded length."""
    lengths = lengths.to(frames.device).long().clamp(0, frames.shape[1])
    new_lengths = _frames(lengths, 1.0 / ratio)
    out_len = max(1, int(math.floor(frames.shape[1] / ratio + 0.5)), int(new_lengths.max()) if len(lengths) else 1)
    return lengths, new_lengths, out_len


def resample_hidden(
    hidden: torch.Tensor, lengths: torch.Tensor, src_shift: float, dst_shift: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states ``[B, Tt, D]`` at ``src_shift`` to ``dst_shift``, as :func:`resample_frames` maps posteriors.

    Coarser destination frames average the valid source frames they overlap (a 40 ms student frame
    is the mean of two 20 ms teacher frames); finer ones interpolate linearly between frame centres.
    Padding never leaks in. Equal shifts return the inputs unchanged.

    Returns
    -------
    hidden : torch.Tensor
        ``[B, Ts, D]`` float32 (the input's dtype), ``Ts = round(Tt * src / dst)``.
    lengths : torch.Tensor
        ``[B]`` long valid destination frames.

    Examples
    --------
    >>> h = torch.tensor([[[1.0], [3.0], [5.0], [7.0], [100.0]]])
    >>> out, lens = resample_hidden(h, torch.tensor([4]), 0.02, 0.04)
    >>> out.flatten()[:2], lens
    (tensor([2., 6.]), tensor([2]))
    """
    ratio = _ratio(src_shift, dst_shift)
    if ratio is None:
        return hidden, lengths
    lengths, new_lengths, out_len = _resampled_lengths(lengths, hidden, ratio)
    resample = _area_average if ratio > 1 else _linear
    out = resample(hidden.float(), lengths, ratio if ratio > 1 else 1.0 / ratio, out_len)
    return out.to(hidden.dtype), new_lengths


def resample_frames(
    log_probs: torch.Tensor, lengths: torch.Tensor, src_shift: float, dst_shift: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert posteriors from frame shift ``src_shift`` to ``dst_shift`` (seconds).

    Method, in probability space: frame ``i`` covers ``[i, i + 1) * shift``.
    When the destination is coarser (``dst > src``) every destination frame
    is the overlap-weighted average of the source probabilities it covers
    (area interpolation; for an integer ratio of 2 this averages frame
    pairs). When it is finer, probabilities are interpolated linearly between
    frame centres. Only each utterance's valid frames contribute (padding
    never leaks in). Each frame is renormalised and returned as log-probs.
    New lengths are ``lengths * src_shift / dst_shift`` rounded half up (at
    least 1). Equal shifts (within 1e-6 s) return the inputs unchanged.

    Parameters
    ----------
    log_probs : torch.Tensor
        ``[B, Tt, V]`` log-posteriors at ``src_shift``.
    lengths : torch.Tensor
        ``[B]`` long valid source frames.
    src_shift, dst_shift : float
        Seconds per frame of the source and the destination.

    Returns
    -------
    log_probs : torch.Tensor
        ``[B, Ts, V]`` log-posteriors at ``dst_shift``, ``Ts = round(Tt * src / dst)``.
    lengths : torch.Tensor
        ``[B]`` long valid destination frames.

    Examples
    --------
    >>> probs = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.5, 0.5]]])
    >>> out, lens = resample_frames(probs.clamp_min(1e-9).log(), torch.tensor([4]), 0.02, 0.04)
    >>> out.exp().round(decimals=3), lens
    (tensor([[[0.5000, 0.5000],
             [0.5000, 0.5000]]]), tensor([2]))
    """
    ratio = _ratio(src_shift, dst_shift)
    if ratio is None:
        return log_probs, lengths
    lengths, new_lengths, out_len = _resampled_lengths(lengths, log_probs, ratio)
    dtype = log_probs.dtype
    lp = log_probs.detach().float()
    lp = torch.where(torch.isfinite(lp), lp, torch.full((), -1e4, device=lp.device))
    probs = torch.softmax(lp, dim=-1)  # valid log-probs: exp; tolerant of unnormalised inputs
    resample = _area_average if ratio > 1 else _linear
    out = resample(probs, lengths, ratio if ratio > 1 else 1.0 / ratio, out_len)
    out = out.clamp_min(torch.finfo(out.dtype).tiny).log()
    out = out - torch.logsumexp(out, dim=-1, keepdim=True)
    return out.to(dtype), new_lengths


def transfer_path(
    path: torch.Tensor,
    lengths: torch.Tensor,
    src_shift: float,
    dst_shift: float,
    target_lengths: torch.Tensor,
    target_max: int,
    blank_index: int,
) -> torch.Tensor:
    """Carry a CTC best path from the teacher's frames to the student's, keeping its transcript.

    Hard targets must come from the teacher's own frames: the argmax of
    posteriors averaged to a coarser rate turns a one-frame spike of 0.9
    into 0.45 against a blank of 0.55 and teaches deletions. So the path is
    taken at the teacher's rate and carried over:

    * same rate: the path itself;
    * finer student frames: each student frame takes the teacher frame it
      lies in (nearest neighbour: every teacher frame is kept, so the
      collapsed transcript is the same);
    * coarser student frames: each token the teacher emits (each run of
      one token) starts at the student frame that holds its start time, or
      the next free one, and covers the student frames its run covers, up to
      the next token; a token repeating the previous one keeps a blank frame
      between them, so it is not merged. Tokens that no longer fit before the
      utterance's last student frame are dropped (only when the teacher emits
      more tokens than the student has frames).

    Frames past ``target_lengths`` are blank.

    Parameters
    ----------
    path : torch.Tensor
        ``[B, Tt]`` long: the teacher's best path (frame argmax) in student token ids.
    lengths : torch.Tensor
        ``[B]`` valid teacher frames.
    src_shift, dst_shift : float
        Seconds per teacher and per student frame.
    target_lengths : torch.Tensor
        ``[B]`` valid student frames.
    target_max : int
        ``Ts``, the student's padded number of frames.
    blank_index : int
        The blank token.

    Returns
    -------
    torch.Tensor
        ``[B, Ts]`` long: a student-rate path whose collapse is the teacher's greedy transcript.

    Examples
    --------
    >>> path = torch.tensor([[0, 0, 5, 0, 0, 0, 5, 5, 5, 5, 0, 0]])  # 20 ms: "a", then "a" again
    >>> transfer_path(path, torch.tensor([12]), 0.02, 0.04, torch.tensor([6]), 6, 0)
    tensor([[0, 5, 0, 5, 5, 0]])
    >>> transfer_path(torch.tensor([[0, 5, 5, 0]]), torch.tensor([4]), 0.04, 0.02, torch.tensor([8]), 8, 0)
    tensor([[0, 0, 5, 5, 5, 5, 0, 0]])
    """
    device = path.device
    path = path.to(torch.long)
    lengths = lengths.to(device).long().clamp(0, path.shape[1])
    target_lengths = target_lengths.to(device).long()
    frames = torch.arange(target_max, device=device)
    valid = frames.unsqueeze(0) < target_lengths.unsqueeze(1)
    if abs(src_shift - dst_shift) < 1e-6 or dst_shift < src_shift:
        # nearest teacher frame for each student frame (identity at equal rates)
        source = torch.floor((frames.double() + 0.5) * dst_shift / src_shift).long()
        last = (lengths - 1).clamp_min(0).unsqueeze(1)
        source = torch.minimum(source.unsqueeze(0), last)
        out = path.gather(1, source.clamp(0, max(path.shape[1] - 1, 0)))
        out = torch.where(source < lengths.unsqueeze(1), out, torch.full_like(out, blank_index))
        return torch.where(valid, out, torch.full_like(out, blank_index))
    out = torch.full((path.shape[0], target_max), blank_index, dtype=torch.long)
    rows = path.cpu()
    ratio = src_shift / dst_shift  # student frames per teacher frame (< 1 here)
    for b in range(path.shape[0]):
        row = rows[b, : int(lengths[b])]
        if row.numel() == 0:
            continue
        changed = torch.ones_like(row, dtype=torch.bool)
        changed[1:] = row[1:] != row[:-1]
        run_starts = torch.nonzero(changed).flatten().tolist() + [row.numel()]
        limit = int(target_lengths[b])
        placed: list[tuple[int, int, int]] = []  # (student frame, token, last student frame the teacher holds it)
        for start, end in zip(run_starts[:-1], run_starts[1:]):
            token = int(row[start])
            if token == blank_index:
                continue
            previous_pos, previous_token = (placed[-1][0], placed[-1][1]) if placed else (-2, None)
            pos = max(int(start * ratio + 1e-9), previous_pos + 1)
            if token == previous_token and pos == previous_pos + 1:
                pos += 1  # a blank between repeats, or CTC would merge them
            if pos >= limit:
                break
            placed.append((pos, token, int((end - 1) * ratio + 1e-9)))
        for i, (pos, token, held) in enumerate(placed):
            # the token on every student frame the teacher holds it, up to the next token (a blank kept before
            # a repeat of the same token), so frame-wise CE sees the teacher's runs, not spikes
            stop = limit - 1
            if i + 1 < len(placed):
                stop = placed[i + 1][0] - (2 if placed[i + 1][1] == token else 1)
            out[b, pos : max(pos, min(held, stop)) + 1] = token
    return out.to(device)


def reconcile_lengths(
    log_probs: torch.Tensor,
    lengths: torch.Tensor,
    target_lengths: torch.Tensor,
    target_max: int,
    tolerance: int = 2,
) -> torch.Tensor:
    """Make the teacher time axis match the student's exactly.

    Per utterance, the first ``min(lengths, target_lengths)`` teacher frames
    are kept; every later frame, up to ``target_max``, repeats the last kept
    frame (so a shorter teacher is padded and a longer one truncated; frames
    beyond ``target_lengths`` are filler that callers mask).

    Parameters
    ----------
    log_probs : torch.Tensor
        ``[B, T, V]`` teacher log-posteriors at the student's frame rate.
    lengths : torch.Tensor
        ``[B]`` long valid teacher frames.
    target_lengths : torch.Tensor
        ``[B]`` long valid student frames.
    target_max : int
        The student's padded number of frames.
    tolerance : int
        Largest accepted ``|lengths - target_lengths|`` (convolution edge effects).

    Returns
    -------
    torch.Tensor
        ``[B, target_max, V]``.

    Raises
    ------
    FrameRateError
        An utterance's lengths differ by more than ``tolerance``.

    Examples
    --------
    >>> lp = torch.arange(4.0).view(1, 4, 1)
    >>> reconcile_lengths(lp, torch.tensor([3]), torch.tensor([4]), 5).flatten()
    tensor([0., 1., 2., 2., 2.])
    """
    if log_probs.shape[0] != lengths.shape[0] or lengths.shape[0] != target_lengths.shape[0]:
        raise ValueError(
            f"batch sizes differ: log_probs {log_probs.shape[0]}, lengths {lengths.shape[0]}, "
            f"target_lengths {target_lengths.shape[0]}"
        )
    device = log_probs.device
    lengths = lengths.to(device).long()
    target_lengths = target_lengths.to(device).long()
    off = ((lengths - target_lengths).abs() > tolerance).nonzero().flatten().tolist()
    if off:
        shown = "; ".join(
            f"utterance {i}: teacher {int(lengths[i])} frames, student {int(target_lengths[i])}" for i in off[:5]
        )
        raise FrameRateError(
            f"teacher and student frame counts differ by more than {tolerance} ({shown}"
            f"{'; ...' if len(off) > 5 else ''}): check both models' frame shifts (frame_shift in the yaml) and the "
            "audio given to each; frame_tolerance raises the limit"
        )
    last = (torch.minimum(lengths, target_lengths).clamp(1, log_probs.shape[1]) - 1).unsqueeze(1)  # [B, 1]
    idx = torch.minimum(torch.arange(target_max, device=device).unsqueeze(0), last)  # [B, target_max]
    return log_probs.gather(1, idx.unsqueeze(-1).expand(-1, -1, log_probs.shape[-1]))
