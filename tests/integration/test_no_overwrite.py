"""No verb overwrites or deletes what it did not write (issue 30): one test per verb that writes.

Each test puts a file of the user's where the verb would write, runs the verb through the ``speech-kd`` entry
function (in-process) and checks: exit status 2, one error line naming the path, and every file of the user's
byte-identical afterwards. ``export`` has its own tests (``test_export_safety.py``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from speech_kd.cli import run


def _listing(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> content)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _refused(argv: list[str], path: Path, capsys) -> str:
    """Run ``speech-kd ARGV``; assert exit 2 and one error line naming ``path``; return the line."""
    code = run(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith(f"speech-kd {argv[0]}: error: ") and str(path) in err[0], err
    return err[0]


def _users_folder(folder: Path, *names: str) -> dict[str, bytes]:
    """``folder`` holding a file of the user's under each of ``names``; returns its listing."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"the user's " + name.encode() + b"\n")
    return _listing(folder)


def test_hparams_never_overwrites_a_file(tmp_path, capsys):
    before = _users_folder(tmp_path, "mine.yaml")
    _refused(["hparams", "teacher.yaml", "--out", str(tmp_path / "mine.yaml")], tmp_path / "mine.yaml", capsys)
    assert _listing(tmp_path) == before
    assert run(["hparams", "teacher.yaml", "--out", str(tmp_path / "new.yaml")]) == 0  # a new name: written
    assert (tmp_path / "new.yaml").read_bytes() and _listing(tmp_path)["mine.yaml"] == before["mine.yaml"]


def test_prepare_never_overwrites_a_csv_it_did_not_write(tiny_corpus, tmp_path, capsys):
    save = tmp_path / "csv"
    before = _users_folder(save, "train.csv", "notes.txt")
    line = _refused(["prepare", str(tiny_corpus), "--save_folder", str(save)], save / "train.csv", capsys)
    assert "not written by prepare" in line
    assert _listing(save) == before  # dev.csv, listed first or not, was not written either: checked before any
    (save / "train.csv").unlink()
    _users_folder(save, "train_skipped.csv")
    _refused(
        ["prepare", str(tiny_corpus), "--save_folder", str(save), "--splits", "train"],
        save / "train_skipped.csv",
        capsys,
    )
    (save / "train_skipped.csv").unlink()
    assert run(["prepare", str(tiny_corpus), "--save_folder", str(save), "--splits", "train"]) == 0
    assert run(["prepare", str(tiny_corpus), "--save_folder", str(save), "--splits", "train", "--force"]) == 0
    after = _listing(save)
    assert after["notes.txt"] == before["notes.txt"] and "train.csv" in after  # its own CSV: redone
    assert not [name for name in after if name.endswith(".tmp")]


def test_prepare_unlabeled_split_without_usable_audio_is_an_error(tmp_path, capsys):
    data = tmp_path / "data"
    _users_folder(data, "extra/a/1.flac", "extra/b/2.wav")  # not audio
    line = _refused(
        ["prepare", str(data), "--save_folder", str(tmp_path / "csv"), "--unlabeled_splits", "extra"],
        data / "extra",
        capsys,
    )
    assert "none of its 2 audio file(s) is usable" in line and "unreadable audio" in line
    assert not (tmp_path / "csv" / "extra.csv").exists()


def test_synth_refuses_a_folder_that_is_not_its_corpus(tmp_path, capsys):
    out = tmp_path / "corpus"
    before = _users_folder(out, "train/1/2/1-2-0000.flac", "readme.txt")
    line = _refused(["synth", str(out), "--hours", "0.001", "--speakers", "1"], out, capsys)
    assert "not a corpus written by speech-kd synth" in line
    assert _listing(out) == before


def test_cache_targets_refuses_a_folder_that_is_not_a_cache(tmp_path, capsys):
    out = tmp_path / "cache"
    argv = ["cache-targets", "--teacher", str(tmp_path / "no_teacher"), "--csv", str(tmp_path / "no.csv"), "--out"]
    before = _users_folder(out, "shard-00000.bin", "notes.txt.tmp.1")
    line = _refused([*argv, str(out)], out, capsys)  # before the teacher is loaded (it does not even exist)
    assert "holds no cache meta.json" in line
    assert _listing(out) == before
    (out / "meta.json").write_text(json.dumps({"name": "not a cache"}))
    before = _listing(out)
    _refused([*argv, str(out)], out / "meta.json", capsys)
    assert _listing(out) == before
    _refused([*argv, str(out / "notes.txt.tmp.1")], out / "notes.txt.tmp.1", capsys)  # a file, not a folder
    assert _listing(out) == before


def test_report_writes_only_its_own_files(tmp_path, capsys):
    for name in ("report.html", "report.md", "report_files/learning_curves.png"):
        run_dir = tmp_path / name.replace("/", "_")
        before = _users_folder(run_dir, name, "history.jsonl")
        line = _refused(["report", str(run_dir), "--no-eval"], run_dir / Path(name).parts[0], capsys)
        assert "not written by speech_kd" in line or "beside no page" in line
        assert _listing(run_dir) == before


def test_an_own_page_is_replaced(tmp_path):
    from speech_kd.report.html import Page, check_own_page

    page = Page("speech_kd report: x", tmp_path / "report_files")
    page.image("a.png", b"png", "a")
    page.write(tmp_path / "report.html", tmp_path / "report.md")
    check_own_page(tmp_path / "report.html", tmp_path / "report.md", tmp_path / "report_files")  # ours: fine


def test_evaluate_html_refuses_a_page_it_did_not_write(tmp_path, capsys):
    before = _users_folder(tmp_path, "page.md")
    argv = ["evaluate", "--asr", str(tmp_path / "no_model"), "--csv", str(tmp_path / "no.csv")]
    _refused([*argv, "--html", str(tmp_path / "page.html")], tmp_path / "page.md", capsys)  # before the scoring
    assert _listing(tmp_path) == before


def test_demo_refuses_a_folder_that_is_not_a_demo_run(tmp_path, capsys):
    out = tmp_path / "work"
    before = _users_folder(out, "results.md", "corpus/notes.txt")
    line = _refused(["demo", "--out", str(out), "--quick"], out, capsys)
    assert "not a folder of speech-kd demo" in line
    assert _listing(out) == before
    shutil.rmtree(out)
    _users_folder(tmp_path, "file")
    _refused(["demo", "--out", str(tmp_path / "file"), "--quick"], tmp_path / "file", capsys)
