"""The demo, end to end in its quick mode: corpus, teacher, cache, KD and scratch students, table."""

from __future__ import annotations

import json

from speech_kd.demo import run_demo


def test_quick_demo_runs_offline_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    results = run_demo(tmp_path / "demo", quick=True)
    assert set(results) == {"teacher", "scratch", "kl_t2"}
    for summary in results.values():
        assert {"wer", "cer", "params", "rtf", "num_utts"} <= set(summary)
    assert results["kl_t2"]["params"] == results["scratch"]["params"] < results["teacher"]["params"]
    table = (tmp_path / "demo" / "results.md").read_text()
    assert "kl_t2" in table and "WER gap closed" in table
    assert json.loads((tmp_path / "demo" / "results.json").read_text()) == results
    meta = json.loads((tmp_path / "demo" / "cache" / "meta.json").read_text())
    assert meta["teacher_tokens"][0] == "<blank>"
