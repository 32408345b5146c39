"""Teacher targets for a batch, live or from the cache, in the student's terms.

Two interchangeable strategies with one call signature::

    targets = strategy(batch, student_lengths, student_max)  # -> Targets

:class:`OnlineTargets` runs the teacher on the batch's clean waveforms;
:class:`CachedTargets` reads what ``speech-kd cache-targets`` stored, by
utterance ID. Both hand their teacher-space posteriors to the same
:class:`TargetAligner`, which maps the vocabulary and the frame rate onto the
student's, so the loss code never knows where targets came from.

With layer distillation the strategy is told which teacher layers to hand out too
(:meth:`OnlineTargets.request_layers` / :meth:`CachedTargets.request_layers`, checked before the
first batch): the live teacher returns them from the same forward pass as its posteriors, the
cache reads the ones it stores, and the aligner pools them to the student's frames
(``Targets.hiddens``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from speech_kd.targets.align import (
    VocabMap,
    lengths_to_mask,
    reconcile_lengths,
    resample_frames,
    resample_hidden,
    transfer_path,
)
from speech_kd.targets.cache.format import CacheError
from speech_kd.targets.teachers.base import Teacher, TeacherOutput
from speech_kd.training.precision import autocast_for, check_precision

__all__ = ["Targets", "TargetAligner", "auto_frame_tolerance", "OnlineTargets", "CachedTargets", "select_rows"]

logger = logging.getLogger(__name__)


@dataclass
class Targets:
    """Teacher posteriors aligned to the student.

    Attributes
    ----------
    log_probs : torch.Tensor
        ``[B, T, V]`` teacher log-posteriors over the student's tokens at the
        student's frame rate (``T`` = student frames).
    mask : torch.Tensor
        ``[B, T]`` bool, True on the student's valid frames.
    lost_mass : float
        Mean teacher probability per valid frame that had no student token.
    hard_labels : torch.Tensor, optional
        ``[B, T]`` long: the teacher's best path taken on its *own* frames
        (before any resampling) and carried to the student's
        (:func:`speech_kd.targets.align.transfer_path`): the hard targets of
        ``kd_loss: ce`` and ``ctc``, whose collapse is the teacher's greedy
        transcript.
    reached : torch.Tensor, optional
        ``[V]`` bool: student tokens some teacher token maps to. The others
        carry no teacher information; the KD term leaves them out.
    hiddens : dict of int to torch.Tensor, optional
        Teacher layer -> its hidden states ``[B, T, D]`` at the student's frames (teacher frames
        averaged into each student frame, :func:`~speech_kd.targets.align.resample_hidden`):
        the layers asked for with ``request_layers`` (layer distillation), else ``None``.
    """

    log_probs: torch.Tensor
    mask: torch.Tensor
    lost_mass: float = 0.0
    hard_labels: torch.Tensor | None = None
    reached: torch.Tensor | None = None
    hiddens: dict[int, torch.Tensor] | None = None


class TargetAligner:
    """Map teacher-space posteriors onto the student's vocabulary and frame rate.

    Parameters
    ----------
    teacher_tokens, teacher_blank, teacher_frame_shift :
        The teacher's declared token strings, blank index and seconds per frame.
    student_tokens, student_blank, student_frame_shift :
        The student's.
    max_unmapped_mass : float
        More teacher mass without a student token (mean over frames of a
        batch) is an error naming the tokens.
    frame_tolerance : int, optional
        Teacher and student lengths may differ by this many student frames
        after resampling (edge effects of convolutions); more is an error.
        ``None`` (default): :func:`auto_frame_tolerance` of the two frame
        shifts (2 frames at equal rates, more when the teacher's frames are
        coarser, since one teacher frame of edge error is several student
        frames).
    """

    def __init__(
        self,
        teacher_tokens: list[str],
        teacher_blank: int,
        teacher_frame_shift: float,
        student_tokens: list[str],
        student_blank: int,
        student_frame_shift: float | None,
        max_unmapped_mass: float = 0.05,
        frame_tolerance: int | None = None,
    ) -> None:
        self.vocab = VocabMap.build(
            teacher_tokens, teacher_blank, student_tokens, student_blank, max_unmapped_mass=max_unmapped_mass
        )
        self.teacher_frame_shift = teacher_frame_shift
        self._tolerance_setting = frame_tolerance
        self.student_frame_shift = None
        self.frame_tolerance = frame_tolerance
        if student_frame_shift is not None:
            self.set_student_frame_shift(student_frame_shift)
        self._matrix_device = None
        #: whether to carry the teacher's best path to the student's frames (``Targets.hard_labels``): only
        #: the hard-target losses (``ce``, ``ctc``) read it; ``KDMixin.attach_targets`` sets it
        self.hard_labels = True

    def set_student_frame_shift(self, seconds: float) -> None:
        """Set (or, when it was not given, fill in once measured) the student's seconds per frame."""
        self.student_frame_shift = float(seconds)
        if self._tolerance_setting is None:
            self.frame_tolerance = auto_frame_tolerance(self.teacher_frame_shift, self.student_frame_shift)

    def report(self) -> str:
        """Start-up summary: vocabulary mapping and frame-rate conversion."""
        if self.student_frame_shift is None:
            return (
                self.vocab.report() + f"\nframe shift: teacher {self.teacher_frame_shift * 1000:.1f} ms -> student "
                "(not set: measured on the first training batch)"
            )
        rate = (
            f"frame shift: teacher {self.teacher_frame_shift * 1000:.1f} ms -> student "
            f"{self.student_frame_shift * 1000:.1f} ms "
            + (
                "(identical)"
                if abs(self.teacher_frame_shift - self.student_frame_shift) < 1e-6
                else "(posteriors resampled: area-averaged probabilities, see speech_kd.targets.align.resample_frames)"
            )
            + f"; length differences up to {self.frame_tolerance} student frames are reconciled"
        )
        return self.vocab.report() + "\n" + rate

    def __call__(self, out: TeacherOutput, student_lengths: torch.Tensor, student_max: int) -> Targets:
        """Align one batch of teacher output ``[B, Tt, Vt]`` to ``[B, student_max, Vs]``."""
        log_probs, lengths = out.log_probs, out.lengths
        if self._matrix_device != log_probs.device:
            self.vocab.matrix = self.vocab.matrix.to(log_probs.device)
            self._matrix_device = log_probs.device
        lost = 0.0
        if not self.vocab.is_identity:
            teacher_mask = lengths_to_mask(lengths, log_probs.shape[1])
            log_probs, lost_mass = self.vocab.map_log_probs(log_probs, teacher_mask)
            lost = self.vocab.check_mass(lost_mass, teacher_mask)
        if self.student_frame_shift is None:
            raise ValueError("the student's frame shift is not known yet: set frame_shift (seconds per output frame)")
        best_path = log_probs.argmax(-1) if self.hard_labels else None  # from the teacher's own frames
        teacher_lengths = lengths
        log_probs, lengths = resample_frames(log_probs, lengths, self.teacher_frame_shift, self.student_frame_shift)
        student_lengths = student_lengths.to(lengths.device)
        log_probs = reconcile_lengths(log_probs, lengths, student_lengths, student_max, self.frame_tolerance)
        hard = None
        if best_path is not None:
            hard = transfer_path(
                best_path,
                teacher_lengths,
                self.teacher_frame_shift,
                self.student_frame_shift,
                student_lengths,
                student_max,
                self.vocab.student_blank,
            )
        reached = self.vocab.matrix.sum(0) > 0
        reached[self.vocab.student_blank] = True
        hiddens = None
        if out.hiddens:  # layer distillation: the same frame mapping as the posteriors, on hidden states
            hiddens = {}
            for layer, hidden in out.hiddens.items():
                hidden, hidden_lengths = resample_hidden(
                    hidden, teacher_lengths, self.teacher_frame_shift, self.student_frame_shift
                )
                hiddens[layer] = reconcile_lengths(
                    hidden, hidden_lengths, student_lengths, student_max, self.frame_tolerance
                )
        return Targets(log_probs, lengths_to_mask(student_lengths, student_max), lost, hard, reached, hiddens)


def auto_frame_tolerance(teacher_frame_shift: float, student_frame_shift: float) -> int:
    """Student frames of length difference to accept: 2 per teacher frame's worth of student frames.

    Examples
    --------
    >>> auto_frame_tolerance(0.04, 0.04), auto_frame_tolerance(0.04, 0.02), auto_frame_tolerance(0.02, 0.04)
    (2, 4, 2)
    >>> auto_frame_tolerance(0.04, 0.01)
    8
    """
    return 2 * max(1, math.ceil(teacher_frame_shift / student_frame_shift - 1e-6))


def resample_wavs(wavs: torch.Tensor, orig: int, new: int) -> torch.Tensor:
    import torchaudio.functional as AF

    return AF.resample(wavs, orig, new)


class OnlineTargets:
    """Run the (frozen) teacher on each batch's clean waveforms.

    Audio at the student's sample rate is resampled to the teacher's when
    they differ. The teacher runs without gradients, in eval mode, under its
    own ``precision`` (``fp32``, ``bf16`` or ``fp16``), whatever autocast the
    student's ``--precision`` opened around the call; the mapping to the
    student's vocabulary and frame rate is done in fp32.
    """

    def __init__(self, teacher: Teacher, aligner: TargetAligner, sample_rate: int, precision: str = "fp32") -> None:
        self.teacher = teacher
        self.aligner = aligner
        self.sample_rate = sample_rate
        self.precision = precision
        #: teacher layers whose hidden states each batch's targets carry (:meth:`request_layers`)
        self.hidden_layers: tuple[int, ...] = ()
        weight = next(iter(teacher.parameters()), None)
        check_precision(precision, weight.device.type if weight is not None else "cuda", what="teacher_precision")
        if teacher.sample_rate != sample_rate:
            logger.warning(
                "teacher %s expects %d Hz, the data is %d Hz: resampling the teacher's input",
                teacher.name,
                teacher.sample_rate,
                sample_rate,
            )

    @property
    def teacher_name(self) -> str:
        """The teacher, as error messages name it."""
        return f"teacher {self.teacher.name}"

    def layer_count(self, path: str | None = None, wanted: str | None = None) -> int:
        """The teacher's encoder layers (``path``: ``kd_teacher_layers``); a one-line ``TeacherError`` for an ensemble.

        ``wanted`` is for the cache's error message (unused here).
        """
        self.teacher.layer_path = path
        return self.teacher.layer_count()

    def request_layers(self, layers: Iterable[int]) -> dict[int, int]:
        """Hand out these teacher layers' hidden states with every batch's targets; return their widths.

        Checked against the teacher's depth; the widths are measured on one second of silence.
        """
        layers = tuple(sorted({int(layer) for layer in layers}))
        self.teacher.check_hidden_layers(layers)
        device = next(iter(self.teacher.parameters())).device
        out = self.teacher(torch.zeros(1, self.teacher.sample_rate, device=device), torch.ones(1), hidden_layers=layers)
        self.hidden_layers = layers
        return {layer: int(out.hiddens[layer].shape[-1]) for layer in layers}

    def to(self, device) -> OnlineTargets:
        """Place the teacher on the student's device (refused if it cannot run ``precision`` there)."""
        check_precision(self.precision, torch.device(device).type, what="teacher_precision")
        self.teacher.to(device)
        return self

    def __call__(
        self, batch, student_lengths: torch.Tensor, student_max: int, features=None, wavs=None, rows=None
    ) -> Targets:
        """Targets for ``batch`` (uses ``batch.sig``: clean waveforms and relative lengths).

        ``wavs``: ``(waveforms [B, S], relative lengths [B])`` the student
        actually heard, when they differ from ``batch.sig`` (speed
        perturbation): the teacher then runs on those, so its frames match
        the student's. ``features`` (``speech_kd.nnet.features.SharedFeatures``): the student's
        clean fbank of this batch; a teacher with the same fbank settings
        starts from it, so the spectrum is computed once per batch (only
        when they are fp32: features computed under a bf16/fp16 student
        autocast are not what the teacher would compute). ``rows`` (long
        ``[B']``): student row ``i`` takes the teacher output of input row
        ``rows[i]`` (augmentation that repeats rows, e.g. ``concat_original``);
        ``None``: one student row per input row.
        """
        wavs, wav_lens = wavs if wavs is not None else batch.sig
        if features is not None and features.feats.dtype != torch.float32:
            features = None
        device_type = wavs.device.type
        with autocast_for(device_type, self.precision):
            if self.teacher.sample_rate != self.sample_rate:
                wavs = resample_wavs(wavs, self.sample_rate, self.teacher.sample_rate)
                features = None
            out = self.teacher(wavs, wav_lens, features=features, hidden_layers=self.hidden_layers)
        with autocast_for(device_type, "fp32"):
            return self.aligner(select_rows(out, rows), student_lengths, student_max)


PERTURBED_CACHE_ERROR = (
    "the student's training audio is speed-perturbed, but cached targets were computed on the clean audio: "
    "their frames would not line up. Use the live teacher (no --targets_cache) with speed_perturb=True, "
    "or set speed_perturb=False"
)


class CachedTargets:
    """Read the teacher's stored posteriors by utterance ID (see ``speech_kd.targets.cache``)."""

    reads_cache = True  # needs no audio; augmented rows are matched to utterances, not to waveforms

    def __init__(self, reader, aligner: TargetAligner) -> None:
        self.reader = reader
        self.aligner = aligner
        #: teacher layers whose stored hidden states each batch's targets carry (:meth:`request_layers`)
        self.hidden_layers: tuple[int, ...] = ()
        #: the largest KD temperature the cache was built for (its stored tail is faithful up to it); several
        #: caches read as one (a CacheUnion) serve the lowest of theirs
        self.max_temperature = min(
            float(part.metadata.get("scheme", {}).get("max_temperature", 1.0))
            for part in getattr(reader, "readers", [reader])
        )

    @property
    def teacher_name(self) -> str:
        """The cached teacher, as error messages name it."""
        return f"teacher {self.reader.metadata.get('teacher_name')} (cache {self.reader.out_dir})"

    def layer_count(self, path: str | None = None, wanted: str | None = None) -> int:
        """The cached teacher's encoder layers (recorded when hidden states were stored).

        ``path`` (``kd_teacher_layers``): the teacher's layer list the run means; refused when the
        cache recorded another (``scheme.hidden.stack``, ``cache-targets --teacher_layers``). ``wanted``:
        the ``--hidden_layers`` that would serve the run, said in the error for a cache that stores no
        hidden states.
        """
        spec = self.reader.hidden_spec()
        if spec.get("depth") is None:
            raise CacheError(self._rebuild_message([], wanted))
        stack = spec.get("stack")
        if path and stack and path != stack:
            raise CacheError(
                f"kd_teacher_layers={path} but cache {self.reader.out_dir} stores layers of the teacher's {stack}: "
                f"set kd_teacher_layers: {stack} (or null), or cache the other list (cache-targets "
                f"--teacher_layers {path} --hidden_layers ...) into a new folder"
            )
        return int(spec["depth"])

    def _rebuild_message(self, missing: list[int], wanted: str | None = None) -> str:
        stored = self.reader.hidden_spec().get("layers") or []
        what = f"teacher layers {missing}" if missing else "teacher hidden states"
        spec = wanted or ",".join(str(layer) for layer in sorted(set(stored) | set(missing)))
        return (
            f"kd_layers needs {what}, but cache {self.reader.out_dir} stores "
            + (f"only layers {stored}" if stored else "no hidden states")
            + ": rebuild it into a new folder from its teacher "
            + f"({self.reader.metadata.get('teacher_name')}): speech-kd cache-targets --teacher TEACHER --csv "
            f"{self.reader.metadata.get('csv')} --out NEW_CACHE --hidden_layers {spec} (docs/cache.md), or use the "
            "live teacher (no targets_cache)"
        )

    def request_layers(self, layers: Iterable[int]) -> dict[int, int]:
        """Read these teacher layers' stored hidden states with every batch; return their widths.

        Refused (:class:`~speech_kd.targets.cache.CacheError`, naming the cache, the missing layers and
        the command to rebuild it) when the cache does not store them all.
        """
        layers = tuple(sorted({int(layer) for layer in layers}))
        spec = self.reader.hidden_spec()
        widths = dict(zip(spec.get("layers") or [], spec.get("dims") or []))
        missing = [layer for layer in layers if layer not in widths]
        if missing:
            raise CacheError(self._rebuild_message(missing))
        self.hidden_layers = layers
        return {layer: int(widths[layer]) for layer in layers}

    def to(self, device) -> CachedTargets:
        """Nothing to move: targets are read straight onto the batch's device."""
        return self

    def __call__(
        self, batch, student_lengths: torch.Tensor, student_max: int, features=None, wavs=None, rows=None
    ) -> Targets:
        """Targets for ``batch`` (uses ``batch.id``); missing IDs raise ``CacheMissError``.

        ``rows`` (long ``[B']``): student row ``i`` takes utterance
        ``batch.id[rows[i]]``'s targets (augmentation that keeps the time axis
        but repeats rows, e.g. ``concat_original`` with noise or chunk drops).
        """
        if wavs is not None:
            raise ValueError(PERTURBED_CACHE_ERROR)
        del features  # the cache needs no audio
        out = self.reader.batch(list(batch.id), device=student_lengths.device, hidden_layers=self.hidden_layers)
        with autocast_for(student_lengths.device.type, "fp32"):
            return self.aligner(select_rows(out, rows), student_lengths, student_max)


def select_rows(out: TeacherOutput, rows: torch.Tensor | None) -> TeacherOutput:
    """``out`` with its batch rows picked (and repeated) by ``rows`` (long ``[B']``); ``None``: unchanged.

    Examples
    --------
    >>> out = TeacherOutput(torch.arange(2.0).view(2, 1, 1), torch.tensor([1, 1]))
    >>> select_rows(out, torch.tensor([0, 1, 1])).log_probs.flatten()
    tensor([0., 1., 1.])
    """
    if rows is None:
        return out
    rows = rows.to(out.log_probs.device)
    hiddens = None
    if out.hiddens is not None:
        hiddens = {layer: hidden.index_select(0, rows.to(hidden.device)) for layer, hidden in out.hiddens.items()}
    lengths = out.lengths.index_select(0, rows.to(out.lengths.device))
    return TeacherOutput(out.log_probs.index_select(0, rows), lengths, hiddens)
