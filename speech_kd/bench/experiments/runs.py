"""Running an experiment's commands side by side, the untranscribed partition, and scoring each model."""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from speech_kd.report import load_history
from speech_kd.scoring.evaluate import evaluate_model


def speech_kd_command(*args: str) -> list[str]:
    """The command line of ``speech-kd ARGS...`` run by this Python."""
    return [sys.executable, "-m", "speech_kd.cli", *args]


def train_seconds_per_epoch(folder: Path) -> float | None:
    """Median wall time of a run's training stages (``train_seconds`` in ``history.jsonl``), or ``None``."""
    times = [row.get("train_seconds") for row in load_history(folder)]
    times = [t for t in times if isinstance(t, (int, float)) and math.isfinite(t)]
    return statistics.median(times) if times else None


def _epochs_done(folder: Path) -> int:
    """Epochs finished by a run (a resumed epoch's repeated history line counts once)."""
    return len(load_history(folder))


def run_all(
    commands: dict[str, list[str]],
    logs: Path,
    parallel: int,
    epochs: dict[str, tuple[Path, int]] | None = None,
    keep_going: bool = False,
) -> list[str]:
    """Run the commands ``parallel`` at a time, one torch thread each; return the names of those that failed.

    Without ``keep_going`` the first failure stops the others and raises (a broken setting
    shows at once); with it, the other runs go on, each failure is told as it happens, and
    the caller decides (a long multi-variant experiment keeps what finished).
    ``epochs`` maps a run name to (output folder, epochs): a progress bar per
    run follows its ``history.jsonl``. Output of each run goes to ``logs/NAME.log``.
    """
    from tqdm import tqdm

    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "MKL_NUM_THREADS": "1"}
    epochs = epochs or {}
    # bars on a terminal only (disable=None); in a log file one line per finished epoch instead of redraws
    bars = {
        name: tqdm(total=total, desc=name, unit="epoch", position=i, leave=True, disable=None)
        for i, (name, (_, total)) in enumerate(epochs.items())
    }
    told = dict.fromkeys(epochs, 0)
    pending = list(commands.items())
    running: list[tuple[str, subprocess.Popen]] = []
    failed: list[str] = []
    try:
        while pending or running:
            while pending and len(running) < parallel:
                name, cmd = pending.pop(0)
                log = open(logs / f"{name}.log", "w")  # noqa: SIM115 - closed when the process ends
                tqdm.write(f"[bench_kd] start {name}: {' '.join(cmd[2:])}")
                running.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)))
            time.sleep(2)
            for name, bar in bars.items():
                done = _epochs_done(epochs[name][0])
                if bar.disable and done > told[name]:
                    tqdm.write(f"[bench_kd] {name}: epoch {done}/{epochs[name][1]}")
                told[name] = done
                bar.update(done - bar.n)
            for name, proc in list(running):
                if proc.poll() is not None:
                    running.remove((name, proc))
                    if proc.returncode != 0:
                        told = f"run {name} failed (exit {proc.returncode}); see {logs / (name + '.log')}"
                        if not keep_going:
                            raise RuntimeError(told)
                        failed.append(name)
                        tqdm.write(f"[bench_kd] {told}")
                        continue
                    tqdm.write(f"[bench_kd] done {name}")
    finally:
        for _, proc in running:
            proc.kill()
        for bar in bars.values():
            bar.close()
    return failed


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


def evaluate_run(model: Path | str, csvs: dict, folder: Path, name: str) -> dict:
    """Test and dev scores of one model; per-utterance files ``eval_NAME[_dev]_utts.txt`` beside the JSON."""
    scores = evaluate_model(
        model, csvs["test"], json_path=folder / f"eval_{name}.json", utts_path=folder / f"eval_{name}_utts.txt"
    ).summary
    dev = evaluate_model(
        model, csvs["dev"], json_path=folder / f"eval_{name}_dev.json", utts_path=folder / f"eval_{name}_dev_utts.txt"
    ).summary
    return {**scores, "dev_wer": dev["wer"], "dev_cer": dev["cer"]}
