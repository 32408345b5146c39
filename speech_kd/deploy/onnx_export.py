"""``speech-kd export``: a model folder -> a folder that transcribes without speechbrain or speech_kd.

Two sources: a model folder written by this package (:func:`export_asr`), or the output folder of a
user's own SpeechBrain CTC recipe (:func:`export_recipe`, read by :mod:`speech_kd.deploy.recipe_folder`).
Both give the same folder, run by the same ``transcribe.py``.

Written into ``out``::

    model.onnx | model.ts   the network (fbank frames in, log-probabilities and output lengths out; ONNX
                            opset 17 or TorchScript): :class:`~speech_kd.deploy.graph.CTCGraph`, or a
                            recipe's own modules traced (:class:`~speech_kd.deploy.recipe_folder.RecipeCTC`)
    fbank.npz               the fbank's window and mel filters, as SpeechBrain's ``Fbank`` builds them
    deploy.json             tokens, blank, sample rate, frame shift, fbank settings, quantisation, parameters
    tokens.txt              one token per line, in index order
    transcribe.py           :mod:`speech_kd.deploy.runtime`, copied: fbank, network, greedy CTC decoding
                            or beam search with a KenLM word n-gram
    lm.arpa | lm.arpa.gz | lm.bin   with ``lm``: the language model, copied (``deploy.json`` ``"lm"``
                            records it with its weights; transcribe.py uses it by default)
    README.txt              usage

Quantisation (``int8``) is dynamic: weights stored as int8, activations
quantised per batch at run time. Only the matrix products with a weight
(linear layers: input projection, feed-forward, attention projections) are
quantised; the layers named in ``fp32_layers`` (default: the CTC output
layer, whose small log-probability margins decide blank against token) and
the convolutions (front end, depth-wise) stay fp32.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import pickle
import shutil
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from speech_kd.deploy import runtime
from speech_kd.deploy.graph import CTCGraph, UnsupportedModelError
from speech_kd.deploy.recipe_folder import (
    RecipeCTC,
    RecipeFolderError,
    RecipeModel,
    error_line,
    load_recipe,
    scripted_steps,
)
from speech_kd.model_folder import ModelFolderError, count_parameters, folder_written_beside, load_asr
from speech_kd.nnet.features import filter_matrix
from speech_kd.scoring.lm import check_lm_units, load_lm

__all__ = [
    "export_asr",
    "export_recipe",
    "quantize_onnx_int8",
    "check_out_folder",
    "FORMATS",
    "QUANTIZE",
    "DEFAULT_FP32_LAYERS",
    "PARITY_TOLERANCE",
    "WRITTEN_BY",
]

FORMATS = ("onnx", "torchscript")
QUANTIZE = (None, "int8")
#: layers left in fp32 by ``--quantize int8`` unless told otherwise
DEFAULT_FP32_LAYERS = ("ctc_lin",)
#: ONNX operator set of the exported graph
OPSET = 17
#: ``deploy.json``'s ``written_by``: how an earlier export is recognised (only those are replaced, with ``force``)
WRITTEN_BY = "speech-kd export"
#: what an export folder holds (``__pycache__``: made by ``import transcribe``); ``force`` replaces a folder
#: holding nothing else
EXPORT_ENTRIES = frozenset(
    {
        "model.onnx",
        "model.ts",
        runtime.FEATURES_NAME,
        runtime.CONFIG_NAME,
        "tokens.txt",
        "transcribe.py",
        "README.txt",
        "__pycache__",
        *runtime.LM_NAMES,
    }
)

_README = """Exported by `speech-kd export` ({format}{quant}): a CTC speech recogniser for {rate} Hz mono audio.

Needs: python3 with numpy, soundfile and {runtime} (not speechbrain, not speech_kd).

    python transcribe.py a.wav b.flac                 # one "FILE<TAB>transcript" line per file
    python transcribe.py long.wav                     # over 60 s: 20 s chunks with 2 s context (bounded memory)

A file that cannot be used (missing, empty, not audio, NaN samples) is reported on stderr and the others
are transcribed; the exit status is then 1. Other sample rates are resampled to {rate} Hz (a note says so).

From Python:

    import sys; sys.path.insert(0, "THIS_FOLDER")
    from transcribe import ExportedASR
    asr = ExportedASR("THIS_FOLDER", threads=1)
    asr.transcribe([samples])       # float32 numpy arrays at {rate} Hz -> list of transcripts
    asr.log_probs([samples])        # per utterance [frames, tokens] log-probabilities

Tokens: deploy.json "tokens" (also tokens.txt), blank index {blank}. One output frame every
{shift} s. Features: {n_mels}-dim log-mel fbank computed by transcribe.py in numpy (fbank.npz holds the
window and filters). Audio shorter than {min_ms} ms is zero-padded to that length.
Exported from: {source}.
"""


def _fbank_settings(module: torch.nn.Module) -> tuple[dict, np.ndarray, np.ndarray]:
    """Settings, window ``[n_fft]`` and mel filters ``[n_fft // 2 + 1, F]`` of a SpeechBrain ``Fbank``."""
    stft, banks = module.compute_STFT, module.compute_fbanks
    problems = []
    if module.deltas or module.context:
        problems.append("deltas/context")
    if not stft.center or stft.pad_mode != "constant" or stft.normalized_stft or not stft.onesided:
        problems.append("STFT other than centred, zero-padded, unnormalised, one-sided")
    if not banks.log_mel or banks.multiplier != 10 or banks.param_rand_factor != 0:
        problems.append("filterbank other than log power mel")
    if problems:
        raise UnsupportedModelError(f"compute_features: {', '.join(problems)}")
    window = stft.window.detach().double().numpy()
    if stft.win_length < stft.n_fft:  # torch.stft centres a shorter window in n_fft
        left = (stft.n_fft - stft.win_length) // 2
        window = np.pad(window, (left, stft.n_fft - stft.win_length - left))
    mel = filter_matrix(banks, torch.device("cpu")).double().numpy().T
    settings = {
        "n_fft": int(stft.n_fft),
        "hop_length": int(stft.hop_length),
        "win_length": int(stft.win_length),
        "n_mels": int(mel.shape[1]),
        "amin": float(banks.amin),
        "top_db": float(banks.top_db),
        "ref_value": float(banks.ref_value),
    }
    return settings, window, mel


def _example(n_mels: int, lengths: tuple[int, ...] = (203, 150), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random fbank frames ``[B, max(lengths), n_mels]`` (about -40 dB, 10 dB spread) and ``lengths [B]``.

    The default is a padded batch of two utterances of different lengths (the trace must not specialise on one).
    """
    generator = torch.Generator().manual_seed(seed)
    feats = torch.randn(len(lengths), max(lengths), n_mels, generator=generator) * 10 - 40
    return feats, torch.tensor(lengths, dtype=torch.int64)


def _linear_names(graph: torch.nn.Module, fp32_layers: tuple[str, ...]) -> set[str]:
    """Names of the ``nn.Linear`` modules of ``graph`` not under any of ``fp32_layers``."""
    return {
        name
        for name, module in graph.named_modules()
        if isinstance(module, torch.nn.Linear)
        and not any(name == layer or name.startswith(layer + ".") for layer in fp32_layers)
    }


def _write_onnx(
    graph: torch.nn.Module, example, path: Path, quantize: str | None, fp32_layers: tuple[str, ...]
) -> None:
    """``torch.onnx.export`` (TorchScript-based exporter, dynamic batch and length), then int8 if asked.

    A graph holding scripted modules (``torch.jit.script``: loops over time kept as loops) is traced with
    ``torch.jit.trace`` first; ``torch.onnx.export``'s own trace refuses to call them.
    """
    plain = path.with_name("fp32.onnx") if quantize else path
    graph = graph.for_export() if isinstance(graph, RecipeCTC) else graph
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if any(isinstance(module, torch.jit.ScriptModule) for module in graph.modules()):
            with torch.no_grad():
                graph = torch.jit.trace(graph, example, check_trace=False)
        torch.onnx.export(
            graph,
            example,
            str(plain),
            input_names=["feats", "lengths"],
            output_names=["log_probs", "out_lengths"],
            dynamic_axes={
                "feats": {0: "batch", 1: "frames"},
                "lengths": {0: "batch"},
                "log_probs": {0: "batch", 1: "out_frames"},
                "out_lengths": {0: "batch"},
            },
            opset_version=OPSET,
            dynamo=False,
        )
    if not quantize:
        return
    import onnx

    keep = tuple(f"/{layer.replace('.', '/')}/" for layer in fp32_layers)
    nodes = onnx.load(str(plain)).graph.node
    quantize_onnx_int8(plain, path, exclude=[node.name for node in nodes if node.name.startswith(keep)])
    plain.unlink()


def quantize_onnx_int8(plain: Path, path: Path, exclude: list[str] | None = None) -> None:
    """Dynamic int8 quantisation of ``plain``'s matrix products (weights int8, activations quantised per run).

    ``exclude`` names nodes kept in fp32. onnxruntime logs a line per tensor on the root logger; silenced.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(
            str(plain),
            str(path),
            op_types_to_quantize=["MatMul"],
            weight_type=QuantType.QInt8,
            nodes_to_exclude=exclude or [],
        )
    finally:
        root.setLevel(level)


def _write_torchscript(
    graph: torch.nn.Module, example, path: Path, quantize: str | None, fp32_layers: tuple[str, ...]
) -> None:
    """``torch.jit.trace`` of the graph (after ``quantize_dynamic`` of its linear layers for int8).

    A recipe's network made to be scripted is scripted after the quantisation (:meth:`RecipeCTC.for_export`).
    """
    if quantize:
        from torch.ao.quantization import quantize_dynamic

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = quantize_dynamic(graph, _linear_names(graph, fp32_layers), dtype=torch.qint8)
    graph = graph.for_export() if isinstance(graph, RecipeCTC) else graph
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(graph, example, check_trace=False)
    traced.save(str(path))


def _is_earlier_export(folder: Path) -> bool:
    """Whether ``folder`` holds a ``deploy.json`` that :func:`export_asr` wrote.

    Recognised by ``written_by``, or by the keys of exports made before that key existed.
    """
    try:
        config = json.loads((folder / runtime.CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(config, dict):
        return False
    return config.get("written_by") == WRITTEN_BY or {"model_file", "fbank", "frame_shift", "tokens"} <= set(config)


def check_out_folder(out: str | os.PathLike, model_folder: str | os.PathLike, force: bool = False) -> Path:
    """Refuse an ``--out`` whose writing would delete or overwrite what :func:`export_asr` did not write.

    Allowed: a folder that does not exist yet, an empty folder, and (with ``force``) an earlier export holding
    nothing but an export's files. Refused (``ValueError``, one line naming the folder): the model folder itself
    or any folder holding it, anything else that exists, and a symbolic link. Returns ``out`` made absolute.
    """
    given = out
    out = Path(os.path.abspath(out))
    if not out.name:
        raise ValueError(f"--out {given}: a file system root cannot be an export folder; name a new folder")
    model = Path(model_folder).resolve()
    target = out.resolve()
    if target == model or target in model.parents:
        raise ValueError(
            f"--out {given}: this is the model folder or a folder holding it ({model}), which export "
            f"would replace; choose a new folder, e.g. {model.parent / 'onnx'}"
        )
    if out.is_symlink():
        raise ValueError(f"--out {given}: a symbolic link; give a new folder or the earlier export itself")
    if not out.exists():
        return out
    if not out.is_dir():
        raise ValueError(f"--out {given}: exists and is not a folder; nothing was changed, choose a new folder")
    entries = sorted(entry.name for entry in out.iterdir())
    if not entries:
        return out
    if not _is_earlier_export(out):
        raise ValueError(
            f"--out {given}: exists and is not an earlier export (no {runtime.CONFIG_NAME} written by "
            f"speech-kd export); nothing was changed, choose a new or empty folder"
        )
    foreign = [name for name in entries if name not in EXPORT_ENTRIES]
    if foreign:
        raise ValueError(
            f"--out {given}: an earlier export that also holds {', '.join(foreign[:3])}"
            f"{' ...' if len(foreign) > 3 else ''}, which speech-kd export did not write; move "
            f"{'them' if len(foreign) > 1 else 'it'} out or choose another folder"
        )
    if not force:
        raise ValueError(f"--out {given}: holds an earlier export; pass --force to replace it")
    return out


def _load_model(model_folder: str | os.PathLike):
    """``load_asr`` of ``model_folder`` on the CPU, a bad checkpoint told in one line.

    A checkpoint that is not one (random bytes, cut short, another format) is named in a ``ValueError``
    instead of torch's unpickling error (which advises unsafe loading).
    """
    try:
        return load_asr(model_folder, device="cpu")
    except (pickle.UnpicklingError, EOFError, RuntimeError, zipfile.BadZipFile, ModelFolderError) as error:
        for path in sorted(Path(model_folder).glob("*.ckpt")):
            if path.name == "tokenizer.ckpt":  # text, read by the tokenizer
                continue
            try:
                torch.load(path, map_location="cpu", weights_only=True)
            except Exception:
                raise ValueError(
                    f"{path}: not a PyTorch checkpoint of a model folder (corrupt, cut short or "
                    "another format); write the model folder again from its training run"
                ) from None
        raise error


def export_asr(
    model_folder: str | os.PathLike,
    out: str | os.PathLike,
    fmt: str = "onnx",
    quantize: str | None = None,
    fp32_layers: tuple[str, ...] | None = None,
    blank_penalty: float = 0.0,
    force: bool = False,
    lm: str | os.PathLike | None = None,
    lm_weight: float = runtime.DEFAULT_LM_WEIGHT,
    word_bonus: float = runtime.DEFAULT_WORD_BONUS,
    beam_size: int = runtime.DEFAULT_BEAM_SIZE,
) -> dict:
    """Export a model folder (``speech-kd train``/``distill``'s ``<output_folder>/model``) to ``out``.

    Parameters
    ----------
    model_folder : str or os.PathLike
        A SpeechBrain ``EncoderASR`` folder written by this package (see the module docstring of
        :mod:`speech_kd.model_folder`).
    out : str or os.PathLike
        Folder to write: new, empty, or (with ``force``) an earlier export, see :func:`check_out_folder`.
        Written to a fresh temporary sibling first, then renamed; a failed export leaves nothing behind.
    fmt : str
        ``"onnx"`` or ``"torchscript"``.
    quantize : str, optional
        ``None`` (fp32) or ``"int8"`` (dynamic quantisation of the linear layers, see module docstring).
    fp32_layers : tuple of str, optional
        Modules of :class:`~speech_kd.deploy.graph.CTCGraph` left in fp32 by ``int8`` (``ctc_lin``,
        ``encoder.layers.0``, ...); default :data:`DEFAULT_FP32_LAYERS`, the output layer.
    blank_penalty : float
        Written to ``deploy.json``: subtracted from the blank's log-probability when decoding.
    force : bool
        Replace ``out`` when it holds an earlier export (only then).
    lm : str or os.PathLike, optional
        A word n-gram (ARPA, ``.arpa.gz`` or KenLM binary) copied into the folder as ``lm.arpa``,
        ``lm.arpa.gz`` or ``lm.bin``, checked first against the model's units
        (:func:`~speech_kd.scoring.lm.check_lm_units`); ``transcribe.py`` then decodes with it by default.
    lm_weight, word_bonus, beam_size : float, float, int
        Recorded with the LM in ``deploy.json`` ``"lm"`` (e.g. what ``speech-kd evaluate --tune_lm`` picked).

    Returns
    -------
    dict
        The ``deploy.json`` written, plus ``max_abs_diff`` (exported network against the PyTorch graph on a
        padded batch of random frames) and ``bytes`` (model file size).
    """
    _check_options(fmt, quantize, beam_size)
    fp32_layers = DEFAULT_FP32_LAYERS if fp32_layers is None else tuple(fp32_layers)
    out = check_out_folder(out, model_folder, force)
    lm_info = load_lm(lm) if lm is not None else None  # a missing or corrupt LM: told before the export runs
    asr = _load_model(model_folder)
    tokens = [asr.tokenizer.ind2lab[i] for i in range(len(asr.tokenizer))]
    blank_index = int(getattr(asr.hparams, "blank_index", 0))
    if lm_info is not None:
        check_lm_units(lm_info, tokens, blank_index)
    encoder = asr.mods.encoder.eval()
    settings, window, mel = _fbank_settings(encoder.compute_features)
    graph = CTCGraph.from_encoder(encoder)
    _check_fp32_layers(graph, quantize, fp32_layers)
    example = _example(settings["n_mels"])
    stride = int(graph.out_lengths(torch.tensor([1 << 20]))[0])
    sample_rate = int(getattr(asr.hparams, "sample_rate", 16000))
    description = {
        "tokens": tokens,
        "blank_index": blank_index,
        "sample_rate": sample_rate,
        "frame_shift": (1 << 20) * settings["hop_length"] / stride / sample_rate,
        "min_samples": settings["n_fft"],
        "params": count_parameters(asr),
        "source": Path(model_folder).resolve().name,
    }

    with folder_written_beside(out, lambda: check_out_folder(out, model_folder, force)) as tmp:
        _write_model(graph, example, tmp, fmt, quantize, fp32_layers)
        config = _write_description(
            tmp, description, settings, window, mel, fmt, quantize, fp32_layers, blank_penalty, batch_exact=True
        )
        diff = _batch_diff(tmp, graph, example)
        if lm_info is not None:
            config = _copy_lm(tmp, lm_info, config, lm_weight, word_bonus, beam_size)
    return {**config, "max_abs_diff": diff, "bytes": (out / config["model_file"]).stat().st_size}


def _check_options(fmt: str, quantize: str | None, beam_size: int) -> None:
    """Refuse a format, quantisation or beam size the exporter does not know (before any work)."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if quantize not in QUANTIZE:
        raise ValueError(f"--quantize {quantize!r}: only int8 (dynamic) is supported")
    if isinstance(beam_size, bool) or not isinstance(beam_size, int) or beam_size < 1:
        raise ValueError(f"--beam_size must be a positive integer, got {beam_size!r}")


def _check_fp32_layers(graph: torch.nn.Module, quantize: str | None, fp32_layers: tuple[str, ...]) -> None:
    """With int8, every ``--fp32_layers`` name must be a module of the exported graph."""
    unknown = [layer for layer in fp32_layers if layer not in dict(graph.named_modules())]
    if quantize and unknown:
        names = [name for name, _ in graph.named_children()][:4]
        raise ValueError(f"--fp32_layers {', '.join(unknown)}: no such module (e.g. {', '.join(names)})")


#: largest log-probability difference between a recipe's exported network and its PyTorch modules (fp32, the
#: same frames in) that counts as reproducing them; exports of this package's models differ by about 1e-5
PARITY_TOLERANCE = 1e-3
#: lengths (fbank frames) of the utterances the recipe check runs, none of the trace's (203, 150)
CHECK_LENGTHS = (97, 311)


def export_recipe(
    folder: str | os.PathLike,
    out: str | os.PathLike,
    hparams: str | os.PathLike | None = None,
    overrides: dict | None = None,
    modules: list[str] | None = None,
    tokenizer: str | os.PathLike | None = None,
    checkpoint: str | None = None,
    fmt: str = "onnx",
    quantize: str | None = None,
    fp32_layers: tuple[str, ...] | None = None,
    blank_penalty: float = 0.0,
    force: bool = False,
    lm: str | os.PathLike | None = None,
    lm_weight: float = runtime.DEFAULT_LM_WEIGHT,
    word_bonus: float = runtime.DEFAULT_WORD_BONUS,
    beam_size: int = runtime.DEFAULT_BEAM_SIZE,
) -> dict:
    """Export a CTC model trained in a user's own SpeechBrain recipe, from the recipe's output folder, to ``out``.

    The folder is read by :func:`~speech_kd.deploy.recipe_folder.load_recipe` (the yaml, the weights the recipe
    evaluated: one checkpoint, or the average of several as SpeechBrain's LibriSpeech CTC recipe computes it; the
    tokenizer). The network (normalised fbank frames in, log-probabilities out) is exported by the first of
    these that reproduces the recipe's PyTorch modules (log-probabilities within :data:`PARITY_TOLERANCE` on
    random frames of lengths the trace did not see, each utterance alone):

    1. the exporter's own graph, :class:`~speech_kd.deploy.graph.CTCGraph`, when the modules are a
       convolution front end, a conformer ``TransformerASR`` and an output layer (SpeechBrain's LibriSpeech
       CTC conformer): exact per utterance in a padded batch (``batch_exact``);
    2. ``torch.onnx.export`` (or ``torch.jit.trace``) of the recipe's modules as they are
       (:class:`~speech_kd.deploy.recipe_folder.RecipeCTC`), one utterance per run (``batch_exact`` false:
       ``transcribe.py`` runs utterances one by one);
    3. the same with each module that ``torch.jit.script`` compiles scripted first
       (:func:`~speech_kd.deploy.recipe_folder.scripted_steps`): a recurrent layer written as a Python loop
       over frames (SpeechBrain's ``LiGRU``, the RNN of its TIMIT CRDNN) keeps its loop instead of being
       unrolled for the traced length.

    When none does, the first module whose export does not reproduce it is named
    (:class:`~speech_kd.deploy.graph.UnsupportedModelError`, one line) and nothing is written. The fbank
    is computed by ``transcribe.py`` as for every export (one implementation, tested equal to SpeechBrain's).
    ``int8`` quantises the chosen network after the fp32 check.

    Parameters
    ----------
    folder : str or os.PathLike
        The recipe's output folder (``hyperparams.yaml``, ``save/CKPT+*``, the tokenizer in ``save/``).
    out : str or os.PathLike
        Folder to write, as for :func:`export_asr` (new, empty, or with ``force`` an earlier export).
    hparams, overrides, modules, tokenizer, checkpoint
        As :func:`~speech_kd.deploy.recipe_folder.load_recipe` takes them.
    fmt, quantize, blank_penalty, force, lm, lm_weight, word_bonus, beam_size
        As :func:`export_asr` takes them.
    fp32_layers : tuple of str, optional
        Modules left in fp32 by ``int8``; default: the output layer (``ctc_lin`` of the exporter's graph, the
        last module's yaml key otherwise).

    Returns
    -------
    dict
        ``deploy.json``'s contents, plus ``max_abs_diff`` (exported network against the PyTorch modules on
        random frames), ``audio_max_abs_diff`` and ``audio_same_transcript`` (``transcribe.py``'s fbank and
        network against SpeechBrain's ``Fbank`` and the modules, on a synthetic waveform), ``path`` (which of
        the three above), ``checkpoint`` (the folder restored and why, or the checkpoints averaged),
        ``modules`` (``"key (Class)"`` of the modules compared, in the order they ran) and ``bytes``.

    Raises
    ------
    RecipeFolderError
        A folder, yaml, checkpoint or tokenizer that cannot be used (one line naming the file).
    UnsupportedModelError
        Features other than an ``Fbank``, or a module no path reproduces (named with its yaml key and class).
    """
    _check_options(fmt, quantize, beam_size)
    out = check_out_folder(out, folder, force)
    lm_info = load_lm(lm) if lm is not None else None
    model = load_recipe(folder, hparams, overrides, modules, tokenizer, checkpoint)
    if lm_info is not None:
        check_lm_units(lm_info, model.tokens, model.blank_index)
    try:
        settings, window, mel = _fbank_settings(model.features)
    except UnsupportedModelError as error:
        raise UnsupportedModelError(f"{model.features_key} ({type(model.features).__name__}): {error}") from None
    reference = RecipeCTC(model.steps, single=False)
    min_samples = _recipe_checks(model, reference, settings)
    with torch.no_grad():
        frames = reference(*_example(settings["n_mels"], (1000,)))[0].shape[1]
    description = {
        "tokens": model.tokens,
        "blank_index": model.blank_index,
        "sample_rate": model.sample_rate,
        "frame_shift": 1000 * settings["hop_length"] / frames / model.sample_rate,
        "min_samples": min_samples,
        "params": model.parameters(),
        "source": _source(model),
    }
    checks = [_example(settings["n_mels"], (n,), seed=i + 1) for i, n in enumerate(CHECK_LENGTHS)]

    with folder_written_beside(out, lambda: check_out_folder(out, folder, force)) as tmp:
        graph, path, diff, batch_exact = _choose_graph(
            model, reference, description, (settings, window, mel), checks, tmp, fmt
        )
        if quantize:
            layers = tuple(fp32_layers) if fp32_layers is not None else _output_layer(graph)
            _check_fp32_layers(graph, quantize, layers)
            example = _example(settings["n_mels"], (203, 150) if batch_exact else (203,))
            _write_model(graph, example, tmp, fmt, quantize, layers)
        else:
            layers = ()
        config = _write_description(
            tmp, description, settings, window, mel, fmt, quantize, layers, blank_penalty, batch_exact
        )
        if quantize:
            diff = _single_diff(tmp, reference, checks)
        audio = _audio_check(tmp, model, reference)
        if lm_info is not None:
            config = _copy_lm(tmp, lm_info, config, lm_weight, word_bonus, beam_size)
    return {
        **config,
        "max_abs_diff": diff,
        **audio,
        "path": path,
        "checkpoint": model.weights(),
        "modules": [model.describe(key) for key in model.steps],
        "bytes": (out / config["model_file"]).stat().st_size,
    }


def _in_folder(folder: Path, path: Path) -> str:
    """``path`` as ``FOLDER_NAME/relative/path`` when it is in ``folder`` (no machine's absolute path), else whole."""
    return f"{folder.name}/{path.relative_to(folder)}" if path.is_relative_to(folder) else str(path)


def _source(model: RecipeModel) -> str:
    """``deploy.json``'s ``source``: the checkpoint folder (``run/save/CKPT+...``), or those averaged."""
    if not model.averaged:
        return _in_folder(model.folder, model.checkpoint)
    averaged = ", ".join(_in_folder(model.folder, path) for path in model.averaged)
    return f"average of {averaged} (the rest from {_in_folder(model.folder, model.checkpoint)})"


def _recipe_checks(model: RecipeModel, reference: RecipeCTC, settings: dict) -> int:
    """Check the modules' output against the tokens; return the fewest samples they take (``min_samples``).

    The output layer must have one output per token of the tokenizer. Audio shorter than the returned
    number of samples is zero-padded by ``transcribe.py``: the FFT length, doubled until the modules run
    (pooling and convolutions need a few frames).
    """
    try:
        with torch.no_grad():
            log_probs = reference(*_example(settings["n_mels"], (50,)))[0]
    except Exception as error:  # a module given the wrong input: any error of any layer
        raise RecipeFolderError(
            f"{model.yaml_path}: the modules {', '.join(model.describe(key) for key in model.steps)} do not run in "
            f"this order on fbank frames ({error_line(error)}); name the modules compute_forward runs, in order, "
            "with --modules"
        ) from None
    last = list(model.steps)[-1]
    if log_probs.dim() != 3 or log_probs.shape[-1] != len(model.tokens):
        raise RecipeFolderError(
            f"{model.tokenizer_path}: {len(model.tokens)} tokens, but the modules end in {model.describe(last)} "
            f"with output {tuple(log_probs.shape)} [batch, frames, tokens]; give the tokenizer the run was "
            "trained with (--tokenizer) or the modules compute_forward runs (--modules)"
        )
    samples = settings["n_fft"]
    while True:
        frames = 1 + samples // settings["hop_length"]
        try:
            with torch.no_grad():
                if reference(*_example(settings["n_mels"], (frames,)))[0].shape[1] > 0:
                    return samples
        except RuntimeError:
            pass
        if samples >= model.sample_rate:
            raise UnsupportedModelError(f"{model.describe(last)}: no output for 1 s of audio")
        samples *= 2


def _conformer_graph(model: RecipeModel) -> CTCGraph:
    """The exporter's graph of a recipe's modules (:class:`UnsupportedModelError` unless it knows them).

    Known: a normaliser, a ``ConvolutionFrontEnd``, a conformer ``TransformerASR`` and a linear layer, in this order.
    """
    kinds = [type(module).__name__ for module in model.steps.values()]
    if (
        kinds[:2] != ["InputNormalization", "ConvolutionFrontEnd"]
        or kinds[2:3] != ["EncoderWrapper"]
        or len(kinds) != 4
    ):
        raise UnsupportedModelError(f"modules {', '.join(kinds)} (the exporter's graph: a conformer's)")
    return CTCGraph(*model.steps.values())


def _output_layer(graph: torch.nn.Module) -> tuple[str, ...]:
    """The output layer's name in ``graph``: ``ctc_lin`` of :class:`CTCGraph`, else the last module."""
    if isinstance(graph, CTCGraph):
        return DEFAULT_FP32_LAYERS
    return ([name for name, _ in graph.named_children()] or [""])[-1:]


def _choose_graph(
    model: RecipeModel,
    reference: RecipeCTC,
    description: dict,
    features: tuple[dict, np.ndarray, np.ndarray],
    checks: list,
    tmp: Path,
    fmt: str,
) -> tuple[torch.nn.Module, str, float, bool]:
    """Write the first fp32 network that reproduces ``reference`` into ``tmp``: ``(graph, path, diff, batch_exact)``.

    Tried in turn: the exporter's graph (batch-exact), the recipe's modules as they are (one utterance per
    run), the same with the modules that script scripted (:func:`export_recipe`). The check runs each of
    ``checks`` (single utterances) through the written folder (``description``, ``features``: the fbank's
    settings, window and filters) and the reference.
    """
    settings, window, mel = features
    reasons = []
    candidates = []
    try:
        candidates.append(("the exporter's conformer graph", _conformer_graph(model), True))
    except UnsupportedModelError as error:
        reasons.append(f"exporter's graph: {error}")
    exporter = "torch.onnx.export" if fmt == "onnx" else "torch.jit.trace"
    candidates.append((f"{exporter} of the recipe's modules", RecipeCTC(model.steps, single=True), False))
    scriptable = [key for key, step in scripted_steps(model.steps).items() if step is not model.steps[key]]
    if scriptable:
        candidates.append(
            (
                f"{exporter} of the recipe's modules, {', '.join(scriptable)} scripted",
                RecipeCTC(model.steps, single=True, script=True),
                False,
            )
        )
    with _quiet_onnxruntime(fmt):  # a candidate that fails is reported below, not in onnxruntime's log
        for path, graph, batch_exact in candidates:
            example = _example(settings["n_mels"], (203, 150) if batch_exact else (203,))
            try:
                _write_model(graph, example, tmp, fmt, None, ())
                _write_description(tmp, description, settings, window, mel, fmt, None, (), 0.0, batch_exact)
                diff = _single_diff(tmp, reference, checks)
            except Exception as error:  # what torch.onnx.export / torch.jit.trace / the runtime raise
                reasons.append(f"{path}: {error_line(error)}")
                continue
            if diff <= PARITY_TOLERANCE:
                return graph, path, diff, batch_exact
            what = f"log-probabilities differ by {diff:.3g}" if math.isfinite(diff) else "other output shapes"
            reasons.append(f"{path}: {what}")
        culprit = _culprit(model, settings, checks, tmp, fmt)
    raise UnsupportedModelError(
        f"{culprit}; neither the exporter's graph nor {exporter} reproduces the model ({'; '.join(reasons)})"
    )


@contextlib.contextmanager
def _quiet_onnxruntime(fmt: str) -> Iterator[None]:
    """Hold the log of onnxruntime to fatal errors (then back to its default, warnings) for ONNX exports."""
    if fmt != "onnx":
        yield
        return
    import onnxruntime

    onnxruntime.set_default_logger_severity(4)
    try:
        yield
    finally:
        onnxruntime.set_default_logger_severity(2)


def _culprit(model: RecipeModel, settings: dict, checks: list, tmp: Path, fmt: str) -> str:
    """Name the first module whose export (the modules up to it, one utterance per run) differs from PyTorch.

    The modules are scripted where they script (:func:`~speech_kd.deploy.recipe_folder.scripted_steps`): a
    recurrent layer that exports scripted is not the one to blame.
    """
    names = list(model.steps)
    for upto in range(1, len(names) + 1):
        graph = RecipeCTC(model.steps, single=True, upto=upto, script=True)
        reference = RecipeCTC(model.steps, single=False, upto=upto)
        probe = tmp / ("probe.onnx" if fmt == "onnx" else "probe.ts")
        try:
            writer = _write_onnx if fmt == "onnx" else _write_torchscript
            writer(graph, _example(settings["n_mels"], (203,)), probe, None, ())
            for feats, lengths in checks:
                got = _run_file(probe, fmt, feats, lengths)
                with torch.no_grad():
                    expected = reference(feats, lengths)[0].numpy()
                if got.shape != expected.shape or not np.abs(got - expected).max() <= PARITY_TOLERANCE:
                    what = (
                        f"gives shape {got.shape}, PyTorch {expected.shape},"
                        if got.shape != expected.shape
                        else f"differs from PyTorch by {np.abs(got - expected).max():.3g}"
                    )
                    return f"{model.describe(names[upto - 1])}: its export {what} on a length the trace did not see"
        except Exception as error:  # what torch.onnx.export / torch.jit.trace raise for what they cannot follow
            return f"{model.describe(names[upto - 1])}: cannot be exported ({error_line(error)})"
        finally:
            probe.unlink(missing_ok=True)
    return f"the modules {', '.join(model.describe(n) for n in names)}: the exported network differs from PyTorch"


def _run_file(path: Path, fmt: str, feats: torch.Tensor, lengths: torch.Tensor) -> np.ndarray:
    """The first output of an exported file (``.onnx`` or TorchScript) on ``feats [B, T, F]``, ``lengths [B]``."""
    if fmt == "onnx":
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return session.run(None, {"feats": feats.numpy(), "lengths": lengths.numpy()})[0]
    with torch.no_grad():
        return torch.jit.load(str(path))(feats, lengths)[0].numpy()


def _single_diff(tmp: Path, reference: torch.nn.Module, checks: list) -> float:
    """Largest log-probability difference of the folder's network from ``reference``, one utterance per run."""
    asr = runtime.ExportedASR(tmp, threads=1)
    worst = 0.0
    for feats, lengths in checks:
        got, got_lengths = asr.run(feats.numpy(), lengths.numpy())
        with torch.no_grad():
            expected, expected_lengths = reference(feats, lengths)
        if got.shape != tuple(expected.shape) or not np.array_equal(got_lengths, expected_lengths.numpy()):
            return math.inf
        worst = max(worst, float(np.abs(got - expected.numpy()).max()))
    return worst if math.isfinite(worst) else math.inf


def _audio_check(tmp: Path, model: RecipeModel, reference: torch.nn.Module) -> dict:
    """``transcribe.py``'s whole path against SpeechBrain's ``Fbank`` and the modules, on a synthetic waveform.

    1.5 s of harmonic sweeps in noise through the folder (numpy fbank, network, greedy decoding) and through
    the recipe's ``Fbank`` and modules: ``audio_max_abs_diff`` and ``audio_same_transcript``.
    """
    rate = model.sample_rate
    t = np.arange(int(1.5 * rate)) / rate
    rng = np.random.default_rng(0)
    pitch = 120 + 60 * np.sin(2 * np.pi * 1.3 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    wav = sum(np.sin(k * phase) / k for k in range(1, 12)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)) * 0.05
    wav = (wav + 0.005 * rng.standard_normal(t.shape[0])).astype(np.float32)
    asr = runtime.ExportedASR(tmp, threads=1)
    got = asr.log_probs([wav])[0]
    with torch.no_grad():
        feats = model.features(torch.from_numpy(wav)[None])
        expected = reference(feats, torch.tensor([feats.shape[1]]))[0][0].numpy()
    if got.shape != expected.shape:
        return {"audio_max_abs_diff": math.inf, "audio_same_transcript": False}
    same = asr.decode(got) == asr.text(runtime.greedy_decode(expected, model.blank_index, asr.blank_penalty))
    return {"audio_max_abs_diff": float(np.abs(got - expected).max()), "audio_same_transcript": same}


def _copy_lm(tmp: Path, info, config: dict, lm_weight: float, word_bonus: float, beam_size: int) -> dict:
    """Copy the LM into the export (``lm.arpa``/``lm.arpa.gz``/``lm.bin``), record it in ``deploy.json``, load it."""
    if info.format == "binary":
        name = "lm.bin"
    else:
        with open(info.path, "rb") as fh:
            name = "lm.arpa.gz" if fh.read(2) == b"\x1f\x8b" else "lm.arpa"
    shutil.copyfile(info.path, tmp / name)
    config = {
        **config,
        "lm": {
            "file": name,
            "source": info.path.name,
            "lm_weight": float(lm_weight),
            "word_bonus": float(word_bonus),
            "beam_size": int(beam_size),
        },
    }
    (tmp / runtime.CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    runtime.ExportedASR(tmp, threads=1)  # the folder's transcribe.py loads it: KenLM's errors now, not later
    return config


def _write_model(
    graph: torch.nn.Module, example, tmp: Path, fmt: str, quantize: str | None, fp32_layers: tuple[str, ...]
) -> None:
    """The network's file (``model.onnx`` or ``model.ts``) in ``tmp``."""
    writer = _write_onnx if fmt == "onnx" else _write_torchscript
    writer(graph, example, tmp / ("model.onnx" if fmt == "onnx" else "model.ts"), quantize, tuple(fp32_layers))


def _write_description(
    tmp: Path,
    description: dict,
    settings: dict,
    window: np.ndarray,
    mel: np.ndarray,
    fmt: str,
    quantize: str | None,
    fp32_layers: tuple[str, ...],
    blank_penalty: float,
    batch_exact: bool,
) -> dict:
    """Write everything of the export but the network into ``tmp``; return ``deploy.json``'s contents.

    ``description``: ``tokens``, ``blank_index``, ``sample_rate``, ``frame_shift``, ``min_samples``, ``params``
    and ``source``; ``window [n_fft]`` and ``mel [n_fft // 2 + 1, F]`` go to ``fbank.npz``.
    """
    np.savez(tmp / runtime.FEATURES_NAME, window=window, mel=mel)
    config = {
        "written_by": WRITTEN_BY,
        "format": fmt,
        "model_file": "model.onnx" if fmt == "onnx" else "model.ts",
        "quantization": "int8-dynamic" if quantize else "fp32",
        "fp32_layers": list(fp32_layers) if quantize else [],
        "batch_exact": bool(batch_exact and not quantize),  # int8: activation scales per batch, utterances one by one
        "tokens": description["tokens"],
        "blank_index": int(description["blank_index"]),
        "sample_rate": int(description["sample_rate"]),
        "frame_shift": float(description["frame_shift"]),
        "min_samples": int(description["min_samples"]),
        "fbank": settings,
        "blank_penalty": float(blank_penalty),
        "params": int(description["params"]),
        "opset": OPSET if fmt == "onnx" else None,
        "source": description["source"],
    }
    (tmp / runtime.CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (tmp / "tokens.txt").write_text("".join(f"{t}\n" for t in config["tokens"]), encoding="utf-8")
    shutil.copyfile(runtime.__file__, tmp / "transcribe.py")
    (tmp / "README.txt").write_text(
        _README.format(
            format=fmt,
            quant=", int8" if quantize else "",
            rate=config["sample_rate"],
            blank=config["blank_index"],
            runtime="onnxruntime" if fmt == "onnx" else "torch",
            shift=round(config["frame_shift"], 4),
            n_mels=settings["n_mels"],
            min_ms=round(1000 * config["min_samples"] / config["sample_rate"]),
            source=config["source"],
        ),
        encoding="utf-8",
    )
    return config


def _batch_diff(tmp: Path, graph: torch.nn.Module, example) -> float:
    """Largest log-probability difference of the folder's network from ``graph`` on the padded ``example``."""
    with torch.no_grad():
        expected, expected_lengths = graph(*example)
    got, got_lengths = runtime.ExportedASR(tmp, threads=1).run(example[0].numpy(), example[1].numpy())
    if not np.array_equal(got_lengths, expected_lengths.numpy()):
        raise RuntimeError(f"exported network gives output lengths {got_lengths}, PyTorch {expected_lengths}")
    return max(float(np.abs(got[i, :n] - expected[i, :n].numpy()).max()) for i, n in enumerate(got_lengths))
