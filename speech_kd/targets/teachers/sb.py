"""Teachers from SpeechBrain ``EncoderASR`` folders (ours, or SpeechBrain's hub models saved locally)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from speechbrain.nnet.containers import LengthsCapableSequential

from speech_kd.data.dataio import token_strings
from speech_kd.nnet.features import fast_fbank, fast_fbank_applies, fbank_signature
from speech_kd.targets.teachers.base import Teacher, TeacherError, TeacherOutput, measure_frame_shift, register_teacher

__all__ = ["SpeechBrainTeacher", "sb_blank_index"]


def sb_blank_index(asr, tokens: list[str]) -> int:
    """The CTC blank of a loaded ``EncoderASR``: from its decoding function, its hparams, or the ``<blank>`` label."""
    decoding = getattr(asr.hparams, "decoding_function", None)
    keywords = getattr(decoding, "keywords", {}) or {}
    for key in ("blank_id", "blank_index"):
        if key in keywords:
            return int(keywords[key])
    for key in ("blank_index", "blank_id"):
        if hasattr(asr.hparams, key):
            return int(getattr(asr.hparams, key))
    if "<blank>" in tokens:
        return tokens.index("<blank>")
    raise TeacherError("cannot tell the CTC blank index of this SpeechBrain model")


@register_teacher("speechbrain")
class SpeechBrainTeacher(Teacher):
    """A SpeechBrain ``EncoderASR`` folder whose ``encode_batch`` returns frame log-probs.

    Loaded with network access disabled. The frame shift is measured by
    running the encoder on two probe lengths (see ``measure_frame_shift``).
    ``overrides`` replace keys of the folder's ``hyperparams.yaml`` when it is
    loaded, e.g. ``{"wav2vec2_hub": "teachers/wav2vec2-large-960h-lv60-self"}``
    for a model whose yaml names a Hugging Face hub id it would download.

    Hidden states (``hidden_layers``, layer distillation) are taken by forward hooks on the
    encoder's layer list in ``mods`` (``layer_path``, or found: :func:`~speech_kd.nnet.layers.find_layer_stack`)
    in the same pass that gives the posteriors (:meth:`Teacher.layer_stack`).
    """

    def __init__(
        self,
        source: str | os.PathLike,
        device: str = "cpu",
        savedir: str | None = None,
        overrides: dict | None = None,
    ) -> None:
        super().__init__()
        from speechbrain.inference.ASR import EncoderASR
        from speechbrain.utils.fetching import FetchConfig

        source = Path(source)
        if not (source / "hyperparams.yaml").exists():
            raise TeacherError(f"{source}: no hyperparams.yaml, not a SpeechBrain model folder")
        savedir = savedir or tempfile.mkdtemp(prefix="speechkd_teacher_")
        try:
            asr = EncoderASR.from_hparams(
                source=str(source.resolve()),
                savedir=savedir,
                run_opts={"device": device},
                fetch_config=FetchConfig(allow_network=False),
                overrides=dict(overrides or {}),
            )
        except Exception as err:
            raise TeacherError(f"{source}: cannot load as a SpeechBrain EncoderASR ({err})") from err
        self.asr = asr
        self.asr.mods.eval()
        self.name = f"speechbrain:{source.name}"
        self.sample_rate = int(getattr(asr.hparams, "sample_rate", 16000))
        self.tokens = token_strings(asr.tokenizer)
        self.blank_index = sb_blank_index(asr, self.tokens)
        self.device_name = device
        probe = self.asr.encode_batch(torch.zeros(1, self.sample_rate), torch.ones(1))
        if probe.dim() != 3 or probe.shape[-1] != len(self.tokens):
            raise TeacherError(
                f"{source}: encode_batch returns shape {tuple(probe.shape)}, not frame posteriors over "
                f"{len(self.tokens)} tokens: not a CTC model"
            )
        self.frame_shift = measure_frame_shift(self.asr.encode_batch, self.sample_rate, device)
        self._outputs_log_probs = bool(torch.allclose(probe.exp().sum(-1), torch.ones(1), atol=1e-3))
        self._after_features = self._layers_after_fbank()
        if self._after_features is not None:
            self._fbank = next(iter(self.asr.mods.encoder.values()))
            self.feature_signature = fbank_signature(self._fbank)

    def _layers_after_fbank(self) -> list | None:
        """The encoder's layers after a leading ``Fbank``, with their lengths-argument names, or ``None``."""
        encoder = getattr(self.asr.mods, "encoder", None)
        if not isinstance(encoder, LengthsCapableSequential) or len(encoder) < 2:
            return None
        layers = list(zip(encoder.values(), encoder.lengths_arg_names))
        if fbank_signature(layers[0][0]) is None:
            return None
        return layers[1:]

    def state_dict(self, *args, **kwargs):
        """Weights of the underlying encoder (used for the fingerprint)."""
        return self.asr.mods.state_dict(*args, **kwargs)

    def layer_roots(self) -> dict[str, torch.nn.Module]:
        """The model's ``mods``: ``kd_teacher_layers`` starts at one of them (e.g. ``encoder.wav2vec2.model...``)."""
        return dict(self.asr.mods.items())

    def posteriors(self, wavs: torch.Tensor, wav_lens: torch.Tensor) -> TeacherOutput:
        """Frame log-posteriors ``[B, T, V]`` and valid frame counts ``[B]``.

        With a leading plain ``Fbank`` the spectrum is computed by
        :func:`~speech_kd.nnet.features.fast_fbank` (same output), then the rest of the encoder.
        """
        if self._after_features is not None and wavs.dim() == 2 and fast_fbank_applies(self._fbank):
            feats = fast_fbank(self._fbank, wavs.to(self.asr.device))  # fast_fbank casts to fp32 itself
            return self.posteriors_from_features(feats, wav_lens)
        return self._finish(self.asr.encode_batch(wavs, wav_lens).float(), wav_lens)

    def posteriors_from_features(self, feats: torch.Tensor, wav_lens: torch.Tensor) -> TeacherOutput:
        """The encoder after its fbank, applied to the student's fbank ``feats [B, T, n_mels]``."""
        x = feats.to(self.asr.device)
        wav_lens = wav_lens.to(self.asr.device)
        for layer, lengths_arg in self._after_features:
            x = layer(x, **{lengths_arg: wav_lens}) if lengths_arg else layer(x)
            if isinstance(x, tuple):
                x = x[0]
        return self._finish(x.float(), wav_lens)

    def _finish(self, out: torch.Tensor, wav_lens: torch.Tensor) -> TeacherOutput:
        if not self._outputs_log_probs:
            out = out.log_softmax(-1)
        lengths = torch.round(wav_lens.to(out.device) * out.shape[1]).long().clamp(1, out.shape[1])
        return TeacherOutput(out, lengths)
