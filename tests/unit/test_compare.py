"""Gap-closed comparison with a paired bootstrap (speech_kd.scoring.compare, speech-kd compare)."""

import json
import random

import numpy as np
import pytest

from speech_kd.cli import main
from speech_kd.scoring.compare import compare_gap, read_utterance_errors
from speech_kd.scoring.metrics import utterance_errors, write_utterances

WORDS = "the cat sat on a mat with big red hat and ran far away".split()


def _utts_file(path, refs, hyps):
    ids = sorted(refs)
    write_utterances(utterance_errors(ids, [refs[i] for i in ids], [hyps[i] for i in ids]), path)
    return path


def _corrupt(ref: str, rate: float, rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) if rng.random() < rate else w for w in ref.split())


def _runs(n_utts=60, seed=0):
    rng = random.Random(seed)
    refs = {f"u{i:03d}": " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for i in range(n_utts)}
    return refs, rng


def test_reads_what_evaluate_writes(tmp_path):
    refs, rng = _runs(10)
    hyps = {u: _corrupt(r, 0.4, rng) for u, r in refs.items()}
    errors = read_utterance_errors(_utts_file(tmp_path / "a.txt", refs, hyps))
    scored = utterance_errors(list(refs), list(refs.values()), list(hyps.values()))
    expected = {u.utt_id: (u.errors, u.ref_words) for u in scored}
    assert errors == expected


def test_gap_closed_matches_a_direct_computation():
    rng = np.random.default_rng(1)
    ids = [f"u{i}" for i in range(50)]
    words = rng.integers(3, 15, size=50)

    def run(rate):
        return {u: (int(rng.binomial(w, rate)), int(w)) for u, w in zip(ids, words)}

    teacher, scratch, kd = run(0.1), [run(0.5), run(0.45)], [run(0.3), run(0.25)]

    def wer(r):
        return 100.0 * sum(e for e, _ in r.values()) / sum(w for _, w in r.values())

    s_mean, k_mean = np.mean([wer(r) for r in scratch]), np.mean([wer(r) for r in kd])
    result = compare_gap(teacher, scratch, kd, draws=500)
    assert result.teacher_wer == pytest.approx(wer(teacher))
    assert result.scratch_mean == pytest.approx(s_mean) and result.kd_mean == pytest.approx(k_mean)
    assert result.gap_closed == pytest.approx((s_mean - k_mean) / (s_mean - wer(teacher)))
    assert result.wer_gain == pytest.approx(s_mean - k_mean)
    lo, hi = result.gap_closed_interval
    assert lo < result.gap_closed < hi
    assert result.resample_seeds and result.prob_kd_better > 0.9


def test_no_difference_gives_an_interval_around_zero():
    rng = np.random.default_rng(2)
    ids = [f"u{i}" for i in range(80)]
    teacher = {u: (int(rng.integers(0, 3)), 10) for u in ids}
    scratch = {u: (int(rng.integers(2, 8)), 10) for u in ids}
    kd = {u: (scratch[u][0] + int(rng.integers(-1, 2)), 10) for u in ids}  # noise only
    result = compare_gap(teacher, [scratch], [kd], draws=1000)
    lo, hi = result.gap_closed_interval
    assert lo < 0.05 and hi > -0.05 and abs(result.gap_closed) < 0.1
    assert not result.resample_seeds
    assert result.prob_half_gap < 0.01


def test_different_test_sets_are_an_error_naming_the_file():
    teacher = {"a": (1, 5), "b": (1, 5)}
    with pytest.raises(ValueError, match="kd.txt.*different utterances"):
        compare_gap(teacher, [{"a": (2, 5), "b": (2, 5)}], [{"a": (1, 5)}], names=["t.txt", "s.txt", "kd.txt"])
    with pytest.raises(ValueError, match="word counts"):
        compare_gap(teacher, [{"a": (2, 5), "b": (2, 6)}], [{"a": (1, 5), "b": (1, 5)}])


def test_unpaired_seed_counts_are_an_error():
    run = {"a": (1, 5), "b": (1, 5)}
    with pytest.raises(ValueError, match="2 scratch runs and 3 KD runs"):
        compare_gap(run, [run, run], [run, run, run])
    assert compare_gap(run, [run], [run, run, run], draws=10).num_utts == 2  # one baseline against three seeds


def test_not_an_utterance_file_is_an_error(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text("hello\n")
    with pytest.raises(ValueError, match="x.txt"):
        read_utterance_errors(path)


def test_compare_cli(tmp_path, capsys):
    refs, rng = _runs(40, seed=3)
    files = {}
    for name, rate in [("t", 0.05), ("s1", 0.5), ("s2", 0.45), ("k1", 0.2), ("k2", 0.25)]:
        hyps = {u: _corrupt(r, rate, rng) for u, r in refs.items()}
        files[name] = str(_utts_file(tmp_path / f"{name}.txt", refs, hyps))
    out = tmp_path / "cmp.json"
    argv = [
        "compare",
        "--teacher",
        files["t"],
        "--scratch",
        files["s1"],
        files["s2"],
        "--kd",
        files["k1"],
        files["k2"],
        "--draws",
        "300",
        "--json",
        str(out),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "WER gap closed by KD" in printed and "utterances and seed pairs" in printed
    data = json.loads(out.read_text())
    assert data["num_utts"] == 40 and len(data["kd_wers"]) == 2 and data["gap_closed"] > 0.3
    assert data["files"]["kd"] == [files["k1"], files["k2"]]

    # no gap to close (the "teacher" is a scratch run): null in strict JSON, not NaN
    argv = [
        "compare",
        "--teacher",
        files["s1"],
        "--scratch",
        files["s1"],
        "--kd",
        files["k1"],
        "--draws",
        "50",
        "--json",
        str(out),
    ]
    assert main(argv) == 0
    text = out.read_text()
    assert "NaN" not in text and json.loads(text)["gap_closed"] is None


def test_teacher_worse_than_scratch_is_said_not_a_negative_share(tmp_path, capsys):
    # a teacher trained too briefly is worse than the student from scratch; the share
    # (scratch - kd) / (scratch - teacher) then comes out negative (e.g. -60 %) or undefined
    refs, rng = _runs(60, seed=5)
    files = {}
    for name, rate in [("t", 0.6), ("s1", 0.3), ("s2", 0.35), ("k1", 0.5), ("k2", 0.55)]:
        hyps = {u: _corrupt(r, rate, rng) for u, r in refs.items()}
        files[name] = str(_utts_file(tmp_path / f"{name}.txt", refs, hyps))
    runs = {k: read_utterance_errors(v) for k, v in files.items()}
    result = compare_gap(runs["t"], [runs["s1"], runs["s2"]], [runs["k1"], runs["k2"]], draws=300)
    assert not result.teacher_better and result.teacher_advantage < -10
    assert result.teacher_advantage_interval[1] < 0 and result.prob_no_gap == 1.0
    assert np.isnan(result.gap_closed) and all(np.isnan(result.gap_closed_interval))
    assert result.wer_gain < 0 and result.prob_kd_better < 0.05  # KD toward the worse teacher made it worse
    argv = [
        "compare",
        "--teacher",
        files["t"],
        "--scratch",
        files["s1"],
        files["s2"],
        "--kd",
        files["k1"],
        files["k2"],
        "--draws",
        "300",
        "--json",
        str(tmp_path / "c.json"),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "teacher worse than scratch" in printed and "KD worse" in printed
    assert "gap closed by KD" not in printed and "nan" not in printed.lower()
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["teacher_better"] is False and data["gap_closed"] is None and data["teacher_advantage"] < 0
