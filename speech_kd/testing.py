"""Helpers for tests and examples: tiny randomly initialised teachers saved to folders.

Nothing here downloads anything: the models are built from configs and
random weights, then saved exactly as real pretrained folders are laid out.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from speech_kd import hparams_files
from speech_kd.data.dataio import make_tokenizer
from speech_kd.model_folder import export_model_folder

__all__ = ["WAV2VEC2_VOCAB", "make_tiny_hf_ctc", "make_tiny_sb_model", "make_tiny_sb_wav2vec2", "whitenoise"]

#: the vocabulary layout of facebook/wav2vec2-base-960h (ids 0..31)
WAV2VEC2_VOCAB = ["<pad>", "<s>", "</s>", "<unk>", "|", *"ETAONIHSRDLUMWCFGYPBVK'XJQZ"]


def whitenoise(seconds: float, sample_rate: int = 16000, seed: int = 0) -> torch.Tensor:
    """Seeded white noise ``[samples]`` at amplitude 0.1."""
    gen = torch.Generator().manual_seed(seed)
    return 0.1 * torch.randn(int(seconds * sample_rate), generator=gen)


def make_tiny_hf_ctc(
    folder: str | os.PathLike, vocab: list[str] | None = None, seed: int = 0, stable_layer_norm: bool = False
) -> str:
    """Save a tiny random ``Wav2Vec2ForCTC`` + processor to ``folder`` (20 ms frames, wav2vec2 vocabulary).

    ``stable_layer_norm``: the pre-LN encoder of wav2vec2-large-lv60 (``do_stable_layer_norm``: a
    LayerNorm after the last layer), rather than wav2vec2-base's post-LN one.
    """
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
        do_stable_layer_norm=stable_layer_norm,
        feat_extract_norm="layer" if stable_layer_norm else "group",
    )
    Wav2Vec2ForCTC(config).save_pretrained(folder)
    tokenizer = Wav2Vec2CTCTokenizer(
        str(folder / "vocab.json"), unk_token="<unk>", pad_token="<pad>", word_delimiter_token="|"
    )
    extractor = Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True, return_attention_mask=False
    )
    Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(folder)
    return str(folder)


def make_tiny_sb_model(folder: str | os.PathLike, seed: int = 0, num_encoder_layers: int = 1) -> str:
    """Export a tiny random model of ``hparams/teacher.yaml``'s architecture as an EncoderASR folder."""
    from hyperpyyaml import load_hyperpyyaml

    text = hparams_files.path("teacher.yaml").read_text()
    torch.manual_seed(seed)
    overrides = {
        "data_folder": "unused",
        "output_folder": str(Path(folder).parent / "tiny_sb_run"),
        "d_model": 32,
        "d_ffn": 64,
        "num_encoder_layers": num_encoder_layers,
        "seed": seed,
    }
    hparams = load_hyperpyyaml(text, overrides)
    hparams["normalize"].train()
    hparams["normalize"](torch.randn(2, 50, 80), torch.ones(2))
    export_model_folder(hparams, text, make_tokenizer(hparams["alphabet"]), folder)
    return str(folder)


#: the layout of SpeechBrain's ``speechbrain/asr-wav2vec2-librispeech`` hyperparams.yaml (a Hugging Face
#: wav2vec2 encoder named by hub id, a DNN, a CTC layer over 31 outputs, a ``CTCTextEncoder`` of characters
#: with ``<blank>``, ``<bos>``, ``<eos>`` at 0, 1, 2), at toy size: ``dnn_neurons`` and the DNN's input
#: size (1024 in the real file) shrunk to the tiny wav2vec2's 32
_SB_WAV2VEC2_YAML = """# Stand-in for speechbrain/asr-wav2vec2-librispeech, random weights (speech_kd.testing)
sample_rate: 16000
wav2vec2_hub: {hub}

# Model parameters
dnn_layers: 2
dnn_neurons: 32

# Outputs
output_neurons: 31  # <blank>, <bos>, <eos> + 28 characters

# Decoding parameters
blank_index: 0
bos_index: 1
eos_index: 2

enc: !new:speechbrain.lobes.models.VanillaNN.VanillaNN
    input_shape: [null, null, 32]
    activation: !name:torch.nn.LeakyReLU
    dnn_blocks: !ref <dnn_layers>
    dnn_neurons: !ref <dnn_neurons>

wav2vec2: !new:speechbrain.lobes.models.huggingface_transformers.Wav2Vec2
    source: !ref <wav2vec2_hub>
    output_norm: True
    freeze: True
    save_path: model_checkpoints

ctc_lin: !new:speechbrain.nnet.linear.Linear
    input_size: !ref <dnn_neurons>
    n_neurons: !ref <output_neurons>

log_softmax: !new:speechbrain.nnet.activations.Softmax
    apply_log: True

asr_model: !new:torch.nn.ModuleList
    - [!ref <enc>, !ref <ctc_lin>]

tokenizer: !new:speechbrain.dataio.encoder.CTCTextEncoder

encoder: !new:speechbrain.nnet.containers.LengthsCapableSequential
    wav2vec2: !ref <wav2vec2>
    enc: !ref <enc>
    ctc_lin: !ref <ctc_lin>
    log_softmax: !ref <log_softmax>

decoding_function: !name:speechbrain.decoders.ctc_greedy_decode
    blank_id: !ref <blank_index>

modules:
    encoder: !ref <encoder>

pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer
    loadables:
        wav2vec2: !ref <wav2vec2>
        asr: !ref <asr_model>
        tokenizer: !ref <tokenizer>
"""


def make_tiny_sb_wav2vec2(folder: str | os.PathLike, seed: int = 0) -> tuple[str, str]:
    """Save a toy stand-in for ``speechbrain/asr-wav2vec2-librispeech`` (random weights).

    Same layout as that model's folder: ``hyperparams.yaml`` whose wav2vec2
    encoder is built from a Hugging Face id (``wav2vec2_hub``) and then
    loaded from ``wav2vec2.ckpt``, ``asr.ckpt`` (DNN + CTC layer over 31
    outputs) and a ``CTCTextEncoder`` in ``tokenizer.ckpt``, made as
    SpeechBrain's recipe makes it (``load_or_create`` with special labels):
    ``<blank>`` 0 (the CTC blank), ``<bos>`` 1, ``<eos>`` 2 and 28 characters
    (upper-case letters, ``'`` and a literal space) in order of first
    appearance, the three that first held ids 0-2 moved to the end. As with
    the real folder used offline, the hub id must be overridden by a local
    folder when loading: ``load_teacher(folder, overrides={"wav2vec2_hub": hub})``.

    Returns
    -------
    (folder, hub) : tuple of str
        The model folder and the local Hugging Face folder that stands in for
        the hub id.
    """
    from hyperpyyaml import load_hyperpyyaml
    from speechbrain.dataio.encoder import CTCTextEncoder

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hub = make_tiny_hf_ctc(folder.parent / (folder.name + "_hf_encoder"), seed=seed)
    tokenizer = CTCTextEncoder()
    tokenizer.load_or_create(
        folder / "tokenizer.ckpt",
        from_iterables=[["THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG'S BACK"]],
        sequence_input=True,
        special_labels={"blank_label": 0, "bos_label": 1, "eos_label": 2},
    )
    torch.manual_seed(seed)
    hparams = load_hyperpyyaml(_SB_WAV2VEC2_YAML.format(hub=hub))  # a local source: nothing is written to save_path
    if len(tokenizer) != hparams["output_neurons"]:
        raise RuntimeError(f"{len(tokenizer)} tokens for {hparams['output_neurons']} outputs")
    torch.save(hparams["wav2vec2"].state_dict(), folder / "wav2vec2.ckpt")
    torch.save(hparams["asr_model"].state_dict(), folder / "asr.ckpt")
    (folder / "hyperparams.yaml").write_text(_SB_WAV2VEC2_YAML.format(hub="facebook/wav2vec2-large-960h-lv60-self"))
    return str(folder), hub
