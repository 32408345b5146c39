"""Does distillation help? Teacher vs the same student from scratch and with KD variants.

Every student run uses identical data, epochs and seed; only the KD settings
differ (``scratch`` is ``--kd_weight=0``). Runs are independent processes
(one torch thread each, ``--parallel`` at a time) so two fit on two cores.

Example (the 40-epoch table of ``docs/results.md``)::

    speech-kd bench-kd --data demo_run/corpus --teacher speech_kd/pretrained/teacher_synth \
        --out results/kd_long --epochs 40 --variants scratch kd

With ``--seeds S1 S2 ...`` every variant is trained once per seed (``OUT/seed_S/``) and
``OUT/results.md`` adds the means over seeds, the gap closed with a 95 % bootstrap
interval over test utterances and seed pairs (:mod:`speech_kd.scoring.compare`) and
``OUT/dev_wer.png`` (dev WER per epoch, band over seeds); ``--test_data`` scores
another folder's (larger) test split. Finished runs are reused, so the same
command with more seeds only trains the new ones::

    speech-kd bench-kd --data data/synth --teacher speech_kd/pretrained/teacher_synth \
        --out results/kd3h12 --epochs 12 --seeds 1986 7 3 4 5 6 --test_data data/synth_bigtest

Untranscribed audio (``docs/untranscribed.md``):
``--transcribed_fraction F`` keeps the transcripts of a fraction ``F`` of the
training split (every ``1/F``-th utterance, ``OUT/partition/transcribed``) and
makes the rest an untranscribed split (``OUT/partition/untranscribed``, no
transcripts); ``--unlabeled SPLIT`` takes the untranscribed split from another
folder of ``--data`` instead (other speakers, say). Every student then trains on
``transcribed``; the ``kd_unlabeled*`` variants add ``untranscribed``
(``kd_unlabeled_filter`` with ``--unlabeled_min_confidence=--min_confidence``),
from a second cache::

    speech-kd bench-kd --data data/synth --teacher speech_kd/pretrained/teacher_synth --out results/unl \
        --epochs 12 --seeds 1986 7 --transcribed_fraction 0.1667 \
        --variants scratch kd kd_unlabeled kd_unlabeled_filter

``--teacher A,B,...`` distils from the ensemble of those folders (cached once; scored with
``speech-kd evaluate --asr A,B,...``). Without ``--teacher`` a teacher is first trained with
``hparams/teacher.yaml``.
Prints and writes ``OUT/results.md`` and ``OUT/results.json``: test WER, CER,
parameters, RTF per model, dev WER and CER, and the share of the
scratch-teacher WER gap each KD variant closes on test and on dev (two sets
of unseen speakers: with a small gap one set alone says little).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import yaml

from speech_kd import hparams_files
from speech_kd.argtypes import float_range, non_negative_int, positive_int
from speech_kd.bench.experiments.runs import (
    evaluate_run,
    make_partition,
    run_all,
    speech_kd_command,
    train_seconds_per_epoch,
)
from speech_kd.bench.experiments.summary import format_results, format_seed_summary, seed_figure, summarise_seeds
from speech_kd.bench.experiments.variants import VARIANTS, merge_overrides, variant_args
from speech_kd.data.prepare import prepare_librispeech
from speech_kd.kd.config import KDConfig
from speech_kd.targets.teachers.ensemble import teacher_sources


def build_parser(prog: str = "speech-kd bench-kd") -> argparse.ArgumentParser:
    """The experiment runner's options (``speech-kd bench-kd --help``; the description is this module's docstring)."""
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True, help="LibriSpeech-layout folder with train/dev/test")
    parser.add_argument("--out", required=True, help="output folder: one run folder per variant, results.md/json")
    parser.add_argument(
        "--teacher", default=None, help="teacher model folder, or A,B,... for an ensemble (default: train one)"
    )
    parser.add_argument("--epochs", type=positive_int, default=15, help="training epochs of every student")
    parser.add_argument(
        "--teacher_epochs",
        type=positive_int,
        default=10,
        help="epochs of the teacher trained when --teacher is not given",
    )
    parser.add_argument("--student", default="hparams/distill.yaml", help="the students' yaml")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["scratch", "kd"],
        help=f"names among {sorted(VARIANTS)}, each optionally + _online (live teacher) or _sp "
        "(speed perturbation, live teacher)",
    )
    parser.add_argument("--parallel", type=positive_int, default=2, help="runs at once (one torch thread each)")
    parser.add_argument(
        "--keep_going",
        action="store_true",
        help="a student run that fails does not stop the others: the rest are scored, the failures listed "
        "(and the exit status is 1)",
    )
    parser.add_argument("--seed", type=non_negative_int, default=1986, help="the seed of a single-seed run")
    parser.add_argument(
        "--seeds",
        type=non_negative_int,
        nargs="+",
        default=None,
        help="several seeds: runs in OUT/seed_S/; mean table, bootstrap interval, dev curves",
    )
    parser.add_argument(
        "--test_data", default=None, help="score the test split of this folder instead (a larger test set)"
    )
    parser.add_argument("--extra", default="", help='more overrides for every student: --extra="--key=value ..."')
    parser.add_argument(
        "--transcribed_fraction",
        type=float_range(0, 1, low_ok=False),
        default=None,
        help="keep the transcripts of this fraction of the train split; the rest is untranscribed",
    )
    parser.add_argument(
        "--unlabeled",
        default=None,
        help="split folder of --data used as the untranscribed audio (default: the rest of train)",
    )
    parser.add_argument(
        "--min_confidence",
        type=float_range(0, 1),
        default=0.85,
        help="unlabeled_min_confidence of the kd_unlabeled_filter variant",
    )
    return parser


def _cached_overrides(variants: dict[str, tuple[list[str], bool]], extra: list[str]) -> list[dict[str, str]]:
    """Each cached variant's overrides merged with ``extra``, as ``{"--key": "value"}``."""
    return [
        dict(arg.split("=", 1) for arg in merge_overrides(overrides, extra) if "=" in arg)
        for overrides, cached in variants.values()
        if cached
    ]


def cache_temperature(variants: dict[str, tuple[list[str], bool]], extra: list[str]) -> float:
    """The largest ``temperature``/``temperature_final`` the cached variants train at (1 when none is set).

    Examples
    --------
    >>> cache_temperature({"kl_t2": (["--temperature=2"], True), "kl_t4": (["--temperature=4"], False)}, [])
    2.0
    >>> cache_temperature({"kd": ([], True)}, ["--temperature_final=3"])
    3.0
    """
    highest = KDConfig().temperature  # what a variant that sets none trains at
    for args in _cached_overrides(variants, extra):
        for key in ("--temperature", "--temperature_final"):
            if args.get(key, "") not in ("", "null", "None"):
                highest = max(highest, float(args[key]))
    return highest


def cache_hidden_layers(
    variants: dict[str, tuple[list[str], bool]], extra: list[str], student_yaml: str | None = None
) -> str | None:
    """The ``cache-targets --hidden_layers`` that serves every cached variant's ``kd_layers`` (``None``: none needs it).

    Explicit mappings give their teacher layers; ``auto`` gives ``auto:N``, ``N`` the student's
    ``num_encoder_layers`` (from the overrides, else ``student_yaml``'s text); several different needs
    (or an unknown ``N``) give ``all``.

    Examples
    --------
    >>> cache_hidden_layers({"kd_out_layer": (["--kd_layers=auto"], True)}, ["--num_encoder_layers=3"])
    'auto:3'
    >>> cache_hidden_layers({"a": (["--kd_layers={0: 4, 1: 2}"], True), "b": (["--kd_layers=1:5"], True)}, [])
    '2,4,5'
    >>> cache_hidden_layers({"kd": ([], True), "kd_out_layer_online": (["--kd_layers=auto"], False)}, []) is None
    True
    """
    needs = set()
    for args in _cached_overrides(variants, extra):
        raw = args.get("--kd_layers", "").strip()
        layers = KDConfig.parse_layers(yaml.safe_load(raw) if raw.startswith("{") else raw)  # "1:5" is not 65
        if layers == "auto":
            depth = args.get("--num_encoder_layers")
            if depth is None and student_yaml and Path(student_yaml).is_file():
                found = re.search(r"^num_encoder_layers:\s*(\d+)", Path(student_yaml).read_text(), re.M)
                depth = found.group(1) if found else None
            needs.add(f"auto:{int(depth)}" if depth is not None else "all")
        elif layers:
            needs.add(tuple(sorted({teacher for _, teacher in layers})))
    if not needs:
        return None
    if len(needs) == 1 and isinstance(next(iter(needs)), str):
        return next(iter(needs))
    if all(isinstance(need, tuple) for need in needs):
        return ",".join(str(layer) for layer in sorted({layer for need in needs for layer in need}))
    return "all"


def cache_teacher_layers(variants: dict[str, tuple[list[str], bool]], extra: list[str]) -> str | None:
    """The ``cache-targets --teacher_layers`` of the cached variants' ``kd_teacher_layers`` (``None``: found).

    Examples
    --------
    >>> cache_teacher_layers({"kd_out_layer": (["--kd_layers=auto"], True)}, ["--kd_teacher_layers=enc.layers"])
    'enc.layers'
    >>> cache_teacher_layers({"kd_out_layer": (["--kd_layers=auto"], True)}, []) is None
    True
    """
    stacks = {
        args["--kd_teacher_layers"]
        for args in _cached_overrides(variants, extra)
        if args.get("--kd_teacher_layers", "null") not in ("", "null", "None")
    }
    if len(stacks) > 1:
        raise ValueError(f"one cache serves every variant, but their --kd_teacher_layers differ: {sorted(stacks)}")
    return stacks.pop() if stacks else None


def main(argv: list[str] | None = None) -> dict:
    """Command-line entry point; returns the results dict (with several seeds: ``{"seeds", "mean"}``)."""
    args = build_parser().parse_args(argv)

    variants = {name: variant_args(name) for name in args.variants}  # unknown names fail before anything runs
    seeds = args.seeds or [args.seed]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds repeats a seed: {seeds}")
    out = Path(args.out).resolve()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    data = str(Path(args.data).resolve())
    teacher = args.teacher
    if teacher is None:
        run = out / "teacher"
        run_all(
            {
                "teacher": speech_kd_command(
                    "train",
                    str(hparams_files.path("teacher.yaml")),
                    f"--data_folder={data}",
                    f"--output_folder={run}",
                    f"--number_of_epochs={args.teacher_epochs}",
                )
            },
            logs,
            1,
        )
        teacher = str(run / "model")

    teacher = ",".join(str(Path(t).resolve()) for t in teacher_sources(teacher))  # A,B,...: an ensemble teacher

    train_split, unlabeled_csv = "train", None
    if args.transcribed_fraction or args.unlabeled:
        data = str(make_partition(Path(data), out / "partition", args.transcribed_fraction, args.unlabeled))
        train_split = "transcribed" if args.transcribed_fraction else "train"
        unlabeled_csv = prepare_librispeech(
            data, out / "data", splits=[], unlabeled_splits=["untranscribed"]
        ).csv_files["untranscribed"]
    elif any(name.startswith("kd_unlabeled") for name in args.variants):
        raise ValueError("the kd_unlabeled variants need --transcribed_fraction or --unlabeled")
    csvs = prepare_librispeech(data, out / "data", splits=[train_split, "dev", "test"]).csv_files
    csvs["train"] = csvs[train_split]
    if args.test_data:
        csvs["test"] = prepare_librispeech(
            Path(args.test_data).resolve(), out / "data_test", splits=["test"]
        ).csv_files["test"]
    cache = out / "cache"
    # one cache serves every cached variant: built for the highest temperature any of them trains at
    ceiling = ["--max_temperature", f"{cache_temperature(variants, args.extra.split()):g}"]
    student_yaml = hparams_files.resolve(args.student)
    hidden = cache_hidden_layers(variants, args.extra.split(), student_yaml)
    if hidden:  # kd_layers variants read the teacher layers' hidden states from the same cache
        ceiling += ["--hidden_layers", hidden]
        stack = cache_teacher_layers(variants, args.extra.split())
        if stack:
            ceiling += ["--teacher_layers", stack]
    caches = {
        "cache": speech_kd_command(
            "cache-targets", "--teacher", teacher, "--csv", csvs["train"], "--out", str(cache), *ceiling
        )
    }
    if unlabeled_csv:
        caches["cache_unlabeled"] = speech_kd_command(
            "cache-targets",
            "--teacher",
            teacher,
            "--csv",
            unlabeled_csv,
            "--out",
            str(out / "cache_unlabeled"),
            *ceiling,
        )
    run_all(caches, logs, 1)

    folders = {seed: out if len(seeds) == 1 else out / f"seed_{seed}" for seed in seeds}
    students, progress, variant_of = {}, {}, {}
    for seed, folder in folders.items():
        for name, (overrides, cached) in variants.items():
            cmd = speech_kd_command(
                "distill",
                student_yaml,
                f"--teacher_source={teacher}",
                f"--data_folder={data}",
                f"--output_folder={folder / name}",
                f"--number_of_epochs={args.epochs}",
                f"--seed={seed}",
                "--report_after_run=False",
                *merge_overrides(overrides, args.extra.split()),
            )
            if train_split != "train":
                cmd.append(f"--train_splits=[{train_split}]")
            if name.startswith("kd_unlabeled_filter"):
                cmd.append(f"--unlabeled_min_confidence={args.min_confidence}")
            if cached:
                both = name.startswith("kd_unlabeled")
                cmd.append(f"--targets_cache={cache}" + (f",{out / 'cache_unlabeled'}" if both else ""))
            key = name if len(seeds) == 1 else f"{name}_seed{seed}"
            students[key] = cmd
            variant_of[key] = name
            progress[key] = (folder / name, args.epochs)
    failed = run_all(students, logs, args.parallel, progress, keep_going=args.keep_going)
    # a variant that failed at any seed is left out of every seed's table (means over unequal seeds mislead)
    scored = [name for name in args.variants if name not in {variant_of[key] for key in failed}]

    teacher_scores = evaluate_run(teacher, csvs, out, "teacher")
    per_seed = {}
    for seed, folder in folders.items():
        results = {"teacher": teacher_scores}
        for name in scored:
            results[name] = evaluate_run(folder / name / "model", csvs, folder, name)
            results[name]["train_s_per_epoch"] = train_seconds_per_epoch(folder / name)
        (folder / "results.md").write_text(format_results(results) + "\n")
        (folder / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        per_seed[seed] = results
    if len(seeds) == 1:
        table, results = format_results(per_seed[seeds[0]]), per_seed[seeds[0]]
    else:
        results = {"seeds": per_seed, "mean": summarise_seeds(per_seed, out, folders, scored)}
        table = format_seed_summary(results["mean"], seeds)
        seed_figure(out, folders, scored, teacher_scores.get("dev_wer"))
        table += "\n\n" + "\n\n".join(f"seed {s}:\n\n{format_results(r)}" for s, r in per_seed.items())
    if failed:
        results["failed"] = failed
        table += "\n\nfailed (left out): " + ", ".join(f"{key} ({logs / (key + '.log')})" for key in failed)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table)
    if failed:
        raise RuntimeError(f"{len(failed)} run(s) failed: {', '.join(failed)}; the others are in {out / 'results.md'}")
    return results
