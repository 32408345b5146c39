"""Teachers from Hugging Face ``...ForCTC`` folders (wav2vec2, HuBERT, WavLM), loaded offline.

``transformers`` is an optional dependency (``pip install speech_kd[hf]``);
this module imports without it and only raises when such a teacher is built.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from speech_kd.targets.teachers.base import Teacher, TeacherError, TeacherOutput, measure_frame_shift, register_teacher

__all__ = ["HFCTCTeacher"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _require_transformers():
    try:
        import transformers
    except ImportError as err:
        raise ImportError("Hugging Face teachers need the transformers package: pip install 'speech_kd[hf]'") from err
    return transformers


@register_teacher("huggingface")
class HFCTCTeacher(Teacher):
    """A local ``AutoModelForCTC`` folder plus its feature extractor and tokenizer.

    The CTC blank is ``config.pad_token_id`` (wav2vec2 convention). Input
    normalisation follows the feature extractor (zero mean, unit variance per
    utterance over its valid samples when ``do_normalize``), batched on the
    teacher's device. ``dtype`` selects bf16/fp16 inference on CUDA; the
    returned log-probs are always float32.

    Hidden states (``hidden_layers``, layer distillation) are taken in the same forward pass by
    forward hooks on the encoder's layers, ``<base>.encoder.layers`` (``wav2vec2``, ``hubert``,
    ``wavlm``; ``layer_path`` names another list): layer ``k`` (0-based) is the ``k``-th encoder
    layer's output, under any ``transformers`` version. ``output_hidden_states`` is not used: its
    last entry of a model with a final encoder LayerNorm (``do_stable_layer_norm``, e.g.
    wav2vec2-large-lv60) is taken after that norm by transformers 4.x and before it by 5.x, and it
    would hold every layer of the batch at once.
    """

    def __init__(self, source: str | os.PathLike, device: str = "cpu", dtype: str = "float32") -> None:
        super().__init__()
        transformers = _require_transformers()
        source = Path(source)
        if not (source / "config.json").exists():
            raise TeacherError(f"{source}: no config.json, not a Hugging Face model folder")
        config = json.loads((source / "config.json").read_text())
        if not any(arch.endswith("ForCTC") for arch in config.get("architectures") or []):
            raise TeacherError(
                f"{source}: architectures {config.get('architectures')} has no ...ForCTC model: not a CTC teacher"
            )
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            self.model = transformers.AutoModelForCTC.from_pretrained(
                str(source), local_files_only=True, torch_dtype=_DTYPES[dtype]
            )
            extractor = transformers.AutoFeatureExtractor.from_pretrained(str(source), local_files_only=True)
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(source), local_files_only=True)
        except (OSError, ValueError) as err:
            raise TeacherError(f"{source}: cannot load as a Hugging Face CTC model ({err})") from err
        self.model.to(device).eval()
        self.dtype = _DTYPES[dtype]
        self.name = f"huggingface:{source.name}"
        self.sample_rate = int(getattr(extractor, "sampling_rate", 16000))
        self.do_normalize = bool(getattr(extractor, "do_normalize", True))
        self.use_attention_mask = bool(getattr(extractor, "return_attention_mask", False))
        vocab_size = int(self.model.config.vocab_size)
        self.tokens = [str(t) for t in tokenizer.convert_ids_to_tokens(list(range(vocab_size)))]
        blank = self.model.config.pad_token_id
        if blank is None:
            raise TeacherError(f"{source}: config has no pad_token_id, cannot tell the CTC blank")
        self.blank_index = int(blank)
        self.frame_shift = measure_frame_shift(
            lambda w, lens: self.posteriors(w, lens).log_probs, self.sample_rate, device
        )

    def state_dict(self, *args, **kwargs):
        """Weights of the wrapped model (used for the fingerprint)."""
        return self.model.state_dict(*args, **kwargs)

    def layer_roots(self) -> dict[str, torch.nn.Module]:
        """The model's children: ``kd_teacher_layers`` starts at one of them (``wav2vec2.encoder.layers``)."""
        return dict(self.model.named_children())

    def default_layer_path(self) -> str | None:
        """``<base>.encoder.layers`` (``base_model_prefix``: ``wav2vec2``, ``hubert``, ``wavlm``) when it exists."""
        prefix = getattr(self.model, "base_model_prefix", "")
        encoder = getattr(getattr(self.model, prefix, None), "encoder", None)
        return f"{prefix}.encoder.layers" if isinstance(getattr(encoder, "layers", None), torch.nn.ModuleList) else None

    def posteriors(self, wavs: torch.Tensor, wav_lens: torch.Tensor) -> TeacherOutput:
        """Frame log-posteriors ``[B, T, V]`` and valid frame counts ``[B]`` for ``wavs [B, S]``."""
        device = next(self.model.parameters()).device
        wavs = wavs.to(device, torch.float32)
        samples = torch.round(wav_lens.to(device) * wavs.shape[1]).long().clamp(1, wavs.shape[1])
        valid = torch.arange(wavs.shape[1], device=device).unsqueeze(0) < samples.unsqueeze(1)
        if self.do_normalize:
            n = samples.unsqueeze(1).to(torch.float32)
            mean = (wavs * valid).sum(1, keepdim=True) / n
            var = (((wavs - mean) * valid) ** 2).sum(1, keepdim=True) / n
            wavs = (wavs - mean) / torch.sqrt(var + 1e-7) * valid
        # masking padded frames out of self-attention (group-norm models still see the zeros in their
        # first conv layer, so they are padding-invariant only approximately; batches are length-sorted)
        with torch.no_grad():  # asked-for layers are kept by the hooks of Teacher.forward
            output = self.model(wavs.to(self.dtype), attention_mask=valid.long())
        logits = output.logits.float()
        if hasattr(self.model, "_get_feat_extract_output_lengths"):
            lengths = self.model._get_feat_extract_output_lengths(samples).long()
        else:
            lengths = torch.round(wav_lens.to(device) * logits.shape[1]).long()
        return TeacherOutput(logits.log_softmax(-1), lengths.clamp(1, logits.shape[1]))
