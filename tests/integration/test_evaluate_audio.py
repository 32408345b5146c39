"""``speech-kd evaluate`` checks audio as ``transcribe.py`` does (issue 30): each bad file named, the rest scored.

A tiny random model folder stands in (the transcripts do not matter); the Hypothesis property feeds
:func:`read_scored_audio` random samples and random bytes.
"""

from __future__ import annotations

import csv
import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from speech_kd.cli import run
from speech_kd.data.audio import AudioError
from speech_kd.scoring.evaluate import read_scored_audio

RATE = 16000


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from speech_kd.testing import make_tiny_sb_model

    return Path(make_tiny_sb_model(tmp_path_factory.mktemp("tiny") / "model"))


def _manifest(folder: Path, files: dict[str, Path]) -> Path:
    path = folder / "test.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["ID", "wav", "wrd"])  # no duration: evaluate reads headers
        for uid, wav in files.items():
            writer.writerow([uid, str(wav), "HELLO"])
    return path


def test_evaluate_names_each_bad_file_scores_the_rest_and_exits_1(tiny_model, tmp_path, capsys, caplog):
    rng = np.random.default_rng(0)
    speech = (0.1 * rng.standard_normal(RATE)).astype(np.float32)
    files = {name: tmp_path / f"{name}.wav" for name in ("good", "8k", "nan", "inf", "2k", "empty", "junk")}
    sf.write(files["good"], speech, RATE)
    sf.write(files["8k"], speech[::2], 8000)
    sf.write(files["nan"], np.where(np.arange(RATE) == 5, np.nan, speech), RATE, subtype="FLOAT")
    sf.write(files["inf"], np.where(np.arange(RATE) == 5, np.inf, speech), RATE, subtype="FLOAT")
    sf.write(files["2k"], speech[::8], 2000)
    files["empty"].write_bytes(b"")
    files["junk"].write_bytes(b"not audio at all" * 10)
    files["missing"] = tmp_path / "missing.wav"
    files["folder"] = tmp_path
    csv_path = _manifest(tmp_path, files)
    out = tmp_path / "res.json"
    with caplog.at_level(logging.WARNING):
        code = run(["evaluate", "--asr", str(tiny_model), "--csv", str(csv_path), "--json", str(out)])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "speech-kd evaluate: 7 of 9 file(s) not scored (see above)" in err
    warnings = [r.getMessage() for r in caplog.records if "not scored" in r.getMessage()]
    for name, reason in (
        ("nan", "NaN or infinite"),
        ("inf", "NaN or infinite"),
        ("2k", "too low for speech"),
        ("empty", "empty file (0 bytes)"),
        ("junk", "unreadable audio"),
        ("missing", "does not exist"),
    ):
        line = [w for w in warnings if w.startswith(f"{files[name]}: ")]
        assert len(line) == 1 and reason in line[0] and "\n" not in line[0], (name, warnings)
    assert any(w.startswith(f"{tmp_path}: ") and "a folder" in w for w in warnings)
    summary = json.loads(out.read_text())
    assert summary["num_utts"] == 2 and len(summary["not_scored"]) == 7  # good and 8k (resampled) scored
    assert any("resampled" in r.getMessage() for r in caplog.records)


def test_evaluate_refuses_when_no_file_can_be_used(tiny_model, tmp_path, capsys):
    (tmp_path / "empty.wav").write_bytes(b"")
    code = run(["evaluate", "--asr", str(tiny_model), "--csv", str(_manifest(tmp_path, {"a": tmp_path / "empty.wav"}))])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "no audio file could be used" in err[-1]


_samples = st.lists(
    st.sampled_from([0.0, 0.5, -1.0, np.nan, np.inf, -np.inf, 1e30]) | st.floats(-2, 2), min_size=0, max_size=400
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    samples=_samples,
    rate=st.sampled_from([RATE, 8000, 2000, 22050, 44101]),
    subtype=st.sampled_from(["FLOAT", "PCM_16"]),
)
def test_read_scored_audio_refuses_non_finite_audio_and_never_raises_anything_else(samples, rate, subtype):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "x.wav"
        wav = np.asarray(samples, dtype=np.float64)
        sf.write(path, wav, rate, subtype=subtype)
        try:
            out = read_scored_audio(path, RATE)
        except AudioError as error:  # one line naming the file
            assert str(error).startswith(f"{path}: ") and "\n" not in str(error)
        else:
            assert out.ndim == 1 and out.shape[0] > 0 and bool(np.isfinite(out.numpy()).all())
            # a float file with a non-finite sample is never read (so never scored as an empty transcript)
            assert subtype != "FLOAT" or bool(np.isfinite(wav).all())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=300))
def test_read_scored_audio_on_random_bytes_is_an_audio_error_or_audio(data):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "x.wav"
        path.write_bytes(data)
        try:
            out = read_scored_audio(path, RATE)
        except AudioError as error:
            assert str(error).startswith(f"{path}: ")
        else:
            assert bool(np.isfinite(out.numpy()).all())


def test_an_ensemble_of_exported_folders_says_what_to_give(tmp_path, capsys):
    sf.write(tmp_path / "a.wav", np.zeros(RATE, dtype=np.float32), RATE)
    for name in ("onnx_a", "onnx_b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "deploy.json").write_text("{}")
    asr = f"{tmp_path / 'onnx_a'},{tmp_path / 'onnx_b'}"
    code = run(["evaluate", "--asr", asr, "--csv", str(_manifest(tmp_path, {"a": tmp_path / "a.wav"}))])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and str(tmp_path / "onnx_a") in err[0]
    assert "an exported folder" in err[0] and "the model folder it was exported from" in err[0]
