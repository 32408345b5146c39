"""bench-kd's runner: a failed run stops the others, or with keep_going is listed while the others finish."""

import sys

import pytest

from speech_kd.bench.experiments.runs import run_all


def _commands(tmp_path):
    done = tmp_path / "done.txt"
    slow_ok = [
        sys.executable,
        "-c",
        f"import time, pathlib; time.sleep(3); pathlib.Path({str(done)!r}).write_text('ok')",
    ]
    return {"fails": [sys.executable, "-c", "import sys; print('bad setting'); sys.exit(3)"], "slow_ok": slow_ok}, done


def test_first_failure_stops_the_others_and_names_the_log(tmp_path):
    commands, done = _commands(tmp_path)
    with pytest.raises(RuntimeError, match=r"run fails failed \(exit 3\); see .*fails\.log"):
        run_all(commands, tmp_path, parallel=2)
    assert not done.exists()  # the slow run was killed, not left to finish
    assert "bad setting" in (tmp_path / "fails.log").read_text()


def test_keep_going_lists_the_failure_and_lets_the_others_finish(tmp_path):
    commands, done = _commands(tmp_path)
    assert run_all(commands, tmp_path, parallel=2, keep_going=True) == ["fails"]
    assert done.read_text() == "ok"


def test_a_log_file_gets_one_line_per_epoch_not_bar_redraws(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    history = run / "history.jsonl"
    write_epochs = (
        "import json, time\n"
        "for epoch in (1, 2):\n"
        f"    with open({str(history)!r}, 'a') as f:\n"
        "        f.write(json.dumps({'epoch': epoch, 'stage': 'valid'}) + '\\n')\n"
        "    time.sleep(2.5)\n"
    )
    assert run_all({"kd": [sys.executable, "-c", write_epochs]}, tmp_path, 1, {"kd": (run, 2)}) == []
    out = capsys.readouterr()
    lines = (out.out + out.err).splitlines()
    assert "[bench_kd] kd: epoch 1/2" in lines and "[bench_kd] kd: epoch 2/2" in lines
    assert not any("epoch/s" in line for line in lines)  # no tqdm bar drawn into a file
