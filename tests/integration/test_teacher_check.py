"""The teacher is scored on dev before distilling, compared every epoch, and KD fades out (kd_anneal)
as the student reaches it. Real tiny corpus, real training."""

from __future__ import annotations

import json

import torch

import speech_kd.scoring.teacher_check
from speech_kd.cli import main
from speech_kd.data.dataio import merge_csvs
from speech_kd.report import build_report
from speech_kd.scoring.evaluate import evaluate_model
from speech_kd.scoring.teacher_check import TeacherDevScore, read_teacher_score, score_teacher_on_dev
from speech_kd.targets.cache import cache_targets
from tests.conftest import REPO, TINY_MODEL

DISTILL = str(REPO / "hparams/distill.yaml")


def _distill(corpus, out, epochs, *extra):
    return main(
        [
            "distill",
            DISTILL,
            f"--data_folder={corpus}",
            f"--output_folder={out}",
            f"--number_of_epochs={epochs}",
            "--report_after_run=False",
            *TINY_MODEL,
            *extra,
        ]
    )


def _history(out):
    return [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]


def test_teacher_scored_on_dev_live_and_from_a_cache_that_covers_dev(trained_run, tiny_corpus, tmp_path):
    teacher = trained_run / "model"
    out = tmp_path / "live"
    assert _distill(tiny_corpus, out, 1, f"--teacher_source={teacher}", "--kd_weight=0.5") == 0
    live = read_teacher_score(out)
    dev_utts = len((out / "dev.csv").read_text().splitlines()) - 1
    assert live is not None and live.source == "live" and live.num_utts == dev_utts
    # the same number `speech-kd evaluate` gives the teacher on the run's dev manifest
    assert live.wer == evaluate_model(teacher, out / "dev.csv", progress=False).summary["wer"]
    valid = _history(out)[-1]["valid"]
    assert valid["teacher_WER"] == live.wer  # compared every epoch: history.jsonl and the train log
    assert "teacher_WER" in (out / "train_log.txt").read_text()
    # scoring does not move the run's random draws (loading a teacher initialises layers before its weights)
    before = torch.get_rng_state()
    assert score_teacher_on_dev({"teacher_source": str(teacher)}, out / "dev.csv").wer == live.wer
    assert torch.equal(before, torch.get_rng_state())

    # a cache that holds the dev utterances too: decoded from it, no teacher folder needed
    both = merge_csvs([str(trained_run / "train.csv"), str(trained_run / "dev.csv")], tmp_path / "train_dev.csv")
    cache = tmp_path / "cache"
    cache_targets(str(teacher), both, cache, progress=False)
    out = tmp_path / "cached"
    assert _distill(tiny_corpus, out, 1, f"--targets_cache={cache}", "--kd_weight=0.5") == 0
    cached = read_teacher_score(out)
    assert cached.source == "cache" and cached.num_utts == live.num_utts
    assert abs(cached.cer - live.cer) < 2.0  # one-byte probabilities can flip a near-tie argmax, rarely


def _teacher_at(wer: float):
    def score(hparams, dev_csv, reader=None, teacher=None, device="cpu", ids=None):
        return TeacherDevScore(wer, wer / 3, len(ids or []), "live", "stub", str(dev_csv))

    return score


def test_kd_anneal_fades_kd_once_the_student_reaches_the_teacher(trained_run, tiny_corpus, tmp_path, monkeypatch):
    # a teacher whose dev WER (1000 %) every student beats after one epoch: the weak-teacher case in small
    monkeypatch.setattr(speech_kd.scoring.teacher_check, "score_teacher_on_dev", _teacher_at(1000.0))
    teacher = f"--teacher_source={trained_run / 'model'}"
    out = tmp_path / "anneal"
    assert _distill(tiny_corpus, out, 2, teacher, "--kd_weight=0.5") == 0
    weights = [row["train"]["kd_weight"] for row in _history(out)]
    assert weights == [0.5, 0.0]  # full KD in epoch 1; reached after it: CTC alone from epoch 2
    log = (out / "log.txt").read_text()
    assert "the student has reached the teacher on dev" in log and "kd_anneal is on" in log
    build_report(out, evaluate=False, n_posteriorgrams=0)
    report = (out / "report.md").read_text()
    assert "reached its teacher on dev at epoch 1" in report and "teacher dev WER / CER" in report

    out = tmp_path / "plain"  # annealing off: the same warning, the weight as configured
    assert _distill(tiny_corpus, out, 2, teacher, "--kd_weight=0.5", "--kd_anneal=False") == 0
    assert [row["train"]["kd_weight"] for row in _history(out)] == [0.5, 0.5]
    assert "kd_anneal is off" in (out / "log.txt").read_text()

    # a teacher far ahead (0 %): the scale stays exactly 1, the run is what it was without annealing
    out = tmp_path / "strong"
    monkeypatch.setattr(speech_kd.scoring.teacher_check, "score_teacher_on_dev", _teacher_at(0.0))
    assert _distill(tiny_corpus, out, 2, teacher, "--kd_weight=0.5") == 0
    assert [row["train"]["kd_weight"] for row in _history(out)] == [0.5, 0.5]


def test_kd_anneal_state_is_checkpointed(trained_run, tiny_corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(speech_kd.scoring.teacher_check, "score_teacher_on_dev", _teacher_at(1000.0))
    teacher = f"--teacher_source={trained_run / 'model'}"
    out = tmp_path / "resumed"
    assert _distill(tiny_corpus, out, 1, teacher, "--kd_weight=0.5") == 0
    # the rerun resumes from the epoch-1 checkpoint: the scale the first run reached (0) goes on
    assert _distill(tiny_corpus, out, 2, teacher, "--kd_weight=0.5") == 0
    assert [row["train"]["kd_weight"] for row in _history(out)] == [0.5, 0.0]
