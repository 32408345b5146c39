"""``speech-kd synth`` and ``speech-kd prepare``: a corpus and its SpeechBrain CSVs (:mod:`speech_kd.data`)."""

from __future__ import annotations

import json

from speech_kd.argtypes import non_negative_float, non_negative_int, positive_float, positive_int
from speech_kd.data.prepare import prepare_librispeech
from speech_kd.data.synth import SplitSpec, SynthConfig, synthesize_corpus

__all__ = ["add_prepare", "add_synth"]


def _cmd_synth(args) -> None:
    splits = (
        SplitSpec("train", args.hours, args.speakers),
        SplitSpec("dev", args.dev_hours, args.dev_speakers),
        SplitSpec("test", args.test_hours, args.test_speakers),
    )
    if args.untranscribed_hours:
        splits += (
            SplitSpec(
                args.untranscribed_name, args.untranscribed_hours, args.untranscribed_speakers, transcribed=False
            ),
        )
    jobs = {"jobs": args.jobs} if args.jobs else {}  # default: all cores
    config = SynthConfig(splits=splits, seed=args.seed, **jobs)
    summary = synthesize_corpus(args.out_dir, config)
    print(json.dumps(summary, indent=2))


def _cmd_prepare(args) -> None:
    result = prepare_librispeech(
        args.data_folder,
        args.save_folder,
        splits=args.splits,
        skip_if_done=not args.force,
        unlabeled_splits=args.unlabeled_splits,
    )
    for split, path in result.csv_files.items():
        kept = result.kept.get(split)
        print(f"{split}: {path}" + (f" ({kept} utterances, {result.hours[split]:.3f} h)" if kept is not None else ""))
    counts = result.skipped_counts()
    for split, by_reason in counts.items():
        print(f"{split}: skipped {sum(by_reason.values())} -> {dict(by_reason)}")
    for item in result.skipped:
        print(f"  skipped {item.split}/{item.utt_id}: {item.path}: {item.reason}")


def add_synth(sub) -> None:
    """``speech-kd synth``."""
    p = sub.add_parser("synth", help="synthesise a LibriSpeech-layout English corpus offline")
    p.add_argument("out_dir", help="corpus folder to write (train/, dev/, test/ in LibriSpeech layout)")
    hours_help = "hours of training audio, planned from sentence lengths (comes out ~7%% shorter: 0.93 h for 1)"
    p.add_argument("--hours", type=positive_float, default=1.0, help=hours_help)
    p.add_argument("--speakers", type=positive_int, default=100, help="training speakers")
    p.add_argument("--dev_hours", type=positive_float, default=0.15, help="hours of the dev split")
    p.add_argument("--dev_speakers", type=positive_int, default=10, help="dev speakers (none of them in other splits)")
    p.add_argument("--test_hours", type=positive_float, default=0.15, help="hours of the test split")
    p.add_argument(
        "--test_speakers", type=positive_int, default=10, help="test speakers (none of them in other splits)"
    )
    p.add_argument(
        "--untranscribed_hours",
        type=non_negative_float,
        default=0.0,
        help="hours of an untranscribed split (no .trans.txt; its own speakers, sentences not in dev/test)",
    )
    p.add_argument(
        "--untranscribed_speakers", type=positive_int, default=50, help="speakers of the untranscribed split"
    )
    p.add_argument("--untranscribed_name", default="untranscribed", help="folder name of the untranscribed split")
    p.add_argument("--seed", type=non_negative_int, default=1234, help="the same seed and sizes give the same corpus")
    p.add_argument("--jobs", type=positive_int, default=None, help="worker processes (default: all cores)")
    p.set_defaults(func=_cmd_synth)


def add_prepare(sub) -> None:
    """``speech-kd prepare``."""
    p = sub.add_parser("prepare", help="LibriSpeech-layout folder -> SpeechBrain CSVs")
    p.add_argument("data_folder", help="LibriSpeech-layout folder: one sub-folder per split")
    p.add_argument("--save_folder", required=True, help="where SPLIT.csv and SPLIT_skipped.csv are written")
    p.add_argument("--splits", nargs="+", default=None, help="split folder names (default: all)")
    unlabeled_help = "untranscribed split folders: every .flac/.wav under each, empty wrd (transcripts ignored)"
    p.add_argument("--unlabeled_splits", nargs="+", default=None, help=unlabeled_help)
    p.add_argument("--force", action="store_true", help="redo splits whose CSV is up to date")
    p.set_defaults(func=_cmd_prepare)
