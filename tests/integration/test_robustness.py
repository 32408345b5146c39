"""Stale manifests, long files, concurrent and changed runs, small input faults (real tiny corpora)."""

from __future__ import annotations

import csv
import logging
import shutil

from speech_kd.data.prepare import prepare_librispeech
from tests.conftest import REPO, TINY_MODEL


def _rows(csv_path) -> dict[str, dict]:
    with open(csv_path, newline="", encoding="utf-8") as fh:
        return {row["ID"]: row for row in csv.DictReader(fh)}


def test_prepare_redoes_a_split_whose_audio_or_transcripts_changed(corpus_copy, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="speech_kd.data.prepare")
    save = tmp_path / "csv"
    first = _rows(prepare_librispeech(corpus_copy, save, splits=["dev"]).csv_files["dev"])
    trans = sorted((corpus_copy / "dev").glob("*/*/*.trans.txt"))[0]
    lines = trans.read_text().splitlines()
    uid, _, text = lines[0].partition(" ")
    lines[0] = f"{uid} {text[::-1]}"  # edited in place: same size, same folder listing
    trans.write_text("\n".join(lines) + "\n")
    wavs = sorted((corpus_copy / "dev").glob("*/*/*.flac"))
    other = next(w for w in wavs if first[w.stem]["duration"] != first[wavs[0].stem]["duration"])
    shutil.copyfile(other, wavs[0])  # a file replaced by another
    second = _rows(prepare_librispeech(corpus_copy, save, splits=["dev"]).csv_files["dev"])
    assert "redoing split dev (2 file(s) changed, added or removed" in caplog.text
    assert second[uid]["wrd"] == text[::-1].upper()
    assert second[wavs[0].stem]["duration"] == first[other.stem]["duration"]
    caplog.clear()
    prepare_librispeech(corpus_copy, save, splits=["dev"])
    assert "up to date, skipping preparation" in caplog.text


def test_a_byte_order_mark_in_a_transcript_file_is_not_text(corpus_copy, tmp_path):
    trans = sorted((corpus_copy / "dev").glob("*/*/*.trans.txt"))[0]
    trans.write_bytes(b"\xef\xbb\xbf" + trans.read_bytes())
    result = prepare_librispeech(corpus_copy, tmp_path, splits=["dev"])
    assert result.skipped == []
    assert trans.read_text(encoding="utf-8-sig").split()[0] in _rows(result.csv_files["dev"])


def _run(capsys, *argv) -> tuple[int, str, str]:
    from speech_kd.cli import run

    code = run(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_one_writer_per_run_folder_changed_settings_and_long_dev_files(tiny_corpus, tmp_path, capsys, caplog):
    """A live lock refuses a second run; a dead one is taken over; other settings are refused unless allowed;
    dev/test utterances over max_eval_duration are skipped by name."""
    import socket
    import subprocess

    out = tmp_path / "run"
    dev = _rows(prepare_librispeech(tiny_corpus, out / "data", splits=["dev"]).csv_files["dev"])
    longest = max(dev.values(), key=lambda r: float(r["duration"]))
    limit = f"--max_eval_duration={float(longest['duration']) - 0.01:.3f}"
    tiny = [arg for arg in TINY_MODEL if not arg.startswith("--lr=")]
    base = [
        "train",
        str(REPO / "hparams/teacher.yaml"),
        f"--data_folder={tiny_corpus}",
        f"--output_folder={out}",
        "--number_of_epochs=1",
        limit,
        *tiny,
    ]
    assert _run(capsys, *base, "--lr=0.003")[0] == 0
    assert f"skipping {longest['ID']} ({longest['wav']} in " in (out / "log.txt").read_text()
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        (out / ".lock").write_text(f"{socket.gethostname()} {sleeper.pid}\n")
        code, _, err = _run(capsys, *base, "--lr=0.003")
        assert code == 2 and f"another run (PID {sleeper.pid} on" in err and len(err.strip().splitlines()) == 1
    finally:
        sleeper.kill()
        sleeper.wait()
    history = (out / "history.jsonl").read_text()
    code, _, err = _run(capsys, *base, "--lr=0.001")
    assert code == 2 and "made with other settings than this run's (folder != now): lr 0.003 != 0.001" in err
    assert (out / "history.jsonl").read_text() == history and not (out / ".lock").exists()
    code, _, err = _run(capsys, *base, "--lr=0.001", "--allow_changed_settings=True")
    logged = caplog.text + err + (out / "log.txt").read_text()
    assert code == 0 and f"taking over the lock of PID {sleeper.pid}" in logged and "lr 0.003 != 0.001" in logged


def test_small_option_faults_are_one_line_errors(tiny_corpus, tmp_path, capsys):
    base = [
        "train",
        str(REPO / "hparams/teacher.yaml"),
        f"--data_folder={tiny_corpus}",
        f"--output_folder={tmp_path / 'run'}",
        *TINY_MODEL,
    ]
    for extra, message in (
        (["--number_of_epochs=0"], "--number_of_epochs=0: must be a whole number, 1 or more"),
        (["--lr"], "--lr needs a value: --lr=VALUE"),
        (["--lr", "--seed=3"], "--lr needs a value"),
        (["--ckpt_interval_minutes=abc"], "--ckpt_interval_minutes=abc: not a number of minutes"),
    ):
        code, _, err = _run(capsys, *base, *extra)
        last = err.strip().splitlines()[-1]  # (earlier lines: SpeechBrain's logger writing to an old test's stream)
        assert code == 2 and message in last and last.startswith("speech-kd train: error: "), (extra, err)
    if not __import__("torch").cuda.is_available():
        code, _, err = _run(capsys, *base, "--device=cuda")
        assert code == 2 and "--device=cuda: no CUDA GPU is available" in err


def test_fractional_checkpoint_interval_is_accepted():
    from speech_kd.training.settings import preparse

    argv, allow, extra = preparse(["x.yaml", "--ckpt_interval_minutes=0.5", "--allow_changed_settings"])
    assert argv == ["x.yaml"] and allow and extra == {"ckpt_interval_minutes": 0.5}
    assert preparse(["x.yaml", "--ckpt_interval_minutes=2", "--debug"])[0] == [
        "x.yaml",
        "--ckpt_interval_minutes=2",
        "--debug",
    ]


def test_sigterm_ends_a_run_as_ctrl_c_does(monkeypatch, capsys):
    import os
    import signal
    import time

    import speech_kd.cli as cli

    def busy(argv):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        return 0

    monkeypatch.setattr(cli, "main", busy)
    code, _, err = _run(capsys, "distill", "x.yaml")
    assert code == 143 and err.strip() == "speech-kd distill: interrupted (run the same command again to resume)"


def test_evaluate_long_files_missing_tokenizer_and_unwritable_output(
    trained_run, tmp_path, capsys, caplog, monkeypatch
):
    import speech_kd.scoring.evaluate as evaluate

    model, csv_path = str(trained_run / "model"), str(trained_run / "dev.csv")
    rows = _rows(csv_path)
    longest = max(rows.values(), key=lambda r: float(r["duration"]))
    limit = f"{float(longest['duration']) - 0.01:.3f}"
    code, out, _ = _run(
        capsys, "evaluate", "--asr", model, "--csv", csv_path, "--max_duration", limit, "--chunk_seconds", "0"
    )
    assert code == 0 and f"utterances {len(rows) - 1} " in out  # read whole: the longest is skipped, named
    assert f"skipping {longest['ID']} ({longest['wav']}): " in caplog.text
    caplog.clear()
    code, out, _ = _run(capsys, "evaluate", "--asr", model, "--csv", csv_path, "--max_duration", limit)
    assert code == 0 and f"utterances {len(rows)} " in out  # by default long files are read in chunks: all scored
    assert "skipping" not in caplog.text
    broken = tmp_path / "model"
    shutil.copytree(model, broken)
    (broken / "tokenizer.ckpt").unlink()
    code, _, err = _run(capsys, "evaluate", "--asr", str(broken), "--csv", csv_path)
    assert code == 2 and "missing tokenizer.ckpt" in err

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(evaluate, "write_utterances", full_disk)
    code, out, err = _run(capsys, "evaluate", "--asr", model, "--csv", csv_path, "--json", str(tmp_path / "e.json"))
    assert code == 2 and out.startswith("WER ") and "No space left on device" in err
