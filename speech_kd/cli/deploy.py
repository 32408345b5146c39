"""``speech-kd export``, ``bench``, ``bench-kd`` and ``demo``: deployment, speed and experiments.

``bench`` and ``bench-kd`` have their own parsers (:mod:`speech_kd.bench.speed`,
:mod:`speech_kd.bench.experiments.main`); they are listed in ``speech-kd --help`` here.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from speech_kd import hparams_files
from speech_kd.argtypes import finite_float, non_negative_float, positive_int
from speech_kd.demo import run_demo
from speech_kd.deploy.onnx_export import export_asr, export_recipe
from speech_kd.deploy.recipe_folder import CHECKPOINT_CHOICES, is_recipe_folder, run_model_folder

__all__ = ["add_bench", "add_demo", "add_export"]


#: the options that read a recipe's output folder (any of them given: the folder is taken as one)
RECIPE_OPTIONS = ("hparams", "overrides", "modules", "tokenizer", "checkpoint")


def _overrides(text: str | None) -> dict | None:
    """``--overrides "{key: value, ...}"`` as a dict (a YAML mapping, as ``--teacher_overrides``)."""
    if not text:
        return None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ValueError(f"--overrides {text!r}: not YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(value, dict):
        raise ValueError(f'--overrides {text!r}: give a YAML mapping, e.g. "{{data_folder: /data, n_mels: 80}}"')
    return value


def _cmd_export(args) -> None:
    """Export a model folder, a ``speech-kd`` run folder's model folder, or a recipe's output folder."""
    lm_options = {
        k: v
        for k, v in (
            ("lm", args.lm),
            ("lm_weight", args.lm_weight),
            ("word_bonus", args.word_bonus),
            ("beam_size", args.beam_size),
        )
        if v is not None
    }
    common = {
        "fmt": args.format,
        "quantize": args.quantize,
        "fp32_layers": tuple(args.fp32_layers) if args.fp32_layers is not None else None,
        "blank_penalty": args.blank_penalty,
        "force": args.force,
        **lm_options,
    }
    asked = any(getattr(args, name) is not None for name in RECIPE_OPTIONS)
    source = None if asked else run_model_folder(args.model_folder)
    if source is not None:  # its checkpoints look like a recipe's, but the run wrote the model folder that exports
        print(f"{args.model_folder} is a speech-kd run folder: exporting the model folder it wrote, {source}")
    recipe = source is None and (asked or is_recipe_folder(args.model_folder))
    if recipe:
        info = export_recipe(
            args.model_folder,
            args.out,
            hparams=args.hparams,
            overrides=_overrides(args.overrides),
            modules=args.modules,
            tokenizer=args.tokenizer,
            checkpoint=args.checkpoint,
            **common,
        )
        print(f"read {info['checkpoint']}; exported with {info['path']}")
    else:
        info = export_asr(source or args.model_folder, args.out, **common)
    print(
        f"wrote {args.out}: {info['model_file']} ({info['format']}, {info['quantization']}, "
        f"{info['bytes'] / 1e6:.2f} MB, {info['params']:,} parameters); largest log-prob difference from the "
        f"PyTorch network on a test batch {info['max_abs_diff']:.2g}"
    )
    if recipe:
        same = "the same" if info["audio_same_transcript"] else "a DIFFERENT"
        print(
            f"on a synthetic waveform, transcribe.py's fbank + network against SpeechBrain's Fbank + the yaml's "
            f"modules in order: {', '.join(info['modules'])}, log-softmax: largest log-prob difference "
            f"{info['audio_max_abs_diff']:.2g}, {same} greedy transcript"
        )
        print(
            "anything your compute_forward does between these modules was not compared: compare one transcript "
            "with your recipe's (docs/deploy.md)"
        )
    if info.get("lm"):
        lm = info["lm"]
        print(
            f"copied the LM as {lm['file']}: transcribe.py decodes with it (beam {lm['beam_size']}, "
            f"lm_weight {lm['lm_weight']:g}, word_bonus {lm['word_bonus']:g}; --lm none: greedy)"
        )
    print(f"try: python {Path(args.out) / 'transcribe.py'} AUDIO.wav")


def _cmd_demo(args) -> None:
    run_demo(args.out, quick=args.quick)


def add_export(sub) -> None:
    """``speech-kd export``."""
    p = sub.add_parser(
        "export",
        help="model folder or recipe output folder -> ONNX/TorchScript folder that runs without speechbrain",
    )
    p.add_argument(
        "model_folder",
        type=hparams_files.model_folder,
        help="a model folder (<output_folder>/model of speech-kd train/distill; their <output_folder> exports "
        "that), or the output folder of your own SpeechBrain CTC recipe (hyperparams.yaml, save/CKPT+*: "
        "docs/deploy.md)",
    )
    p.add_argument("--out", required=True, help="folder to write (model, deploy.json, tokens, transcribe.py)")
    format_help = "onnx (needs onnxruntime, numpy, soundfile) or torchscript (torch, numpy, soundfile)"
    p.add_argument("--format", default="onnx", choices=["onnx", "torchscript"], help=format_help)
    p.add_argument(
        "--quantize",
        default=None,
        choices=["int8"],
        help="int8: linear layers dynamically quantised (int8 weights, per-batch activations)",
    )
    p.add_argument(
        "--fp32_layers",
        nargs="*",
        default=None,
        help="modules kept in fp32 by --quantize int8 (default: the output layer: ctc_lin, or a recipe's last module)",
    )
    p.add_argument(
        "--blank_penalty",
        type=finite_float,
        default=0.0,
        help="stored in the folder: subtracted from the blank's log-probability at decoding",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace --out when it holds an earlier export (anything else is never replaced)",
    )
    p.add_argument(
        "--lm",
        default=None,
        help="word n-gram (ARPA or KenLM binary) copied into the folder; transcribe.py then decodes with it",
    )
    p.add_argument(
        "--lm_weight", type=non_negative_float, default=None, help="with --lm: recorded LM weight (default 0.5)"
    )
    p.add_argument("--word_bonus", type=finite_float, default=None, help="with --lm: recorded word bonus (default 1.5)")
    p.add_argument("--beam_size", type=positive_int, default=None, help="with --lm: recorded beam size (default 100)")
    recipe = p.add_argument_group(
        "a recipe's output folder",
        "read when MODEL_FOLDER holds checkpoints (save/CKPT+*) and no model.ckpt (nor the model/ folder of a "
        "speech-kd run), or when any of these is given",
    )
    recipe.add_argument(
        "--hparams",
        default=None,
        help="the recipe's yaml (default: MODEL_FOLDER/hyperparams.yaml, the copy the run wrote)",
    )
    recipe.add_argument(
        "--overrides",
        default=None,
        help='yaml keys to set, as a YAML mapping: "{key: value}" (output_folder is MODEL_FOLDER, '
        "!PLACEHOLDER keys get a dummy value)",
    )
    recipe.add_argument(
        "--modules",
        nargs="+",
        default=None,
        help="yaml keys of the modules compute_forward runs after the features, in order (default: the yaml's "
        "modules, normaliser first)",
    )
    recipe.add_argument(
        "--tokenizer",
        default=None,
        help="a CTCTextEncoder file or a SentencePiece model, told apart by content (default: label_encoder.txt, "
        "tokenizer.ckpt or the one *.model in the save folder)",
    )
    recipe.add_argument(
        "--checkpoint",
        default=None,
        help=f"{' | '.join(CHECKPOINT_CHOICES)} | CKPT+... (default: average when the yaml's avg_checkpoints > 1: "
        "the model averaged over the checkpoints recording a WER, as SpeechBrain's LibriSpeech CTC recipe "
        "evaluates it; else best: the lowest WER, else CER, else PER recorded, the newest when none is)",
    )
    p.set_defaults(func=_cmd_export)


def add_bench(sub) -> None:
    """``speech-kd bench`` and ``bench-kd`` (their own parsers: listed here for ``speech-kd --help``)."""
    sub.add_parser("bench", help="speed benchmarks (ratios measured side by side): speech-kd bench --help")
    sub.add_parser(
        "bench-kd", help="experiments: teacher vs scratch and KD students over seeds: speech-kd bench-kd --help"
    )


def add_demo(sub) -> None:
    """``speech-kd demo``."""
    p = sub.add_parser("demo", help="synthesise, distil and evaluate end to end, offline")
    p.add_argument("--out", default="demo_run", help="output folder (corpus, runs, results.md)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test, minutes)")
    p.set_defaults(func=_cmd_demo)
