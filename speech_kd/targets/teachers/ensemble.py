"""Ensembles of teachers: posteriors averaged in probability space on one vocabulary and frame rate."""

from __future__ import annotations

import logging

import torch

from speech_kd.hparams_files import model_folder
from speech_kd.targets.align import VocabMap, lengths_to_mask, reconcile_lengths, resample_frames
from speech_kd.targets.teachers.base import Teacher, TeacherError, TeacherOutput, load_teacher

__all__ = ["EnsembleTeacher", "load_ensemble", "load_teachers", "teacher_sources", "spike_survival"]

logger = logging.getLogger(__name__)

#: below this share of surviving member spikes the ensemble warns (see :func:`spike_survival`)
MIN_SPIKE_SURVIVAL = 0.97


def spike_survival(
    member_log_probs: list[torch.Tensor], ensemble_log_probs: torch.Tensor, lengths: torch.Tensor, blank_index: int
) -> float:
    """Share of the members' non-blank argmax frames where the averaged posterior is non-blank too.

    CTC models emit each token as a one-frame spike, and independently trained
    models put their spikes on different frames: averaged, a spike only one
    member has is outvoted by the others' blank and the token vanishes (three
    scratch students of 42 % dev WER each average to 67 %, spaces and vowels
    dropped; three students distilled from one teacher, whose spikes it
    aligned, average to 35 %). Near 1.0 the members agree on timing.

    ``member_log_probs``: each ``[B, T, V]`` on the ensemble's grid;
    ``ensemble_log_probs [B, T, V]``; ``lengths [B]`` valid frames.

    Examples
    --------
    >>> spike = torch.log(torch.tensor([[[0.1, 0.9], [0.9, 0.1], [0.9, 0.1]]]))
    >>> late = torch.log(torch.tensor([[[0.9, 0.1], [0.9, 0.1], [0.1, 0.9]]]))
    >>> mean = ((spike.exp() + late.exp()) / 2).log()
    >>> spike_survival([spike, spike], spike, torch.tensor([3]), 0)
    1.0
    >>> spike_survival([spike, late], mean, torch.tensor([3]), 0)
    0.0
    """
    mask = torch.arange(ensemble_log_probs.shape[1], device=lengths.device)[None, :] < lengths[:, None]
    kept = (ensemble_log_probs.argmax(-1) != blank_index) & mask
    spikes = survived = 0
    for log_probs in member_log_probs:
        member = (log_probs.argmax(-1) != blank_index) & mask
        spikes += int(member.sum())
        survived += int((member & kept).sum())
    return survived / spikes if spikes else 1.0


class EnsembleTeacher(Teacher):
    """Several teachers seen as one.

    Every member is mapped onto a reference vocabulary (default: the first
    member's) and resampled to the first member's frame rate, then the
    probabilities are averaged with normalised ``weights`` (uniform by
    default; :meth:`weights_from_wer` gives weights proportional to 1/WER).
    """

    def __init__(
        self,
        members: list[Teacher],
        weights: list[float] | None = None,
        tokens: list[str] | None = None,
        blank_index: int | None = None,
    ) -> None:
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
        #: :func:`spike_survival` of the first batch (``None`` before it); below
        #: ``MIN_SPIKE_SURVIVAL`` a warning says the members' spikes are not aligned
        self.spike_survival: float | None = None

    def layer_count(self) -> int:
        """Refused: the members' layers do not correspond, so no layer of the ensemble can be a target."""
        raise TeacherError(
            f"kd_layers needs one teacher, not the ensemble {self.name}: its members' hidden layers have no common "
            "meaning to average; distil the layers from one teacher folder (or drop kd_layers)"
        )

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
        total, ref_lengths, ref_max, aligned = None, None, None, []
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
            if self.spike_survival is None:  # kept for the first batch's timing check only
                aligned.append(log_probs)
            probs = weight * log_probs.exp()
            total = probs if total is None else total + probs
        mean_log_probs = total.clamp(min=1e-8).log()
        if self.spike_survival is None:
            self._check_spike_timing(aligned, mean_log_probs, ref_lengths)
        return TeacherOutput(mean_log_probs, ref_lengths)

    def _check_spike_timing(
        self, aligned: list[torch.Tensor], mean_log_probs: torch.Tensor, lengths: torch.Tensor
    ) -> None:
        """Measure :func:`spike_survival` on the first batch; warn when the members' spikes do not line up."""
        self.spike_survival = spike_survival(aligned, mean_log_probs, lengths, self.blank_index)
        if self.spike_survival < MIN_SPIKE_SURVIVAL:
            logger.warning(
                "%s: only %.1f %% of the members' CTC spikes survive averaging (first batch): their spike "
                "timing differs, so the ensemble drops tokens and can be worse than its members. Check its "
                "WER (speech-kd evaluate --asr A,B,...); members distilled from one teacher share its timing",
                self.name,
                100 * self.spike_survival,
            )


def load_ensemble(sources: list[str], weights: list[float] | None = None, device: str = "cpu") -> EnsembleTeacher:
    """Load each folder with :func:`load_teacher` and combine them."""
    return EnsembleTeacher([load_teacher(s, device=device) for s in sources], weights)


def teacher_sources(value) -> list[str]:
    """Teacher folders from a yaml/CLI value: a list, or one string with comma-separated folders.

    ``speech_kd/pretrained/NAME`` is the shipped model where no such folder exists here
    (:func:`speech_kd.hparams_files.model_folder`).

    Examples
    --------
    >>> teacher_sources("a, b")
    ['a', 'b']
    >>> teacher_sources(["a"])
    ['a']
    """
    if isinstance(value, (list, tuple)):
        return [model_folder(str(v)) for v in value]
    return [model_folder(s.strip()) for s in str(value or "").split(",") if s.strip()]


def load_teachers(
    value,
    kind: str = "auto",
    device: str = "cpu",
    overrides: dict | None = None,
    weights: list[float] | None = None,
) -> Teacher:
    """One teacher for one folder, an :class:`EnsembleTeacher` for several (``value``: see :func:`teacher_sources`).

    ``overrides`` (keys replaced in a SpeechBrain teacher's ``hyperparams.yaml``)
    and ``kind`` apply to a single teacher; ensemble members are detected
    one by one. The one place the distillation yaml, ``cache-targets`` and
    ``evaluate`` turn a ``teacher_source`` into a model.
    """
    sources = teacher_sources(value)
    if not sources:
        raise ValueError("no teacher folder given")
    if len(sources) == 1:
        extra = {"overrides": dict(overrides)} if overrides else {}
        return load_teacher(sources[0], kind=kind, device=device, **extra)
    if overrides or kind != "auto":
        raise ValueError(f"teacher_overrides / teacher_kind apply to one teacher, not the ensemble {sources}")
    return load_ensemble(sources, weights=weights, device=device)
