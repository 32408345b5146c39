"""history.jsonl survives a line cut short by a crash: the next epoch starts a new line, readers skip the stub."""

from __future__ import annotations

import json
from types import SimpleNamespace

from speech_kd.brain import CTCBrain
from speech_kd.report import load_history


def _brain_stub(folder):
    """The attributes ``_append_history`` reads, without building a model."""
    return SimpleNamespace(hparams=SimpleNamespace(output_folder=str(folder)), optimizer_step=7,
                           train_stats={"loss": 1.0}, batches_per_rank=3, train_seconds=2.5)  # fmt: skip


def test_append_after_a_truncated_line_keeps_every_epoch(tmp_path, caplog):
    path = tmp_path / "history.jsonl"
    path.write_text(json.dumps({"epoch": 1, "step": 3}) + "\n" + '{"epoch": 2, "st')  # killed mid-line
    CTCBrain._append_history(_brain_stub(tmp_path), 2, 0.001, {"CER": 9.0})
    CTCBrain._append_history(_brain_stub(tmp_path), 3, 0.001, {"CER": 8.0})
    lines = path.read_text().splitlines()
    assert lines[1] == '{"epoch": 2, "st' and json.loads(lines[2])["epoch"] == 2
    rows = load_history(tmp_path)
    assert [r["epoch"] for r in rows] == [1, 2, 3] and rows[1]["valid"] == {"CER": 9.0}
    assert "line 2 is not JSON" in caplog.text


def test_first_line_of_a_new_history(tmp_path):
    CTCBrain._append_history(_brain_stub(tmp_path), 1, 0.01, {})
    assert [r["step"] for r in load_history(tmp_path)] == [7]
    assert (tmp_path / "history.jsonl").read_text().count("\n") == 1
