"""``speech-kd export``: a model folder -> a folder that transcribes without speechbrain or speech_kd.

Written into ``out``::

    model.onnx | model.ts   the network of :class:`~speech_kd.deploy.graph.CTCGraph` (fbank frames in,
                            log-probabilities and output lengths out; ONNX opset 17 or TorchScript)
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

import json
import os
import pickle
import shutil
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from speech_kd.deploy import runtime
from speech_kd.deploy.graph import CTCGraph, UnsupportedModelError
from speech_kd.model_folder import ModelFolderError, count_parameters, folder_written_beside, load_asr
from speech_kd.nnet.features import filter_matrix
from speech_kd.scoring.lm import check_lm_units, load_lm

__all__ = ["export_asr", "check_out_folder", "FORMATS", "QUANTIZE", "DEFAULT_FP32_LAYERS", "WRITTEN_BY"]

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
{shift} s. Features: 80-dim log-mel fbank computed by transcribe.py in numpy (fbank.npz holds the
window and filters). Audio shorter than {min_ms} ms is zero-padded to that length.
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


def _example(graph: CTCGraph, n_mels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A padded batch of two utterances of different lengths (the trace must not specialise on one)."""
    generator = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 203, n_mels, generator=generator) * 10 - 40
    return feats, torch.tensor([203, 150], dtype=torch.int64)


def _linear_names(graph: torch.nn.Module, fp32_layers: tuple[str, ...]) -> set[str]:
    """Names of the ``nn.Linear`` modules of ``graph`` not under any of ``fp32_layers``."""
    return {
        name
        for name, module in graph.named_modules()
        if isinstance(module, torch.nn.Linear)
        and not any(name == layer or name.startswith(layer + ".") for layer in fp32_layers)
    }


def _write_onnx(graph: CTCGraph, example, path: Path, quantize: str | None, fp32_layers: tuple[str, ...]) -> None:
    """``torch.onnx.export`` (TorchScript-based exporter, dynamic batch and length), then int8 if asked."""
    plain = path.with_name("fp32.onnx") if quantize else path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
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
    from onnxruntime.quantization import QuantType, quantize_dynamic

    keep = tuple(f"/{layer.replace('.', '/')}/" for layer in fp32_layers)
    nodes = onnx.load(str(plain)).graph.node
    excluded = [node.name for node in nodes if node.name.startswith(keep)]
    quantize_dynamic(
        str(plain), str(path), op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8, nodes_to_exclude=excluded
    )
    plain.unlink()


def _write_torchscript(
    graph: CTCGraph, example, path: Path, quantize: str | None, fp32_layers: tuple[str, ...]
) -> None:
    """``torch.jit.trace`` of the graph (after ``quantize_dynamic`` of its linear layers for int8)."""
    if quantize:
        from torch.ao.quantization import quantize_dynamic

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = quantize_dynamic(graph, _linear_names(graph, fp32_layers), dtype=torch.qint8)
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
    fp32_layers: tuple[str, ...] = DEFAULT_FP32_LAYERS,
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
    fp32_layers : tuple of str
        Modules of :class:`~speech_kd.deploy.graph.CTCGraph` left in fp32 by ``int8`` (``ctc_lin``,
        ``encoder.layers.0``, ...).
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
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if quantize not in QUANTIZE:
        raise ValueError(f"--quantize {quantize!r}: only int8 (dynamic) is supported")
    out = check_out_folder(out, model_folder, force)
    lm_info = load_lm(lm) if lm is not None else None  # a missing or corrupt LM: told before the export runs
    if isinstance(beam_size, bool) or not isinstance(beam_size, int) or beam_size < 1:
        raise ValueError(f"--beam_size must be a positive integer, got {beam_size!r}")
    asr = _load_model(model_folder)
    if lm_info is not None:
        tokens = [asr.tokenizer.ind2lab[i] for i in range(len(asr.tokenizer))]
        check_lm_units(lm_info, tokens, int(getattr(asr.hparams, "blank_index", 0)))
    encoder = asr.mods.encoder.eval()
    settings, window, mel = _fbank_settings(encoder.compute_features)
    graph = CTCGraph.from_encoder(encoder)
    unknown = [layer for layer in fp32_layers if layer not in dict(graph.named_modules())]
    if quantize and unknown:
        raise ValueError(f"--fp32_layers {', '.join(unknown)}: no such module (e.g. ctc_lin, encoder.layers.0)")
    example = _example(graph, settings["n_mels"])

    with folder_written_beside(out, lambda: check_out_folder(out, model_folder, force)) as tmp:
        config, diff = _write_folder(
            tmp,
            asr,
            graph,
            example,
            settings,
            window,
            mel,
            fmt,
            quantize,
            fp32_layers,
            blank_penalty,
            count_parameters(asr),
            model_folder,
        )
        if lm_info is not None:
            config = _copy_lm(tmp, lm_info, config, lm_weight, word_bonus, beam_size)
    return {**config, "max_abs_diff": diff, "bytes": (out / config["model_file"]).stat().st_size}


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


def _write_folder(
    tmp: Path,
    asr,
    graph: CTCGraph,
    example,
    settings: dict,
    window: np.ndarray,
    mel: np.ndarray,
    fmt: str,
    quantize: str | None,
    fp32_layers: tuple[str, ...],
    blank_penalty: float,
    params: int,
    model_folder: str | os.PathLike,
) -> tuple[dict, float]:
    """Write the export into ``tmp`` and check it against the PyTorch graph.

    Returns ``deploy.json``'s contents and the largest log-probability difference.
    """
    stride = int(graph.out_lengths(torch.tensor([1 << 20]))[0])
    tokens = [asr.tokenizer.ind2lab[i] for i in range(len(asr.tokenizer))]
    sample_rate = int(getattr(asr.hparams, "sample_rate", 16000))
    model_file = "model.onnx" if fmt == "onnx" else "model.ts"
    writer = _write_onnx if fmt == "onnx" else _write_torchscript
    writer(graph, example, tmp / model_file, quantize, tuple(fp32_layers))
    np.savez(tmp / runtime.FEATURES_NAME, window=window, mel=mel)
    config = {
        "written_by": WRITTEN_BY,
        "format": fmt,
        "model_file": model_file,
        "quantization": "int8-dynamic" if quantize else "fp32",
        "fp32_layers": list(fp32_layers) if quantize else [],
        "batch_exact": not quantize,  # int8: activation scales per batch, so utterances are run one by one
        "tokens": tokens,
        "blank_index": int(getattr(asr.hparams, "blank_index", 0)),
        "sample_rate": sample_rate,
        "frame_shift": (1 << 20) * settings["hop_length"] / stride / sample_rate,
        "min_samples": settings["n_fft"],
        "fbank": settings,
        "blank_penalty": float(blank_penalty),
        "params": params,
        "opset": OPSET if fmt == "onnx" else None,
        "source": Path(model_folder).resolve().name,
    }
    (tmp / runtime.CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (tmp / "tokens.txt").write_text("".join(f"{t}\n" for t in tokens), encoding="utf-8")
    shutil.copyfile(runtime.__file__, tmp / "transcribe.py")
    (tmp / "README.txt").write_text(
        _README.format(
            format=fmt,
            quant=", int8" if quantize else "",
            rate=sample_rate,
            blank=config["blank_index"],
            runtime="onnxruntime" if fmt == "onnx" else "torch",
            shift=round(config["frame_shift"], 4),
            min_ms=round(1000 * settings["n_fft"] / sample_rate),
        ),
        encoding="utf-8",
    )

    with torch.no_grad():
        expected, expected_lengths = graph(*example)
    got, got_lengths = runtime.ExportedASR(tmp, threads=1).run(example[0].numpy(), example[1].numpy())
    if not np.array_equal(got_lengths, expected_lengths.numpy()):
        raise RuntimeError(f"exported network gives output lengths {got_lengths}, PyTorch {expected_lengths}")
    diff = max(float(np.abs(got[i, :n] - expected[i, :n].numpy()).max()) for i, n in enumerate(got_lengths))
    return config, diff
