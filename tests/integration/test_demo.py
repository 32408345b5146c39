"""The demo, end to end in its quick mode: corpus, teacher, cache, KD and scratch students, table."""

from __future__ import annotations

import json
import re

from speech_kd.demo import run_demo
from tests.report_checks import chromium_check, inline_images


def test_quick_demo_runs_offline_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    results = run_demo(tmp_path / "demo", quick=True)
    assert set(results) == {"teacher", "scratch", "kd"}
    for summary in results.values():
        assert {"wer", "cer", "params", "rtf", "num_utts", "dev_wer", "dev_cer"} <= set(summary)
    assert results["kd"]["params"] == results["scratch"]["params"] < results["teacher"]["params"]
    assert results["kd"]["train_s_per_epoch"] > 0 and results["scratch"]["train_s_per_epoch"] > 0
    table = (tmp_path / "demo" / "results.md").read_text()
    assert "| kd |" in table and "WER gap closed" in table and "dev WER gap closed" in table and "vs scratch" in table
    assert json.loads((tmp_path / "demo" / "results.json").read_text()) == results
    meta = json.loads((tmp_path / "demo" / "cache" / "meta.json").read_text())
    assert meta["teacher_tokens"][0] == "<blank>"

    # the run report of the KD student: self-contained, every image decodes, Chromium shows no broken image
    html_path = tmp_path / "demo" / "kd" / "report.html"
    html = html_path.read_text()
    images = inline_images(html)
    assert len(images) >= 4
    posteriorgrams = re.findall(r'<img[^>]*alt="(\d+-\d+-\d+)"', html)  # alt = utterance ID
    assert 1 <= len(posteriorgrams) <= 3
    assert len(images) == 3 + len(posteriorgrams)  # + learning curves, error-rate bars, size-vs-WER
    for alt in ("Loss, dev error rates and learning rate", "Test WER and CER per model", "Parameters against WER"):
        assert f'alt="{alt}"' in html, alt
    for text in ("Learning curves", "teacher", "scratch", "kd", "hyperparams.yaml", "REF", "frame shift"):
        assert text in html, text
    md = (tmp_path / "demo" / "kd" / "report.md").read_text()
    assert "![" in md and (tmp_path / "demo" / "kd" / "report_files" / "learning_curves.png").exists()
    chromium_check(html_path, "demo_report.png")
