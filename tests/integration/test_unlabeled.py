"""Untranscribed audio end to end: synth's untranscribed split, prepare --unlabeled_splits, distil on it."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import soundfile as sf

from speech_kd.cli import main, run
from speech_kd.data.synth.corpus import SplitSpec, SynthConfig, _plan, synthesize_corpus
from tests.conftest import REPO, TINY_MODEL

TEACHER = REPO / "speech_kd" / "pretrained" / "teacher_synth"
#: the tiny_corpus fixture's config (tests/conftest.py)
TINY = (SplitSpec("train", 0.025, 4), SplitSpec("dev", 0.006, 2), SplitSpec("test", 0.006, 2))


@pytest.fixture(scope="module")
def unlabeled_corpus(tiny_corpus, tmp_path_factory):
    """The tiny corpus plus an untranscribed split, synthesised into a copy of it."""
    root = tmp_path_factory.mktemp("unlabeled") / "synth"
    shutil.copytree(tiny_corpus, root)
    before = {p: p.stat().st_mtime_ns for p in root.glob("*/*/*/*.flac")}
    splits = (*TINY, SplitSpec("untranscribed", 0.008, 2, transcribed=False))
    synthesize_corpus(root, SynthConfig(splits=splits, seed=7, jobs=1))
    assert {p: p.stat().st_mtime_ns for p in before} == before  # the other splits were not rendered again
    return root


def _rows(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_synth_untranscribed_split(unlabeled_corpus):
    root = unlabeled_corpus
    flacs = sorted(root.glob("untranscribed/*/*/*.flac"))
    assert flacs and not list(root.glob("untranscribed/**/*.trans.txt"))
    references = (root / "untranscribed.references.txt").read_text().splitlines()
    assert sorted(line.split(" ")[0] for line in references) == [p.stem for p in flacs]
    plan = _plan(SynthConfig(splits=(*TINY, SplitSpec("untranscribed", 0.008, 2, transcribed=False)), seed=7))
    assert [u for u in plan if u.split != "untranscribed"] == _plan(SynthConfig(splits=TINY, seed=7))
    untranscribed = [u for u in plan if u.split == "untranscribed"]
    others = [u for u in plan if u.split != "untranscribed"]
    assert not {u.text for u in untranscribed} & {u.text for u in others}
    assert not {u.speaker.speaker_id for u in untranscribed} & {u.speaker.speaker_id for u in others}


def test_prepare_unlabeled_splits(unlabeled_corpus, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(unlabeled_corpus, data, symlinks=True)
    extra = data / "extra"  # a plain tree: two files of the same name, a WAV, transcripts to ignore, a broken file
    (extra / "a").mkdir(parents=True)
    (extra / "b" / "deep").mkdir(parents=True)
    first, second = sorted(data.glob("train/*/*/*.flac"))[:2]
    audio, rate = sf.read(first)
    sf.write(extra / "a" / "take.wav", audio, rate)
    shutil.copy(second, extra / "b" / "deep" / "take.flac")
    shutil.copy(second, extra / "solo.flac")
    (extra / "b" / "broken.flac").write_bytes(b"")
    (extra / "a" / "a.trans.txt").write_text("take SOME WORDS\n")
    out = tmp_path / "csv"
    assert (
        main(
            [
                "prepare",
                str(data),
                "--save_folder",
                str(out),
                "--splits",
                "dev",
                "--unlabeled_splits",
                "untranscribed",
                "extra",
            ]
        )
        == 0
    )
    rows = _rows(out / "untranscribed.csv")
    assert sorted(r["ID"] for r in rows) == sorted(p.stem for p in data.glob("untranscribed/*/*/*.flac"))
    assert all(
        r["wrd"] == "" and float(r["duration"]) > 0 and r["spk_id"] == "-".join(r["ID"].split("-")[:2]) for r in rows
    )
    rows = {r["ID"]: r for r in _rows(out / "extra.csv")}
    assert set(rows) == {"a__take.wav", "b__deep__take.flac", "solo"}
    assert rows["a__take.wav"]["spk_id"] == "a" and rows["solo"]["spk_id"] == "extra"
    skipped = _rows(out / "extra_skipped.csv")
    assert [r["ID"] for r in skipped] == ["broken"] and "empty" in skipped[0]["reason"]
    assert "extra: skipped 1" in capsys.readouterr().out
    assert _rows(out / "dev.csv")[0]["wrd"]  # transcribed splits as before

    # bad input: one line naming the folder, exit status 2
    capsys.readouterr()
    assert run(["prepare", str(data), "--save_folder", str(out), "--unlabeled_splits", "nowhere"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unlabeled split folder nowhere does not exist" in err
    (data / "silent" / "x").mkdir(parents=True)
    assert run(["prepare", str(data), "--save_folder", str(out), "--unlabeled_splits", "silent"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "silent holds no .flac or .wav file" in err
    assert run(["prepare", str(data), "--save_folder", str(out), "--splits", "dev", "--unlabeled_splits", "dev"]) == 2
    assert "given as transcribed and as unlabeled" in capsys.readouterr().err


def test_distill_on_untranscribed_audio_cached_and_filtered(unlabeled_corpus, tmp_path, capsys):
    """Caches of both manifests, the confidence filter, KD-only batches; the train cache alone is refused."""
    from speech_kd.data.prepare import prepare_librispeech

    csvs = prepare_librispeech(
        unlabeled_corpus, tmp_path / "csv", splits=["train"], unlabeled_splits=["untranscribed"]
    ).csv_files
    for name in ("train", "untranscribed"):
        assert (
            main(
                [
                    "cache-targets",
                    "--teacher",
                    str(TEACHER),
                    "--csv",
                    csvs[name],
                    "--out",
                    str(tmp_path / f"cache_{name}"),
                ]
            )
            == 0
        )
    capsys.readouterr()
    common = [
        "distill",
        str(REPO / "hparams/distill.yaml"),
        f"--data_folder={unlabeled_corpus}",
        f"--teacher_source={TEACHER}",
        "--unlabeled_splits=[untranscribed]",
        "--number_of_epochs=1",
        "--report_after_run=False",
        "--kd_anneal=False",
        *TINY_MODEL,
    ]
    assert run([*common, f"--output_folder={tmp_path / 'refused'}", f"--targets_cache={tmp_path / 'cache_train'}"]) == 2
    err = capsys.readouterr().err
    assert "training utterances have no cached targets" in err and "--targets_cache=TRAIN_CACHE,UNLABELED_CACHE" in err

    # a threshold between the scores: the teacher's median confidence on the untranscribed audio
    from speech_kd.targets.cache import CacheReader
    from speech_kd.training.unlabeled import teacher_confidence

    reader = CacheReader(tmp_path / "cache_untranscribed")
    scores = {}
    for uid in sorted(reader.ids):
        lp = reader.get(uid)
        scores[uid] = float(teacher_confidence(lp[None], __import__("torch").tensor([len(lp)]))[0])
    threshold = sorted(scores.values())[len(scores) // 2]
    out = tmp_path / "kd"
    caches = f"{tmp_path / 'cache_train'},{tmp_path / 'cache_untranscribed'}"
    assert (
        main(
            [*common, f"--output_folder={out}", f"--targets_cache={caches}", f"--unlabeled_min_confidence={threshold}"]
        )
        == 0
    )
    left_out = _rows(out / "unlabeled_filtered.csv")
    assert {r["ID"] for r in left_out} == {uid for uid, s in scores.items() if s < threshold} != set()
    assert len(_rows(out / "unlabeled_confidence.csv")) == len(scores)
    assert len(_rows(out / "unlabeled.csv")) == len(scores)
    record = json.loads((out / "history.jsonl").read_text().splitlines()[-1])
    assert record["train"]["kd_loss"] > 0
    assert 0 < record["train"]["untranscribed_share"] < 1  # KD-only batches ran beside the transcribed ones
    resolved = json.loads((out / "kd_run.json").read_text())
    assert resolved["unlabeled_splits"] == ["untranscribed"] and resolved["unlabeled_min_confidence"] == threshold


def test_unlabeled_splits_unused_without_teacher(unlabeled_corpus, tmp_path):
    out = tmp_path / "scratch"
    assert (
        main(
            [
                "distill",
                str(REPO / "hparams/distill.yaml"),
                f"--data_folder={unlabeled_corpus}",
                f"--output_folder={out}",
                "--kd_weight=0",
                "--unlabeled_splits=[untranscribed]",
                "--number_of_epochs=1",
                "--report_after_run=False",
                *TINY_MODEL,
            ]
        )
        == 0
    )
    assert "unlabeled_splits: not used, this run has no teacher targets" in (out / "log.txt").read_text()
    assert not (out / "unlabeled_confidence.csv").exists()
