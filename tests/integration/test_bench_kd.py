"""bench_kd over several seeds: per-seed tables, means, bootstrap interval of the gap closed, dev curves."""

from __future__ import annotations

import json

from speech_kd.bench.experiments import main as bench_kd
from tests.conftest import TINY_MODEL


def test_several_seeds_give_a_mean_table_with_intervals_and_a_figure(trained_run, tiny_corpus, tmp_path):
    out = tmp_path / "bench"
    argv = [
        "--data",
        str(tiny_corpus),
        "--teacher",
        str(trained_run / "model"),
        "--out",
        str(out),
        "--epochs",
        "1",
        "--seeds",
        "11",
        "12",
        "--variants",
        "scratch",
        "kd",
        "--test_data",
        str(tiny_corpus),
        "--extra=" + " ".join(TINY_MODEL),
    ]
    results = bench_kd(argv)
    assert set(results) == {"seeds", "mean"} and set(results["seeds"]) == {11, 12}
    for seed in (11, 12):
        assert (out / f"seed_{seed}" / "kd" / "model" / "hyperparams.yaml").exists()
        assert (out / f"seed_{seed}" / "eval_kd_utts.txt").exists()
        per_seed = json.loads((out / f"seed_{seed}" / "results.json").read_text())
        assert set(per_seed) == {"teacher", "scratch", "kd"}
    mean = results["mean"]
    wers = [results["seeds"][s]["kd"]["wer"] for s in (11, 12)]
    assert abs(mean["kd"]["wer"] - sum(wers) / 2) < 1e-9
    gap = mean["kd"]["test_gap"]
    assert gap["num_utts"] == results["seeds"][11]["kd"]["num_utts"] and len(gap["interval"]) == 2
    assert "dev_gap" in mean["kd"] and "test_gap" not in mean["scratch"]
    table = (out / "results.md").read_text()
    assert table.startswith("mean over seeds 11, 12") and "seed 12:" in table
    assert (out / "dev_wer.png").read_bytes()[1:4] == b"PNG"
    assert json.loads((out / "results.json").read_text())["mean"]["kd"]["params"] == mean["kd"]["params"]

    # the same command again reuses the finished runs: nothing retrained, the same scores
    again = bench_kd(argv)
    assert again["mean"]["kd"]["wer"] == mean["kd"]["wer"]
    assert len((out / "seed_11" / "kd" / "history.jsonl").read_text().splitlines()) == 1
