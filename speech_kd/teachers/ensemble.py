"""Ensembles of teachers: posteriors averaged in probability space on one vocabulary and frame rate."""

from __future__ import annotations

import torch

from speech_kd.align import VocabMap, lengths_to_mask, reconcile_lengths, resample_frames
from speech_kd.teachers.base import Teacher, TeacherOutput, load_teacher

__all__ = ["EnsembleTeacher", "load_ensemble"]


class EnsembleTeacher(Teacher):
    """Several teachers seen as one.

    Every member is mapped onto a reference vocabulary (default: the first
    member's) and resampled to the first member's frame rate, then the
    probabilities are averaged with normalised ``weights`` (uniform by
    default; :meth:`weights_from_wer` gives weights proportional to 1/WER).
    """

    def __init__(self, members: list[Teacher], weights: list[float] | None = None,
                 tokens: list[str] | None = None, blank_index: int | None = None) -> None:  # fmt: skip
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one teacher")
        self.members = torch.nn.ModuleList(members)
        weights = list(weights) if weights is not None else [1.0] * len(members)
        if len(weights) != len(members) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"ensemble weights {weights} do not fit {len(members)} teachers")
        self.weights = [w / sum(weights) for w in weights]
        self.tokens = list(tokens) if tokens is not None else list(members[0].tokens)
        self.blank_index = blank_index if blank_index is not None else members[0].blank_index
        self.frame_shift = members[0].frame_shift
        self.sample_rate = members[0].sample_rate
        self.name = "ensemble(" + ", ".join(m.name for m in members) + ")"
        self.maps = [VocabMap.build(m.tokens, m.blank_index, self.tokens, self.blank_index) for m in members]

    @staticmethod
    def weights_from_wer(wers: list[float]) -> list[float]:
        """Weights proportional to ``1 / WER`` (better teachers count more), normalised to sum 1.

        Examples
        --------
        >>> EnsembleTeacher.weights_from_wer([10.0, 20.0])
        [0.6666666666666666, 0.3333333333333333]
        """
        inverse = [1.0 / max(w, 1e-6) for w in wers]
        return [v / sum(inverse) for v in inverse]

    def posteriors(self, wavs: torch.Tensor, wav_lens: torch.Tensor) -> TeacherOutput:
        """Weighted mean of the members' probabilities ``[B, T, V]`` on the reference grid."""
        total, ref_lengths, ref_max = None, None, None
        for member, vmap, weight in zip(self.members, self.maps, self.weights):
            out = member(wavs, wav_lens)
            log_probs, lengths = out.log_probs, out.lengths
            if not vmap.is_identity:
                vmap.matrix = vmap.matrix.to(log_probs.device)
                log_probs, _ = vmap.map_log_probs(log_probs, lengths_to_mask(lengths, log_probs.shape[1]))
            log_probs, lengths = resample_frames(log_probs, lengths, member.frame_shift, self.frame_shift)
            if ref_lengths is None:
                ref_lengths, ref_max = lengths, log_probs.shape[1]
            else:
                log_probs = reconcile_lengths(log_probs, lengths, ref_lengths, ref_max)
            probs = weight * log_probs.exp()
            total = probs if total is None else total + probs
        return TeacherOutput(total.clamp(min=1e-8).log(), ref_lengths)


def load_ensemble(sources: list[str], weights: list[float] | None = None, device: str = "cpu") -> EnsembleTeacher:
    """Load each folder with :func:`load_teacher` and combine them."""
    return EnsembleTeacher([load_teacher(s, device=device) for s in sources], weights)
