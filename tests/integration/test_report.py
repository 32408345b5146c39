"""Run reports from real tiny runs: what distillation did, as a self-contained page that Chromium renders."""

from __future__ import annotations

import logging
import re
import shutil

import pytest

from speech_kd.cli import main
from speech_kd.report.scores import gap_closed_by_run
from tests.conftest import REPO, TINY_MODEL
from tests.report_checks import assert_self_contained, chromium_check, inline_images

DISTILL = str(REPO / "hparams/distill.yaml")
CURVES = 'alt="Loss, dev error rates and learning rate"'


@pytest.fixture(scope="module")
def kd_run(trained_run, tiny_corpus, tmp_path_factory):
    """A 2-epoch tiny distillation from the trained tiny teacher (live targets); the report is written at its end."""
    out = tmp_path_factory.mktemp("report") / "kd"
    assert (
        main(
            [
                "distill",
                DISTILL,
                f"--data_folder={tiny_corpus}",
                f"--output_folder={out}",
                "--number_of_epochs=2",
                f"--teacher_source={trained_run / 'model'}",
                "--kd_weight=0.5",
                *TINY_MODEL,
            ]
        )
        == 0
    )
    return out


def _copy_run(run, dst):
    """A private copy of a run folder (without checkpoints) to write a report into."""
    return shutil.copytree(run, dst, ignore=shutil.ignore_patterns("save", "report*"))


def _posteriorgram_captions(html: str) -> list[str]:
    return re.findall(r"<figcaption><pre>(.*?)</pre></figcaption>", html, flags=re.S)


def _dev_rows(run) -> int:
    return len((run / "dev.csv").read_text().strip().splitlines()) - 1


def test_distill_writes_the_report(kd_run):
    html_path = kd_run / "report.html"
    html = html_path.read_text()
    assert_self_contained(html)
    images = inline_images(html)
    captions = _posteriorgram_captions(html)
    assert len(captions) == min(3, _dev_rows(kd_run))
    # learning curves, one posteriorgram per caption, the error-rate bars (teacher and this student)
    assert len(images) == 1 + len(captions) + 1
    assert CURVES in html and 'alt="Test WER and CER per model"' in html
    for caption in captions:  # transcript and both greedy hypotheses under each picture
        assert "REF     :" in caption and "teacher :" in caption and "student :" in caption
    assert "hollow circles mark the teacher" in html
    for text in (
        "Learning curves",
        "KD diagnostics per epoch",
        "kd_run.json",
        "hyperparams.yaml",
        "frame shift",
        "<td>teacher</td>",
        f"<td>{kd_run.name}</td>",
    ):
        assert text in html, text
    md = (kd_run / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\((report_files/[^)]+\.png)\)", md)
    assert len(links) == len(images) and all((kd_run / link).exists() for link in links)
    assert "report_files/learning_curves.png" in links


def test_report_cli_with_compare_renders_in_chromium(kd_run, trained_run, tmp_path):
    run = _copy_run(kd_run, tmp_path / "kd")
    assert main(["report", str(run), "--compare", f"scratch={trained_run / 'model'}", "--max_utts", "4"]) == 0
    html_path = run / "report.html"
    html = html_path.read_text()
    assert_self_contained(html)
    images = inline_images(html)
    assert 'alt="Parameters against WER"' in html  # two students: KD and "scratch"
    assert len(images) == 1 + len(_posteriorgram_captions(html)) + 2
    assert "<td>scratch</td>" in html and "Scored on 4 utterances" in html
    assert (run / "report_files" / "size_vs_wer.png").exists()
    shot = chromium_check(html_path, "report_page.png")
    if shot is None:
        pytest.skip("chromium not installed: the page was checked without a browser")


def test_report_of_a_run_without_teacher(trained_run, tmp_path):
    run = _copy_run(trained_run, tmp_path / "teacher_run")
    assert main(["report", str(run), "--no-eval"]) == 0
    html = (run / "report.html").read_text()
    captions = _posteriorgram_captions(html)
    assert len(captions) == min(3, _dev_rows(run))
    assert all("teacher :" not in c and "student :" in c for c in captions)
    assert "this run has no teacher" in html and "teacher spikes" not in html
    assert len(inline_images(html)) == 1 + len(captions)  # learning curves + student posteriorgrams, no scores
    assert "test_results.json" in html and "Test WER and CER per model" not in html


def test_report_failure_only_warns(monkeypatch, caplog, tmp_path):
    import speech_kd.training.distill
    from speech_kd.training.distill import _report

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(speech_kd.training.distill, "build_report", broken)
    with caplog.at_level(logging.WARNING):
        _report({"output_folder": str(tmp_path), "report_after_run": True})
    assert "could not write the run report: boom" in caplog.text
    caplog.clear()
    _report({"output_folder": str(tmp_path), "report_after_run": False})
    assert "could not write" not in caplog.text


def test_wer_gap_closed():
    rows = [{"name": "teacher", "wer": 20.0}, {"name": "kd", "wer": 40.0}, {"name": "scratch", "wer": 60.0}]
    assert gap_closed_by_run(rows, "kd") == {"kd": "50 %"}
    assert gap_closed_by_run(rows[:2], "kd") == {}
    better_than_teacher = [{**rows[0], "wer": 70.0}, *rows[1:]]  # no gap to close: said so, not "nan %" or "-50 %"
    assert gap_closed_by_run(better_than_teacher, "kd") == {"kd": "teacher worse than scratch"}


def test_evaluate_html_worst_first(trained_run, tmp_path):
    page = tmp_path / "eval.html"
    csv = trained_run / "data" / "test.csv"
    assert main(["evaluate", "--asr", str(trained_run / "model"), "--csv", str(csv), "--html", str(page)]) == 0
    html = page.read_text()
    assert_self_contained(html)
    wers = [float(w) for w in re.findall(r"WER ([0-9.]+)% \(", html)]
    assert wers and wers == sorted(wers, reverse=True)
    assert html.count("REF:") == html.count("HYP:") == len(wers) == len(csv.read_text().strip().splitlines()) - 1
    captions = _posteriorgram_captions(html)  # the worst utterances, drawn
    assert len(captions) == min(3, len(wers)) == len(inline_images(html))
    worst_ids = re.findall(r"<p>(\S+) — WER", html)[: len(captions)]
    assert [c.split()[0] for c in captions] == worst_ids
    assert (tmp_path / "eval.md").exists() and (tmp_path / "eval_files" / "worst_0.png").exists()
    chromium_check(page, "evaluate_page.png", height=2400)
