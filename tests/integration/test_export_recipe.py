"""``speech-kd export`` of a user's own SpeechBrain recipe output folder (issue 28 item 5).

The recipes are ``tests/recipes/``: SpeechBrain's LibriSpeech CTC conformer (SentencePiece characters) and its
TIMIT CRDNN (LiGRU, a ``CTCTextEncoder``), run as users run them (``python train.py hparams/X.yaml``, real
``fit()``, two epochs on the tiny synthesised corpus), unchanged. The exported folder's ``transcribe.py`` is
compared with the recipe's own ``compute_forward`` and its greedy decoding on the corpus' test audio.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece
import soundfile as sf
import speechbrain as sb
import torch
import yaml
from hyperpyyaml import load_hyperpyyaml
from speechbrain.dataio.batch import PaddedBatch
from speechbrain.dataio.encoder import CTCTextEncoder
from speechbrain.nnet.linear import Linear

from speech_kd.deploy.runtime import ExportedASR
from tests.conftest import REPO

pytest.importorskip("onnxruntime", reason="onnxruntime missing: pip install 'speech_kd[export]'")

pytestmark = pytest.mark.slow

RECIPES = REPO / "tests" / "recipes"
#: deploy.json keys of every export (what speech-kd export writes for a model folder of this package)
DEPLOY_KEYS = {
    "written_by",
    "format",
    "model_file",
    "quantization",
    "fp32_layers",
    "batch_exact",
    "tokens",
    "blank_index",
    "sample_rate",
    "frame_shift",
    "min_samples",
    "fbank",
    "blank_penalty",
    "params",
    "opset",
    "source",
}
#: subtracted from the blank's log-probability on both sides, so that the barely trained models write tokens
PENALTY = 3.0


class NumpyLinear(Linear):
    """SpeechBrain's ``Linear`` computed through numpy: a trace records its output as a constant (untraceable)."""

    def forward(self, x):
        return torch.from_numpy(super().forward(x).detach().numpy())


def _characters(corpus: Path) -> int:
    chars = set()
    for path in (corpus / "train").rglob("*.trans.txt"):
        for line in path.read_text().splitlines():
            chars |= set(line.split(" ", 1)[1])
    return len(chars)


def _listing(folder: Path) -> dict:
    """Every path under ``folder`` with its size and modification time (what must not change)."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def _train(recipe: str, yaml_name: str, out: Path, overrides: list[str], epochs: int = 2) -> list[str]:
    """``python train.py hparams/YAML --output_folder=OUT ...`` in the recipe's folder; returns the overrides."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    args = [f"--output_folder={out}", f"--number_of_epochs={epochs}", *overrides]
    done = subprocess.run(
        [sys.executable, "train.py", f"hparams/{yaml_name}", *args],
        cwd=RECIPES / recipe,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return args


@pytest.fixture(scope="module")
def noise(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("noise")
    sf.write(folder / "noise.wav", np.random.default_rng(0).standard_normal(48000).astype("float32") * 0.1, 16000)
    (folder / "noise.csv").write_text(f"ID,duration,wav,wav_format,wav_opts\nnoise1,3.0,{folder / 'noise.wav'},wav,\n")
    return folder / "noise.csv"


@pytest.fixture(scope="module")
def crdnn_run(tiny_corpus, noise, tmp_path_factory) -> tuple[Path, list[str]]:
    """SpeechBrain's TIMIT CTC recipe shape (CRDNN with LiGRU, CTCTextEncoder), two epochs: (folder, overrides)."""
    out = tmp_path_factory.mktemp("crdnn") / "run"
    overrides = [
        f"--data_folder={tiny_corpus}",
        f"--noise_annotation={noise}",
        f"--output_neurons={_characters(tiny_corpus) + 1}",
    ]
    return out, _train("crdnn_ctc", "crdnn.yaml", out, overrides)


@pytest.fixture(scope="module")
def conformer_run(tiny_corpus, tmp_path_factory) -> tuple[Path, list[str]]:
    """SpeechBrain's LibriSpeech CTC conformer recipe shape (SentencePiece characters), two epochs."""
    out = tmp_path_factory.mktemp("conformer") / "run"
    overrides = [f"--data_folder={tiny_corpus}", f"--output_neurons={_characters(tiny_corpus) + 3}"]
    return out, _train("librispeech_ctc", "conformer.yaml", out, overrides)


@pytest.fixture(scope="module")
def conformer_averaged_run(tiny_corpus, tmp_path_factory) -> tuple[Path, list[str]]:
    """The same with avg_checkpoints 2 (conformer_large.yaml has 10), three epochs: it keeps its two best and
    two newest checkpoints, and its evaluate() tests their average."""
    out = tmp_path_factory.mktemp("conformer_averaged") / "run"
    overrides = [
        f"--data_folder={tiny_corpus}",
        f"--output_neurons={_characters(tiny_corpus) + 3}",
        "--avg_checkpoints=2",
    ]
    return out, _train("librispeech_ctc", "conformer.yaml", out, overrides, epochs=3)


@pytest.fixture(scope="module")
def test_wavs(tiny_corpus) -> list[Path]:
    return sorted((tiny_corpus / "test").rglob("*.flac"))[:3]


def _export(*args: str) -> tuple[int, str, str]:
    """``speech-kd export ARGS`` in this process: exit status, stdout, stderr."""
    from speech_kd.cli import run

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run(["export", *args])
    return code, out.getvalue(), err.getvalue()


def _recipe_brain(recipe: str, yaml_name: str, brain_class: str, run: Path, overrides: list[str], opt: str):
    """The recipe's own Brain, built from its own yaml with the run's overrides (as its train.py does)."""
    module = runpy.run_path(str(RECIPES / recipe / "train.py"), run_name="recipe_under_test")
    _, run_opts, given = sb.parse_arguments([str(RECIPES / recipe / "hparams" / yaml_name), *overrides])
    with open(RECIPES / recipe / "hparams" / yaml_name, encoding="utf-8") as fh:
        hparams = load_hyperpyyaml(fh, given)
    brain = module[brain_class](
        modules=hparams["modules"],
        opt_class=hparams[opt],
        hparams=hparams,
        run_opts={"device": "cpu"},
        checkpointer=hparams["checkpointer"],
    )
    return brain, hparams


def _transcribe_py(folder: Path, wavs: list[Path], *options: str) -> list[str]:
    """``python FOLDER/transcribe.py WAV ...`` without speech_kd on the path: the transcripts."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, str(folder / "transcribe.py"), *map(str, wavs), *options],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return [line.split("\t", 1)[1] for line in done.stdout.splitlines()]


def _penalised(log_probs: torch.Tensor, blank: int) -> torch.Tensor:
    out = log_probs.clone()
    out[..., blank] -= PENALTY
    return out


def test_timit_crdnn_recipe_exports_and_transcribes_as_the_recipe_decodes(crdnn_run, test_wavs, tmp_path):
    """CRDNN with LiGRU (a loop over frames: exported scripted), CTCTextEncoder characters, 20 ms frames, the
    checkpoint of the lowest CER; the recipe folder is left as it was."""
    run, overrides = crdnn_run
    metas = {p.parent.name: yaml.safe_load(p.read_text()) for p in (run / "save").glob("CKPT+*/CKPT.yaml")}
    best = min(metas, key=lambda name: metas[name]["CER"])
    before = _listing(run)
    out = tmp_path / "onnx"
    code, stdout, err = _export(str(run), "--out", str(out))
    assert code == 0, err
    assert _listing(run) == before  # nothing written into the recipe's folder
    assert f"{best} (lowest CER" in stdout and "scripted" in stdout
    config = json.loads((out / "deploy.json").read_text())
    assert set(config) == DEPLOY_KEYS and config["batch_exact"] is False
    assert config["frame_shift"] == pytest.approx(0.02) and config["fbank"]["n_mels"] == 40
    assert config["source"] == f"run/save/{best}"

    brain, hparams = _recipe_brain("crdnn_ctc", "crdnn.yaml", "ASR_Brain", run, overrides, "opt_class")
    brain.checkpointer.recover_if_possible(min_key="CER")  # what its evaluate(min_key="CER") tests
    brain.modules.eval()
    labels = CTCTextEncoder()
    labels.load(run / "save" / "label_encoder.txt")
    blank = hparams["blank_index"]
    asr = ExportedASR(out, threads=1)
    expected, penalised = [], []
    for wav_path in test_wavs:
        wav = sf.read(wav_path, dtype="float32")[0]
        batch = PaddedBatch([{"id": wav_path.stem, "sig": torch.from_numpy(wav)}])
        with torch.no_grad():
            p_ctc, lens = brain.compute_forward(batch, sb.Stage.VALID)
        got = asr.log_probs([wav])[0]
        assert got.shape == tuple(p_ctc.shape[1:]) and np.abs(got - p_ctc[0].numpy()).max() < 1e-3
        for log_probs, texts in ((p_ctc, expected), (_penalised(p_ctc, blank), penalised)):
            tokens = sb.decoders.ctc_greedy_decode(log_probs, lens, blank_id=blank)[0]
            texts.append(" ".join("".join(labels.decode_ndim(tokens)).split()))
    assert _transcribe_py(out, test_wavs) == expected
    assert _transcribe_py(out, test_wavs, "--blank_penalty", str(PENALTY)) == penalised
    assert all(penalised), "with the blank held back the model writes characters: the tokens are compared"

    # the recipe's own yaml instead of the run's copy: its placeholders need nothing, output_neurons the run's
    neurons = next(arg for arg in overrides if arg.startswith("--output_neurons=")).split("=")[1]
    again = tmp_path / "from_recipe_yaml"
    original = RECIPES / "crdnn_ctc" / "hparams" / "crdnn.yaml"
    code, _, err = _export(
        str(run), "--hparams", str(original), "--overrides", f"{{output_neurons: {neurons}}}", "--out", str(again)
    )
    assert code == 0, err
    wav = sf.read(test_wavs[0], dtype="float32")[0]
    assert np.array_equal(ExportedASR(again).log_probs([wav])[0], asr.log_probs([wav])[0])


def test_librispeech_conformer_recipe_exports_through_the_exporters_graph(conformer_run, test_wavs, tmp_path):
    """ConvolutionFrontEnd + conformer TransformerASR + ctc_lin: the exporter's own (batch-exact) graph;
    SentencePiece pieces decode as the recipe's tokenizer decodes them; int8 and TorchScript export too."""
    run, overrides = conformer_run
    out = tmp_path / "onnx"
    code, stdout, err = _export(str(run), "--out", str(out))
    assert code == 0, err
    assert "the exporter's conformer graph" in stdout and "lowest WER" in stdout
    config = json.loads((out / "deploy.json").read_text())
    assert set(config) == DEPLOY_KEYS and config["batch_exact"] is True
    assert config["frame_shift"] == pytest.approx(0.04) and config["tokens"][1:3] == ["", ""]  # <s>, </s>

    brain, hparams = _recipe_brain("librispeech_ctc", "conformer.yaml", "ASR", run, overrides, "model_opt_class")
    brain.checkpointer.recover_if_possible(min_key="WER")
    brain.modules.eval()
    pieces = sentencepiece.SentencePieceProcessor(model_file=str(next((run / "save").glob("*.model"))))
    blank = hparams["blank_index"]
    asr = ExportedASR(out, threads=1)
    expected, penalised, wavs = [], [], []
    for wav_path in test_wavs:
        wav = sf.read(wav_path, dtype="float32")[0]
        wavs.append(wav)
        batch = PaddedBatch([{"id": wav_path.stem, "sig": torch.from_numpy(wav)}])
        with torch.no_grad():
            p_ctc, lens, greedy = brain.compute_forward(batch, sb.Stage.VALID)
        got = asr.log_probs([wav])[0]
        assert got.shape == tuple(p_ctc.shape[1:]) and np.abs(got - p_ctc[0].numpy()).max() < 1e-3
        expected.append(" ".join(pieces.decode_ids(greedy[0]).split()))
        tokens = sb.decoders.ctc_greedy_decode(_penalised(p_ctc, blank), lens, blank_id=blank)[0]
        penalised.append(" ".join(pieces.decode_ids(tokens).split()))
    assert _transcribe_py(out, test_wavs) == expected
    assert _transcribe_py(out, test_wavs, "--blank_penalty", str(PENALTY)) == penalised
    assert all(penalised)
    # a padded batch gives each utterance what it gets alone (the exporter's graph)
    for alone, batched in zip(
        [asr.log_probs([w])[0] for w in wavs], ExportedASR(out, max_batch_seconds=0).log_probs(wavs)
    ):
        assert np.abs(alone - batched).max() < 1e-4
    # the reference transcripts, as token ids, read back by transcribe.py's text() as SentencePiece writes them
    for wav_path in test_wavs:
        words = next(
            line.split(" ", 1)[1]
            for line in next(wav_path.parent.glob("*.trans.txt")).read_text().splitlines()
            if line.startswith(wav_path.stem + " ")
        )
        assert asr.text(pieces.encode_as_ids(words)) == " ".join(pieces.decode_ids(pieces.encode_as_ids(words)).split())

    for extra in (["--quantize", "int8"], ["--format", "torchscript"]):
        folder = tmp_path / "_".join(extra).strip("-")
        code, _, err = _export(str(run), "--out", str(folder), *extra)
        assert code == 0, err
        config = json.loads((folder / "deploy.json").read_text())
        assert config["fp32_layers"] == (["ctc_lin"] if "int8" in extra else [])
        assert len(_transcribe_py(folder, test_wavs[:1])) == 1


def test_librispeech_conformer_export_is_the_average_its_evaluate_tests(conformer_averaged_run, test_wavs, tmp_path):
    """avg_checkpoints > 1: by default the export is the model the recipe's ``evaluate(min_key="WER")`` tests,
    which its ``on_evaluate_start`` averages over the checkpoints; the tokenizer collected as
    ``save/tokenizer.ckpt`` (the stock recipe's Pretrainer) is read as the SentencePiece model it is. Nothing
    is written outside --out."""
    run, overrides = conformer_averaged_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    sentencepiece_model = next((copy / "save").glob("*.model"))
    sentencepiece_model.rename(copy / "save" / "tokenizer.ckpt")
    scored = sorted(p.parent.name for p in (copy / "save").glob("CKPT+*/CKPT.yaml") if "WER" in p.read_text())
    assert len(scored) >= 2, "three epochs, two best and two newest kept: at least two to average"
    before = _listing(tmp_path)
    out = tmp_path / "onnx"
    code, stdout, err = _export(str(copy), "--out", str(out))
    assert code == 0, err
    assert {k: v for k, v in _listing(tmp_path).items() if not k.startswith("onnx")} == before
    assert f"the averaged model from {len(scored)} checkpoints" in stdout and all(name in stdout for name in scored)
    assert "model: the average of" in stdout and "normalizer from the newest" in stdout

    brain, _ = _recipe_brain("librispeech_ctc", "conformer.yaml", "ASR", run, overrides, "model_opt_class")
    brain.on_evaluate_start(min_key="WER")  # what the recipe's evaluate() runs first
    brain.modules.eval()
    pieces = sentencepiece.SentencePieceProcessor(model_file=str(copy / "save" / "tokenizer.ckpt"))
    asr = ExportedASR(out, threads=1)
    expected = []
    for wav_path in test_wavs:
        wav = sf.read(wav_path, dtype="float32")[0]
        batch = PaddedBatch([{"id": wav_path.stem, "sig": torch.from_numpy(wav)}])
        with torch.no_grad():
            p_ctc, lens, greedy = brain.compute_forward(batch, sb.Stage.VALID)
        got = asr.log_probs([wav])[0]
        assert got.shape == tuple(p_ctc.shape[1:]) and np.abs(got - p_ctc[0].numpy()).max() < 1e-3
        expected.append(" ".join(pieces.decode_ids(greedy[0]).split()))
    assert _transcribe_py(out, test_wavs) == expected
    # the one checkpoint of the lowest WER differs from the average: --checkpoint best is another model
    best = tmp_path / "best"
    assert _export(str(copy), "--out", str(best), "--checkpoint", "best")[0] == 0
    wav = sf.read(test_wavs[0], dtype="float32")[0]
    assert np.abs(ExportedASR(best).log_probs([wav])[0] - asr.log_probs([wav])[0]).max() > 1e-3


def test_crdnn_int8_and_torchscript_keep_the_output_layer_fp32(crdnn_run, test_wavs, tmp_path):
    """int8 (ONNX, and TorchScript: quantised before the recurrent layer is scripted); --checkpoint newest."""
    run, _ = crdnn_run
    metas = {p.parent.name: yaml.safe_load(p.read_text()) for p in (run / "save").glob("CKPT+*/CKPT.yaml")}
    newest = max(metas, key=lambda name: metas[name]["unixtime"])
    for extra in (["--quantize", "int8"], ["--format", "torchscript", "--quantize", "int8", "--checkpoint", "newest"]):
        folder = tmp_path / "_".join(extra).strip("-")
        code, stdout, err = _export(str(run), "--out", str(folder), *extra)
        assert code == 0, err
        config = json.loads((folder / "deploy.json").read_text())
        assert config["quantization"] == "int8-dynamic" and config["fp32_layers"] == ["output"]
        assert len(_transcribe_py(folder, test_wavs[:1])) == 1
    assert config["source"] == f"run/save/{newest}" and "newest of 2 checkpoint(s)" in stdout


def _one_line_error(args: list[str], out: Path) -> str:
    code, _, err = _export(*args, "--out", str(out))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert not out.exists()  # refused before anything was written
    return lines[0]


def test_bad_recipe_input_is_refused_in_one_line_naming_the_file(crdnn_run, conformer_run, tmp_path):
    run, _ = crdnn_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    out = tmp_path / "onnx"
    # the modules of another shape than the checkpoint's (the recipe's own yaml: the copy's values are resolved)
    original = RECIPES / "crdnn_ctc" / "hparams" / "crdnn.yaml"
    error = _one_line_error([str(copy), "--hparams", str(original), "--overrides", "{rnn_neurons: 32}"], out)
    assert f"{copy / 'save'}" in error and "model.ckpt: does not fit the yaml's 'model' (CRDNN)" in error
    assert "size mismatch" in error
    # a tokenizer of another size than the output layer
    sentencepiece_model = next((conformer_run[0] / "save").glob("*.model"))
    error = _one_line_error([str(copy), "--tokenizer", str(sentencepiece_model)], out)
    assert str(sentencepiece_model) in error and "but the modules end in output (Linear)" in error
    # a module the yaml does not have, a checkpoint the folder does not have
    assert "--modules decoder: no such module" in _one_line_error([str(copy), "--modules", "decoder"], out)
    error = _one_line_error([str(copy), "--checkpoint", "CKPT+1999"], out)
    assert "--checkpoint CKPT+1999: not one of the 2 checkpoints in" in error
    # no tokenizer
    (copy / "save" / "label_encoder.txt").unlink()
    error = _one_line_error([str(copy)], out)
    assert error.endswith(
        f"{copy / 'save'}: no tokenizer (label_encoder.txt of a CTCTextEncoder, tokenizer.ckpt or one "
        "SentencePiece *.model); give it with --tokenizer FILE"
    )
    # no checkpoint
    for checkpoint in (copy / "save").glob("CKPT+*"):
        shutil.rmtree(checkpoint)
    error = _one_line_error([str(copy), "--hparams", str(copy / "hyperparams.yaml")], out)
    assert f"{copy}: no checkpoints" in error
    # the recipe's folder itself as --out: refused, as a model folder is
    before = _listing(run)
    code, _, err = _export(str(run), "--out", str(run))
    assert code == 2 and "model folder or a folder holding it" in err and _listing(run) == before


def test_an_untraceable_module_is_named_with_its_yaml_key(crdnn_run, tmp_path):
    """A module whose trace is a constant (numpy inside): no export path reproduces it, so it is named."""
    run, _ = crdnn_run
    text = (run / "hyperparams.yaml").read_text()
    assert text.count("!new:speechbrain.nnet.linear.Linear") == 1  # the recipe's output layer, key "output"
    mine = tmp_path / "untraceable.yaml"
    mine.write_text(text.replace("!new:speechbrain.nnet.linear.Linear", f"!new:{__name__}.NumpyLinear"))
    error = _one_line_error([str(run), "--hparams", str(mine)], tmp_path / "onnx")
    assert error.startswith("speech-kd export: error: UnsupportedModelError: output (NumpyLinear): ")
    assert "neither the exporter's graph nor torch.onnx.export reproduces the model" in error
