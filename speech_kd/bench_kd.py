"""Does distillation help? Teacher vs the same student from scratch and with KD variants.

Every student run uses identical data, epochs and seed; only the KD settings
differ (``scratch`` is ``--kd_weight=0``). Runs are independent processes
(one torch thread each, ``--parallel`` at a time) so two fit on two cores.

Example (the README's 40-epoch table)::

    speech-kd bench-kd --data demo_run/corpus --teacher speech_kd/pretrained/teacher_synth \
        --out results/kd_long --epochs 40 --variants scratch kd

With ``--seeds S1 S2 ...`` every variant is trained once per seed (``OUT/seed_S/``) and
``OUT/results.md`` adds the means over seeds, the gap closed with a 95 % bootstrap
interval over test utterances and seed pairs (:mod:`speech_kd.compare`) and
``OUT/dev_wer.png`` (dev WER per epoch, band over seeds); ``--test_data`` scores
another folder's (larger) test split. Finished runs are reused, so the same
command with more seeds only trains the new ones::

    speech-kd bench-kd --data data/synth --teacher speech_kd/pretrained/teacher_synth \
        --out results/kd3h12 --epochs 12 --seeds 1986 7 3 4 5 6 --test_data data/synth_bigtest

Untranscribed audio (README "Untranscribed audio", ``docs/untranscribed.md``):
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
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from speech_kd.compare import gap_closed, no_gap_label

__all__ = ["VARIANTS", "main", "gap_closed"]

REPO = Path(__file__).resolve().parent.parent

#: named KD settings (overrides of hparams/distill.yaml). Any name may end in ``_online`` (the
#: live teacher instead of the cache) or ``_sp`` (speed perturbation 0.9/1.0/1.1x, for both the
#: student and the live teacher, which then hears the perturbed audio): see :func:`variant_args`.
VARIANTS: dict[str, list[str]] = {
    # the student without KD, at its own best learning rate (0.001 / 0.002 / 0.004 measured; the yaml's
    # 0.004 is the KD student's best): each student is compared at the rate that suits it (README)
    "scratch": ["--kd_weight=0", "--lr=0.002"],
    "kd": [],  # the KD settings of the student yaml itself (hparams/distill.yaml's defaults)
    "kd_anneal": ["--kd_anneal=True"],  # kd with teacher annealing on (KD fades as the student reaches the teacher)
    "kd_plain": ["--kd_anneal=False"],  # kd with teacher annealing off (the KD weight as configured, all run long)
    # untranscribed audio (needs --transcribed_fraction or --unlabeled): KD on the split named untranscribed too
    "kd_unlabeled": ["--unlabeled_splits=[untranscribed]"],
    "kd_unlabeled_filter": ["--unlabeled_splits=[untranscribed]"],  # + --unlabeled_min_confidence=--min_confidence
    "kd_unlabeled_pl": ["--unlabeled_splits=[untranscribed]", "--unlabeled_kd_loss=ctc"],  # pseudo-labels there
    "kd_blankdown": ["--blank_mode=downweight"],  # kd with blank-dominated teacher frames weighted 0.1
    "kd_top4": ["--kd_topk=4"],  # kd with the teacher restricted to its top 4 tokens per frame
    "kl_t1": ["--kd_weight=0.5", "--temperature=1"],
    "kl_t2": ["--kd_weight=0.5", "--temperature=2"],
    "kl_t4": ["--kd_weight=0.5", "--temperature=4"],
    "kl_t2_w09": ["--kd_weight=0.9", "--temperature=2"],
    "kl_t1_w09": ["--kd_weight=0.9", "--temperature=1"],
    "kl_t1_w1": ["--kd_weight=1.0", "--temperature=1"],
    "kl_t2_top4": ["--kd_weight=0.5", "--temperature=2", "--kd_topk=4"],
    "kl_t2_blankdown": ["--kd_weight=0.5", "--temperature=2", "--blank_mode=downweight"],
    "ce_hard": ["--kd_weight=0.5", "--kd_loss=ce"],
    "ctc_teacher_path": ["--kd_weight=0.5", "--kd_loss=ctc"],
    "mse": ["--kd_weight=0.5", "--kd_loss=mse"],
}


def variant_args(name: str) -> tuple[list[str], bool]:
    """Overrides of a variant name and whether it reads the cache (else the live teacher, or none).

    Examples
    --------
    >>> variant_args("kl_t2")
    (['--kd_weight=0.5', '--temperature=2'], True)
    >>> variant_args("kl_t2_online")
    (['--kd_weight=0.5', '--temperature=2'], False)
    >>> variant_args("scratch_sp")
    (['--kd_weight=0', '--lr=0.002', '--speed_perturb=True'], False)
    """
    base, extra, cached = name, [], True
    for suffix, args in (("_sp", ["--speed_perturb=True"]), ("_online", [])):
        if base.endswith(suffix):
            base, extra, cached = base[: -len(suffix)], args + extra, False
    if base not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}: one of {sorted(VARIANTS)}, optionally + _online or _sp")
    return VARIANTS[base] + extra, cached and base != "scratch"


def merge_overrides(variant: list[str], extra: list[str]) -> list[str]:
    """A variant's ``--key=value`` overrides followed by ``extra``; a key given in ``extra`` wins.

    (SpeechBrain refuses a key given twice.)

    Examples
    --------
    >>> merge_overrides(["--kd_weight=0", "--lr=0.002"], ["--lr=0.001"])
    ['--kd_weight=0', '--lr=0.001']
    """
    given = {arg.split("=", 1)[0] for arg in extra}
    return [arg for arg in variant if arg.split("=", 1)[0] not in given] + list(extra)


def _speech_kd(*args: str) -> list[str]:
    return [sys.executable, "-m", "speech_kd.cli", *args]


def train_seconds_per_epoch(folder: Path) -> float | None:
    """Median wall time of a run's training stages (``train_seconds`` in ``history.jsonl``), or ``None``."""
    from speech_kd.report import load_history

    times = [row.get("train_seconds") for row in load_history(folder)]
    times = [t for t in times if isinstance(t, (int, float)) and math.isfinite(t)]
    return statistics.median(times) if times else None


def _epochs_done(folder: Path) -> int:
    """Epochs finished by a run (a resumed epoch's repeated history line counts once)."""
    from speech_kd.report import load_history

    return len(load_history(folder))


def _run_all(
    commands: dict[str, list[str]], logs: Path, parallel: int, epochs: dict[str, tuple[Path, int]] | None = None
) -> None:
    """Run the commands ``parallel`` at a time, one torch thread each; fail loudly.

    ``epochs`` maps a run name to (output folder, epochs): a progress bar per
    run follows its ``history.jsonl``. Output of each run goes to ``logs/NAME.log``.
    """
    from tqdm import tqdm

    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "MKL_NUM_THREADS": "1"}
    epochs = epochs or {}
    bars = {name: tqdm(total=total, desc=name, unit="epoch", position=i, leave=True)
            for i, (name, (_, total)) in enumerate(epochs.items())}  # fmt: skip
    pending = list(commands.items())
    running: list[tuple[str, subprocess.Popen]] = []
    try:
        while pending or running:
            while pending and len(running) < parallel:
                name, cmd = pending.pop(0)
                log = open(logs / f"{name}.log", "w")  # noqa: SIM115 - closed when the process ends
                tqdm.write(f"[bench_kd] start {name}: {' '.join(cmd[2:])}")
                running.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                                       cwd=REPO)))  # fmt: skip
            time.sleep(2)
            for name, bar in bars.items():
                bar.update(_epochs_done(epochs[name][0]) - bar.n)
            for name, proc in list(running):
                if proc.poll() is not None:
                    running.remove((name, proc))
                    if proc.returncode != 0:
                        raise RuntimeError(f"run {name} failed (exit {proc.returncode}); see {logs / (name + '.log')}")
                    tqdm.write(f"[bench_kd] done {name}")
    finally:
        for _, proc in running:
            proc.kill()
        for bar in bars.values():
            bar.close()


def build_parser(prog: str = "speech-kd bench-kd") -> argparse.ArgumentParser:
    """The experiment runner's options (``speech-kd bench-kd --help``)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--data", required=True, help="LibriSpeech-layout folder with train/dev/test")
    parser.add_argument("--out", required=True, help="output folder: one run folder per variant, results.md/json")
    parser.add_argument("--teacher", default=None,
                        help="teacher model folder, or A,B,... for an ensemble (default: train one)")  # fmt: skip
    parser.add_argument("--epochs", type=int, default=15, help="training epochs of every student")
    parser.add_argument("--teacher_epochs", type=int, default=10,
                        help="epochs of the teacher trained when --teacher is not given")  # fmt: skip
    parser.add_argument("--student", default="hparams/distill.yaml", help="the students' yaml")
    parser.add_argument("--variants", nargs="+", default=["scratch", "kd"],
                        help=f"names among {sorted(VARIANTS)}, each optionally + _online (live teacher) or _sp "
                        "(speed perturbation, live teacher)")  # fmt: skip
    parser.add_argument("--parallel", type=int, default=2, help="runs at once (one torch thread each)")
    parser.add_argument("--seed", type=int, default=1986, help="the seed of a single-seed run")
    parser.add_argument(
        "--seeds",
        type=int,
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
        type=float,
        default=None,
        help="keep the transcripts of this fraction of the train split; the rest is untranscribed",
    )
    parser.add_argument(
        "--unlabeled",
        default=None,
        help="split folder of --data used as the untranscribed audio (default: the rest of train)",
    )
    parser.add_argument("--min_confidence", type=float, default=0.85,
                        help="unlabeled_min_confidence of the kd_unlabeled_filter variant")  # fmt: skip
    return parser


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
        _run_all({"teacher": _speech_kd("train", str(REPO / "hparams/teacher.yaml"), f"--data_folder={data}",
                                        f"--output_folder={run}", f"--number_of_epochs={args.teacher_epochs}")},
                 logs, 1)  # fmt: skip
        teacher = str(run / "model")
    from speech_kd.teachers.ensemble import teacher_sources

    teacher = ",".join(str(Path(t).resolve()) for t in teacher_sources(teacher))  # A,B,...: an ensemble teacher

    from speech_kd.prepare import prepare_librispeech

    train_split, unlabeled_csv = "train", None
    if args.transcribed_fraction or args.unlabeled:
        data = str(make_partition(Path(data), out / "partition", args.transcribed_fraction, args.unlabeled))
        train_split = "transcribed" if args.transcribed_fraction else "train"
        unlabeled_csv = prepare_librispeech(data, out / "data", splits=[],
                                            unlabeled_splits=["untranscribed"]).csv_files["untranscribed"]  # fmt: skip
    elif any(name.startswith("kd_unlabeled") for name in args.variants):
        raise ValueError("the kd_unlabeled variants need --transcribed_fraction or --unlabeled")
    csvs = prepare_librispeech(data, out / "data", splits=[train_split, "dev", "test"]).csv_files
    csvs["train"] = csvs[train_split]
    if args.test_data:
        csvs["test"] = prepare_librispeech(
            Path(args.test_data).resolve(), out / "data_test", splits=["test"]
        ).csv_files["test"]
    cache = out / "cache"
    caches = {"cache": _speech_kd("cache-targets", "--teacher", teacher, "--csv", csvs["train"], "--out", str(cache))}
    if unlabeled_csv:
        caches["cache_unlabeled"] = _speech_kd("cache-targets", "--teacher", teacher, "--csv", unlabeled_csv, "--out",
                                               str(out / "cache_unlabeled"))  # fmt: skip
    _run_all(caches, logs, 1)

    folders = {seed: out if len(seeds) == 1 else out / f"seed_{seed}" for seed in seeds}
    students, progress = {}, {}
    for seed, folder in folders.items():
        for name, (overrides, cached) in variants.items():
            cmd = _speech_kd("distill", str(REPO / args.student), f"--teacher_source={teacher}",
                             f"--data_folder={data}", f"--output_folder={folder / name}",
                             f"--number_of_epochs={args.epochs}", f"--seed={seed}", "--report_after_run=False",
                             *merge_overrides(overrides, args.extra.split()))  # fmt: skip
            if train_split != "train":
                cmd.append(f"--train_splits=[{train_split}]")
            if name.startswith("kd_unlabeled_filter"):
                cmd.append(f"--unlabeled_min_confidence={args.min_confidence}")
            if cached:
                both = name.startswith("kd_unlabeled")
                cmd.append(f"--targets_cache={cache}" + (f",{out / 'cache_unlabeled'}" if both else ""))
            key = name if len(seeds) == 1 else f"{name}_seed{seed}"
            students[key] = cmd
            progress[key] = (folder / name, args.epochs)
    _run_all(students, logs, args.parallel, progress)

    teacher_scores = _evaluate(teacher, csvs, out, "teacher")
    per_seed = {}
    for seed, folder in folders.items():
        results = {"teacher": teacher_scores}
        for name in args.variants:
            results[name] = _evaluate(folder / name / "model", csvs, folder, name)
            results[name]["train_s_per_epoch"] = train_seconds_per_epoch(folder / name)
        (folder / "results.md").write_text(format_results(results) + "\n")
        (folder / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        per_seed[seed] = results
    if len(seeds) == 1:
        table, results = format_results(per_seed[seeds[0]]), per_seed[seeds[0]]
    else:
        results = {"seeds": per_seed, "mean": summarise_seeds(per_seed, out, folders, args.variants)}
        table = format_seed_summary(results["mean"], seeds)
        _seed_figure(out, folders, args.variants, teacher_scores.get("dev_wer"))
        table += "\n\n" + "\n\n".join(f"seed {s}:\n\n{format_results(r)}" for s, r in per_seed.items())
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table)
    return results


def make_partition(data: Path, out: Path, transcribed_fraction: float | None, unlabeled: str | None) -> Path:
    """A LibriSpeech-layout folder of symbolic links: ``dev``, ``test`` and the training audio, split in two.

    With ``transcribed_fraction`` ``F``, ``transcribed`` holds every ``1/F``-th
    utterance of ``data/train`` (in ID order, spread evenly over speakers) with
    its transcript, and ``untranscribed`` the others without transcripts. With
    ``unlabeled``, ``untranscribed`` is that split folder of ``data`` instead
    (``train`` then stays whole, unless ``F`` is given too).

    Returns
    -------
    Path
        ``out``, to use as the data folder.
    """
    out.mkdir(parents=True, exist_ok=True)
    for split in ("dev", "test", *(() if transcribed_fraction else ("train",))):
        link = out / split
        if not link.exists():
            link.symlink_to((data / split).resolve(), target_is_directory=True)
    if unlabeled:
        link = out / "untranscribed"
        if not link.exists():
            link.symlink_to((data / unlabeled).resolve(), target_is_directory=True)
    if not transcribed_fraction:
        return out
    if not 0 < transcribed_fraction < 1:
        raise ValueError(f"--transcribed_fraction={transcribed_fraction}: must be between 0 and 1")
    lines = {}
    for trans in sorted((data / "train").glob("*/*/*.trans.txt")):
        for line in trans.read_text(encoding="utf-8").splitlines():
            if line.strip():
                lines[line.split(" ", 1)[0]] = (line, trans.parent)
    chapters: dict[Path, list[str]] = {}
    for i, uid in enumerate(sorted(lines)):
        line, chapter = lines[uid]
        keep = math.floor((i + 1) * transcribed_fraction) > math.floor(i * transcribed_fraction)
        rel = chapter.relative_to(data / "train")
        if not keep and unlabeled:
            continue
        target = out / ("transcribed" if keep else "untranscribed") / rel
        target.mkdir(parents=True, exist_ok=True)
        link = target / f"{uid}.flac"
        if not link.exists():
            link.symlink_to((chapter / f"{uid}.flac").resolve())
        if keep:
            chapters.setdefault(target, []).append(line)
    for target, kept in chapters.items():
        (target / f"{target.parent.name}-{target.name}.trans.txt").write_text("\n".join(kept) + "\n")
    return out


def _evaluate(model: Path | str, csvs: dict, folder: Path, name: str) -> dict:
    """Test and dev scores of one model; per-utterance files ``eval_NAME[_dev]_utts.txt`` beside the JSON."""
    from speech_kd.evaluate import evaluate_model

    scores = evaluate_model(model, csvs["test"], json_path=folder / f"eval_{name}.json",
                            utts_path=folder / f"eval_{name}_utts.txt").summary  # fmt: skip
    dev = evaluate_model(model, csvs["dev"], json_path=folder / f"eval_{name}_dev.json",
                         utts_path=folder / f"eval_{name}_dev_utts.txt").summary  # fmt: skip
    return {**scores, "dev_wer": dev["wer"], "dev_cer": dev["cer"]}


def summarise_seeds(per_seed: dict, out: Path, folders: dict, variants: list[str]) -> dict:
    """Mean scores over seeds per model and, for KD variants, the gap closed with a bootstrap interval.

    The interval (:func:`speech_kd.compare.compare_gap`) resamples test
    utterances and seed pairs, on test and on dev.
    """
    from speech_kd.compare import compare_gap, read_utterance_errors

    keys = ("wer", "cer", "dev_wer", "dev_cer", "train_s_per_epoch")
    summary = {}
    for name in ["teacher", *variants]:
        rows = [r[name] for r in per_seed.values()]
        summary[name] = {
            k: statistics.mean(r[k] for r in rows) for k in keys if all(r.get(k) is not None for r in rows)
        }
        summary[name]["params"] = rows[0]["params"]
    if "scratch" in variants:
        for split, suffix in (("test", ""), ("dev", "_dev")):
            teacher = read_utterance_errors(out / f"eval_teacher{suffix}_utts.txt")
            scratch = [read_utterance_errors(f / f"eval_scratch{suffix}_utts.txt") for f in folders.values()]
            for name in variants:
                if name == "scratch":
                    continue
                kd = [read_utterance_errors(f / f"eval_{name}{suffix}_utts.txt") for f in folders.values()]
                gap = compare_gap(teacher, scratch, kd)
                summary[name][f"{split}_gap"] = {
                    "closed": gap.gap_closed, "interval": gap.gap_closed_interval, "wer_gain": gap.wer_gain,
                    "wer_gain_interval": gap.wer_gain_interval, "prob_kd_better": gap.prob_kd_better,
                    "num_utts": gap.num_utts, "teacher_better": gap.teacher_better,
                    "teacher_advantage": gap.teacher_advantage,
                    "teacher_advantage_interval": gap.teacher_advantage_interval,
                }  # fmt: skip
    return summary


def format_seed_summary(summary: dict, seeds: list[int]) -> str:
    """Markdown table of the means over seeds, with the bootstrap intervals of the gap closed."""

    def gap(row: dict, split: str) -> str:
        g = row.get(f"{split}_gap")
        if not g:
            return ""
        if not g.get("teacher_better", True):  # no gap to close: say so, with how far the teacher is behind
            lo, hi = g["teacher_advantage_interval"]
            return f"teacher worse than scratch by {-g['teacher_advantage']:.2f} [{-hi:.2f}, {-lo:.2f}]"
        lo, hi = g["interval"]
        return f"{100 * g['closed']:.0f} % [{100 * lo:.0f}, {100 * hi:.0f}]"

    def gain(row: dict) -> str:
        g = row.get("test_gap")
        return f"{g['wer_gain']:.2f} [{g['wer_gain_interval'][0]:.2f}, {g['wer_gain_interval'][1]:.2f}]" if g else ""

    lines = [f"mean over seeds {', '.join(map(str, seeds))}; [95 % bootstrap interval over test utterances and "
             "seed pairs]", "",
             "| model | WER % | CER % | dev WER % | dev CER % | parameters | WER gap closed | dev WER gap closed "
             "| WER gain (points) | s/epoch |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, row in summary.items():
        seconds = row.get("train_s_per_epoch")
        lines.append(f"| {name} | {row['wer']:.2f} | {row['cer']:.2f} | {row.get('dev_wer', float('nan')):.2f} | "
                     f"{row.get('dev_cer', float('nan')):.2f} | {row['params']:,} | {gap(row, 'test')} | "
                     f"{gap(row, 'dev')} | {gain(row)} | {f'{seconds:.1f}' if seconds else ''} |")  # fmt: skip
    return "\n".join(lines)


def _seed_figure(out: Path, folders: dict, variants: list[str], teacher_dev_wer: float | None) -> None:
    """``OUT/dev_wer.png``: dev WER per epoch of each variant, mean and min-max band over seeds."""
    from speech_kd.report import load_history
    from speech_kd.report.plots import seed_curves

    groups = {name: [load_history(f / name) for f in folders.values()] for name in variants}
    (out / "dev_wer.png").write_bytes(seed_curves(groups, teacher=teacher_dev_wer))


def baseline_of(name: str, names) -> str:
    """The scratch run a variant is compared with: ``scratch_sp`` for ``*_sp`` variants when it ran, else ``scratch``.

    Examples
    --------
    >>> baseline_of("kd_sp", ["scratch", "scratch_sp", "kd_sp"]), baseline_of("kd_sp", ["scratch", "kd_sp"])
    ('scratch_sp', 'scratch')
    """
    return "scratch_sp" if name.endswith("_sp") and "scratch_sp" in names else "scratch"


def format_results(results: dict) -> str:
    """Markdown table; KD rows get the share of the gap between their scratch run and the teacher they close.

    ``s/epoch`` is the median wall time of a student's training stage
    (students run side by side, so their times are comparable), and
    ``vs scratch`` its ratio to the scratch student's (``scratch_sp`` for
    ``*_sp`` variants, which differ from ``scratch`` by their augmentation).
    """

    def closed(name: str, key: str) -> str:
        teacher, scratch = results.get("teacher", {}).get(key), results.get(baseline_of(name, results), {}).get(key)
        if name == "teacher" or name.startswith("scratch") or teacher is None or scratch is None \
                or key not in results[name]:  # fmt: skip
            return ""
        if scratch <= teacher:  # the scratch student is already as good as the teacher: no gap to close
            return no_gap_label(scratch, teacher)
        return f"{100 * gap_closed(scratch, results[name][key], teacher):.0f} %"

    def number(row: dict, key: str) -> str:
        return f"{row[key]:.2f}" if key in row else ""

    lines = ["| model | WER % | CER % | parameters | RTF | WER gap closed | dev WER % | dev CER % | dev WER gap closed "
             "| s/epoch | vs scratch |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, s in results.items():
        seconds = s.get("train_s_per_epoch")
        base_time = results.get(baseline_of(name, results), {}).get("train_s_per_epoch")
        timing = f"{seconds:.1f} | " if seconds else " | "
        timing += f"{seconds / base_time:.2f}" if seconds and base_time else ""
        lines.append(f"| {name} | {s['wer']:.2f} | {s['cer']:.2f} | {s['params']:,} | {s['rtf']:.4f} | "
                     f"{closed(name, 'wer')} | {number(s, 'dev_wer')} | {number(s, 'dev_cer')} | "
                     f"{closed(name, 'dev_wer')} | {timing} |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
