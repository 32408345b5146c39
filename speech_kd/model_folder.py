"""The model folder: written from a trained model, read back as SpeechBrain's ``EncoderASR`` (one module for both).

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
from this package is imported by the yaml. :func:`load_asr` does that offline
with checks (a missing or damaged file is a :class:`ModelFolderError` naming it),
:func:`count_parameters` counts what was loaded.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import yaml

__all__ = [
    "defined_keys",
    "extract_model_block",
    "export_model_folder",
    "MODEL_BLOCK_START",
    "MODEL_BLOCK_END",
    "FORMAT",
    "ModelFolderError",
    "count_parameters",
    "load_asr",
    "pretrainer_loadables",
    "folder_written_beside",
    "replace_folder",
]

MODEL_BLOCK_START = "# >>> model"
MODEL_BLOCK_END = "# <<< model"
#: ``speech_kd.json``'s ``format``: how a model folder written here is recognised (only those are replaced)
FORMAT = "speech_kd/encoder-asr-ctc/1"
#: what a model folder written here holds
MODEL_ENTRIES = frozenset({"hyperparams.yaml", "model.ckpt", "normalizer.ckpt", "tokenizer.ckpt", "speech_kd.json"})

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


def _check_model_out(out_dir: Path) -> None:
    """Refuse an ``out_dir`` whose replacement would delete what :func:`export_model_folder` did not write.

    Allowed: a folder that does not exist, an empty one, or an earlier model folder written here (its
    ``speech_kd.json`` has :data:`FORMAT`) holding nothing else. Otherwise a one-line ``ValueError``.
    """
    if not out_dir.name:
        raise ValueError(f"model folder {out_dir}: a file system root cannot be a model folder")
    if out_dir.is_symlink():
        raise ValueError(f"model folder {out_dir}: a symbolic link; give a new folder or the earlier one itself")
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ValueError(f"model folder {out_dir}: exists and is not a folder; nothing was changed")
    entries = sorted(entry.name for entry in out_dir.iterdir())
    if not entries:
        return
    try:
        ours = json.loads((out_dir / "speech_kd.json").read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise ValueError(
            f"model folder {out_dir}: exists and is not a model folder written by speech_kd (no "
            "speech_kd.json of ours); nothing was changed, choose a new or empty folder"
        )
    foreign = [name for name in entries if name not in MODEL_ENTRIES]
    if foreign:
        more = " ..." if len(foreign) > 3 else ""
        raise ValueError(
            f"model folder {out_dir}: also holds {', '.join(foreign[:3])}{more}, which speech_kd did "
            "not write there; move it out, then run again"
        )


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
    fresh temporary sibling folder is renamed to ``out_dir`` at the end. An
    existing ``out_dir`` is replaced only when it is empty or an earlier model
    folder written here holding nothing else (a rerun of the same training);
    anything else is refused with a ``ValueError`` before writing. A failed
    write leaves nothing behind.
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

    out_dir = Path(os.path.abspath(out_dir))
    _check_model_out(out_dir)
    with folder_written_beside(out_dir, lambda: _check_model_out(out_dir)) as tmp:
        (tmp / "hyperparams.yaml").write_text(text)
        torch.save(hparams["model"].state_dict(), tmp / "model.ckpt")
        hparams["normalize"]._save(str(tmp / "normalizer.ckpt"))
        tokenizer.save(str(tmp / "tokenizer.ckpt"))
        params = sum(p.numel() for p in hparams["model"].parameters())
        info = {
            "format": FORMAT,
            "tokens": [tokenizer.ind2lab[i] for i in range(len(tokenizer))],
            "blank_index": int(hparams.get("blank_index", 0)),
            "sample_rate": int(hparams.get("sample_rate", 16000)),
            "params": params,
        }
        info.update(extra_info or {})
        (tmp / "speech_kd.json").write_text(json.dumps(info, indent=2) + "\n")
    return out_dir


@contextlib.contextmanager
def folder_written_beside(out: Path, check_again: Callable[[], None]) -> Iterator[Path]:
    """Write a folder as a fresh temporary sibling of ``out``, then swap it in (:func:`replace_folder`).

    The temporary folder is this call's alone (``mkdtemp``), with the permissions a plain ``mkdir`` would
    give; ``check_again`` (that ``out`` is still ours to replace) runs right before the swap. On any
    failure the temporary folder and the parent folders this call made are removed: nothing is left.
    """
    made = [folder for folder in (out.parent, *out.parent.parents) if not folder.exists()]  # deepest first
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))  # ours alone
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would make the folder private
        yield tmp
        check_again()  # the folder may have changed while it was written
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in made:  # the parents this call made, if still empty
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def replace_folder(tmp: Path, out: Path) -> None:
    """Rename the finished folder ``tmp`` to ``out``; an earlier folder at ``out`` is moved aside first, removed after.

    Callers have checked that ``out`` is theirs to replace (an earlier model folder or export). A failed
    rename puts the earlier folder back.
    """
    if not out.exists() or not any(out.iterdir()):
        os.replace(tmp, out)  # over an empty folder: nothing is lost
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    os.replace(out, aside / "previous")
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(aside / "previous", out)
        aside.rmdir()
        raise
    shutil.rmtree(aside)


# --------------------------------------------------------------------------- reading


class ModelFolderError(ValueError):
    """A model folder that exists but does not load (damaged checkpoint, broken hyperparams.yaml)."""


def load_asr(folder: str | os.PathLike, device: str = "cpu", savedir: str | None = None):
    """Load an ``EncoderASR`` model folder offline."""
    from speechbrain.inference.ASR import EncoderASR
    from speechbrain.utils.fetching import FetchConfig

    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"{folder}: no such folder")
    if not (folder / "hyperparams.yaml").exists():
        raise FileNotFoundError(f"{folder}: not a model folder (no hyperparams.yaml)")
    yaml_text = (folder / "hyperparams.yaml").read_text(encoding="utf-8", errors="replace")
    if not any(line.startswith("pretrainer:") for line in yaml_text.splitlines()):
        raise ModelFolderError(
            f"{folder}: not a model folder (its hyperparams.yaml has no pretrainer): a training run's output "
            "folder? give its model folder (speech-kd: RUN/model), or export your recipe's output folder first "
            "(speech-kd export FOLDER --out DIR, docs/deploy.md) and give DIR"
        )
    missing = [
        f"{name}.ckpt"
        for name in pretrainer_loadables(folder / "hyperparams.yaml")
        if not (folder / f"{name}.ckpt").exists()
    ]
    if missing:  # SpeechBrain would load without it (an empty tokenizer: KeyError at the first transcript)
        raise ModelFolderError(
            f"{folder}: missing {', '.join(missing)} (listed in its hyperparams.yaml pretrainer); "
            "copy the whole model folder again"
        )
    try:
        asr = EncoderASR.from_hparams(
            source=str(folder.resolve()),
            savedir=savedir or tempfile.mkdtemp(prefix="speechkd_asr_"),
            run_opts={"device": device},
            fetch_config=FetchConfig(allow_network=False),
        )
    except (RuntimeError, EOFError, KeyError, OSError, ValueError) as err:  # a damaged checkpoint, a bad yaml
        first_line = str(err).splitlines()[0] if str(err) else ""
        raise ModelFolderError(
            f"{folder}: cannot load as a SpeechBrain EncoderASR folder ({err.__class__.__name__}: {first_line})"
        ) from err
    outputs = getattr(asr.hparams, "output_neurons", None)
    if outputs is not None and hasattr(asr.tokenizer, "expect_len"):  # a CTCTextEncoder: one token per output
        if len(asr.tokenizer) != int(outputs):
            raise ModelFolderError(
                f"{folder}: tokenizer.ckpt holds {len(asr.tokenizer)} tokens, but output_neurons is {outputs}"
            )
        asr.tokenizer.expect_len(int(outputs))  # said: SpeechBrain warns at every load until it is
    return asr


def pretrainer_loadables(yaml_path: Path) -> list[str]:
    """The names under the ``pretrainer`` entry's ``loadables`` in a model folder's yaml (none with ``paths``)."""
    lines = yaml_path.read_text(encoding="utf-8", errors="replace").splitlines()
    names: list[str] = []
    try:
        start = next(i for i, line in enumerate(lines) if line.startswith("pretrainer:"))
    except StopIteration:
        return names
    block = []
    for line in lines[start + 1 :]:
        if line.strip() and not line.startswith((" ", "\t")):
            break
        block.append(line)
    if any(line.strip().startswith("paths:") for line in block):
        return []
    inside, depth = False, 0
    for line in block:
        stripped = line.strip()
        if stripped.startswith("loadables:"):
            inside, depth = True, len(line) - len(line.lstrip())
            continue
        if inside and stripped:
            if len(line) - len(line.lstrip()) <= depth:
                break
            names.append(stripped.split(":")[0].strip())
    return names


def count_parameters(asr) -> int:
    """Number of parameters of the loaded model's modules (an exported folder's: from its ``deploy.json``)."""
    if getattr(asr, "exported_params", None) is not None:
        return int(asr.exported_params)
    return sum(p.numel() for p in asr.mods.parameters())
