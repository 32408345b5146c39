"""Non-finite losses: a NaN batch updates nothing and is counted; a run that keeps producing them stops and says why."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from speech_kd.data.dataio import token_strings
from speech_kd.targets.build import make_targets
from speech_kd.targets.teachers.base import Teacher, TeacherError, TeacherOutput
from speech_kd.testing import make_tiny_sb_model
from speech_kd.training.distill_brain import DistillBrain
from speech_kd.training.train import run_training
from tests.conftest import REPO, TINY_MODEL

NAN_BATCHES: set[int] = set()  # 1-based batch numbers of an epoch whose KD term is made NaN


class NaNInjectingBrain(DistillBrain):
    """DistillBrain whose KD term is NaN on the batches in ``NAN_BATCHES`` (``None``: every batch)."""

    def kd_term(self, predictions, batch, temperature):
        loss, stats = super().kd_term(predictions, batch, temperature)
        if NAN_BATCHES is None or self.step in NAN_BATCHES:
            loss = loss * float("nan")
        return loss, stats


def _attach(brain, hparams, datasets):
    brain.attach_targets(make_targets(hparams, token_strings(brain.tokenizer)))


def _run(corpus, out, teacher, *extra):
    return run_training(
        [
            str(REPO / "hparams/distill.yaml"),
            f"--data_folder={corpus}",
            f"--output_folder={out}",
            f"--teacher_source={teacher}",
            "--number_of_epochs=1",
            "--noprogressbar",
            *TINY_MODEL,
            *extra,
        ],
        brain_class=NaNInjectingBrain,
        setup=_attach,
    )


@pytest.fixture()
def teacher(tmp_path):
    return make_tiny_sb_model(tmp_path / "teacher" / "model")


class _Collect(logging.Handler):
    """Keeps the records of one logger (SpeechBrain's logging set-up replaces the root handlers caplog uses)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_nan_batch_is_skipped_and_counted(tiny_corpus, tmp_path, teacher, monkeypatch):
    monkeypatch.setattr(f"{__name__}.NAN_BATCHES", {2})
    out = tmp_path / "one_nan"
    collect, brain_logger = _Collect(), logging.getLogger("speech_kd.training.ctc_brain")
    brain_logger.addHandler(collect)
    try:
        _run(tiny_corpus, out, teacher)
    finally:
        brain_logger.removeHandler(collect)
    messages = collect.messages
    assert sum("non-finite training loss" in m for m in messages) == 1
    assert any("batch 2 of epoch 1" in m and "1 of --nonfinite_patience=3" in m for m in messages)
    assert sum("optimizer step skipped" in m for m in messages) == 1  # the NaN never reached the weights
    record = json.loads((out / "history.jsonl").read_text().splitlines()[-1])
    assert all(math.isfinite(record["train"][k]) for k in ("loss", "ctc_loss", "kd_loss"))  # NaN batch left out
    weights = torch.load(out / "model" / "model.ckpt")
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_persistent_nan_stops_with_the_likely_causes(tiny_corpus, tmp_path, teacher, monkeypatch):
    monkeypatch.setattr(f"{__name__}.NAN_BATCHES", None)
    from speech_kd.training.ctc_brain import NonFiniteLossError

    with pytest.raises(NonFiniteLossError) as err:
        _run(tiny_corpus, tmp_path / "all_nan", teacher, "--nonfinite_patience=1")
    message = str(err.value)
    assert "NaN/inf on 2 batches of epoch 1, more than --nonfinite_patience=1" in message
    for cause in ("learning rate too high", "fp16 overflow", "shorter than their transcripts", "teacher"):
        assert cause in message
    assert "-" in message.rsplit("(utterance IDs):", 1)[1]  # names the utterances of the batches


class NaNTeacher(Teacher):
    tokens, blank_index, frame_shift, sample_rate, name = ["<blank>", "A"], 0, 0.02, 16000, "nan"

    def posteriors(self, wavs, wav_lens):
        return TeacherOutput(torch.full((wavs.shape[0], 5, 2), float("nan")), torch.full((wavs.shape[0],), 5))


def test_nan_teacher_output_stops_at_once():
    with pytest.raises(TeacherError, match="non-finite posteriors.*teacher_precision"):
        NaNTeacher()(torch.zeros(1, 1600), torch.ones(1))
