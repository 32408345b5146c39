"""Bad input and faults around ``speech-kd export`` and the exported ``transcribe.py`` (issue 30).

Export never deletes or overwrites what it did not write; ``transcribe.py`` checks audio files, options and
the model folder, reports each bad file in one line and goes on, and chunks long files by default. A tiny
random model (exported in about a second) stands in where the transcript does not matter; the shipped
teacher is exported once where a good file must give words.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("onnxruntime", reason="onnxruntime missing: pip install 'speech_kd[export]'")

from speech_kd.deploy import runtime  # noqa: E402
from speech_kd.deploy.runtime import AudioFileError, ExportedASR, TranscribeError  # noqa: E402


def _listing(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> content)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random model folder of hparams/teacher.yaml's architecture (``RUN/model``)."""
    from speech_kd.testing import make_tiny_sb_model

    return Path(make_tiny_sb_model(tmp_path_factory.mktemp("tiny") / "run" / "model"))


@pytest.fixture(scope="module")
def tiny_export(tiny_model, tmp_path_factory) -> Path:
    """The tiny model exported to ONNX."""
    from speech_kd.deploy.onnx_export import export_asr

    out = tmp_path_factory.mktemp("tiny_export") / "onnx"
    export_asr(tiny_model, out)
    return out


@pytest.fixture()
def run_copy(tiny_model, tmp_path) -> Path:
    """A private copy of the tiny model's run folder (``RUN``, holding ``RUN/model`` and a log)."""
    run = tmp_path / "run"
    shutil.copytree(tiny_model.parent, run)
    (run / "train_log.txt").write_text("epoch 1\n")
    return run


def _export(*args: str) -> tuple[int, str]:
    """``speech-kd export ARGS`` in this process: exit status and stderr."""
    from speech_kd.cli import run

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = run(["export", *args])
    return code, err.getvalue()


# ---- speech-kd export: never deletes what it did not write ------------------------------------------------------


def test_export_refuses_the_model_folder_and_the_run_folder(run_copy):
    before = _listing(run_copy)
    model_before = _listing(run_copy / "model")
    for out in (run_copy / "model", run_copy, run_copy / "model" / ".." / "model"):
        code, err = _export(str(run_copy / "model"), "--out", str(out))
        assert code == 2 and len(err.strip().splitlines()) == 1 and "model folder or a folder holding it" in err
        assert str(out) in err and "onnx" in err  # names the folder, suggests RUN/onnx
    assert _listing(run_copy) == before  # nothing removed or changed
    code, err = _export(str(run_copy / "model"), "--out", str(run_copy / "onnx"))  # beside the model: fine
    assert code == 0, err
    assert (run_copy / "onnx" / "deploy.json").is_file() and _listing(run_copy / "model") == model_before


def test_a_run_folder_exports_the_model_folder_it_wrote(run_copy, tmp_path):
    """``speech-kd export RUN``: RUN's checkpoints look like a recipe's output folder, but the run wrote RUN/model,
    which is what exports (said in one line), not RUN read as a recipe (no tokenizer there: refused)."""
    from speech_kd.cli import run

    checkpoint = run_copy / "save" / "CKPT+2024-01-01+00-00-00+00"
    checkpoint.mkdir(parents=True)
    (checkpoint / "CKPT.yaml").write_text("end-of-epoch: true\nunixtime: 1\n")
    out = tmp_path / "onnx"
    stdout, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(stdout):
        code = run(["export", str(run_copy), "--out", str(out)])
    assert code == 0, err.getvalue()
    assert stdout.getvalue().splitlines()[0] == (
        f"{run_copy} is a speech-kd run folder: exporting the model folder it wrote, {run_copy / 'model'}"
    )
    assert json.loads((out / "deploy.json").read_text())["source"] == "model"
    # a recipe option asks for the recipe route: refused in one line that names the model folder
    code, err = _export(str(run_copy), "--out", str(tmp_path / "again"), "--checkpoint", "best")
    assert code == 2 and len(err.strip().splitlines()) == 1 and f"(or export {run_copy / 'model'}" in err


def test_export_refuses_a_users_folder_even_with_force(tiny_model, tmp_path):
    user = tmp_path / "mine"
    (user / "sub").mkdir(parents=True)
    (user / "notes.txt").write_text("keep me")
    (user / "sub" / "data.bin").write_bytes(b"\x00\x01")
    before = _listing(user)
    for extra in ([], ["--force"]):
        code, err = _export(str(tiny_model), "--out", str(user), *extra)
        assert code == 2 and len(err.strip().splitlines()) == 1
        assert str(user) in err and "not an earlier export" in err
    assert _listing(user) == before
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    code, err = _export(str(tiny_model), "--out", str(a_file))
    assert code == 2 and "not a folder" in err and a_file.read_text() == "x"


def test_force_replaces_an_earlier_export_and_only_that(tiny_model, tmp_path):
    out = tmp_path / "onnx"
    assert _export(str(tiny_model), "--out", str(out))[0] == 0
    assert json.loads((out / "deploy.json").read_text())["written_by"] == "speech-kd export"
    code, err = _export(str(tiny_model), "--out", str(out), "--blank_penalty", "1.5")
    assert code == 2 and "pass --force" in err and str(out) in err and len(err.strip().splitlines()) == 1
    assert json.loads((out / "deploy.json").read_text())["blank_penalty"] == 0.0  # untouched
    code, err = _export(str(tiny_model), "--out", str(out), "--blank_penalty", "1.5", "--force")
    assert code == 0, err
    assert json.loads((out / "deploy.json").read_text())["blank_penalty"] == 1.5
    (out / "__pycache__").mkdir()  # `import transcribe` makes it: still an export
    assert _export(str(tiny_model), "--out", str(out), "--force")[0] == 0
    (out / "my_results.txt").write_text("mine")  # something of the user's inside: never removed
    code, err = _export(str(tiny_model), "--out", str(out), "--force")
    assert code == 2 and "my_results.txt" in err and (out / "my_results.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]  # no temporary folders left


def test_export_leaves_a_users_tmp_folder_and_nothing_after_a_failure(tiny_model, tmp_path, monkeypatch):
    from speech_kd.deploy import onnx_export as exporter

    users_tmp = tmp_path / "onnx.tmp"
    users_tmp.mkdir()
    (users_tmp / "precious.wav").write_bytes(b"RIFF....")
    assert _export(str(tiny_model), "--out", str(tmp_path / "onnx"))[0] == 0
    assert (users_tmp / "precious.wav").read_bytes() == b"RIFF...."
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx", "onnx.tmp"]

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(exporter.np, "savez", full_disk)  # fails half-way: the model file is written by then
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    code, err = _export(str(tiny_model), "--out", str(tmp_path / "new" / "deeper" / "onnx"))
    assert code == 2 and "No space left" in err
    code, err = _export(str(tiny_model), "--out", str(tmp_path / "onnx"), "--force")
    assert code == 2
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before  # parents made: removed too
    assert (tmp_path / "onnx" / "deploy.json").is_file()  # the earlier export is still whole


def test_export_of_a_corrupt_checkpoint_is_one_line_without_unsafe_advice(tiny_model, tmp_path):
    bad = tmp_path / "bad_model"
    shutil.copytree(tiny_model, bad)
    (bad / "model.ckpt").write_bytes(np.random.default_rng(0).bytes(5000))
    code, err = _export(str(bad), "--out", str(tmp_path / "onnx"))
    lines = [line for line in err.splitlines() if line.startswith("speech-kd export")]
    assert code == 2 and len(lines) == 1 and str(bad / "model.ckpt") in lines[0]
    assert "weights_only" not in err and "Traceback" not in err and not (tmp_path / "onnx").exists()
    (bad / "model.ckpt").write_bytes((tiny_model / "model.ckpt").read_bytes()[:2000])  # a zip cut short
    code, err = _export(str(bad), "--out", str(tmp_path / "onnx"))
    assert code == 2 and str(bad / "model.ckpt") in err and "weights_only" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad_model"]


def test_model_folder_writer_replaces_only_its_own_folders(tmp_path):
    """``export_model_folder`` (what training writes): an earlier model folder of its own is replaced (a rerun);
    a user's folder, or an earlier one holding a user's file, is refused and kept."""
    from speech_kd.testing import make_tiny_sb_model

    folder = tmp_path / "model"
    make_tiny_sb_model(folder, seed=0)
    first = (folder / "model.ckpt").read_bytes()
    make_tiny_sb_model(folder, seed=1)  # a rerun: replaced
    assert (folder / "model.ckpt").read_bytes() != first
    (folder / "onnx").mkdir()  # e.g. an export placed inside
    with pytest.raises(ValueError, match="also holds onnx"):
        make_tiny_sb_model(folder, seed=2)
    assert (folder / "onnx").is_dir() and (folder / "model.ckpt").is_file()
    user = tmp_path / "user"
    user.mkdir()
    (user / "a.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a model folder written by speech_kd"):
        make_tiny_sb_model(user)
    assert _listing(user) == {"a.txt": b"mine"}
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "tiny_sb_run") == ["model", "user"]


# ---- transcribe.py: files, options, model folder ----------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_export(tmp_path_factory) -> Path:
    from speech_kd.demo import SHIPPED_TEACHER
    from speech_kd.deploy.onnx_export import export_asr

    out = tmp_path_factory.mktemp("teacher_export") / "onnx"
    export_asr(SHIPPED_TEACHER, out)
    return out


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> Path:
    """A 16 kHz FLAC of synthesised speech (the corpus' TTS)."""
    from speech_kd.data.synth.voices import make_speakers, render

    path = tmp_path_factory.mktemp("speech") / "good.flac"
    render(make_speakers(1, 0)[0], "THE CAT SAT ON THE MAT AND THE DOG RAN HOME", path)
    return path


def test_transcribe_py_reports_each_bad_file_and_transcribes_the_good_ones(teacher_export, speech, tmp_path):
    import torch
    import torchaudio.functional as AF

    wav, rate = sf.read(speech, dtype="float32")
    files = {
        "good": str(speech),
        "missing": str(tmp_path / "missing.wav"),
        "empty": str(tmp_path / "empty.wav"),
        "junk": str(tmp_path / "junk.wav"),
        "nan": str(tmp_path / "nan.wav"),
        "inf": str(tmp_path / "inf.wav"),
        "8k": str(tmp_path / "8k.wav"),
    }
    Path(files["empty"]).write_bytes(b"")
    Path(files["junk"]).write_bytes(b"RIFF" + bytes(range(256)))
    for name, value in (("nan", np.nan), ("inf", -np.inf)):
        bad = wav.copy()
        bad[1000] = value
        sf.write(files[name], bad, rate, subtype="FLOAT")
    sf.write(files["8k"], AF.resample(torch.from_numpy(wav), rate, 8000).numpy(), 8000)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, str(teacher_export / "transcribe.py"), *files.values()],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    lines = dict(line.split("\t") for line in out.stdout.strip().splitlines())
    assert list(lines) == [files["good"], files["8k"]] and all(lines.values())  # words for both, in order
    errors = out.stderr.strip().splitlines()
    for name, reason in (
        ("missing", "no such file"),
        ("empty", "empty file (0 bytes)"),
        ("junk", "not readable audio"),
        ("nan", "NaN or infinite"),
        ("inf", "NaN or infinite"),
    ):
        assert sum(files[name] in line and reason in line for line in errors) == 1, (name, errors)
    assert any(files["8k"] in line and "8000 Hz audio resampled" in line for line in errors)
    assert errors[-1] == "transcribe.py: 5 of 7 file(s) not transcribed (see above)"
    assert len(errors) == 7  # 5 errors, 1 note, the summary: one line each


@pytest.mark.parametrize(
    "option",
    [
        ["--batch", "0"],
        ["--batch", "-2"],
        ["--batch", "1.5"],
        ["--threads", "-3"],
        ["--threads", "0"],
        ["--threads", "100000"],
        ["--chunk_seconds", "-5"],
        ["--chunk_seconds", "nan"],
        ["--chunk_seconds", "inf"],
        ["--context_seconds", "-1"],
        ["--context_seconds", "nan"],
        ["--max_batch_seconds", "-1"],
        ["--max_batch_seconds", "inf"],
        ["--blank_penalty", "nan"],
        ["--chunk_seconds", "abc"],
    ],
)
def test_transcribe_py_refuses_bad_numbers(option, tiny_export, speech):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_:
        runtime.main([str(speech), "--model", str(tiny_export), *option])
    assert exit_.value.code == 2
    message = err.getvalue().strip().splitlines()[-1]  # argparse: usage lines, then this one
    assert f": error: argument {option[0]}: " in message and repr(option[1]) in message


@pytest.mark.parametrize(
    "damage",
    ["model.onnx", "deploy.json missing", "deploy.json", "deploy.json keys", "fbank.npz", "model.onnx missing"],
)
def test_transcribe_py_names_a_broken_model_folder(damage, tiny_export, speech, tmp_path, capsys):
    folder = tmp_path / "onnx"
    shutil.copytree(tiny_export, folder)
    name = damage.split()[0]
    if damage.endswith("missing"):
        (folder / name).unlink()
    elif damage == "deploy.json keys":
        (folder / name).write_text(json.dumps({"tokens": 3}))
    else:
        (folder / name).write_bytes(np.random.default_rng(1).bytes(3000))
    assert runtime.main([str(speech), "--model", str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"transcribe.py: error: {folder / name}")
    assert "allow_pickle" not in err[0] and "weights_only" not in err[0]


def test_long_files_are_chunked_by_default(tiny_export, tmp_path, monkeypatch, capsys):
    """Over LONG_SECONDS the file goes in AUTO_CHUNK_SECONDS chunks unless --chunk_seconds says otherwise."""
    calls = []
    original = ExportedASR.transcribe_long

    def spy(self, wav, chunk_seconds=20.0, context_seconds=runtime.CONTEXT_SECONDS):
        calls.append((wav.shape[0], chunk_seconds, context_seconds))
        return original(self, wav, chunk_seconds, context_seconds)

    monkeypatch.setattr(ExportedASR, "transcribe_long", spy)
    monkeypatch.setattr(runtime, "LONG_SECONDS", 3.0)  # the same rule as at 60 s, on short files
    monkeypatch.setattr(runtime, "AUTO_CHUNK_SECONDS", 1.0)
    rng = np.random.default_rng(0)
    long, short = tmp_path / "long.wav", tmp_path / "short.wav"
    sf.write(long, 0.1 * rng.standard_normal(16000 * 4).astype(np.float32), 16000)
    sf.write(short, 0.1 * rng.standard_normal(16000 * 2).astype(np.float32), 16000)
    model = ["--model", str(tiny_export)]
    assert runtime.main([str(short), str(long), *model]) == 0
    assert calls == [(16000 * 4, 1.0, runtime.CONTEXT_SECONDS)]
    assert [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()] == [str(short), str(long)]
    calls.clear()
    assert runtime.main([str(long), *model, "--chunk_seconds", "0"]) == 0  # whole, as asked, with a note
    assert calls == [] and "in one piece" in capsys.readouterr().err
    assert runtime.main([str(short), *model, "--chunk_seconds", "0.5", "--context_seconds", "0"]) == 0
    assert calls == [(16000 * 2, 0.5, 0.0)]


def test_resample_is_torchaudios():
    """The numpy resampler gives what speech-kd evaluate's torchaudio resampling gives."""
    import torch
    import torchaudio.functional as AF

    rng = np.random.default_rng(0)
    for rate, new, n in (
        (8000, 16000, 12345),
        (44100, 16000, 30000),
        (48000, 16000, 999),
        (16000, 8000, 4000),
        (22050, 16000, 7),
        (16000, 16000, 100),
    ):
        wav = rng.standard_normal(n).astype(np.float32)
        ours = runtime.resample(wav, rate, new)
        ref = AF.resample(torch.from_numpy(wav), rate, new).numpy()
        assert ours.dtype == np.float32 and ours.shape == ref.shape and np.abs(ours - ref).max() < 2e-4
    with pytest.raises(ValueError, match="44101 Hz"):
        runtime.resample(np.zeros(10, np.float32), 44101, 16000)  # no small ratio: refused, not 5 GB of weights


def test_the_library_refuses_bad_values_too(tiny_export):
    with pytest.raises(TranscribeError, match="threads"):
        ExportedASR(tiny_export, threads=0)
    with pytest.raises(TranscribeError, match="max_batch_seconds"):
        ExportedASR(tiny_export, max_batch_seconds=float("nan"))
    asr = ExportedASR(tiny_export, threads=1)
    with pytest.raises(TranscribeError, match="chunk_seconds"):
        asr.transcribe_long(np.zeros(16000, np.float32), chunk_seconds=-1)
    with pytest.raises(AudioFileError, match="NaN or infinite"):
        asr.transcribe([np.zeros(16000, np.float32), np.full(800, np.inf, np.float32)])


# ---- property tests ------------------------------------------------------------------------------------------------

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

_FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=32)
_SAMPLES = hnp.arrays(np.float32, st.integers(0, 3000), elements=_FLOATS)


@pytest.fixture(scope="module")
def tiny_asr(tiny_export) -> ExportedASR:
    return ExportedASR(tiny_export, threads=1)


@settings(max_examples=200, deadline=None)
@given(wav=hnp.arrays(st.sampled_from([np.float32, np.float64, np.int16, np.int32]), st.integers(0, 50)))
def test_property_check_samples(wav):
    """Accepted: finite float32 of the same length; otherwise AudioFileError, exactly when a sample is not finite."""
    try:
        out = runtime.check_samples(wav, "w.wav")
    except AudioFileError as error:
        assert str(error).startswith("w.wav: ") and "\n" not in str(error)
        with np.errstate(all="ignore"):
            assert wav.size == 0 or not np.isfinite(wav.astype(np.float32)).all()
    else:
        assert out.dtype == np.float32 and out.shape == wav.shape and np.isfinite(out).all()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(wav=_SAMPLES, chunked=st.booleans())
def test_property_never_an_empty_transcript_for_non_finite_audio(wav, chunked, tiny_asr):
    """Audio with a NaN or infinite sample is refused (AudioFileError), never transcribed to ''."""
    try:
        text = tiny_asr.transcribe_long(wav, 1.0, 0.5) if chunked else tiny_asr.transcribe([wav])[0]
    except AudioFileError as error:
        assert "\n" not in str(error)
        assert wav.size == 0 or not np.isfinite(wav).all()
    else:
        assert isinstance(text, str) and np.isfinite(wav).all() and wav.size


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=400), header=st.sampled_from([b"", b"RIFF", b"fLaC", b"OggS"]))
def test_property_read_audio_of_random_bytes(data, header, tmp_path_factory):
    """Random bytes as an audio file: a checked waveform or one AudioFileError line naming the file."""
    path = tmp_path_factory.getbasetemp() / "random.wav"
    path.write_bytes(header + data)
    try:
        wav = runtime.read_audio(path, 16000)
    except AudioFileError as error:
        assert str(error).startswith(f"{path}: ") and "\n" not in str(error)
    else:
        assert wav.dtype == np.float32 and wav.size and np.isfinite(wav).all()


_OPTIONS = ["--batch", "--threads", "--max_batch_seconds", "--chunk_seconds", "--context_seconds", "--blank_penalty"]
_VALUES = st.one_of(
    st.integers(-(10**6), 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=8),
    st.sampled_from(["nan", "inf", "-inf", "1e309", "0", "-0", "1_0", " 3"]),
)


@settings(max_examples=300, deadline=None)
@given(argv=st.lists(st.tuples(st.sampled_from(_OPTIONS), _VALUES), max_size=4))
def test_property_option_parsing(argv):
    """Random option values: every accepted number is in range; anything else is argparse's exit 2, one error line."""
    args = [item for pair in argv for item in pair]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            parsed = runtime.build_parser().parse_args(["a.wav", *args])
    except SystemExit as exit_:
        assert exit_.code == 2 and err.getvalue().count(": error: ") == 1 and "Traceback" not in err.getvalue()
        return
    assert parsed.batch >= 1 and (parsed.threads is None or 1 <= parsed.threads <= runtime.MAX_THREADS)
    for name in ("max_batch_seconds", "context_seconds"):
        assert np.isfinite(getattr(parsed, name)) and getattr(parsed, name) >= 0
    assert parsed.chunk_seconds is None or (np.isfinite(parsed.chunk_seconds) and parsed.chunk_seconds >= 0)
    assert parsed.blank_penalty is None or np.isfinite(parsed.blank_penalty)


def test_one_padded_batch_of_every_file_and_an_empty_call(tiny_export, speech):
    """--max_batch_seconds 0 (one padded batch) with --batch equal to the number of files: the last flush has
    nothing left and must not fail (speech-kd bench's memory probe runs exactly this)."""
    asr = ExportedASR(str(tiny_export), max_batch_seconds=0)
    assert asr.transcribe([]) == []
    files = [str(speech), str(speech)]
    run = subprocess.run(
        [sys.executable, str(tiny_export / "transcribe.py"), "--batch", "2", "--max_batch_seconds", "0", *files],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert len(run.stdout.strip().splitlines()) == 2
