"""``speech-kd train``, ``distill``, ``cache-targets`` and ``hparams``: runs, soft targets and the default yamls.

``train`` and ``distill`` take SpeechBrain's own syntax (a yaml, then ``--key=value``
overrides): :func:`run_passthrough` hands them to :mod:`speech_kd.training`; without a
yaml they use the packaged ``teacher.yaml`` / ``distill.yaml`` (:mod:`speech_kd.hparams_files`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from speech_kd import hparams_files
from speech_kd.argtypes import float_range, int_range, non_negative_float, positive_float, positive_int
from speech_kd.cli.common import check_device
from speech_kd.targets.cache import cache_targets
from speech_kd.training.distill import run_distillation
from speech_kd.training.train import run_training

__all__ = ["DEFAULT_YAML", "PASSTHROUGH", "add_cache_targets", "add_hparams", "add_train_distill", "run_passthrough"]

#: train/distill take SpeechBrain's own argument syntax (yaml + --key=value overrides)
PASSTHROUGH = {"train", "distill"}
#: the packaged yaml each of them uses when the command line names none
DEFAULT_YAML = {"train": "teacher.yaml", "distill": "distill.yaml"}


def run_passthrough(command: str, argv: list[str]) -> int:
    """``speech-kd train|distill [HPARAMS.yaml] [--key=value ...]``; the packaged yaml when none is given."""
    if not argv or argv[0] in ("-h", "--help"):
        print(
            f"usage: speech-kd {command} [HPARAMS.yaml] [--key=value ...] [SpeechBrain run options]\n"
            f"without HPARAMS.yaml: the packaged {DEFAULT_YAML[command]} (speech-kd hparams lists them)"
        )
        return 0 if argv else 2
    if argv[0].startswith("-"):
        argv = [str(hparams_files.path(DEFAULT_YAML[command])), *argv]
    if command == "train":
        run_training(argv)
    else:
        run_distillation(argv)
    return 0


def _cmd_cache_targets(args) -> None:
    check_device(args.device)
    overrides = yaml.safe_load(args.teacher_overrides) if args.teacher_overrides else None
    summary = cache_targets(
        args.teacher,
        args.csv,
        args.out,
        device=args.device,
        top_k=args.top_k,
        mass=args.mass,
        max_temperature=args.max_temperature,
        batch_seconds=args.batch_seconds,
        shard_utts=args.shard_utts,
        teacher_overrides=overrides,
        max_duration=args.max_duration,
        hidden_layers=args.hidden_layers,
        hidden_dtype=args.hidden_dtype,
        teacher_layers=args.teacher_layers,
    )
    print(json.dumps(summary, indent=2))


def _cmd_hparams(args) -> None:
    if args.name is None:  # each name with the first line its header says of it
        for name in hparams_files.names():
            header = [line.lstrip("# ").strip() for line in hparams_files.path(name).read_text().splitlines()[:6]]
            about = [line for line in header if line.startswith(("Model:", "Params:"))] or header[1:2]
            print(f"{name:<18} " + "; ".join(line.split(": ", 1)[-1] for line in about))
        return
    source = hparams_files.path(args.name)
    if args.out is None:
        print(source.read_text(), end="")
        return
    out = Path(args.out)
    if out.exists():
        raise FileExistsError(f"{out} exists; not overwritten (remove it or choose another --out)")
    shutil.copyfile(source, out)
    print(f"wrote {out} (from the packaged {source.name})")


def add_cache_targets(sub) -> None:
    """``speech-kd cache-targets``."""
    p = sub.add_parser("cache-targets", help="run a teacher once and store its soft targets")
    p.add_argument("--teacher", required=True, help="teacher folder (SpeechBrain or Hugging Face); A,B,... an ensemble")
    p.add_argument("--csv", required=True, help="SpeechBrain CSV manifest of the utterances to cache")
    p.add_argument("--out", required=True, help="cache folder; an existing one for the same teacher is completed")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--top_k", type=int_range(1, 127), default=8, help="most tokens stored per frame (at most 127)")
    p.add_argument(
        "--mass",
        type=float_range(0, 1, low_ok=False),
        default=0.98,
        help="tokens stored per frame until they hold this share of the distribution softened at --max_temperature",
    )
    p.add_argument(
        "--max_temperature",
        type=positive_float,
        default=1.0,
        help="largest KD temperature the cache serves (distill refuses a higher one); a higher value "
        "keeps more tokens per frame (docs/cache.md)",
    )
    p.add_argument("--batch_seconds", type=positive_float, default=120.0, help="seconds of audio per teacher batch")
    p.add_argument(
        "--max_duration",
        type=non_negative_float,
        default=60.0,
        help="skip utterances longer than this (seconds; a warning names each); 0: no limit",
    )
    p.add_argument(
        "--shard_utts",
        type=positive_int,
        default=2000,
        help="utterances per shard file (an interrupted run redoes at most one shard)",
    )
    p.add_argument(
        "--teacher_overrides",
        default=None,
        help="YAML dict of keys replaced in a SpeechBrain teacher's hyperparams.yaml, "
        "e.g. '{wav2vec2_hub: teachers/wav2vec2-large-960h-lv60-self}'",
    )
    p.add_argument(
        "--hidden_layers",
        default=None,
        help="also store these teacher encoder layers' hidden states, for distill's kd_layers: 1,3,5 (from 0), "
        "all, or auto:N (the layers kd_layers: auto maps a student of N layers to); default: none",
    )
    p.add_argument(
        "--hidden_dtype",
        choices=["int8", "fp16"],
        default="int8",
        help="storage of hidden states: int8 scaled per channel and per frame, or fp16 (docs/cache.md)",
    )
    p.add_argument(
        "--teacher_layers",
        default=None,
        metavar="DOTTED.PATH",
        help="the teacher's list of layers --hidden_layers counts in, for a teacher with several (distill's "
        "kd_teacher_layers, e.g. encoder.wav2vec2.model.encoder.layers); default: found",
    )
    p.set_defaults(func=_cmd_cache_targets)


def add_train_distill(sub) -> None:
    """``speech-kd train`` and ``distill`` (handled before the parser: listed for ``speech-kd --help``)."""
    sub.add_parser("train", help="train a CTC model: speech-kd train HPARAMS.yaml --key=value ...")
    sub.add_parser("distill", help="distil a student: speech-kd distill HPARAMS.yaml --teacher_source=DIR ...")


def add_hparams(sub) -> None:
    """``speech-kd hparams``."""
    p = sub.add_parser("hparams", help="list the packaged default yamls, or write one out for editing")
    p.add_argument("name", nargs="?", default=None, help="a packaged yaml (e.g. distill.yaml); none: list them")
    p.add_argument("--out", default=None, help="write it to this file (never overwritten); none: print it")
    p.set_defaults(func=_cmd_hparams)
