"""history.jsonl survives a line cut short by a crash: the epoch is written again whole, the torn line dropped."""

from __future__ import annotations

import json
from types import SimpleNamespace

from speech_kd.report import load_history
from speech_kd.training.ctc_brain import CTCBrain


def _brain_stub(folder):
    """The attributes ``_append_history`` reads, without building a model."""
    return SimpleNamespace(
        hparams=SimpleNamespace(output_folder=str(folder)),
        optimizer_step=7,
        train_stats={"loss": 1.0},
        batches_per_rank=3,
        train_seconds=2.5,
    )


def test_a_truncated_line_is_replaced_by_its_epoch_written_whole(tmp_path):
    path = tmp_path / "history.jsonl"
    first = json.dumps({"epoch": 1, "step": 3})
    path.write_text(first + "\n" + '{"epoch": 2, "st')  # killed mid-line
    CTCBrain._append_history(_brain_stub(tmp_path), 2, 0.001, {"CER": 9.0})
    CTCBrain._append_history(_brain_stub(tmp_path), 3, 0.001, {"CER": 8.0})
    lines = path.read_text().splitlines()
    assert lines[0] == first and [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
    rows = load_history(tmp_path)
    assert [r["epoch"] for r in rows] == [1, 2, 3] and rows[1]["valid"] == {"CER": 9.0}


def test_a_repeated_epoch_replaces_its_line_and_later_ones(tmp_path):
    for epoch in (1, 2, 3):
        CTCBrain._append_history(_brain_stub(tmp_path), epoch, 0.01, {"CER": float(epoch)})
    CTCBrain._append_history(_brain_stub(tmp_path), 2, 0.01, {"CER": 20.0})  # resumed from epoch 1's checkpoint
    rows = load_history(tmp_path)
    assert [(r["epoch"], r["valid"]["CER"]) for r in rows] == [(1, 1.0), (2, 20.0)]


def test_first_line_of_a_new_history(tmp_path):
    CTCBrain._append_history(_brain_stub(tmp_path), 1, 0.01, {})
    assert [r["step"] for r in load_history(tmp_path)] == [7]
    assert (tmp_path / "history.jsonl").read_text().count("\n") == 1
