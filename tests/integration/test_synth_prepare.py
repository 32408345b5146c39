"""Synthesis and data preparation on real audio, including broken files."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speech_kd.data.prepare import prepare_librispeech
from speech_kd.data.synth import ALPHABET, SplitSpec, SynthConfig
from speech_kd.data.synth.corpus import _plan


def _transcripts(root: Path, split: str) -> dict[str, str]:
    out = {}
    for trans in (root / split).glob("*/*/*.trans.txt"):
        for line in trans.read_text().splitlines():
            uid, text = line.split(" ", 1)
            out[uid] = text
    return out


def test_synth_layout_and_disjoint_splits(tiny_corpus):
    splits = {s: _transcripts(tiny_corpus, s) for s in ("train", "dev", "test")}
    assert all(splits.values())
    speakers = {s: {uid.split("-")[0] for uid in utts} for s, utts in splits.items()}
    texts = {s: set(utts.values()) for s, utts in splits.items()}
    for a, b in (("train", "dev"), ("train", "test"), ("dev", "test")):
        assert not speakers[a] & speakers[b]
        assert not texts[a] & texts[b]
    for split, utts in splits.items():
        for uid, text in utts.items():
            assert set(text) <= ALPHABET
            spk, chapter, _ = uid.split("-")
            flac = tiny_corpus / split / spk / chapter / f"{uid}.flac"
            info = sf.info(str(flac))
            assert (info.samplerate, info.channels) == (16000, 1)
            assert 0.5 < info.frames / info.samplerate < 20
    assert (tiny_corpus / "SPEAKERS.TXT").exists()


def test_synth_plan_is_deterministic_and_a_prefix():
    small = SynthConfig(splits=(SplitSpec("train", 0.05, 10), SplitSpec("dev", 0.01, 2)), seed=3)
    big = SynthConfig(splits=(SplitSpec("train", 0.2, 10), SplitSpec("dev", 0.01, 2)), seed=3)
    plan_a = [(u.utt_id, u.text, u.speaker) for u in _plan(small)]
    assert plan_a == [(u.utt_id, u.text, u.speaker) for u in _plan(small)]
    assert set(plan_a) <= {(u.utt_id, u.text, u.speaker) for u in _plan(big)}


def _read_csv(path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_prepare_writes_speechbrain_csv(tiny_corpus, tmp_path):
    result = prepare_librispeech(tiny_corpus, tmp_path, splits=["train", "dev"])
    rows = _read_csv(result.csv_files["train"])
    assert list(rows[0]) == ["ID", "duration", "wav", "spk_id", "wrd"]
    assert len(rows) == len(_transcripts(tiny_corpus, "train"))
    assert not result.skipped
    row = rows[0]
    assert Path(row["wav"]).exists() and float(row["duration"]) > 0.5
    # SpeechBrain's librispeech_prepare.py: spk_id is speaker-chapter, duration str(frames / rate)
    assert row["spk_id"] == "-".join(row["ID"].split("-")[:2])
    assert float(row["duration"]) == sf.info(row["wav"]).frames / 16000


def test_prepare_reports_and_skips_bad_files(corpus_copy, tmp_path):
    split = corpus_copy / "train"
    chapters = {}
    for trans in sorted(split.glob("*/*/*.trans.txt")):
        for line in trans.read_text().splitlines():
            chapters[line.split(" ", 1)[0]] = trans.parent
    ids = sorted(chapters)[:6]

    def flac(uid):
        return chapters[uid] / f"{uid}.flac"

    flac(ids[0]).write_bytes(b"not audio at all" * 10)  # corrupt
    flac(ids[1]).write_bytes(b"")  # empty file
    sf.write(flac(ids[2]), np.zeros(8000, dtype="float32"), 8000)  # wrong rate
    sf.write(flac(ids[3]), np.zeros((16000, 2), dtype="float32"), 16000)  # stereo
    flac(ids[4]).unlink()  # transcript line without audio
    whole = flac(ids[5]).read_bytes()
    flac(ids[5]).write_bytes(whole[: len(whole) // 2])  # cut short: the header still announces every sample
    chapter = chapters[ids[0]]
    spk, chap = chapter.parent.name, chapter.name
    sf.write(chapter / f"{spk}-{chap}-9999.flac", np.zeros(16000, dtype="float32"), 16000)  # audio, no line
    trans = chapter / f"{spk}-{chap}.trans.txt"
    trans.write_text(trans.read_text() + f"{spk}-{chap}-9998 CAF\u00c9 NUMBER 42\n")  # outside the alphabet
    sf.write(chapter / f"{spk}-{chap}-9998.flac", np.zeros(16000, dtype="float32"), 16000)
    n_lines = len(_transcripts(corpus_copy, "train"))

    result = prepare_librispeech(corpus_copy, tmp_path, splits=["train"])
    reasons = {s.utt_id: s.reason for s in result.skipped}
    assert "unreadable audio" in reasons[ids[0]]
    assert "empty file" in reasons[ids[1]]
    assert "sample rate 8000" in reasons[ids[2]]
    assert "2 channels" in reasons[ids[3]]
    assert reasons[ids[4]] == "transcript line without audio"
    assert "truncated" in reasons[ids[5]]
    assert reasons[f"{spk}-{chap}-9999"] == "audio without a transcript line"
    assert "outside the alphabet" in reasons[f"{spk}-{chap}-9998"] and "4" in reasons[f"{spk}-{chap}-9998"]
    kept = {r["ID"] for r in _read_csv(result.csv_files["train"])}
    assert not kept & set(reasons)
    assert len(kept) == n_lines - 7
    skipped_csv = _read_csv(tmp_path / "train_skipped.csv")
    assert {r["ID"] for r in skipped_csv} == set(reasons)
    assert not list(tmp_path.glob("*.tmp"))


def test_synth_command_with_its_defaults(tmp_path, capsys):
    """``speech-kd synth OUT`` as the README writes it: no --jobs (was a TypeError: jobs=None reached the pool)."""
    import json

    from speech_kd.cli import main

    out = tmp_path / "corpus"
    argv = [
        "synth",
        str(out),
        "--hours",
        "0.004",
        "--speakers",
        "2",
        "--dev_hours",
        "0.002",
        "--dev_speakers",
        "1",
        "--test_hours",
        "0.002",
        "--test_speakers",
        "1",
    ]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    for split in ("train", "dev", "test"):
        flacs = list((out / split).glob("*/*/*.flac"))
        assert flacs and sf.info(str(flacs[0])).samplerate == 16000, split
    assert summary


def _audio(root: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(root)): sf.read(str(p), dtype="int16")[0] for p in sorted(root.glob("*/*/*/*.flac"))}


def _all_transcripts(root: Path) -> dict[str, str]:
    lines = [line.split(" ", 1) for t in root.glob("*/*/*/*.trans.txt") for line in t.read_text().splitlines()]
    return dict(lines)


def test_synth_is_repeatable_and_a_rerun_with_another_seed_never_mixes_corpora(tmp_path):
    from speech_kd.data.synth import synthesize_corpus

    def config(seed: int, speakers: int) -> SynthConfig:
        return SynthConfig(splits=(SplitSpec("train", 0.004, speakers), SplitSpec("dev", 0.002, 1)), seed=seed, jobs=1)

    synthesize_corpus(tmp_path / "a", config(5, 3))
    synthesize_corpus(tmp_path / "b", config(5, 3))
    first, second = _audio(tmp_path / "a"), _audio(tmp_path / "b")
    assert first and first.keys() == second.keys()
    assert all(np.array_equal(first[k], second[k]) for k in first), "same seed, different samples"

    # the same folder again with another seed and speaker count: exactly what a fresh folder gets
    synthesize_corpus(tmp_path / "a", config(6, 2))
    synthesize_corpus(tmp_path / "fresh", config(6, 2))
    rerun, fresh = _audio(tmp_path / "a"), _audio(tmp_path / "fresh")
    assert rerun.keys() == fresh.keys()
    assert all(np.array_equal(rerun[k], fresh[k]) for k in fresh)
    assert _all_transcripts(tmp_path / "a") == _all_transcripts(tmp_path / "fresh")

    # a folder without the plan record (an older version's, or one copied by hand): not ours, refused as it is
    (tmp_path / "b" / "synth_plan.json").unlink()
    before = _audio(tmp_path / "b")
    with pytest.raises(FileExistsError, match="not a corpus written by speech-kd synth"):
        synthesize_corpus(tmp_path / "b", config(6, 2))
    after = _audio(tmp_path / "b")
    assert after.keys() == before.keys() and all(np.array_equal(after[k], before[k]) for k in before)


def test_prepare_checks_every_split_before_writing(tiny_corpus, tmp_path):
    import pytest

    with pytest.raises(FileNotFoundError, match="nope"):
        prepare_librispeech(tiny_corpus, tmp_path / "csv", splits=["train", "nope"])
    assert not list((tmp_path / "csv").glob("*.csv"))
