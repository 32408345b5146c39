"""``speech-kd``: the command line. Each command only parses arguments and calls the library.

Commands::

    speech-kd synth OUT_DIR [--hours H] ...          synthesise a LibriSpeech-layout corpus
    speech-kd prepare DATA_FOLDER --save_folder DIR [--splits NAME ...] [--unlabeled_splits NAME ...]
    speech-kd train HPARAMS.yaml --key=value ...     SpeechBrain-style training
    speech-kd distill HPARAMS.yaml --teacher_source=FOLDER --key=value ...
    speech-kd cache-targets --teacher FOLDER --csv train.csv --out CACHE_DIR
    speech-kd evaluate --asr FOLDER (--csv TEST.csv | --data_folder DIR --split NAME) [--json PATH] [--html PATH]
    speech-kd export MODEL_FOLDER --out DIR [--format onnx|torchscript] [--quantize int8] [--force]
    speech-kd report RUN_DIR [--compare NAME=FOLDER ...] [--max_utts N] [--no-eval]
    speech-kd compare --teacher T_utts.txt --scratch S_utts.txt ... --kd K_utts.txt ... [--json PATH]
    speech-kd bench [--json PATH]                    speed benchmarks
    speech-kd bench-kd --data DIR --out DIR ...      experiments: scratch vs KD students over seeds
    speech-kd demo [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

__all__ = ["main", "run"]

# train/distill take SpeechBrain's own argument syntax (yaml + --key=value overrides)
_PASSTHROUGH = {"train", "distill"}


def _cmd_synth(args) -> None:
    from speech_kd.synth import SplitSpec, SynthConfig, synthesize_corpus

    splits = (
        SplitSpec("train", args.hours, args.speakers),
        SplitSpec("dev", args.dev_hours, args.dev_speakers),
        SplitSpec("test", args.test_hours, args.test_speakers),
    )
    if args.untranscribed_hours:
        splits += (SplitSpec(args.untranscribed_name, args.untranscribed_hours, args.untranscribed_speakers,
                             transcribed=False),)  # fmt: skip
    jobs = {"jobs": args.jobs} if args.jobs else {}  # default: all cores
    config = SynthConfig(splits=splits, seed=args.seed, **jobs)
    summary = synthesize_corpus(args.out_dir, config)
    print(json.dumps(summary, indent=2))


def _cmd_prepare(args) -> None:
    from speech_kd.prepare import prepare_librispeech

    result = prepare_librispeech(args.data_folder, args.save_folder, splits=args.splits, skip_if_done=not args.force,
                                 unlabeled_splits=args.unlabeled_splits)  # fmt: skip
    for split, path in result.csv_files.items():
        kept = result.kept.get(split)
        print(f"{split}: {path}" + (f" ({kept} utterances, {result.hours[split]:.3f} h)" if kept is not None else ""))
    counts = result.skipped_counts()
    for split, by_reason in counts.items():
        print(f"{split}: skipped {sum(by_reason.values())} -> {dict(by_reason)}")
    for item in result.skipped:
        print(f"  skipped {item.split}/{item.utt_id}: {item.path}: {item.reason}")


def check_device(device: str) -> None:
    """Refuse ``cuda`` devices when this process sees no CUDA GPU (one line instead of a traceback later)."""
    import torch

    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device={device}: no CUDA GPU is available to this process (torch.cuda.is_available() "
                         "is False); use --device=cpu")  # fmt: skip


def _cmd_evaluate(args) -> None:
    from speech_kd.evaluate import check_writable, evaluate_model, write_outputs

    utts = args.utts
    if utts is None and args.json:
        json_path = Path(args.json)
        utts = str(json_path.with_name(json_path.stem + "_utts.txt"))  # x.json -> x_utts.txt, in its folder
    check_device(args.device)
    check_writable(args.json, utts)  # now, not after the scoring
    result = evaluate_model(
        args.asr,
        csv_path=args.csv,
        data_folder=args.data_folder,
        split=args.split,
        device=args.device,
        batch_seconds=args.batch_seconds,
        max_duration=args.max_duration,
        blank_penalty=args.blank_penalty,
        chunk_seconds=args.chunk_seconds,
        context_seconds=args.context_seconds,
    )
    s = result.summary
    print(
        f"WER {s['wer']:.2f}%  CER {s['cer']:.2f}%  utterances {s['num_utts']}  "
        f"params {s['params']:,}  RTF {s['rtf']:.4f}",
        flush=True,
    )
    write_outputs(result, args.json, utts)  # after the WER is printed: a failing disk does not hide it
    if args.json:
        print(f"wrote {args.json}" + (f" and {utts}" if utts else ""))
    if args.html:
        from speech_kd.report import evaluation_page

        print(f"wrote {evaluation_page(result.summary, result.utterances, args.html, device=args.device)}")


def _cmd_export(args) -> None:
    from speech_kd.deploy.exporter import export_asr

    info = export_asr(args.model_folder, args.out, fmt=args.format, quantize=args.quantize,
                      fp32_layers=tuple(args.fp32_layers), blank_penalty=args.blank_penalty,
                      force=args.force)  # fmt: skip
    print(f"wrote {args.out}: {info['model_file']} ({info['format']}, {info['quantization']}, "
          f"{info['bytes'] / 1e6:.2f} MB, {info['params']:,} parameters); largest log-prob difference from the "
          f"PyTorch network on a test batch {info['max_abs_diff']:.2g}")  # fmt: skip
    print(f"try: python {Path(args.out) / 'transcribe.py'} AUDIO.wav")


def _cmd_cache_targets(args) -> None:
    import yaml

    from speech_kd.cache import cache_targets

    check_device(args.device)
    overrides = yaml.safe_load(args.teacher_overrides) if args.teacher_overrides else None
    summary = cache_targets(
        args.teacher, args.csv, args.out, device=args.device, top_k=args.top_k, mass=args.mass,
        max_temperature=args.max_temperature, batch_seconds=args.batch_seconds, shard_utts=args.shard_utts,
        teacher_overrides=overrides,
        max_duration=args.max_duration,
    )  # fmt: skip
    print(json.dumps(summary, indent=2))


def _cmd_report(args) -> None:
    from speech_kd.report import build_report

    compare = {}
    for item in args.compare or []:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise SystemExit(f"--compare expects NAME=FOLDER, got {item!r}")
        compare[name] = folder
    path = build_report(args.run_dir, compare=compare, max_utts=args.max_utts or None, evaluate=not args.no_eval,
                        n_posteriorgrams=args.posteriorgrams, device=args.device)  # fmt: skip
    print(f"wrote {path} and {path.with_suffix('.md')}")


def _cmd_compare(args) -> None:
    from speech_kd.compare import compare_files, format_comparison

    result = compare_files(args.teacher, args.scratch, args.kd, json_path=args.json, draws=args.draws)
    print(format_comparison(result))
    if args.json:
        print(f"wrote {args.json}")


def _cmd_demo(args) -> None:
    from speech_kd.demo import run_demo

    run_demo(args.out, quick=args.quick)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (train/distill are handled before it, see ``main``)."""
    parser = argparse.ArgumentParser(
        prog="speech-kd", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="synthesise a LibriSpeech-layout English corpus offline")
    p.add_argument("out_dir", help="corpus folder to write (train/, dev/, test/ in LibriSpeech layout)")
    hours_help = "hours of training audio, planned from sentence lengths (comes out ~7%% shorter: 0.93 h for 1)"
    p.add_argument("--hours", type=float, default=1.0, help=hours_help)
    p.add_argument("--speakers", type=int, default=100, help="training speakers")
    p.add_argument("--dev_hours", type=float, default=0.15, help="hours of the dev split")
    p.add_argument("--dev_speakers", type=int, default=10, help="dev speakers (none of them in other splits)")
    p.add_argument("--test_hours", type=float, default=0.15, help="hours of the test split")
    p.add_argument("--test_speakers", type=int, default=10, help="test speakers (none of them in other splits)")
    p.add_argument(
        "--untranscribed_hours",
        type=float,
        default=0.0,
        help="hours of an untranscribed split (no .trans.txt; its own speakers, sentences not in dev/test)",
    )
    p.add_argument("--untranscribed_speakers", type=int, default=50, help="speakers of the untranscribed split")
    p.add_argument("--untranscribed_name", default="untranscribed", help="folder name of the untranscribed split")
    p.add_argument("--seed", type=int, default=1234, help="the same seed and sizes give the same corpus")
    p.add_argument("--jobs", type=int, default=None, help="worker processes (default: all cores)")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("prepare", help="LibriSpeech-layout folder -> SpeechBrain CSVs")
    p.add_argument("data_folder", help="LibriSpeech-layout folder: one sub-folder per split")
    p.add_argument("--save_folder", required=True, help="where SPLIT.csv and SPLIT_skipped.csv are written")
    p.add_argument("--splits", nargs="+", default=None, help="split folder names (default: all)")
    unlabeled_help = "untranscribed split folders: every .flac/.wav under each, empty wrd (transcripts ignored)"
    p.add_argument("--unlabeled_splits", nargs="+", default=None, help=unlabeled_help)
    p.add_argument("--force", action="store_true", help="redo splits whose CSV is up to date")
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("evaluate", help="WER/CER, parameters and RTF of a model folder")
    p.add_argument("--asr", required=True, help="model folder (EncoderASR-loadable); A,B,... scores their ensemble")
    p.add_argument("--csv", default=None, help="SpeechBrain CSV manifest")
    p.add_argument("--data_folder", default=None, help="LibriSpeech-layout folder (with --split)")
    p.add_argument("--split", default=None, help="split folder under --data_folder (e.g. test-clean)")
    p.add_argument("--json", default=None, help="write the summary here")
    p.add_argument("--utts", default=None, help="per-utterance file (default: next to --json)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--batch_seconds", type=float, default=60.0, help="seconds of audio per batch")
    p.add_argument("--max_duration", type=float, default=60.0,
                   help="longer utterances (seconds) are not scored, a warning names each; 0: no limit")  # fmt: skip
    p.add_argument("--html", default=None, help="per-utterance page, worst first, with alignments")
    p.add_argument("--blank_penalty", type=float, default=None,
                   help="exported folders only: subtracted from the blank's log-probability at decoding")  # fmt: skip
    p.add_argument("--chunk_seconds", type=float, default=None,
                   help="exported folders only: utterances transcribed in chunks of this many seconds")  # fmt: skip
    p.add_argument("--context_seconds", type=float, default=None,
                   help="with --chunk_seconds: audio before and after each chunk the network also reads "
                        "(default 2; 0: independent chunks)")  # fmt: skip
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("export", help="model folder -> ONNX/TorchScript folder that runs without speechbrain")
    p.add_argument("model_folder", help="a model folder (<output_folder>/model of speech-kd train/distill)")
    p.add_argument("--out", required=True, help="folder to write (model, deploy.json, tokens, transcribe.py)")
    format_help = "onnx (needs onnxruntime, numpy, soundfile) or torchscript (torch, numpy, soundfile)"
    p.add_argument("--format", default="onnx", choices=["onnx", "torchscript"], help=format_help)
    p.add_argument("--quantize", default=None, choices=["int8"],
                   help="int8: linear layers dynamically quantised (int8 weights, per-batch activations)")  # fmt: skip
    p.add_argument("--fp32_layers", nargs="*", default=["ctc_lin"],
                   help="modules kept in fp32 by --quantize int8 (default: ctc_lin, the output layer)")  # fmt: skip
    p.add_argument("--blank_penalty", type=float, default=0.0,
                   help="stored in the folder: subtracted from the blank's log-probability at decoding")  # fmt: skip
    p.add_argument("--force", action="store_true",
                   help="replace --out when it holds an earlier export (anything else is never replaced)")  # fmt: skip
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("cache-targets", help="run a teacher once and store its soft targets")
    p.add_argument("--teacher", required=True, help="teacher folder (SpeechBrain or Hugging Face); A,B,... an ensemble")
    p.add_argument("--csv", required=True, help="SpeechBrain CSV manifest of the utterances to cache")
    p.add_argument("--out", required=True, help="cache folder; an existing one for the same teacher is completed")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--top_k", type=int, default=8, help="most tokens stored per frame (at most 127)")
    p.add_argument("--mass", type=float, default=0.98,
                   help="tokens stored per frame until they hold this share of the distribution softened at "
                        "--max_temperature")  # fmt: skip
    p.add_argument("--max_temperature", type=float, default=1.0,
                   help="largest KD temperature the cache serves (distill refuses a higher one); a higher value "
                        "keeps more tokens per frame (docs/cache.md)")  # fmt: skip
    p.add_argument("--batch_seconds", type=float, default=120.0, help="seconds of audio per teacher batch")
    p.add_argument("--max_duration", type=float, default=60.0,
                   help="skip utterances longer than this (seconds; a warning names each); 0: no limit")  # fmt: skip
    p.add_argument("--shard_utts", type=int, default=2000,
                   help="utterances per shard file (an interrupted run redoes at most one shard)")  # fmt: skip
    p.add_argument("--teacher_overrides", default=None,
                   help="YAML dict of keys replaced in a SpeechBrain teacher's hyperparams.yaml, "
                        "e.g. '{wav2vec2_hub: teachers/wav2vec2-large-960h-lv60-self}'")  # fmt: skip
    p.set_defaults(func=_cmd_cache_targets)

    p = sub.add_parser("report", help="HTML/Markdown report of a run folder")
    p.add_argument("run_dir", help="a train or distill output folder")
    p.add_argument("--compare", action="append", metavar="NAME=FOLDER", help="another model folder for the table")
    p.add_argument("--max_utts", type=int, default=200, help="test utterances scored per model (0: all)")
    p.add_argument("--posteriorgrams", type=int, default=3, help="dev utterances drawn as posteriorgrams")
    p.add_argument("--no-eval", dest="no_eval", action="store_true",
                   help="skip scoring (the table shows the run's test_results.json)")  # fmt: skip
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("compare", help="share of the teacher gap KD closes, with a bootstrap interval")
    p.add_argument("--teacher", required=True, help="the teacher's per-utterance file (speech-kd evaluate --utts)")
    p.add_argument("--scratch", required=True, nargs="+", help="scratch students' files, one per seed")
    p.add_argument("--kd", required=True, nargs="+", help="KD students' files, one per seed, in the same order")
    p.add_argument("--draws", type=int, default=2000, help="bootstrap draws")
    p.add_argument("--json", default=None, help="also write the result here")
    p.set_defaults(func=_cmd_compare)

    # these four have their own parsers (see main): listed here for speech-kd --help
    sub.add_parser("bench", help="speed benchmarks (ratios measured side by side): speech-kd bench --help")
    sub.add_parser(
        "bench-kd", help="experiments: teacher vs scratch and KD students over seeds: speech-kd bench-kd --help"
    )

    p = sub.add_parser("demo", help="synthesise, distil and evaluate end to end, offline")
    p.add_argument("--out", default="demo_run", help="output folder (corpus, runs, results.md)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test, minutes)")
    p.set_defaults(func=_cmd_demo)

    sub.add_parser("train", help="train a CTC model: speech-kd train HPARAMS.yaml --key=value ...")
    sub.add_parser("distill", help="distil a student: speech-kd distill HPARAMS.yaml --teacher_source=DIR ...")
    return parser


def all_parsers() -> dict[str, argparse.ArgumentParser]:
    """Every verb's parser, by verb (``train``/``distill`` take a yaml: SpeechBrain's own syntax); for the docs."""
    from speech_kd.bench import build_parser as bench_parser
    from speech_kd.bench_kd import build_parser as bench_kd_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    parsers = {name: p for name, p in sub.choices.items() if name not in ("bench", "bench-kd", "train", "distill")}
    parsers["bench"], parsers["bench-kd"] = bench_parser(), bench_kd_parser()
    return parsers


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``speech-kd`` script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s - %(message)s")
    if argv and argv[0] in _PASSTHROUGH:
        if len(argv) < 2 or argv[1] in ("-h", "--help"):
            print(f"usage: speech-kd {argv[0]} HPARAMS.yaml [--key=value ...] [SpeechBrain run options]")
            return 0 if len(argv) >= 2 else 2
        if argv[0] == "train":
            from speech_kd.train import run_training

            run_training(argv[1:])
        else:
            from speech_kd.distill import run_distillation

            run_distillation(argv[1:])
        return 0
    if argv and argv[0] == "bench":  # its own parser: speech-kd bench --help lists every option
        from speech_kd.bench import main as bench_main

        bench_main(argv[1:])
        return 0
    if argv and argv[0] == "bench-kd":
        from speech_kd.bench_kd import main as bench_kd_main

        bench_kd_main(argv[1:])
        return 0
    args = build_parser().parse_args(argv)
    args.func(args)
    return 0


def _is_input_error(error: BaseException) -> bool:
    """Errors that are about the user's files or settings, told as one line instead of a traceback.

    Our own error types (bad audio, transcripts, vocabularies, frame rates,
    caches, teachers, non-finite losses) and the ``ValueError``/``OSError``
    families that name the file or option at fault. Anything else is a bug and
    keeps its traceback.
    """
    from speech_kd.brain import NonFiniteLossError
    from speech_kd.cache import CacheError

    return isinstance(error, (ValueError, OSError, CacheError, NonFiniteLossError))


#: commands that continue from where an interrupted run stopped (checkpoints, cache shards)
RESUMABLE = {"train", "distill", "cache-targets", "demo"}


def run(argv: list[str] | None = None) -> int:
    """The ``speech-kd`` script: :func:`main`, with errors in the user's input told in one line.

    ``speech-kd CMD ...: error: MESSAGE`` on stderr and exit status 2, with no
    traceback; set ``SPEECH_KD_TRACEBACK=1`` to get the traceback as well.
    """
    import os
    import signal
    import threading

    argv = list(sys.argv[1:] if argv is None else argv)
    received: list[int] = []

    def on_sigterm(signum, frame):  # SIGTERM (kill, a scheduler's stop) ends the run as Ctrl-C does
        received.append(signum)
        raise KeyboardInterrupt

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        return main(argv)
    except KeyboardInterrupt:
        if os.environ.get("SPEECH_KD_TRACEBACK"):
            raise
        command = argv[0] if argv else ""
        hint = " (run the same command again to resume)" if command in RESUMABLE else ""
        print(f"speech-kd {command}: interrupted{hint}", file=sys.stderr)
        return 143 if received else 130
    except Exception as error:
        if os.environ.get("SPEECH_KD_TRACEBACK") or not _is_input_error(error):
            raise
        from speech_kd.audio import AudioError

        command = argv[0] if argv else ""
        print(f"speech-kd {command}: error: {type(error).__name__}: {error}", file=sys.stderr)
        if isinstance(error, AudioError) and command in RESUMABLE:
            # found while reading a batch (prepare checks headers and both ends, not every sample):
            # the run would die on the same file again, so say how to get past it without losing work
            print(f"speech-kd {command}: fix or re-encode {error.path}, or delete its row from the manifest, "
                  "then run the same command again: it resumes from its last checkpoint", file=sys.stderr)  # fmt: skip
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(run())
