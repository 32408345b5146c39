"""``speech-kd export``, ``bench``, ``bench-kd`` and ``demo``: deployment, speed and experiments.

``bench`` and ``bench-kd`` have their own parsers (:mod:`speech_kd.bench.speed`,
:mod:`speech_kd.bench.experiments.main`); they are listed in ``speech-kd --help`` here.
"""

from __future__ import annotations

from pathlib import Path

from speech_kd.argtypes import finite_float, non_negative_float, positive_int
from speech_kd.demo import run_demo
from speech_kd.deploy.onnx_export import export_asr

__all__ = ["add_bench", "add_demo", "add_export"]


def _cmd_export(args) -> None:
    info = export_asr(
        args.model_folder,
        args.out,
        fmt=args.format,
        quantize=args.quantize,
        fp32_layers=tuple(args.fp32_layers),
        blank_penalty=args.blank_penalty,
        force=args.force,
        **{
            k: v
            for k, v in (
                ("lm", args.lm),
                ("lm_weight", args.lm_weight),
                ("word_bonus", args.word_bonus),
                ("beam_size", args.beam_size),
            )
            if v is not None
        },
    )
    print(
        f"wrote {args.out}: {info['model_file']} ({info['format']}, {info['quantization']}, "
        f"{info['bytes'] / 1e6:.2f} MB, {info['params']:,} parameters); largest log-prob difference from the "
        f"PyTorch network on a test batch {info['max_abs_diff']:.2g}"
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
    p = sub.add_parser("export", help="model folder -> ONNX/TorchScript folder that runs without speechbrain")
    p.add_argument("model_folder", help="a model folder (<output_folder>/model of speech-kd train/distill)")
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
        default=["ctc_lin"],
        help="modules kept in fp32 by --quantize int8 (default: ctc_lin, the output layer)",
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
