"""The teacher interface shared by every kind of teacher.

A teacher turns a batch of waveforms into frame log-posteriors over its own
tokens. Everything the distillation needs to line those up with a student is
declared, never guessed: its token strings, blank index, frame shift and
sample rate. Adapters register themselves with :func:`register_teacher` and
are built by :func:`load_teacher`.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from speech_kd.nnet.layers import LayerStackError, LayerTaps, find_layer_stack

__all__ = [
    "Teacher",
    "TeacherError",
    "TeacherOutput",
    "register_teacher",
    "load_teacher",
    "measure_frame_shift",
    "TEACHER_KINDS",
]


class TeacherError(ValueError):
    """A teacher that cannot be loaded or used, with the reason."""


@dataclass
class TeacherOutput:
    """Teacher posteriors for one batch.

    Attributes
    ----------
    log_probs : torch.Tensor
        ``[B, T, V]`` float32 log-posteriors over the teacher's tokens.
    lengths : torch.Tensor
        ``[B]`` int64, number of valid frames of each utterance.
    hiddens : dict of int to torch.Tensor, optional
        Encoder layer (0-based) -> its output ``[B, T, D]`` float32 at the same frames as
        ``log_probs``: the layers asked for with ``hidden_layers`` (layer distillation), else ``None``.
    """

    log_probs: torch.Tensor
    lengths: torch.Tensor
    hiddens: dict[int, torch.Tensor] | None = None


class Teacher(torch.nn.Module, ABC):
    """A frozen CTC acoustic model seen through one small interface.

    Attributes set by every adapter: ``tokens`` (index -> string),
    ``blank_index``, ``frame_shift`` (seconds per output frame),
    ``sample_rate`` (Hz the model expects) and ``name``. The teacher is kept in
    eval mode and runs without gradients.
    """

    tokens: list[str]
    blank_index: int
    frame_shift: float
    sample_rate: int
    name: str
    #: ``speech_kd.nnet.features.fbank_signature`` of the teacher's own fbank when it
    #: can start from precomputed features (see :meth:`posteriors_from_features`)
    feature_signature: tuple | None = None
    #: dotted path to the encoder's list of layers (``kd_teacher_layers``), from a key of :meth:`layer_roots`;
    #: ``None``: :meth:`default_layer_path`, else found (:func:`~speech_kd.nnet.layers.find_layer_stack`)
    layer_path: str | None = None
    #: the dotted path of the layer list hidden states are taken from (set when it is found)
    layer_stack_name: str | None = None
    #: the encoder layers the running call returns in ``TeacherOutput.hiddens`` (set by :meth:`forward`)
    _hidden_request: tuple[int, ...] = ()

    @abstractmethod
    def posteriors(self, wavs: torch.Tensor, wav_lens: torch.Tensor) -> TeacherOutput:
        """Log-posteriors for ``wavs [B, S]`` with relative lengths ``wav_lens [B]``."""

    def posteriors_from_features(self, feats: torch.Tensor, wav_lens: torch.Tensor) -> TeacherOutput:
        """Log-posteriors from precomputed fbank ``feats [B, T, n_mels]`` (only if ``feature_signature``)."""
        raise NotImplementedError(f"teacher {self.name} cannot start from precomputed features")

    def layer_roots(self) -> dict[str, torch.nn.Module]:
        """The modules the encoder's layer list is looked for in (a ``layer_path`` starts at one of the keys).

        Raises :class:`TeacherError` (one line) for a teacher without such layers (the default).
        """
        raise TeacherError(f"teacher {self.name}: layer distillation (kd_layers) is not supported for this teacher")

    def default_layer_path(self) -> str | None:
        """The layer list's path when ``layer_path`` is unset; ``None`` (the default): found by its shape."""
        return None

    def layer_stack(self) -> list[torch.nn.Module]:
        """The encoder's layers, 0-based as ``kd_layers`` counts them (found once per ``layer_path``).

        Hidden states are these layers' outputs, taken by forward hooks
        (:class:`~speech_kd.nnet.layers.LayerTaps`) in the pass that gives the posteriors: the
        ``k``-th layer's output whatever else the model does after its layers (a final LayerNorm).
        """
        if getattr(self, "_stack_key", None) != (self.layer_path,):
            try:
                name, stack = find_layer_stack(
                    self.layer_roots(), self.layer_path or self.default_layer_path(), f"teacher {self.name}"
                )
            except LayerStackError as err:
                raise TeacherError(str(err)) from None
            if getattr(self, "_taps", None) is not None:
                self._taps.remove()
            self._stack_key, self._stack, self._taps, self.layer_stack_name = (self.layer_path,), stack, None, name
        return self._stack

    def layer_count(self) -> int:
        """Number of encoder layers :meth:`forward` can return hidden states of (``hidden_layers``).

        Raises :class:`TeacherError` (one line) for a teacher without such layers.
        """
        return len(self.layer_stack())

    def _arm_taps(self) -> None:
        """Before a forward pass: hooks on the asked-for layers (:attr:`_hidden_request`), switched on."""
        stack = self.layer_stack()
        if self._taps is None or self._tapped != self._hidden_request:
            if self._taps is not None:
                self._taps.remove()
            self._taps, self._tapped = LayerTaps(stack, self._hidden_request), self._hidden_request
        self._taps.take()
        self._taps.active = True

    def _taken(self) -> dict[int, torch.Tensor]:
        """After a forward pass: the asked-for layers' outputs ``[B, T, D]`` as float32 (hooks off)."""
        self._taps.active = False
        return {layer: hidden.float() for layer, hidden in self._taps.take().items()}

    def check_hidden_layers(self, layers: Iterable[int]) -> None:
        """Refuse, naming the teacher, the index and its depth, a layer past :meth:`layer_count`."""
        depth = self.layer_count()
        for layer in layers:
            if not 0 <= int(layer) < depth:
                raise TeacherError(
                    f"kd_layers: teacher layer {layer} is past the depth of teacher {self.name} "
                    f"({depth} layers, 0..{depth - 1})"
                )

    def forward(
        self, wavs: torch.Tensor, wav_lens: torch.Tensor, features=None, hidden_layers: Iterable[int] = ()
    ) -> TeacherOutput:
        """Run :meth:`posteriors` in eval mode without gradients; check the output.

        ``features`` (a ``speech_kd.nnet.features.SharedFeatures``) is the
        student's fbank of the same batch: when it was computed with exactly
        the teacher's fbank settings, the teacher starts from it instead of
        recomputing the spectrum. ``hidden_layers``: encoder layers (0-based)
        whose outputs the same forward pass also returns (``TeacherOutput.hiddens``), taken
        by forward hooks on :meth:`layer_stack`.
        """
        self.eval()
        self._hidden_request = tuple(sorted({int(layer) for layer in hidden_layers}))
        if self._hidden_request:
            self.check_hidden_layers(self._hidden_request)
            self._arm_taps()
        try:
            with torch.no_grad():
                if features is not None and features.usable_by(self.feature_signature):
                    out = self.posteriors_from_features(features.feats, features.wav_lens)
                else:
                    out = self.posteriors(wavs, wav_lens)
            if self._hidden_request and out.hiddens is None:
                out = TeacherOutput(out.log_probs, out.lengths, self._taken())
        finally:
            if self._hidden_request:
                self._taps.active = False
            self._hidden_request = ()
        if out.log_probs.dim() != 3 or out.log_probs.shape[-1] != len(self.tokens):
            raise TeacherError(
                f"teacher {self.name}: output shape {tuple(out.log_probs.shape)} does not match its "
                f"{len(self.tokens)} tokens"
            )
        if not torch.isfinite(out.log_probs).all():
            raise TeacherError(
                f"teacher {self.name}: non-finite posteriors (NaN/inf) for this batch. A teacher run at "
                "teacher_precision=fp16 can overflow (use fp32 or bf16); otherwise check its weights and the audio"
            )
        if hidden_layers:
            check_hiddens(self.name, out, sorted({int(layer) for layer in hidden_layers}))
        return out

    def train(self, mode: bool = True):
        """Teachers stay in eval mode whatever the caller asks."""
        return super().train(False)

    def fingerprint(self) -> str:
        """Hash of the weights, tokens and frame shift (identifies the teacher)."""
        digest = hashlib.sha256()
        digest.update(repr((self.tokens, self.blank_index, round(self.frame_shift, 6))).encode())
        for name, tensor in sorted(self.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]


def check_hiddens(name: str, out: TeacherOutput, layers: list[int]) -> None:
    """Each asked-for layer is in ``out.hiddens`` as ``[B, T, D]`` at the posteriors' frames, else a TeacherError."""
    hiddens = out.hiddens or {}
    missing = [layer for layer in layers if layer not in hiddens]
    if missing:
        raise TeacherError(f"teacher {name}: no hidden state from layer(s) {missing} (skipped by LayerDrop?)")
    for layer in layers:
        shape = tuple(hiddens[layer].shape)
        if len(shape) != 3 or shape[:2] != tuple(out.log_probs.shape[:2]):
            raise TeacherError(
                f"teacher {name}: layer {layer} gives shape {shape}, the posteriors {tuple(out.log_probs.shape)}: "
                "only layers at the output frame rate ([B, T, D], same B and T) can be distilled"
            )


TEACHER_KINDS: dict[str, Callable[..., Teacher]] = {}


def register_teacher(kind: str):
    """Class decorator: make an adapter loadable as ``load_teacher(..., kind=kind)``."""

    def wrap(cls):
        TEACHER_KINDS[kind] = cls
        return cls

    return wrap


def detect_kind(source: str | os.PathLike) -> str:
    """Guess the adapter for a local folder from the files it holds."""
    path = Path(source)
    if not path.exists():
        raise TeacherError(f"teacher folder {source} does not exist")
    if (path / "hyperparams.yaml").exists():
        return "speechbrain"
    if (path / "config.json").exists():
        return "huggingface"
    if (path / "deploy.json").is_file():  # written by speech-kd export (the name is deploy.runtime.CONFIG_NAME)
        raise TeacherError(
            f"{source}: an exported folder (speech-kd export: ONNX/TorchScript), which only transcribe.py and "
            "speech-kd evaluate --asr FOLDER (alone) run; as a teacher or an ensemble member give the model folder "
            "it was exported from (RUN/model)"
        )
    raise TeacherError(
        f"{source}: not a teacher folder: it holds neither hyperparams.yaml (a SpeechBrain model folder, e.g. "
        "RUN/model of speech-kd train) nor config.json (a Hugging Face CTC model); give such a folder"
    )


def load_teacher(source: str | os.PathLike, kind: str = "auto", device: str = "cpu", **kwargs) -> Teacher:
    """Build a teacher from a local folder.

    Parameters
    ----------
    source : path-like
        A SpeechBrain ``EncoderASR`` folder or a Hugging Face ``...ForCTC`` folder.
    kind : str
        ``auto`` (detect from the folder), ``speechbrain`` or ``huggingface``.
    device : str
        Where the teacher runs (the student's device).
    """
    if kind == "auto":
        kind = detect_kind(source)
    # adapters register themselves on import
    importlib.import_module(
        {"speechbrain": "speech_kd.targets.teachers.sb", "huggingface": "speech_kd.targets.teachers.hf"}.get(
            kind, "speech_kd.targets.teachers.sb"
        )
    )
    if kind not in TEACHER_KINDS:
        raise TeacherError(f"unknown teacher kind {kind!r}; known: {sorted(TEACHER_KINDS)}")
    teacher = TEACHER_KINDS[kind](source, device=device, **kwargs)
    teacher.requires_grad_(False)
    return teacher.eval()


def measure_frame_shift(
    run: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], sample_rate: int, device: str = "cpu"
) -> float:
    """Seconds per output frame of ``run(wavs, wav_lens) -> [B, T, ...]``.

    Runs 2 s and 4 s of low noise and divides the extra duration by the extra
    frames, so fixed edge effects (convolution padding) cancel out.
    """
    gen = torch.Generator().manual_seed(0)
    frames = []
    for seconds in (2, 4):
        wav = 0.01 * torch.randn(1, seconds * sample_rate, generator=gen)
        with torch.no_grad():
            out = run(wav.to(device), torch.ones(1, device=device))
        frames.append(out.shape[1])
    if frames[1] <= frames[0]:
        raise TeacherError("model output does not grow with the input length: not a frame-level CTC model")
    return 2.0 / (frames[1] - frames[0])
