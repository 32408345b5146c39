"""Teachers of the sizes users have, built from their published configurations with random weights.

Speed and memory do not depend on the weights, so ``speech-kd bench
--teacher_arch NAME`` times a student against a teacher of a real size
without downloading anything. Each entry copies the architecture fields of a
published configuration (cited in ``source``); the CTC vocabulary is
wav2vec2's 32 characters for the Hugging Face models.

- ``synth`` (3.1 M parameters): ``hparams/teacher.yaml``, the shipped teacher's shape;
- ``wav2vec2-base`` (94 M): facebook/wav2vec2-base-960h ``config.json``;
- ``wav2vec2-large`` (315 M): facebook/wav2vec2-large-960h-lv60-self ``config.json``;
- ``wavlm-large`` (315 M): microsoft/wavlm-large ``config.json`` with a CTC head;
- ``sb-conformer-large``: SpeechBrain's LibriSpeech conformer encoder size (d_model 512, 8 heads,
  12 layers, d_ffn 2048) in ``hparams/teacher.yaml``'s conformer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from speech_kd.testing import WAV2VEC2_VOCAB

__all__ = ["TEACHER_ARCHS", "TeacherArch", "UnknownTeacherArch", "build_teacher", "teacher_arch"]


class UnknownTeacherArch(ValueError):
    """A ``--teacher_arch`` name that is not in :data:`TEACHER_ARCHS` (the message lists them)."""


@dataclass(frozen=True)
class TeacherArch:
    """One published teacher architecture.

    Attributes
    ----------
    name : str
        The ``--teacher_arch`` name.
    kind : str
        ``speechbrain`` (this package's conformer yaml with ``overrides``) or a Hugging Face model class
        (``wav2vec2``, ``wavlm``).
    config : dict
        The architecture fields of the published configuration (Hugging Face) or yaml overrides.
    source : str
        Where the configuration is published.
    """

    name: str
    kind: str
    config: dict = field(default_factory=dict)
    source: str = ""


_W2V2_CONV = {
    "conv_dim": (512,) * 7,
    "conv_stride": (5, 2, 2, 2, 2, 2, 2),
    "conv_kernel": (10, 3, 3, 3, 3, 2, 2),
    "num_conv_pos_embeddings": 128,
    "num_conv_pos_embedding_groups": 16,
}
_LARGE = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096}

TEACHER_ARCHS: dict[str, TeacherArch] = {
    arch.name: arch
    for arch in (
        TeacherArch("synth", "speechbrain", {}, "hparams/teacher.yaml"),
        TeacherArch(
            "wav2vec2-base",
            "wav2vec2",
            {
                **_W2V2_CONV,
                "hidden_size": 768,
                "num_hidden_layers": 12,
                "num_attention_heads": 12,
                "intermediate_size": 3072,
                "feat_extract_norm": "group",
                "do_stable_layer_norm": False,
                "conv_bias": False,
            },
            "facebook/wav2vec2-base-960h config.json",
        ),
        TeacherArch(
            "wav2vec2-large",
            "wav2vec2",
            {**_W2V2_CONV, **_LARGE, "feat_extract_norm": "layer", "do_stable_layer_norm": True, "conv_bias": True},
            "facebook/wav2vec2-large-960h-lv60-self config.json",
        ),
        TeacherArch(
            "wavlm-large",
            "wavlm",
            {
                **_W2V2_CONV,
                **_LARGE,
                "feat_extract_norm": "layer",
                "do_stable_layer_norm": True,
                "conv_bias": False,
                "num_buckets": 320,
                "max_bucket_distance": 800,
            },
            "microsoft/wavlm-large config.json",
        ),
        TeacherArch(
            "sb-conformer-large",
            "speechbrain",
            {"d_model": 512, "nhead": 8, "num_encoder_layers": 12, "d_ffn": 2048, "cnn_channels_1": 64},
            "speechbrain/asr-conformer-transformerlm-librispeech hyperparams.yaml (encoder)",
        ),
    )
}


def teacher_arch(name: str) -> TeacherArch:
    """The architecture called ``name``; an unknown name is a one-line error listing those that exist.

    Examples
    --------
    >>> teacher_arch("wav2vec2-base").kind
    'wav2vec2'
    >>> try:
    ...     teacher_arch("whisper")
    ... except UnknownTeacherArch as err:
    ...     print(err)
    --teacher_arch whisper: not known; one of synth, wav2vec2-base, wav2vec2-large, wavlm-large, sb-conformer-large
    """
    if name not in TEACHER_ARCHS:
        raise UnknownTeacherArch(f"--teacher_arch {name}: not known; one of {', '.join(TEACHER_ARCHS)}")
    return TEACHER_ARCHS[name]


def build_hf_teacher(arch: TeacherArch, folder: Path, seed: int = 0) -> Path:
    """Save a randomly initialised Hugging Face CTC model of ``arch`` with its processor in ``folder``."""
    from transformers import (
        Wav2Vec2Config,
        Wav2Vec2CTCTokenizer,
        Wav2Vec2FeatureExtractor,
        Wav2Vec2ForCTC,
        Wav2Vec2Processor,
        WavLMConfig,
        WavLMForCTC,
    )

    folder.mkdir(parents=True, exist_ok=True)
    vocab = WAV2VEC2_VOCAB
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    torch.manual_seed(seed)
    config_class, model_class = (WavLMConfig, WavLMForCTC) if arch.kind == "wavlm" else (Wav2Vec2Config, Wav2Vec2ForCTC)
    config = config_class(vocab_size=len(vocab), pad_token_id=vocab.index("<pad>"), **arch.config)
    model_class(config).save_pretrained(folder)
    tokenizer = Wav2Vec2CTCTokenizer(
        str(folder / "vocab.json"), unk_token="<unk>", pad_token="<pad>", word_delimiter_token="|"
    )
    extractor = Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True, return_attention_mask=True
    )
    Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def build_teacher(name: str, folder: Path, export_speechbrain) -> Path:
    """A teacher folder of architecture ``name`` with random weights.

    ``export_speechbrain(yaml, out, overrides) -> model folder`` builds this
    package's conformer (the caller's, so the student and the teacher are made
    the same way).
    """
    arch = teacher_arch(name)
    if arch.kind == "speechbrain":
        return Path(export_speechbrain("hparams/teacher.yaml", folder, arch.config))
    return build_hf_teacher(arch, folder / "model")
