"""Write a trained model as a folder SpeechBrain's ``EncoderASR`` loads offline.

Folder contents::

    hyperparams.yaml   the training yaml's ``# >>> model`` block, the keys it
                       references (with their trained values), an
                       ``encoder`` (LengthsCapableSequential over
                       ``encoder_chain``), tokenizer, greedy decoding, Pretrainer
    model.ckpt         state dict of the yaml's ``model`` ModuleList
    normalizer.ckpt    global mean/variance statistics
    tokenizer.ckpt     CTCTextEncoder labels
    speech_kd.json     tokens, frame shift, parameter count, provenance

Load it with ``EncoderASR.from_hparams(source=FOLDER, savedir=...)``; nothing
from this package is imported by the yaml.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
import yaml

__all__ = ["defined_keys", "extract_model_block", "export_model_folder", "MODEL_BLOCK_START", "MODEL_BLOCK_END"]

MODEL_BLOCK_START = "# >>> model"
MODEL_BLOCK_END = "# <<< model"

_INFERENCE_TAIL = """
# ---- inference interface (written by speech_kd.model_folder) ----
encoder: !new:speechbrain.nnet.containers.LengthsCapableSequential
{chain}

tokenizer: !new:speechbrain.dataio.encoder.CTCTextEncoder

decoding_function: !name:speechbrain.decoders.ctc_greedy_decode
    blank_id: !ref <blank_index>

modules:
    encoder: !ref <encoder>

pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer
    loadables:
        model: !ref <model>
        normalizer: !ref <normalize>
        tokenizer: !ref <tokenizer>
"""


def extract_model_block(yaml_text: str) -> str:
    """Return the text between the ``# >>> model`` and ``# <<< model`` lines."""
    start = yaml_text.find(MODEL_BLOCK_START)
    end = yaml_text.find(MODEL_BLOCK_END)
    if start < 0 or end < start:
        raise ValueError(
            f"the hparams file has no model block: mark it with lines starting {MODEL_BLOCK_START!r} "
            f"and {MODEL_BLOCK_END!r} (see hparams/teacher.yaml)"
        )
    block = yaml_text[start:end]
    return block.split("\n", 1)[1] if "\n" in block else ""


def defined_keys(yaml_text: str) -> set[str]:
    r"""Top-level keys a HyperPyYAML text defines (``key:`` at the start of a line).

    Example
    -------
    >>> sorted(defined_keys("lr: 0.1\nmodel: !new:torch.nn.Linear\n    in_features: 2\n"))
    ['lr', 'model']
    """
    return set(re.findall(r"^([A-Za-z_]\w*):", yaml_text, flags=re.M))


def _referenced_keys(block: str, defined: set[str]) -> list[str]:
    """Top-level keys the block references but does not define, in order."""
    keys: list[str] = []
    for match in re.finditer(r"<([A-Za-z_]\w*)", block):
        key = match.group(1)
        if key not in defined and key not in keys:
            keys.append(key)
    return keys


def _plain(value):
    """YAML-safe copy of an hparams scalar or list."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    raise TypeError(f"cannot write {type(value).__name__} into the model yaml")


def export_model_folder(
    hparams: dict,
    hparams_text: str,
    tokenizer,
    out_dir: str | os.PathLike,
    extra_info: dict | None = None,
) -> Path:
    """Write the exported model folder (see module docstring); return its path.

    ``hparams`` is the loaded yaml (modules at their trained state),
    ``hparams_text`` the yaml source it came from. Written atomically: a
    sibling temporary folder is renamed over ``out_dir`` at the end.
    """
    block = extract_model_block(hparams_text)
    defined = defined_keys(block)
    for required in ("model", "normalize", "encoder_chain"):
        if required not in defined:
            raise ValueError(f"the model block must define {required!r}")
    scalars = {key: _plain(hparams[key]) for key in _referenced_keys(block, defined)}
    scalars.setdefault("blank_index", int(hparams.get("blank_index", 0)))
    scalars.setdefault("sample_rate", int(hparams.get("sample_rate", 16000)))
    chain = "\n".join(f"    {name}: !ref <{name}>" for name in hparams["encoder_chain"])
    text = (
        "# Exported by speech_kd: a CTC acoustic model for speechbrain.inference.ASR.EncoderASR\n"
        + yaml.safe_dump(scalars, sort_keys=False, default_flow_style=False)
        + "\n"
        + block
        + _INFERENCE_TAIL.format(chain=chain)
    )

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "hyperparams.yaml").write_text(text)
    torch.save(hparams["model"].state_dict(), tmp / "model.ckpt")
    hparams["normalize"]._save(str(tmp / "normalizer.ckpt"))
    tokenizer.save(str(tmp / "tokenizer.ckpt"))
    params = sum(p.numel() for p in hparams["model"].parameters())
    info = {
        "format": "speech_kd/encoder-asr-ctc/1",
        "tokens": [tokenizer.ind2lab[i] for i in range(len(tokenizer))],
        "blank_index": int(hparams.get("blank_index", 0)),
        "sample_rate": int(hparams.get("sample_rate", 16000)),
        "params": params,
    }
    info.update(extra_info or {})
    (tmp / "speech_kd.json").write_text(json.dumps(info, indent=2) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
