"""SIGKILL at a random moment, rerun the same command: training resumes and ends with the same step count.

Run for ``train`` and for ``distill`` (live teacher: nothing of it is in the
checkpoints, the rerun loads it again), with intra-epoch checkpoints every
two optimizer steps (``--ckpt_interval_steps=2``).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from speech_kd.testing import make_tiny_sb_model
from tests.conftest import REPO, TINY_MODEL

EPOCHS = 3


def _command(corpus: Path, out: Path, kind: str, teacher: str | None) -> list[str]:
    if kind == "train":
        recipe = ["train", str(REPO / "hparams/teacher.yaml")]
    else:
        recipe = [
            "distill",
            str(REPO / "hparams/distill.yaml"),
            f"--teacher_source={teacher}",
            "--report_after_run=False",
        ]
    return [
        sys.executable,
        "-m",
        "speech_kd.cli",
        *recipe,
        f"--data_folder={corpus}",
        f"--output_folder={out}",
        f"--number_of_epochs={EPOCHS}",
        "--ckpt_interval_steps=2",
        "--keep_checkpoints=2",
        *TINY_MODEL,
    ]


def _history(out: Path) -> dict[int, dict]:
    """Last history line per epoch (a kill between checkpoint and log repeats a line)."""
    lines = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    return {rec["epoch"]: rec for rec in lines}


class Killed(Exception):
    """Stands for a kill, raised inside the training loop where a SIGKILL would land."""


def _kill_at_batch_then_rerun(run, argv: list[str], brain_class, kill_at_batch: int, monkeypatch) -> None:
    """``run(argv)`` dies at training batch ``kill_at_batch`` (``brain_class.fit_batch`` raises), then runs again."""
    real = brain_class.fit_batch
    calls = {"n": 0}

    def dies_at_a_batch(self, batch):
        calls["n"] += 1
        if calls["n"] == kill_at_batch:
            raise Killed
        return real(self, batch)

    monkeypatch.setattr(brain_class, "fit_batch", dies_at_a_batch)
    with pytest.raises(Killed):
        run(argv)
    monkeypatch.setattr(brain_class, "fit_batch", real)
    run(argv)


def _final_step(out: Path) -> int:
    return _history(out)[EPOCHS]["step"]


@pytest.mark.parametrize("kind", ["train", "distill"])
def test_sigkill_then_rerun_resumes(tiny_corpus, tmp_path, kind):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    teacher = make_tiny_sb_model(tmp_path / "teacher" / "model") if kind == "distill" else None
    clean = tmp_path / "clean"
    subprocess.run(_command(tiny_corpus, clean, kind, teacher), check=True, env=env, capture_output=True, cwd=REPO)
    expected = _final_step(clean)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _command(tiny_corpus, killed, kind, teacher),
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not list((killed / "save").glob("CKPT+*")):
        time.sleep(0.05)
    time.sleep(random.Random(os.getpid()).uniform(0.0, 1.5))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL

    result = subprocess.run(
        _command(tiny_corpus, killed, kind, teacher), env=env, capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]  # SpeechBrain logs tracebacks to stdout
    assert "it/s" not in result.stderr and "s/it" not in result.stderr  # not a terminal: no progress-bar redraws
    assert _final_step(killed) == expected
    assert (killed / "model" / "model.ckpt").exists()
    assert sorted(_history(killed)) == list(range(1, EPOCHS + 1))
    assert [_history(killed)[e]["step"] for e in (1, 2)] == [_history(clean)[e]["step"] for e in (1, 2)]
    for ckpt in (killed / "save").glob("CKPT+*"):  # every checkpoint left behind is complete
        assert (ckpt / "CKPT.yaml").exists() and (ckpt / "model.ckpt").exists()
        torch.load(ckpt / "model.ckpt")


def test_a_kill_during_the_epoch_end_save_loses_nothing(tiny_corpus, tmp_path, monkeypatch):
    """Dying in the epoch-end save repeats the epoch (its history line is written first) and ends as if never killed.

    (The other order lost the line for good: the rerun found the epoch's checkpoint, skipped the epoch,
    and its history had no row for it; seen once in ``test_sigkill_then_rerun_resumes[train]``.)
    """
    from speech_kd.training.checkpoints import AtomicCheckpointer
    from speech_kd.training.train import run_training

    real = AtomicCheckpointer.save_and_keep_only

    def dies_at_the_last_epoch(self, *args, meta=None, **kwargs):
        if (meta or {}).get("epoch") == EPOCHS:
            raise Killed
        return real(self, *args, meta=meta, **kwargs)

    out = tmp_path / "run"
    argv = [
        str(REPO / "hparams/teacher.yaml"),
        f"--data_folder={tiny_corpus}",
        f"--output_folder={out}",
        f"--number_of_epochs={EPOCHS}",
        *TINY_MODEL,
    ]
    monkeypatch.setattr(AtomicCheckpointer, "save_and_keep_only", dies_at_the_last_epoch)
    with pytest.raises(Killed):
        run_training(argv)
    assert EPOCHS in _history(out)
    monkeypatch.setattr(AtomicCheckpointer, "save_and_keep_only", real)
    run_training(argv)  # the rerun trains the last epoch again and its line replaces the first one
    epochs = [json.loads(line)["epoch"] for line in (out / "history.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, EPOCHS + 1))  # one line per epoch, none twice

    # and, the random generators being checkpointed, it draws what an uninterrupted run draws (speed
    # perturbation, SpecAugment, dropout): the same weights at the end
    clean = tmp_path / "clean"
    run_training([a if not a.startswith("--output_folder") else f"--output_folder={clean}" for a in argv])
    resumed, straight = (torch.load(o / "model" / "model.ckpt") for o in (out, clean))
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


@pytest.mark.parametrize("kill_at_batch", [3, 5])
def test_a_run_killed_mid_epoch_ends_with_the_weights_of_one_never_killed(
    tiny_corpus, tmp_path, monkeypatch, kill_at_batch
):
    """Resumed from an intra-epoch checkpoint, the run draws what it would have drawn: the same final weights.

    (The train loader has its own generator: starting an epoch's iterator drew a seed from the global one,
    which after a resume mid-epoch shifted every later dropout/SpecAugment/speed draw.)
    """
    from speech_kd.training.ctc_brain import CTCBrain
    from speech_kd.training.train import run_training

    def argv(out: Path) -> list[str]:
        return [
            str(REPO / "hparams/teacher.yaml"),
            f"--data_folder={tiny_corpus}",
            f"--output_folder={out}",
            "--number_of_epochs=2",
            "--ckpt_interval_steps=2",
            *TINY_MODEL,
        ]

    _kill_at_batch_then_rerun(run_training, argv(tmp_path / "killed"), CTCBrain, kill_at_batch, monkeypatch)
    run_training(argv(tmp_path / "clean"))
    resumed, straight = (torch.load(tmp_path / o / "model" / "model.ckpt") for o in ("killed", "clean"))
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


def test_cr_ctc_resumed_mid_epoch_draws_the_same_two_views(tiny_corpus, tmp_path, monkeypatch):
    """CR-CTC's two SpecAugment views are drawn from the checkpointed generator: killed at the 4th batch (intra-epoch
    checkpoints every 2 steps) and rerun, the run ends with the weights of one never killed, and the epoch's
    logged cr_loss covers all its batches."""
    from speech_kd.training.ctc_brain import CTCBrain
    from speech_kd.training.train import run_training

    def argv(out: Path) -> list[str]:
        return [
            str(REPO / "hparams/teacher.yaml"),
            f"--data_folder={tiny_corpus}",
            f"--output_folder={out}",
            "--number_of_epochs=1",
            "--ckpt_interval_steps=2",
            "--cr_ctc_weight=0.2",
            "--spec_augment=True",
            "--max_batch_length=10",
            *(a for a in TINY_MODEL if not a.startswith("--max_batch_length")),
        ]

    _kill_at_batch_then_rerun(run_training, argv(tmp_path / "killed"), CTCBrain, 4, monkeypatch)
    run_training(argv(tmp_path / "clean"))
    resumed, straight = (torch.load(tmp_path / o / "model" / "model.ckpt") for o in ("killed", "clean"))
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    resumed, straight = (_history(tmp_path / o)[1]["train"] for o in ("killed", "clean"))
    assert resumed["cr_loss"] > 0 and resumed["cr_loss"] == pytest.approx(straight["cr_loss"], rel=1e-9)


def test_kd_statistics_of_an_epoch_resumed_mid_way_cover_all_its_batches(tiny_corpus, tmp_path, monkeypatch):
    """Killed at the 4th training batch of epoch 1 (intra-epoch checkpoints every 2 steps), then rerun: epoch 1's
    logged KD numbers are those of the run never killed, not only of the batches after the resume."""
    from speech_kd.training.distill import run_distillation
    from speech_kd.training.distill_brain import DistillBrain

    teacher = make_tiny_sb_model(tmp_path / "teacher" / "model")

    def argv(out: Path) -> list[str]:
        return [
            str(REPO / "hparams/distill.yaml"),
            f"--teacher_source={teacher}",
            "--report_after_run=False",
            f"--data_folder={tiny_corpus}",
            f"--output_folder={out}",
            "--number_of_epochs=1",
            "--ckpt_interval_steps=2",
            "--max_batch_length=10",
            *(a for a in TINY_MODEL if not a.startswith("--max_batch_length")),
        ]

    _kill_at_batch_then_rerun(run_distillation, argv(tmp_path / "killed"), DistillBrain, 4, monkeypatch)
    run_distillation(argv(tmp_path / "clean"))
    resumed, straight = (_history(tmp_path / o)[1]["train"] for o in ("killed", "clean"))
    for key in ("kd_loss", "ctc_loss", "agreement", "blank_share"):
        assert resumed[key] == pytest.approx(straight[key], rel=1e-9), key


def test_synthesis_workers_die_on_the_pools_sigterm_under_the_clis_handler():
    """``speech-kd``'s SIGTERM handler (raise KeyboardInterrupt) is not inherited by the synthesis pool's workers.

    Inherited, it let a worker that ``Pool.terminate`` signalled keep waiting for work, and ``speech-kd bench``
    (which synthesises its corpus) hung when the pool closed.
    """
    from speech_kd.data.synth.corpus import render_pool

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        with render_pool(2) as pool:
            workers = list(pool._pool)
            assert pool.map(signal.getsignal, [signal.SIGTERM] * 4) == [signal.SIG_DFL] * 4
    finally:
        signal.signal(signal.SIGTERM, previous)
    for worker in workers:  # ended by the pool's sentinel or killed by its SIGTERM, not left waiting
        worker.join(timeout=30)
        assert worker.exitcode in (0, -signal.SIGTERM)
