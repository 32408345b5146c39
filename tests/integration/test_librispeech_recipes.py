"""recipes/LibriSpeech/ASR/CTC end to end on the tiny corpus (LibriSpeech layout), with stand-in teachers.

The yamls are the real recipe files; the overrides only rename the splits
(the tiny corpus has train/dev/test instead of train-clean-100/...), shrink
the model and run one epoch. The teachers are toy models of the same
classes as the public ones the recipes name: a Hugging Face
``Wav2Vec2ForCTC`` folder with wav2vec2-base-960h's vocabulary (20 ms
frames, ``|`` delimiter) and a SpeechBrain ``EncoderASR`` folder laid out
like ``speechbrain/asr-wav2vec2-librispeech`` (Hugging Face wav2vec2 encoder
named by hub id, ``CTCTextEncoder`` characters with ``<blank>``, ``<bos>``,
``<eos>`` at 0, 1, 2), loaded with the same ``teacher_overrides`` the recipe
uses to point the hub id at a local folder.
"""

from __future__ import annotations

import csv
import json
import runpy
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY_MODEL
from tests.integration.test_unlabeled import unlabeled_corpus  # noqa: F401 F811 (a fixture)

RECIPE = REPO / "recipes" / "LibriSpeech" / "ASR" / "CTC"
#: the tiny corpus's split names, a student small enough for seconds, one epoch
TINY_LIBRISPEECH = [
    "--train_splits=[train]",
    "--dev_splits=[dev]",
    "--test_splits=[test]",
    "--number_of_epochs=1",
    "--conv_kernel_size=7",
    "--num_workers=0",
    "--noprogressbar",
    *TINY_MODEL,
]


def _run_recipe(script: str, yaml: str, corpus: Path, out: Path, *extra: str, monkeypatch) -> None:
    """Run ``recipes/LibriSpeech/ASR/CTC/<script>`` as ``python <script> hparams/<yaml> ...`` (in this process)."""
    argv = [
        str(RECIPE / script),
        f"hparams/{yaml}",
        f"--data_folder={corpus}",
        f"--output_folder={out}",
        *TINY_LIBRISPEECH,
        *extra,
    ]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(argv[0], run_name="__main__")


def _check_run(out: Path) -> dict:
    assert (out / "model" / "model.ckpt").exists() and (out / "model" / "hyperparams.yaml").exists()
    assert set(json.loads((out / "test_results.json").read_text())) == {"test"}
    return json.loads((out / "history.jsonl").read_text().splitlines()[-1])


def test_train_recipe_conformer_ctc(tiny_corpus, tmp_path, monkeypatch):
    out = tmp_path / "conformer"
    _run_recipe("train.py", "conformer_ctc.yaml", tiny_corpus, out, monkeypatch=monkeypatch)
    record = _check_run(out)
    assert record["epoch"] == 1 and record["step"] > 0
    info = json.loads((out / "model" / "speech_kd.json").read_text())
    assert info["trained_with"] == "conformer_ctc.yaml"


def test_distill_recipe_huggingface_wav2vec2_teacher(tiny_corpus, tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from speech_kd.testing import make_tiny_hf_ctc

    teacher = make_tiny_hf_ctc(tmp_path / "wav2vec2-base-960h")
    out = tmp_path / "kd_hf"
    # an untrained wav2vec2 puts ~3/32 of its mass on <s>, </s>, <unk> (no student token); a trained one ~0
    _run_recipe(
        "distill.py",
        "distill_wav2vec2_base_960h.yaml",
        tiny_corpus,
        out,
        f"--teacher_source={teacher}",
        "--max_unmapped_mass=0.3",
        "--report_after_run=False",
        monkeypatch=monkeypatch,
    )
    record = _check_run(out)
    assert record["train"]["kd_loss"] > 0 and record["train"]["kd_weight"] == 0.5
    setup = (out / "kd_setup.txt").read_text()
    assert "20.0 ms" in setup and "40.0 ms" in setup  # wav2vec2's frames resampled to the student's
    assert "<unk>" in setup  # listed as unmapped


def test_distill_recipe_speechbrain_wav2vec2_teacher(tiny_corpus, tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from speech_kd.testing import make_tiny_sb_wav2vec2

    teacher, hub = make_tiny_sb_wav2vec2(tmp_path / "asr-wav2vec2-librispeech")
    assert "facebook/wav2vec2-large-960h-lv60-self" in (Path(teacher) / "hyperparams.yaml").read_text()
    out = tmp_path / "kd_sb"
    # an untrained teacher puts ~2/31 of its mass on <bos>, <eos> (no student token); a trained one ~0
    _run_recipe(
        "distill.py",
        "distill_sb_wav2vec2.yaml",
        tiny_corpus,
        out,
        f"--teacher_source={teacher}",
        f"--teacher_overrides={{wav2vec2_hub: {hub}}}",
        "--max_unmapped_mass=0.3",
        "--report_after_run=False",
        monkeypatch=monkeypatch,
    )
    record = _check_run(out)
    assert record["train"]["kd_loss"] > 0
    setup = (out / "kd_setup.txt").read_text()
    assert "20.0 ms" in setup and "40.0 ms" in setup
    # CTCTextEncoder characters: the literal space and all 27 others matched, only <bos>, <eos> left over
    assert "unmapped teacher tokens (2): '<bos>', '<eos>'" in setup
    assert "student tokens no teacher token reaches (0)" in setup

    # the README's cached route: cache-targets with the same overrides, then distil from the cache
    from speech_kd.cli import main
    from speech_kd.data.prepare import prepare_librispeech

    csv = prepare_librispeech(tiny_corpus, tmp_path / "csv", splits=["train"]).csv_files["train"]
    cache = tmp_path / "cache"
    assert (
        main(
            [
                "cache-targets",
                "--teacher",
                teacher,
                "--teacher_overrides",
                f"{{wav2vec2_hub: {hub}}}",
                "--csv",
                csv,
                "--out",
                str(cache),
                "--max_temperature",
                "2",  # the recipe's temperature, as the README's command says
            ]
        )
        == 0
    )
    cached = tmp_path / "kd_sb_cached"
    _run_recipe(
        "distill.py",
        "distill_sb_wav2vec2.yaml",
        tiny_corpus,
        cached,
        f"--teacher_source={teacher}",
        f"--teacher_overrides={{wav2vec2_hub: {hub}}}",
        f"--targets_cache={cache}",
        "--max_unmapped_mass=0.3",
        "--report_after_run=False",
        monkeypatch=monkeypatch,
    )
    assert _check_run(cached)["train"]["kd_loss"] > 0


def test_distill_recipe_with_untranscribed_splits(unlabeled_corpus, tmp_path, monkeypatch):  # noqa: F811
    """distill_wav2vec2_base_960h_unlabeled.yaml with its own split names: train-clean-360 and train-other-500
    (transcripts present, as in LibriSpeech, and ignored) are untranscribed audio beside train-clean-100."""
    pytest.importorskip("transformers")
    from speech_kd.testing import make_tiny_hf_ctc

    data = tmp_path / "LibriSpeech"
    data.mkdir()
    for name, split in (("train-clean-100", "train"), ("dev", "dev"), ("test", "test")):
        (data / name).symlink_to(unlabeled_corpus / split, target_is_directory=True)
    speakers = sorted((unlabeled_corpus / "untranscribed").iterdir())
    for name, speaker in zip(("train-clean-360", "train-other-500"), speakers):
        (data / name).mkdir()
        (data / name / speaker.name).symlink_to(speaker, target_is_directory=True)
    chapter = next((data / "train-other-500").glob("*/*"))
    (chapter / f"{speaker.name}-{chapter.name}.trans.txt").write_text("not a line of this chapter\n")
    teacher = make_tiny_hf_ctc(tmp_path / "wav2vec2-base-960h")
    out = tmp_path / "kd_unlabeled"
    overrides = [arg for arg in TINY_LIBRISPEECH if not arg.startswith("--train_splits")]
    argv = [
        str(RECIPE / "distill.py"),
        "hparams/distill_wav2vec2_base_960h_unlabeled.yaml",
        f"--data_folder={data}",
        f"--output_folder={out}",
        *overrides,
        f"--teacher_source={teacher}",
        "--max_unmapped_mass=0.3",
        "--report_after_run=False",
        "--unlabeled_fraction=1.0",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(argv[0], run_name="__main__")
    record = _check_run(out)
    assert record["train"]["kd_loss"] > 0 and 0 < record["train"]["untranscribed_share"] < 1
    with open(out / "unlabeled.csv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["ID"].split("-")[0] for r in rows} == {s.name for s in speakers[:2]} and not any(r["wrd"] for r in rows)
