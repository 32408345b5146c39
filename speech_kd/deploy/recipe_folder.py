"""A SpeechBrain recipe's output folder -> what ``speech-kd export`` needs: modules at a checkpoint, features, tokens.

A CTC student trained in a user's own SpeechBrain recipe (SpeechBrain's LibriSpeech CTC conformer, its TIMIT
CRDNN, ...) ends as the recipe's output folder, not as an ``EncoderASR`` model folder::

    OUTPUT/hyperparams.yaml          the recipe's yaml as it ran: overrides applied, references resolved
                                     (SpeechBrain's ``create_experiment_directory`` writes it)
    OUTPUT/save/CKPT+.../            the checkpointer's recoverables (``model.ckpt``, ``normalizer.ckpt``, ...)
                                     and ``CKPT.yaml`` (meta: ``WER``, ``CER`` or ``PER`` when the recipe kept it)
    OUTPUT/save/label_encoder.txt    a ``CTCTextEncoder`` (TIMIT style), or
    OUTPUT/save/tokenizer.ckpt       what SpeechBrain's ``Pretrainer`` collected (LibriSpeech CTC: a
                                     SentencePiece model; known by its content, not its name), or
    OUTPUT/save/<N>_<type>.model     a SentencePiece model (``SentencePiece(model_dir=save_folder)``)

:func:`load_recipe` loads the yaml with HyperPyYAML (the output folder's own copy unless another is given;
``output_folder`` is set to the folder given, paths the copy recorded under its old output folder follow it,
``!PLACEHOLDER`` keys such as ``data_folder`` get a dummy value, since nothing is trained or read; a folder
that building the yaml's objects creates, such as a ``Checkpointer``'s ``checkpoints_dir`` recorded outside
the output folder, is removed again), restores the modules through SpeechBrain's ``Checkpointer``, reads the
tokens, and returns the inference pipeline of the recipe's ``compute_forward``:

    waveform -> ``compute_features`` (an ``Fbank``: computed by the exported folder's ``transcribe.py``)
             -> the normaliser (``InputNormalization``, its running statistics restored)
             -> the encoder modules, in the yaml's ``modules`` order (or ``modules=[...]``)
             -> log-softmax (CTC log-probabilities)

Which weights (``checkpoint=``), so that the export is the model the recipe evaluated:

- ``"average"``, the default when the yaml's ``avg_checkpoints`` is above 1 (SpeechBrain's LibriSpeech CTC
  recipe): as that recipe's ``on_evaluate_start`` does, the recoverables holding the modules are averaged
  (``average_checkpoints``) over every checkpoint that records the error rate (``find_checkpoints(min_key=
  "WER")``, else ``CER``, else ``PER``), and the others (the normaliser's statistics) come from the newest
  checkpoint, which its ``super().on_evaluate_start()`` recovers;
- ``"best"``, the default otherwise: one checkpoint, the lowest ``WER``, else ``CER``, else ``PER`` recorded
  (the one ``evaluate(min_key=...)`` tests); the newest when no error rate was recorded;
- ``"newest"``, or a checkpoint folder's name (``CKPT+...``).

Every bad input is refused before any export work with one line naming the file and the problem
(:class:`RecipeFolderError`): no checkpoint, a yaml whose modules do not fit the checkpoint, no tokenizer,
a tokenizer whose size is not the output layer's.

Shapes: ``B`` batch, ``T`` fbank frames, ``F`` mel bins, ``T'`` output frames, ``V`` tokens.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import re
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece
import torch
import yaml
from hyperpyyaml import load_hyperpyyaml, resolve_references
from speechbrain.dataio.encoder import CTCTextEncoder
from speechbrain.lobes.features import Fbank
from speechbrain.lobes.models.transformer.TransformerASR import EncoderWrapper, TransformerASR
from speechbrain.processing.features import InputNormalization
from speechbrain.utils.checkpoints import (
    DEFAULT_SAVE_HOOKS,
    Checkpoint,
    Checkpointer,
    average_checkpoints,
    get_default_hook,
    torch_save,
)

from speech_kd.nnet import run_chain

__all__ = [
    "RecipeFolderError",
    "RecipeModel",
    "RecipeCTC",
    "ERROR_RATE_KEYS",
    "CHECKPOINT_CHOICES",
    "is_recipe_folder",
    "run_model_folder",
    "find_checkpoint_dirs",
    "find_tokenizer",
    "read_tokens",
    "load_recipe",
    "scripted_steps",
    "error_line",
]

#: meta keys of SpeechBrain checkpoints that are error rates (lower is better), in the order they are preferred
ERROR_RATE_KEYS = ("WER", "CER", "PER")
#: ``checkpoint=`` values besides a checkpoint folder: the average the recipe evaluates, the lowest recorded
#: error rate, or the newest
CHECKPOINT_CHOICES = ("average", "best", "newest")
#: the value given to the yaml's ``!PLACEHOLDER`` keys (``data_folder``...) that the export never reads
UNUSED = "speech-kd-export-unused"
#: the label-encoder file SpeechBrain's CTC recipes write into ``save_folder``
LABEL_ENCODER = "label_encoder.txt"
#: the file SpeechBrain's ``Pretrainer`` collects a recipe's ``tokenizer`` loadable into (``collect_in``)
COLLECTED_TOKENIZER = "tokenizer.ckpt"
#: SentencePiece's word-start mark; ``transcribe.py`` turns it into a space
WORD_START = "\u2581"


class RecipeFolderError(ValueError):
    """A recipe output folder, yaml, checkpoint or tokenizer that cannot be exported (one line naming the file)."""


def find_checkpoint_dirs(folder: str | os.PathLike) -> list[Path]:
    """Folders holding SpeechBrain checkpoints (``CKPT+*/CKPT.yaml``) in ``folder``, ``folder/*`` or ``folder/*/*``.

    Example
    -------
    >>> find_checkpoint_dirs("/nonexistent")
    []
    """
    folder = Path(folder)
    found = []
    for pattern in ("CKPT+*/CKPT.yaml", "*/CKPT+*/CKPT.yaml", "*/*/CKPT+*/CKPT.yaml"):
        for meta in sorted(folder.glob(pattern)):
            if meta.parent.parent not in found:
                found.append(meta.parent.parent)
        if found:
            break
    return found


def is_recipe_folder(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is a recipe's output folder rather than a model folder.

    Yes when it holds checkpoints and no model folder's ``model.ckpt``, or a ``hyperparams.yaml`` without
    the ``pretrainer`` every model folder has (then refused for its missing checkpoints, not misread as a
    model folder).
    """
    folder = Path(folder)
    if not folder.is_dir() or (folder / "model.ckpt").exists():
        return False
    if find_checkpoint_dirs(folder):
        return True
    yaml_path = folder / "hyperparams.yaml"
    lines = yaml_path.read_text(encoding="utf-8", errors="replace").splitlines() if yaml_path.is_file() else []
    return bool(lines) and not any(line.startswith("pretrainer:") for line in lines)


def run_model_folder(folder: str | os.PathLike) -> Path | None:
    """``folder/model`` when ``folder`` is the output folder of ``speech-kd train``/``distill``, else ``None``.

    Such a run folder holds checkpoints (``save/CKPT+*``) like a recipe's, and also the model folder the run
    wrote (``model/speech_kd.json``): that is what exports, read as a model folder, not as a recipe.

    Example
    -------
    >>> run_model_folder("/nonexistent") is None
    True
    """
    model = Path(folder) / "model"
    if (model / "speech_kd.json").is_file() and not (Path(folder) / "model.ckpt").exists():
        return model
    return None


def _run_hint(folder: Path) -> str:
    """`` (or export RUN/model, ...)`` when ``folder`` is a ``speech-kd`` run folder (:func:`run_model_folder`)."""
    ours = run_model_folder(folder)
    return f" (or export {ours}, the model folder this run wrote)" if ours is not None else ""


def find_tokenizer(save_dirs: list[Path], hparams: dict) -> Path | None:
    """The tokenizer file a CTC recipe left: ``label_encoder.txt``, ``tokenizer.ckpt`` or one ``*.model``.

    Looked for in each of ``save_dirs`` (the checkpoint folder, then the output folder): a ``CTCTextEncoder``'s
    ``label_encoder.txt``, else the ``tokenizer.ckpt`` SpeechBrain's ``Pretrainer`` collects (SpeechBrain's
    LibriSpeech CTC recipe: a SentencePiece model), else a SentencePiece ``*.model``; of several, the one named
    ``<output_neurons>_<token_type>.model`` (as SpeechBrain's ``SentencePiece`` names it). ``None`` when there
    is none (or no way to choose). :func:`read_tokens` tells the kinds apart by content.
    """
    preferred = f"{hparams.get('output_neurons')}_{hparams.get('token_type')}.model"
    for folder in save_dirs:
        for name in (LABEL_ENCODER, COLLECTED_TOKENIZER):
            if (folder / name).is_file():
                return folder / name
        models = sorted(folder.glob("*.model"))
        if len(models) == 1:
            return models[0]
        if (folder / preferred).is_file():
            return folder / preferred
    return None


def _sentencepiece(path: Path) -> sentencepiece.SentencePieceProcessor | None:
    """``path`` loaded as a SentencePiece model, or ``None`` when its content is not one (whatever its name)."""
    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.load(str(path))
    except (OSError, RuntimeError):
        return None
    return processor


def read_tokens(path: str | os.PathLike, blank_index: int | None) -> tuple[list[str], int]:
    """``(tokens [V], blank index)`` of a ``CTCTextEncoder`` file or a SentencePiece model, for ``deploy.json``.

    The kind is told by the content, not the name: a file that loads as a SentencePiece model is one (the
    ``tokenizer.ckpt`` SpeechBrain's ``Pretrainer`` collects is a SentencePiece model under another name),
    anything else is read as a ``CTCTextEncoder`` file. Written so that ``transcribe.py``'s joined tokens of a
    best path are the tokenizer's own decoding:

    - ``CTCTextEncoder`` (``label_encoder.txt``): each label as it is (characters, ``" "`` a space). When the
      labels are longer than one character and none is a space (TIMIT's phonemes, words), each is written
      with SentencePiece's word-start mark ``▁`` before it, so that the transcript is the labels separated by
      spaces. The blank is the encoder's ``blank_label``.
    - SentencePiece: each piece (``▁`` starts a word); control pieces (``<s>``, ``</s>``) as ``""`` and the
      unknown piece as ``" ⁇ "``, as ``decode_ids`` writes them. The blank is ``blank_index`` (the recipe's).

    Raises
    ------
    RecipeFolderError
        The file cannot be read as either, or the blank index is not one of its tokens.
    """
    path = Path(path)
    processor = _sentencepiece(path)
    if processor is not None:
        blank = 0 if blank_index is None else int(blank_index)
        tokens = []
        for i in range(processor.get_piece_size()):
            if i != blank and processor.is_control(i):
                tokens.append("")
            elif i != blank and processor.is_unknown(i):
                tokens.append(" \u2047 ")
            else:
                tokens.append(processor.id_to_piece(i))
    else:
        encoder = CTCTextEncoder()
        try:
            encoder.load(path)
            tokens = [str(encoder.ind2lab[i]) for i in range(len(encoder))]
            blank = int(encoder.lab2ind[encoder.blank_label])
        except (OSError, ValueError, KeyError, SyntaxError, AttributeError) as error:
            raise RecipeFolderError(
                f"{path}: neither a SentencePiece model nor a SpeechBrain CTCTextEncoder file with a blank label "
                f"({error_line(error)})"
            ) from None
        if blank_index is not None and int(blank_index) != blank:
            raise RecipeFolderError(
                f"{path}: its blank label {encoder.blank_label!r} is index {blank}, the yaml's blank_index is "
                f"{blank_index}; give the tokenizer the run was trained with (--tokenizer)"
            )
        labels = [t for i, t in enumerate(tokens) if i != blank]
        if " " not in labels and any(len(t) > 1 and not re.fullmatch(r"<\w+>", t) for t in labels):
            tokens = [t if i == blank else WORD_START + t for i, t in enumerate(tokens)]
    if not 0 <= blank < len(tokens):
        raise RecipeFolderError(f"{path}: blank index {blank} is not one of its {len(tokens)} tokens")
    return tokens, blank


@dataclasses.dataclass
class RecipeModel:
    """A recipe's CTC model at one checkpoint, as :func:`load_recipe` rebuilt it.

    Attributes
    ----------
    folder, yaml_path, checkpoint, tokenizer_path : Path
        The output folder, the yaml loaded, the checkpoint folder restored (when averaging: the one the
        recoverables that are not averaged come from), the tokenizer file.
    checkpoint_note : str
        Why that checkpoint (``"lowest WER 12.3 of 4 checkpoints"``, ``"newest of 2 (no error rate recorded)"``),
        or which checkpoints were averaged and how.
    hparams : dict
        The loaded yaml.
    features_key : str
        The yaml key of the ``Fbank`` (``compute_features``).
    steps : dict
        Yaml key -> module, in the order they run after the features: the normaliser, then the encoder
        modules (a ``TransformerASR`` wrapped in SpeechBrain's ``EncoderWrapper``: its ``encode``).
    tokens : list of str
        ``V`` tokens, as :func:`read_tokens` writes them.
    blank_index, sample_rate : int
        The CTC blank and the audio sample rate.
    averaged : list of Path
        The checkpoint folders whose weights were averaged, lowest error rate first (empty: one checkpoint).
    """

    folder: Path
    yaml_path: Path
    checkpoint: Path
    checkpoint_note: str
    tokenizer_path: Path
    hparams: dict
    features_key: str
    steps: dict
    tokens: list
    blank_index: int
    sample_rate: int
    averaged: list = dataclasses.field(default_factory=list)

    def weights(self) -> str:
        """Where the weights come from, for messages: ``"FOLDER (why)"`` or the averaged checkpoints."""
        if not self.averaged:
            return f"{self.checkpoint} ({self.checkpoint_note})"
        where = self.checkpoint.parent
        return f"the averaged model from {len(self.averaged)} checkpoints in {where} ({self.checkpoint_note})"

    @property
    def features(self) -> torch.nn.Module:
        """The recipe's ``Fbank``."""
        return self.hparams[self.features_key]

    def parameters(self) -> int:
        """Parameters of the modules that run (the normaliser has none)."""
        return sum(p.numel() for module in self.steps.values() for p in module.parameters())

    def describe(self, key: str) -> str:
        """``"key (Class)"`` of a step, with the class a user's yaml names (the wrapped one for a transformer)."""
        module = self.steps[key]
        inner = module.transformer if isinstance(module, EncoderWrapper) else module
        return f"{key} ({type(inner).__name__})"


class RecipeCTC(torch.nn.Module):
    """``(feats [B, T, F], lengths [B]) -> (log_probs [B, T', V], out_lengths [B])`` through a recipe's modules.

    The modules run as the recipe's ``compute_forward`` runs them (:func:`speech_kd.nnet.run_chain`: relative
    lengths to those whose ``forward`` takes them), then a log-softmax (a no-op on log-probabilities already).

    Parameters
    ----------
    steps : dict
        Yaml key -> module (:attr:`RecipeModel.steps`); registered under those names (top level), so exported
        nodes and ``--fp32_layers`` use the yaml's keys.
    single : bool
        False (the reference): relative lengths ``lengths / T`` go to the modules, and the output lengths
        are SpeechBrain's ``round(relative length * T')``. True (the exported graph): one utterance per run,
        no lengths given to the modules (nothing is padded), output length ``T'``; a module whose padding
        mask is built from lengths by a Python loop or ``.item()`` (SpeechBrain's ``length_to_mask``) then
        traces with any length.
    upto : int, optional
        Run only the first ``upto`` steps and return their raw output (which module does not export:
        :func:`speech_kd.deploy.onnx_export` compares prefixes).
    script : bool
        Script the steps when exported (:meth:`for_export`, :func:`scripted_steps`).

    Example
    -------
    >>> net = RecipeCTC({"lin": torch.nn.Linear(40, 5)}, single=False)
    >>> log_probs, lengths = net(torch.randn(2, 30, 40), torch.tensor([30, 21]))
    >>> tuple(log_probs.shape), lengths.tolist()
    ((2, 30, 5), [30, 21])
    """

    def __init__(self, steps: dict, single: bool, upto: int | None = None, script: bool = False) -> None:
        super().__init__()
        self._names = list(steps)[:upto]
        self._single = single
        self._upto = upto
        self._script = script
        for name in self._names:
            self.add_module(name, steps[name])
        self.eval()

    def for_export(self) -> RecipeCTC:
        """The network to trace: made with ``script=True``, its steps scripted where they script.

        Scripting comes last, after any dynamic quantisation of the linear layers (which does not reach into
        scripted modules).
        """
        if not self._script:
            return self
        steps = scripted_steps(dict(self.named_children()))
        return RecipeCTC(steps, self._single, None if self._upto is None else len(steps))

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probabilities ``[B, T', V]`` (or, with ``upto``, the last step's output) and lengths ``[B]``."""
        relative = None if self._single else lengths.to(feats.dtype) / feats.shape[1]
        x = run_chain(dict(self.named_children()), self._names, feats, relative)
        if isinstance(x, (tuple, list)):
            x = x[0]
        if self._upto is None:
            x = torch.log_softmax(x, dim=-1)
        if self._single:
            return x, torch.ones_like(lengths) * x.shape[1]
        return x, torch.round(relative * x.shape[1]).to(torch.int64)


def scripted_steps(steps: dict) -> dict:
    """The steps with each one that ``torch.jit.script`` compiles replaced by its scripted copy.

    Tracing unrolls Python loops for the traced length: a recurrent layer written as a loop over frames
    (SpeechBrain's ``LiGRU``, the default RNN of its CRDNN, as in the TIMIT CTC recipe) traces into a graph
    of one length. Scripted (what SpeechBrain's ``jit_module_keys`` does for speed), the loop stays a loop,
    and a trace of the whole calls the scripted module. Steps that do not script are kept as they are.

    Example
    -------
    >>> steps = scripted_steps({"lin": torch.nn.Linear(4, 3)})
    >>> isinstance(steps["lin"], torch.jit.ScriptModule)
    True
    """
    out = {}
    for key, module in steps.items():
        try:
            with warnings.catch_warnings():  # torch 2.x deprecates torch.jit.script (still what keeps loops)
                warnings.simplefilter("ignore")
                out[key] = torch.jit.script(copy.deepcopy(module))
        except Exception:  # torch.jit.script raises many types for what it cannot compile
            out[key] = module
    return out


def error_line(error: BaseException) -> str:
    r"""``Type: first line`` of an error's message, for one-line refusals.

    The next line too when the first ends in a colon, as ``load_state_dict``'s "Error(s) in loading state_dict
    for X:" does before naming the mismatch.

    Example
    -------
    >>> error_line(RuntimeError("Error(s) in loading state_dict for Linear:\n\tsize mismatch for w\nmore"))
    'RuntimeError: Error(s) in loading state_dict for Linear: size mismatch for w'
    """
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()] or [""]
    text = f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    return f"{type(error).__name__}: {text}"


def _placeholders(text: str) -> list[str]:
    """Top-level keys a yaml leaves to the command line (``key: !PLACEHOLDER``)."""
    return re.findall(r"^([A-Za-z_]\w*):\s*!PLACEHOLDER", text, flags=re.M)


def _relocated(text: str, folder: Path) -> str:
    """The yaml text with the paths it recorded under its ``output_folder`` moved under ``folder``.

    A copy written by ``create_experiment_directory`` holds resolved paths (``save_folder: /old/run/save``,
    ``checkpoints_dir: /old/run/save``): overriding ``output_folder`` does not reach them, and a folder that
    was moved, or a relative path read from another working directory, would point elsewhere (and
    SpeechBrain's ``Checkpointer`` would create that folder). A yaml that computes them (``!ref``) is left as
    it is: the ``output_folder`` override reaches them.
    """
    match = re.search(r"^output_folder:[ \t]*([^!\s#][^\n#]*?)[ \t]*(#.*)?$", text, flags=re.M)
    if not match:
        return text
    old = match.group(1).strip("'\"").rstrip("/")
    if not old or old in (".", "/") or Path(old) == folder:
        return text
    pattern = r"(?<=[\s:'\"\[,])" + re.escape(old) + r"(?=[/\s'\",\]]|$)"
    return re.sub(pattern, lambda _: str(folder), text, flags=re.M)


def _renamed_anchors(text: str) -> str:
    """The yaml text with the anchors a resolved copy holds (``&id006``, ``*id006``) renamed ``&recipe006``.

    ``create_experiment_directory`` writes the copy with ruamel's anchor names; HyperPyYAML, when it loads
    the copy, dumps it again and gives new anchors the same names, and a tuple value (``cnn_channels:
    &id006 (8,)``) then comes back as None (HyperPyYAML issue #3, duplicate anchors with constructors):
    SpeechBrain's TIMIT CRDNN copy does not load as it is.
    """
    return re.sub(r"(?<=[\s\[,{])([&*])id(\d+)\b", r"\1recipe\2", text)


class _PlainLoader(yaml.SafeLoader):
    """A YAML loader that reads each tagged node (``!new:``, ``!name:``, ``!apply:``...) as the plain value it holds."""


def _plain_node(loader: _PlainLoader, suffix: str, node: yaml.Node) -> object:
    """A tagged node's mapping, list or string, its tag ignored."""
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


_PlainLoader.add_multi_constructor("!", _plain_node)


def _strings(value: object) -> Iterator[str]:
    """Every string among the values of a parsed yaml (mappings' values, lists' items), at any depth."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _yaml_strings(text: str, given: dict) -> list[str]:
    """The string values of the yaml ``text`` with ``given`` applied and its references resolved.

    Nothing is built: HyperPyYAML's ``resolve_references`` writes the values, tags are read as plain values.
    These are the paths the yaml's objects may create when built (a ``Checkpointer``'s ``checkpoints_dir``).
    """
    try:
        resolved = resolve_references(text, given).getvalue()
    except Exception:  # what the load will report; the text's own strings are what can be known
        resolved = text
    try:
        return list(_strings(yaml.load(resolved, Loader=_PlainLoader)))
    except yaml.YAMLError:
        return []


@contextlib.contextmanager
def _created_folders_removed(values: Iterable[str]) -> Iterator[None]:
    """Remove, when the block ends, each folder named in ``values`` that it created, if empty (parents too).

    Loading a recipe's yaml builds its objects, and SpeechBrain's ``Checkpointer`` creates its
    ``checkpoints_dir`` (``os.makedirs``) in its ``__init__``: a ``save_folder`` recorded outside the output
    folder (``--save_folder=`` at training), or one under a ``!PLACEHOLDER``'s dummy value (relative: the
    working folder), would be left behind by an export that only reads. Each value, taken as a path (relative
    ones from the working folder), is recorded with its parents that do not exist before the block; after it,
    those that exist and are empty folders are removed, deepest first. Nothing that existed before is touched.
    """
    missing: set[Path] = set()
    for value in values:
        try:
            path = Path(os.path.abspath(value))
            while not os.path.lexists(path) and path != path.parent:
                missing.add(path)
                path = path.parent
        except (OSError, ValueError):  # a NUL byte, a name too long: not a path anything creates
            continue
    try:
        yield
    finally:
        for path in sorted(missing, key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
                    path.rmdir()


def _load_yaml(yaml_path: Path, folder: Path, overrides: dict) -> dict:
    """The recipe yaml loaded for ``folder``: ``output_folder`` set, recorded paths moved, placeholders filled.

    The folders that building its objects creates are removed again (:func:`_created_folders_removed`).
    """
    try:
        text = yaml_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise RecipeFolderError(f"{yaml_path}: cannot be read ({error_line(error)})") from None
    text = _relocated(_renamed_anchors(text), folder)
    given = {key: UNUSED for key in _placeholders(text)}
    if re.search(r"^output_folder:", text, flags=re.M):
        given["output_folder"] = str(folder)
    given.update(overrides)
    try:
        with _created_folders_removed(_yaml_strings(text, given)):
            hparams = load_hyperpyyaml(text, given)
    except Exception as error:  # HyperPyYAML raises whatever a constructor in the yaml raises
        raise RecipeFolderError(
            f"{yaml_path}: cannot be loaded ({error_line(error)}); give the keys it needs with "
            '--overrides "{key: value}"'
        ) from None
    if not isinstance(hparams, dict):
        raise RecipeFolderError(f"{yaml_path}: not a HyperPyYAML mapping of hyperparameters")
    return hparams


def _features_key(hparams: dict, yaml_path: Path) -> str:
    """The yaml key of the recipe's ``Fbank`` (``compute_features``, else the only ``Fbank`` in the yaml)."""
    if isinstance(hparams.get("compute_features"), Fbank):
        return "compute_features"
    keys = [key for key, value in hparams.items() if isinstance(value, Fbank)]
    if len(keys) == 1:
        return keys[0]
    found = hparams.get("compute_features")
    what = f"compute_features is a {type(found).__name__}" if found is not None else "no Fbank"
    raise RecipeFolderError(
        f"{yaml_path}: {what}; the export computes SpeechBrain's Fbank in transcribe.py (numpy), other "
        "features are not exported"
    )


def _steps(hparams: dict, yaml_path: Path, features_key: str, modules: list[str] | None) -> dict:
    """Yaml key -> module in running order: normalisers first, then the ``modules`` entries (or ``modules``)."""
    table = hparams.get("modules")
    if modules:
        missing = [key for key in modules if not isinstance(hparams.get(key, (table or {}).get(key)), torch.nn.Module)]
        if missing:
            raise RecipeFolderError(f"{yaml_path}: --modules {', '.join(missing)}: no such module in the yaml")
        chosen = {key: hparams.get(key, (table or {}).get(key)) for key in modules}
    else:
        if not isinstance(table, dict) or not table:
            raise RecipeFolderError(
                f"{yaml_path}: no 'modules' mapping; name the modules compute_forward runs with --modules"
            )
        chosen = {
            key: module
            for key, module in table.items()
            if isinstance(module, torch.nn.Module) and module is not hparams[features_key]
        }
        norms = {key: module for key, module in chosen.items() if isinstance(module, InputNormalization)}
        chosen = {**norms, **{key: m for key, m in chosen.items() if key not in norms}}
    return {
        key: EncoderWrapper(module) if isinstance(module, TransformerASR) else module for key, module in chosen.items()
    }


@dataclasses.dataclass
class _Choice:
    """The checkpoints :func:`_restore` reads: one for every recoverable, and those to average, if any."""

    checkpoint: Checkpoint
    note: str
    averaged: list[Checkpoint] = dataclasses.field(default_factory=list)
    key: str = ""


def _error_rate_key(checkpoints: list[Checkpoint]) -> str | None:
    """The first of :data:`ERROR_RATE_KEYS` that a checkpoint records as a number, or ``None``."""
    for key in ERROR_RATE_KEYS:
        if any(isinstance(c.meta.get(key), (int, float)) for c in checkpoints):
            return key
    return None


def _choose_checkpoint(checkpointer: Checkpointer, choice: str, where: Path, asked: bool) -> _Choice:
    """The checkpoint(s) to restore and why (see :func:`load_recipe`; ``asked``: ``choice`` was given)."""
    checkpoints = checkpointer.list_checkpoints()
    if not checkpoints:
        raise RecipeFolderError(f"{where}: no checkpoint (CKPT+*/CKPT.yaml) to export")
    if choice not in CHECKPOINT_CHOICES:
        named = [c for c in checkpoints if c.path.name == Path(choice).name]
        if not named:
            raise RecipeFolderError(
                f"--checkpoint {choice}: not one of the {len(checkpoints)} checkpoints in {where} "
                f"({', '.join(c.path.name for c in checkpoints[:3])}{' ...' if len(checkpoints) > 3 else ''})"
            )
        return _Choice(named[0], "as asked")
    newest = max(checkpoints, key=lambda c: c.meta.get("unixtime", 0))
    key = _error_rate_key(checkpoints)
    if choice == "newest":
        return _Choice(newest, f"newest of {len(checkpoints)} checkpoint(s)")
    if key is None:
        if choice == "average" and asked:
            raise RecipeFolderError(
                f"--checkpoint average: no checkpoint in {where} records a WER, CER or PER to choose the "
                "checkpoints to average by; give --checkpoint best, newest or a CKPT+... name"
            )
        return _Choice(newest, f"newest of {len(checkpoints)} checkpoint(s) (no WER, CER or PER recorded)")
    # the recipe's own call (on_evaluate_start): every checkpoint recording the key, lowest first
    scored = checkpointer.find_checkpoints(min_key=key, ckpt_predicate=lambda c: isinstance(c.meta[key], (int, float)))
    if choice == "average" and len(scored) > 1:
        return _Choice(newest, "", scored, key)
    best = scored[0]
    note = f"lowest {key} ({best.meta[key]:.4g}) of {len(checkpoints)} checkpoint(s)"
    if choice == "average":
        note += f"; the only one recording a {key}: nothing to average"
    return _Choice(best, note)


def _load_entry(ckpt_root: Path, recoverables: dict, entry: Checkpoint) -> None:
    """Load ``recoverables`` from one checkpoint; one that does not fit is named with the reason."""
    try:
        Checkpointer(ckpt_root, recoverables).load_checkpoint(entry)
    except Exception:  # a size mismatch, missing or unexpected keys, a damaged file: find which, say why
        for name, obj in recoverables.items():
            try:
                Checkpointer(ckpt_root, {name: obj}).load_checkpoint(entry)
            except Exception as error:
                raise RecipeFolderError(
                    f"{entry.path / f'{name}.ckpt'}: does not fit the yaml's {name!r} ({type(obj).__name__}): "
                    f"{error_line(error)}; give the yaml and --overrides the run was trained with"
                ) from None
        raise


def _restore(
    hparams: dict, yaml_path: Path, steps: dict, ckpt_root: Path, choice: str, asked: bool
) -> tuple[Path, str, list[Path]]:
    """Restore the recoverables that hold the steps (each checked against its file).

    Returns the checkpoint restored, why, and the checkpoints averaged (lowest error rate first; empty when
    one checkpoint was restored). Averaging is the stock LibriSpeech CTC recipe's ``on_evaluate_start``:
    every recoverable is restored from the newest checkpoint (its ``super().on_evaluate_start()``, which
    gives no key), then those saved as a state dict (SpeechBrain's default for a module: the ``model``, not
    the normaliser's statistics) are replaced by ``average_checkpoints`` over the scored checkpoints.
    """
    recipe_checkpointer = hparams.get("checkpointer")
    if not isinstance(recipe_checkpointer, Checkpointer):
        raise RecipeFolderError(f"{yaml_path}: no 'checkpointer' (a SpeechBrain Checkpointer) naming what to restore")
    needed = {id(module) for step in steps.values() for module in step.modules()}
    recoverables = {
        name: obj
        for name, obj in recipe_checkpointer.recoverables.items()
        if isinstance(obj, torch.nn.Module) and any(id(m) in needed for m in obj.modules())
    }
    covered = {id(m) for obj in recoverables.values() for m in obj.modules()}
    for key, step in steps.items():
        inner = step.transformer if isinstance(step, EncoderWrapper) else step
        if id(inner) not in covered:
            raise RecipeFolderError(
                f"{yaml_path}: {key} ({type(inner).__name__}) is in no recoverable of the checkpointer: "
                "its trained weights are not in the checkpoints"
            )
    chosen = _choose_checkpoint(Checkpointer(ckpt_root), choice, ckpt_root, asked)
    averaged = [
        name
        for name, obj in recoverables.items()
        if chosen.averaged
        and name not in recipe_checkpointer.custom_save_hooks
        and get_default_hook(obj, DEFAULT_SAVE_HOOKS) is torch_save
    ]
    if chosen.averaged and not averaged:
        raise RecipeFolderError(
            f"{yaml_path}: none of the recoverables holding the modules ({', '.join(recoverables)}) is saved as "
            "a state dict, which averaging needs; give --checkpoint best"
        )
    for entry, names in [(chosen.checkpoint, list(recoverables)), *((c, averaged) for c in chosen.averaged)]:
        for name in names:
            if not (entry.path / f"{name}.ckpt").is_file():
                raise RecipeFolderError(
                    f"{entry.path / f'{name}.ckpt'}: missing; the checkpoint does not hold the yaml's {name!r}"
                )
    _load_entry(ckpt_root, recoverables, chosen.checkpoint)
    for name in averaged:
        try:
            recoverables[name].load_state_dict(average_checkpoints(chosen.averaged, recoverable_name=name), strict=True)
        except Exception as error:  # parameters of other shapes in one checkpoint, a damaged file
            raise RecipeFolderError(
                f"{ckpt_root}: the {name!r} of the {len(chosen.averaged)} checkpoints recording a {chosen.key} do "
                f"not average into the yaml's {name!r} ({error_line(error)}); give --checkpoint best"
            ) from None
    if not chosen.averaged:
        return chosen.checkpoint.path, chosen.note, []
    scores = ", ".join(f"{c.path.name} ({chosen.key} {c.meta[chosen.key]:.4g})" for c in chosen.averaged)
    rest = [name for name in recoverables if name not in averaged]
    note = (
        f"{', '.join(averaged)}: the average of the {len(chosen.averaged)} checkpoints recording a {chosen.key}, "
        f"as the recipe's on_evaluate_start computes it: {scores}"
    )
    if rest:
        note += f"; {', '.join(rest)} from the newest, {chosen.checkpoint.path.name}"
    return chosen.checkpoint.path, note, [c.path for c in chosen.averaged]


def load_recipe(
    folder: str | os.PathLike,
    hparams: str | os.PathLike | None = None,
    overrides: dict | None = None,
    modules: list[str] | None = None,
    tokenizer: str | os.PathLike | None = None,
    checkpoint: str | None = None,
) -> RecipeModel:
    """Load a recipe's output folder as a CTC model, with the weights the recipe evaluated (module docstring).

    Parameters
    ----------
    folder : str or os.PathLike
        The recipe's output folder (``output_folder``: ``hyperparams.yaml``, ``save/CKPT+*``).
    hparams : str or os.PathLike, optional
        The recipe's yaml; default ``folder/hyperparams.yaml`` (the copy the run wrote, with its overrides).
    overrides : dict, optional
        Yaml keys to set (as the recipe's command line did): needed only for keys the yaml cannot do without
        that are not recorded in it (``output_folder`` is set to ``folder``, ``!PLACEHOLDER`` keys to a dummy).
    modules : list of str, optional
        The yaml keys of the modules ``compute_forward`` runs between the normaliser and the log-softmax, in
        order; default: the ``modules`` mapping's entries in yaml order, normalisers first.
    tokenizer : str or os.PathLike, optional
        A ``CTCTextEncoder`` file or a SentencePiece model (told apart by content, whatever the name); default:
        the one the recipe left in its save folder (:func:`find_tokenizer`).
    checkpoint : str, optional
        ``"average"`` (the model averaged over the checkpoints recording the error rate, as SpeechBrain's
        LibriSpeech CTC recipe evaluates it), ``"best"`` (lowest WER, else CER, else PER recorded; else the
        newest), ``"newest"``, or a checkpoint folder's name (``CKPT+...``). Default: ``"average"`` when the
        yaml's ``avg_checkpoints`` is above 1 (and more than one checkpoint records the error rate), else
        ``"best"``.

    Returns
    -------
    RecipeModel

    Raises
    ------
    RecipeFolderError
        One line naming the file: no checkpoint, no yaml, a yaml that does not load or whose modules do not fit
        the checkpoint, no tokenizer, a tokenizer of another size than the output layer, ``"average"`` asked
        where no checkpoint records an error rate.
    """
    folder = Path(os.path.abspath(folder))
    if not folder.is_dir():
        raise RecipeFolderError(f"{folder}: no such folder")
    roots = find_checkpoint_dirs(folder)
    if not roots:
        raise RecipeFolderError(
            f"{folder}: no checkpoints (no save/CKPT+*/CKPT.yaml); give a recipe's output folder after at least "
            "one checkpoint was saved"
        )
    yaml_path = Path(hparams) if hparams is not None else folder / "hyperparams.yaml"
    if not yaml_path.is_file():
        raise RecipeFolderError(f"{yaml_path}: no such file; give the recipe's yaml with --hparams{_run_hint(folder)}")
    loaded = _load_yaml(yaml_path, folder, dict(overrides or {}))
    recipe_checkpointer = loaded.get("checkpointer")
    ckpt_root = Path(getattr(recipe_checkpointer, "checkpoints_dir", roots[0]))
    if ckpt_root.resolve() not in [r.resolve() for r in roots]:
        if len(roots) > 1:
            raise RecipeFolderError(
                f"{yaml_path}: its checkpointer reads {ckpt_root}, which holds no checkpoint, and {folder} holds "
                f"several checkpoint folders ({', '.join(str(r) for r in roots)})"
            )
        ckpt_root = roots[0]
    tokenizer_path = Path(tokenizer) if tokenizer is not None else find_tokenizer([ckpt_root, folder], loaded)
    if tokenizer_path is None:
        raise RecipeFolderError(
            f"{ckpt_root}: no tokenizer ({LABEL_ENCODER} of a CTCTextEncoder, {COLLECTED_TOKENIZER} or one "
            f"SentencePiece *.model); give it with --tokenizer FILE{_run_hint(folder)}"
        )
    if not tokenizer_path.is_file():
        raise RecipeFolderError(f"{tokenizer_path}: no such tokenizer file")
    blank = loaded.get("blank_index")
    tokens, blank = read_tokens(tokenizer_path, None if blank is None else int(blank))
    features_key = _features_key(loaded, yaml_path)
    steps = _steps(loaded, yaml_path, features_key, modules)
    average = isinstance(loaded.get("avg_checkpoints"), int) and loaded["avg_checkpoints"] > 1
    choice = checkpoint if checkpoint is not None else ("average" if average else "best")
    chosen, note, averaged = _restore(loaded, yaml_path, steps, ckpt_root, choice, checkpoint is not None)
    for module in steps.values():
        module.eval()
    return RecipeModel(
        folder=folder,
        yaml_path=yaml_path,
        checkpoint=chosen,
        checkpoint_note=note,
        tokenizer_path=tokenizer_path,
        hparams=loaded,
        features_key=features_key,
        steps=steps,
        tokens=tokens,
        blank_index=blank,
        sample_rate=int(loaded.get("sample_rate", 16000)),
        averaged=averaged,
    )
