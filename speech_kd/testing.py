"""Helpers for tests and examples: tiny randomly initialised teachers saved to folders.

Nothing here downloads anything: the models are built from configs and
random weights, then saved exactly as real pretrained folders are laid out.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

__all__ = ["WAV2VEC2_VOCAB", "make_tiny_hf_ctc", "make_tiny_sb_model", "whitenoise"]

#: the vocabulary layout of facebook/wav2vec2-base-960h (ids 0..31)
WAV2VEC2_VOCAB = ["<pad>", "<s>", "</s>", "<unk>", "|", *"ETAONIHSRDLUMWCFGYPBVK'XJQZ"]


def whitenoise(seconds: float, sample_rate: int = 16000, seed: int = 0) -> torch.Tensor:
    """Seeded white noise ``[samples]`` at amplitude 0.1."""
    gen = torch.Generator().manual_seed(seed)
    return 0.1 * torch.randn(int(seconds * sample_rate), generator=gen)


def make_tiny_hf_ctc(folder: str | os.PathLike, vocab: list[str] | None = None, seed: int = 0) -> str:
    """Save a tiny random ``Wav2Vec2ForCTC`` + processor to ``folder`` (20 ms frames, wav2vec2 vocabulary)."""
    from transformers import (
        Wav2Vec2Config,
        Wav2Vec2CTCTokenizer,
        Wav2Vec2FeatureExtractor,
        Wav2Vec2ForCTC,
        Wav2Vec2Processor,
    )

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = vocab or WAV2VEC2_VOCAB
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    torch.manual_seed(seed)
    config = Wav2Vec2Config(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(16, 16, 16, 16, 16, 16, 16),
        conv_stride=(5, 2, 2, 2, 2, 2, 2),
        conv_kernel=(10, 3, 3, 3, 3, 2, 2),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        pad_token_id=vocab.index("<pad>"),
        ctc_loss_reduction="mean",
    )
    Wav2Vec2ForCTC(config).save_pretrained(folder)
    tokenizer = Wav2Vec2CTCTokenizer(str(folder / "vocab.json"), unk_token="<unk>", pad_token="<pad>",
                                     word_delimiter_token="|")  # fmt: skip
    extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0,
                                         do_normalize=True, return_attention_mask=False)  # fmt: skip
    Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(folder)
    return str(folder)


def make_tiny_sb_model(folder: str | os.PathLike, seed: int = 0) -> str:
    """Export a tiny random model of ``hparams/teacher.yaml``'s architecture as an EncoderASR folder."""
    from hyperpyyaml import load_hyperpyyaml

    from speech_kd.dataio import make_tokenizer
    from speech_kd.export import export_model_folder

    repo = Path(__file__).resolve().parent.parent
    text = (repo / "hparams/teacher.yaml").read_text()
    torch.manual_seed(seed)
    overrides = {"data_folder": "unused", "output_folder": str(Path(folder).parent / "tiny_sb_run"),
                 "d_model": 32, "d_ffn": 64, "num_encoder_layers": 1, "seed": seed}  # fmt: skip
    hparams = load_hyperpyyaml(text, overrides)
    hparams["normalize"].train()
    hparams["normalize"](torch.randn(2, 50, 80), torch.ones(2))
    export_model_folder(hparams, text, make_tokenizer(hparams["alphabet"]), folder)
    return str(folder)
