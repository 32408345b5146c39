"""Distillation end to end: live teacher, cached targets, and the errors users meet first."""

from __future__ import annotations

import json
import shutil

import pytest
import speechbrain as sb
import torch

from speech_kd.cli import main
from speech_kd.data.dataio import load_dataset, make_tokenizer, token_strings
from speech_kd.targets.cache import CacheError, CacheReader, cache_targets
from speech_kd.targets.strategies import CachedTargets, OnlineTargets, TargetAligner
from speech_kd.targets.teachers.base import TeacherError, load_teacher
from tests.conftest import REPO, TINY_MODEL

DISTILL = str(REPO / "hparams/distill.yaml")


def _distill(corpus, out, *extra):
    return main(
        [
            "distill",
            DISTILL,
            f"--data_folder={corpus}",
            f"--output_folder={out}",
            "--number_of_epochs=1",
            *TINY_MODEL,
            *extra,
        ]
    )


def test_distill_with_live_teacher(trained_run, tiny_corpus, tmp_path, monkeypatch):
    out = tmp_path / "kd"
    monkeypatch.chdir(trained_run)  # a teacher named relative to the working directory
    assert _distill(tiny_corpus, out, "--teacher_source=model", "--kd_weight=0.5", "--use_tensorboard=True") == 0
    # recorded absolute, so `speech-kd report` finds the teacher from any folder
    assert json.loads((out / "kd_run.json").read_text())["teacher_source"] == str((trained_run / "model").resolve())
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    train = history[-1]["train"]
    assert train["kd_loss"] > 0 and 0 <= train["agreement"] <= 1 and 0 <= train["blank_share"] <= 1
    assert train["kd_weight"] == 0.5
    assert (out / "model" / "hyperparams.yaml").exists()
    setup = (out / "kd_setup.txt").read_text()
    assert "frame shift" in setup
    log = (out / "train_log.txt").read_text()
    assert "kd_loss" in log
    # the same per-epoch numbers in TensorBoard (SpeechBrain's TensorboardLogger)
    event_acc = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events = event_acc.EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"kd_loss/train", "ctc_loss/train", "agreement/train", "blank_share/train", "CER/valid", "lr"} <= tags
    assert events.Scalars("kd_loss/train")[0].value == pytest.approx(train["kd_loss"], rel=1e-5)


def test_cached_targets_equal_live_targets(trained_run, tiny_corpus, tmp_path):
    teacher = load_teacher(trained_run / "model")
    csv = trained_run / "train.csv"
    summary = cache_targets(str(trained_run / "model"), csv, tmp_path / "cache", progress=False)
    # a barely trained teacher is not peaky (8 tokens kept per frame); the real figures are in docs/cache.md
    assert summary["bytes_per_frame"] < 29 * 4 / 5
    tokenizer = make_tokenizer(" 'ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    tokens = token_strings(tokenizer)
    aligner = TargetAligner(teacher.tokens, teacher.blank_index, teacher.frame_shift, tokens, 0, 0.04)
    data = load_dataset(csv, tokenizer, sorting="descending")
    batch = next(iter(sb.dataio.dataloader.make_dataloader(data, batch_size=3)))
    n = int(batch.sig[0].shape[1] / 16000 / 0.04) + 1
    lengths = torch.round(batch.sig[1] * n).long()
    live = OnlineTargets(teacher, aligner, 16000)(batch, lengths, n)
    cached = CachedTargets(CacheReader(tmp_path / "cache"), aligner)(batch, lengths, n)
    mask = live.mask
    diff = (live.log_probs.exp() - cached.log_probs.exp()).abs()[mask]
    assert diff.max() < 0.05  # quantisation (1/510 per token) plus the truncated tail mass


def test_distill_from_cache_and_cache_mismatch(trained_run, tiny_corpus, tmp_path):
    cache = tmp_path / "cache"
    assert (
        main(
            [
                "cache-targets",
                "--teacher",
                str(trained_run / "model"),
                "--csv",
                str(trained_run / "train.csv"),
                "--out",
                str(cache),
            ]
        )
        == 0
    )
    out = tmp_path / "kd_cached"
    assert _distill(tiny_corpus, out, f"--teacher_source={trained_run / 'model'}", f"--targets_cache={cache}") == 0
    assert (out / "model" / "model.ckpt").exists()
    # a different teacher (other weights) must not silently use this cache
    other = tmp_path / "other_teacher"
    shutil.copytree(trained_run / "model", other)
    state = torch.load(other / "model.ckpt")
    state = {k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}
    torch.save(state, other / "model.ckpt")
    with pytest.raises(CacheError, match="fingerprint"):
        _distill(tiny_corpus, tmp_path / "bad", f"--teacher_source={other}", f"--targets_cache={cache}")


def test_a_cache_missing_training_utterances_is_refused_before_training(trained_run, tiny_corpus, tmp_path):
    lines = (trained_run / "train.csv").read_text().splitlines()
    subset = tmp_path / "subset.csv"
    subset.write_text("\n".join(lines[:4]) + "\n")  # header + 3 utterances
    cache = tmp_path / "cache"
    assert (
        main(["cache-targets", "--teacher", str(trained_run / "model"), "--csv", str(subset), "--out", str(cache)]) == 0
    )
    out = tmp_path / "kd"
    with pytest.raises(CacheError, match=rf"{len(lines) - 4} of {len(lines) - 1} training utterances have no cached"):
        _distill(tiny_corpus, out, f"--targets_cache={cache}")
    assert not (out / "history.jsonl").exists()  # refused before the first batch


def test_a_cache_of_other_audio_under_the_same_ids_is_refused_naming_them(trained_run, corpus_copy, tmp_path):
    """A cache covering more than the run is fine; another file under a cached ID is refused by name."""
    from speech_kd.targets.build import check_cache_data

    rows = (trained_run / "train.csv").read_text().splitlines()
    dev = (trained_run / "dev.csv").read_text().splitlines()[1:]
    superset = tmp_path / "train_and_dev.csv"
    superset.write_text("\n".join(rows + dev) + "\n")
    cache = tmp_path / "cache"
    cache_targets(str(trained_run / "model"), superset, cache, progress=False)
    tokenizer = make_tokenizer(" 'ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    check_cache_data(CacheReader(cache), [load_dataset(trained_run / "train.csv", tokenizer)], cache)  # more: fine
    wavs = sorted((corpus_copy / "train").glob("*/*/*.flac"), key=lambda p: p.stat().st_size)
    shutil.copyfile(wavs[-1], wavs[0])  # the shortest utterance's file replaced by the longest one's audio
    with pytest.raises(CacheError, match=rf"1 utterance\(s\) with other audio under the same ID: {wavs[0].stem} \("):
        _distill(corpus_copy, tmp_path / "kd", f"--targets_cache={cache}")
    assert not (tmp_path / "kd" / "history.jsonl").exists()


def test_live_teacher_hears_the_speed_perturbed_audio(trained_run, tiny_corpus, tmp_path):
    """With speed perturbation (always 0.9x here) the live teacher runs on the student's perturbed audio:
    on the clean audio its frames would be 10 % more than the student's, far beyond frame_tolerance."""
    out = tmp_path / "kd_sp"
    assert (
        _distill(tiny_corpus, out, f"--teacher_source={trained_run / 'model'}", "--speed_perturb=True", "--speeds=[90]")
        == 0
    )
    train = json.loads((out / "history.jsonl").read_text().splitlines()[-1])["train"]
    assert train["kd_loss"] > 0 and train["lost_mass"] < 1e-6


def test_speed_perturbation_with_a_cache_is_refused_before_training(trained_run, tiny_corpus, tmp_path):
    cache = tmp_path / "cache"
    cache_targets(str(trained_run / "model"), trained_run / "train.csv", cache, progress=False)
    with pytest.raises(ValueError, match="speed-perturbed.*live teacher"):
        _distill(tiny_corpus, tmp_path / "kd", f"--targets_cache={cache}", "--speed_perturb=True")
    assert not (tmp_path / "kd" / "history.jsonl").exists() and not list((tmp_path / "kd").glob("save/CKPT*"))


def test_bad_teacher_folders_fail_before_training(tiny_corpus, tmp_path):
    with pytest.raises(TeacherError, match="does not exist"):
        _distill(tiny_corpus, tmp_path / "a", f"--teacher_source={tmp_path / 'nowhere'}")
    not_a_model = tmp_path / "empty_teacher"
    not_a_model.mkdir()
    with pytest.raises(TeacherError, match="not a teacher folder"):
        _distill(tiny_corpus, tmp_path / "b", f"--teacher_source={not_a_model}")
    with pytest.raises(ValueError, match="teacher_source"):
        _distill(tiny_corpus, tmp_path / "c")


def test_distill_from_huggingface_teacher_maps_vocab_and_frame_rate(tiny_corpus, tmp_path):
    pytest.importorskip("transformers")
    from speech_kd.targets.align import VocabMappingError
    from speech_kd.testing import make_tiny_hf_ctc

    hf = make_tiny_hf_ctc(tmp_path / "w2v")
    # an untrained wav2vec2 spreads ~3/32 of its mass on <s>, </s>, <unk>: more than the 5 % allowed
    with pytest.raises(VocabMappingError, match="<unk>"):
        _distill(tiny_corpus, tmp_path / "strict", f"--teacher_source={hf}")
    out = tmp_path / "kd_hf"
    assert _distill(tiny_corpus, out, f"--teacher_source={hf}", "--max_unmapped_mass=0.3") == 0
    setup = (out / "kd_setup.txt").read_text()
    assert "20.0 ms" in setup and "40.0 ms" in setup
    assert (out / "model" / "model.ckpt").exists()
