"""``speech-kd``: the command line. Each command only parses arguments and calls the library.

Commands::

    speech-kd synth OUT_DIR [--hours H] ...          synthesise a LibriSpeech-layout corpus
    speech-kd prepare DATA_FOLDER --save_folder DIR [--splits NAME ...] [--unlabeled_splits NAME ...]
    speech-kd train HPARAMS.yaml --key=value ...     SpeechBrain-style training
    speech-kd distill HPARAMS.yaml --teacher_source=FOLDER --key=value ...
    speech-kd cache-targets --teacher FOLDER --csv train.csv --out CACHE_DIR
    speech-kd evaluate --asr FOLDER (--csv TEST.csv | --data_folder DIR --split NAME) [--json PATH] [--html PATH]
    speech-kd export MODEL_FOLDER --out DIR [--format onnx|torchscript] [--quantize int8] [--force]
    speech-kd export RECIPE_OUTPUT_FOLDER --out DIR [--hparams RECIPE.yaml] [--overrides YAML] ...
    speech-kd report RUN_DIR [--compare NAME=FOLDER ...] [--max_utts N] [--no-eval]
    speech-kd compare --teacher T_utts.txt --scratch S_utts.txt ... --kd K_utts.txt ... [--json PATH]
    speech-kd lm (--text FILE... | --csv CSV...) --order N --out LM.arpa   word n-gram LM (KenLM)
    speech-kd bench [--json PATH]                    speed benchmarks
    speech-kd bench-kd --data DIR --out DIR ...      experiments: scratch vs KD students over seeds
    speech-kd demo [--out DIR]
    speech-kd hparams [NAME [--out FILE]]           the packaged default yamls
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from speech_kd.bench.experiments import build_parser as bench_kd_parser
from speech_kd.bench.experiments import main as bench_kd_main
from speech_kd.bench.speed import build_parser as bench_parser
from speech_kd.bench.speed import main as bench_main
from speech_kd.cli import data, deploy, scoring, training
from speech_kd.data.audio import AudioError
from speech_kd.targets.cache import CacheError
from speech_kd.training.ctc_brain import NonFiniteLossError

__all__ = ["all_parsers", "build_parser", "main", "run"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (train/distill are handled before it, see ``main``)."""
    parser = argparse.ArgumentParser(
        prog="speech-kd", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    data.add_synth(sub)
    data.add_prepare(sub)
    scoring.add_evaluate(sub)
    deploy.add_export(sub)
    training.add_cache_targets(sub)
    scoring.add_report(sub)
    scoring.add_compare(sub)
    scoring.add_lm(sub)
    deploy.add_bench(sub)
    deploy.add_demo(sub)
    training.add_train_distill(sub)
    training.add_hparams(sub)
    return parser


def all_parsers() -> dict[str, argparse.ArgumentParser]:
    """Every verb's parser, by verb (``train``/``distill`` take a yaml: SpeechBrain's own syntax); for the docs."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    parsers = {name: p for name, p in sub.choices.items() if name not in ("bench", "bench-kd", "train", "distill")}
    parsers["bench"], parsers["bench-kd"] = bench_parser(), bench_kd_parser()
    return parsers


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``speech-kd`` script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s - %(message)s")
    if argv and argv[0] in training.PASSTHROUGH:
        return training.run_passthrough(argv[0], argv[1:])
    if argv and argv[0] == "bench":  # its own parser: speech-kd bench --help lists every option
        bench_main(argv[1:])
        return 0
    if argv and argv[0] == "bench-kd":
        bench_kd_main(argv[1:])
        return 0
    args = build_parser().parse_args(argv)
    return args.func(args) or 0  # evaluate: 1 when some file was not scored


def _is_input_error(error: BaseException) -> bool:
    """Errors that are about the user's files or settings, told as one line instead of a traceback.

    Our own error types (bad audio, transcripts, vocabularies, frame rates,
    caches, teachers, non-finite losses) and the ``ValueError``/``OSError``
    families that name the file or option at fault. Anything else is a bug and
    keeps its traceback.
    """
    return isinstance(error, (ValueError, OSError, CacheError, NonFiniteLossError))


#: commands that continue from where an interrupted run stopped (checkpoints, cache shards)
RESUMABLE = {"train", "distill", "cache-targets", "demo"}


def run(argv: list[str] | None = None) -> int:
    """The ``speech-kd`` script: :func:`main`, with errors in the user's input told in one line.

    ``speech-kd CMD ...: error: MESSAGE`` on stderr and exit status 2, with no
    traceback; set ``SPEECH_KD_TRACEBACK=1`` to get the traceback as well.
    """
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
        command = argv[0] if argv else ""
        print(f"speech-kd {command}: error: {type(error).__name__}: {error}", file=sys.stderr)
        if isinstance(error, AudioError) and command in RESUMABLE:
            # found while reading a batch (prepare checks headers and both ends, not every sample):
            # the run would die on the same file again, so say how to get past it without losing work
            print(
                f"speech-kd {command}: fix or re-encode {error.path}, or delete its row from the manifest, "
                "then run the same command again: it resumes from its last checkpoint",
                file=sys.stderr,
            )
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(run())
