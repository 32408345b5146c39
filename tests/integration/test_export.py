"""speech-kd export: ONNX/TorchScript folders against the PyTorch model (shipped teacher, real synthesised speech).

Needs onnxruntime (``pip install 'speech_kd[export]'``; ``make test`` installs it): without it the ONNX tests
skip, saying so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from speech_kd.demo import SHIPPED_TEACHER
from speech_kd.deploy.runtime import ExportedASR, fbank, greedy_decode


def _onnxruntime():
    return pytest.importorskip("onnxruntime", reason="onnxruntime missing: pip install 'speech_kd[export]'")


@pytest.fixture(scope="module")
def test_set(tiny_corpus, tmp_path_factory):
    """(csv path, [(id, waveform, transcript)]) of the tiny corpus' test split."""
    from speech_kd.data.prepare import prepare_librispeech
    from speech_kd.scoring.evaluate import read_manifest

    csv = prepare_librispeech(tiny_corpus, tmp_path_factory.mktemp("data"), splits=["test"]).csv_files["test"]
    rows = read_manifest(csv)
    return csv, [(r["ID"], sf.read(r["wav"], dtype="float32")[0], r["wrd"]) for r in rows]


@pytest.fixture(scope="module")
def teacher():
    from speech_kd.model_folder import load_asr

    return load_asr(SHIPPED_TEACHER)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Export a folder of the shipped teacher on first use: ``exported(fmt, quantize) -> (folder, info)``."""
    from speech_kd.deploy.onnx_export import export_asr

    root, done = tmp_path_factory.mktemp("exported"), {}

    def get(fmt: str, quantize: str | None = None):
        if (fmt, quantize) not in done:
            if fmt == "onnx":
                _onnxruntime()
            out = root / f"{fmt}_{quantize or 'fp32'}"
            done[fmt, quantize] = out, export_asr(SHIPPED_TEACHER, out, fmt, quantize)
        return done[fmt, quantize]

    return get


def _pytorch_log_probs(teacher, wav: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return teacher.mods.encoder(torch.from_numpy(wav)[None], torch.ones(1))[0].numpy()


def test_numpy_fbank_is_speechbrains(test_set, teacher):
    """The folder's numpy fbank against SpeechBrain's: its own computation in float64 within 1e-4 dB; its float32
    module differs by float32 rounding only (the spectrum's, up to ~2e-3 dB in quiet bins of real speech)."""
    from speech_kd.nnet.features import filter_matrix

    module = teacher.mods.encoder.compute_features
    stft, banks = module.compute_STFT, module.compute_fbanks
    window = stft.window.double()
    mel = filter_matrix(banks, torch.device("cpu")).double().T
    wavs = [w for _, w, _ in test_set[1]] + [np.sin(np.arange(1234) / 7).astype(np.float32)]
    for wav in wavs:
        ours = fbank(wav, window.numpy(), mel.numpy(), stft.hop_length)
        spec = (
            torch.stft(
                torch.from_numpy(wav).double(),
                stft.n_fft,
                stft.hop_length,
                stft.win_length,
                window,
                center=True,
                pad_mode="constant",
                return_complex=True,
            )
            .abs()
            .pow(2)
            .T
        )
        exact = banks._amplitude_to_DB((spec @ mel)[None])[0].numpy()
        assert ours.shape == exact.shape and ours.dtype == np.float32
        assert np.abs(ours - exact).max() < 1e-4
        sb32 = module(torch.from_numpy(wav)[None])[0].numpy()
        assert np.abs(ours - sb32).mean() < 1e-4 and np.abs(ours - sb32).max() < 5e-3


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_fp32_export_is_the_pytorch_model(fmt, exported, test_set, teacher):
    """Log-probs within 1e-4 of the PyTorch model per utterance, the same greedy transcripts, and a padded batch
    (or the runtime's groups of at most max_batch_seconds, longest first) gives each utterance what it gets alone,
    in the order given."""
    folder, info = exported(fmt)
    assert info["max_abs_diff"] < 1e-4 and info["batch_exact"]
    asr = ExportedASR(folder, threads=1, max_batch_seconds=0)  # all in one padded batch
    wavs = [w for _, w, _ in test_set[1]][:4] + [np.zeros(100, dtype=np.float32)]  # any length: 6 ms too
    batch = asr.log_probs(wavs)
    grouped = ExportedASR(folder, threads=1, max_batch_seconds=6.0).log_probs(wavs)
    side_by_side = ExportedASR(folder, threads=2, max_batch_seconds=6.0).log_probs(wavs)  # groups on 2 threads
    for wav, got, in_group, in_parallel in zip(wavs, batch, grouped, side_by_side):
        alone = asr.log_probs([wav])[0]
        assert np.abs(got - alone).max() < 1e-4  # float rounding of other matrix shapes only
        assert in_group.shape == alone.shape and np.abs(in_group - alone).max() < 1e-4
        assert in_parallel.shape == alone.shape and np.abs(in_parallel - in_group).max() < 1e-4
        if wav.shape[0] >= 400:  # SpeechBrain's front end cannot take shorter audio
            ref = _pytorch_log_probs(teacher, wav)
            assert ref.shape == got.shape and np.abs(ref - got).max() < 1e-4
            words = teacher.transcribe_batch(torch.from_numpy(wav)[None], torch.ones(1))[0][0]
            assert asr.text(greedy_decode(got, asr.blank_index)) == " ".join(words.split())
    assert any(asr.transcribe(wavs[:3])), "the shipped teacher should write something"


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_int8_export_keeps_the_output_layer_fp32_and_stays_close(fmt, exported, test_set):
    from speech_kd.scoring.metrics import error_rates

    folder, info = exported(fmt, "int8")
    fp32_folder, fp32_info = exported(fmt)
    assert info["quantization"] == "int8-dynamic" and info["fp32_layers"] == ["ctc_lin"]
    assert info["bytes"] < 0.5 * fp32_info["bytes"]
    if fmt == "onnx":
        import onnx

        nodes = onnx.load(str(folder / "model.onnx")).graph.node
        quantized = [n.name for n in nodes if n.op_type == "MatMulInteger"]
        assert quantized and not any(name.startswith("/ctc_lin/") for name in quantized)
        assert any(n.op_type == "MatMul" and n.name.startswith("/ctc_lin/") for n in nodes)
    wavs = [w for _, w, _ in test_set[1]][:5]
    fp32 = ExportedASR(fp32_folder, threads=1).transcribe(wavs)
    int8 = ExportedASR(folder, threads=1).transcribe(wavs)
    assert error_rates(fp32, int8).cer < 10  # characters changed by int8 (same audio)


def test_transcribe_py_runs_without_speechbrain_speech_kd_or_torch(exported, test_set, tmp_path):
    folder, _ = exported("onnx")
    files = [str(tmp_path / f"{i}.wav") for i in range(3)]
    for path, (_, wav, _) in zip(files, test_set[1]):
        sf.write(path, wav, 16000)
    blocker = (
        "import runpy, sys\n"
        "for name in ('speechbrain', 'speech_kd', 'torch', 'torchaudio'): sys.modules[name] = None\n"
        f"sys.argv = ['transcribe.py', *{files!r}]\n"
        f"runpy.run_path({str(folder / 'transcribe.py')!r}, run_name='__main__')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-c", blocker], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    expected = ExportedASR(folder).transcribe([w for _, w, _ in test_set[1][:3]])
    assert [line.split("\t") for line in lines] == [[f, t] for f, t in zip(files, expected)]
    config = json.loads((folder / "deploy.json").read_text())
    assert config["frame_shift"] == pytest.approx(0.04) and config["tokens"][0] == "<blank>"
    assert (folder / "tokens.txt").read_text().splitlines()[3] == "A" and "transcribe.py" in (
        folder / "README.txt"
    ).read_text()


def test_evaluate_scores_an_exported_folder_like_its_model(exported, test_set, tmp_path):
    """Same WER as the model folder (scored one utterance per batch: SpeechBrain's batched conformer lets padding
    into the last frames, the exported network does not)."""
    from speech_kd.cli import main

    folder, _ = exported("onnx")
    csv = str(test_set[0])
    main(["evaluate", "--asr", str(folder), "--csv", csv, "--json", str(tmp_path / "onnx.json")])
    main(
        [
            "evaluate",
            "--asr",
            str(SHIPPED_TEACHER),
            "--csv",
            csv,
            "--json",
            str(tmp_path / "pt.json"),
            "--batch_seconds",
            "0.1",
        ]
    )
    onnx_summary, pt = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("onnx", "pt"))
    assert onnx_summary["num_utts"] == pt["num_utts"] == len(test_set[1])
    assert (onnx_summary["wer"], onnx_summary["cer"], onnx_summary["params"]) == (pt["wer"], pt["cer"], pt["params"])
    assert onnx_summary["rtf"] > 0 and (tmp_path / "onnx_utts.txt").read_text().count("  WER ") == len(test_set[1])
    main(
        ["evaluate", "--asr", str(folder), "--csv", csv, "--json", str(tmp_path / "pen.json"), "--blank_penalty", "20"]
    )
    assert json.loads((tmp_path / "pen.json").read_text())["insertions"] > onnx_summary["insertions"]


def test_chunked_transcription_of_a_long_file(exported, test_set, tmp_path):
    """Chunks with context on both sides: the whole file's frames, each within context of its own audio."""
    from speech_kd.scoring.evaluate import evaluate_model

    folder, _ = exported("onnx")
    asr = ExportedASR(folder, threads=1)
    wav = np.concatenate([w for _, w, _ in test_set[1][:4]])
    whole_lp = asr.log_probs([wav])[0]
    whole = asr.transcribe([wav])[0]
    seconds = wav.shape[0] / 16000
    for chunk, context in ((1.0, 0.0), (1.3, 0.5), (0.04, 0.2)):  # every piece count, incl. one frame per chunk
        pieces = list(asr.stream_log_probs(wav, chunk, context))
        assert len(pieces) == int(np.ceil(seconds / (round(chunk / 0.04) * 0.04)))
        assert sum(p.shape[0] for p in pieces) == whole_lp.shape[0]
    # context covering the file: every window is the whole file, so the kept frames are the whole file's
    pieces = list(asr.stream_log_probs(wav, chunk_seconds=1.0, context_seconds=seconds))
    assert np.abs(np.concatenate(pieces) - whole_lp).max() < 1e-4
    assert asr.transcribe_long(wav, chunk_seconds=1.0, context_seconds=seconds) == whole
    assert asr.transcribe_long(wav, chunk_seconds=seconds + 1) == whole
    # 1 s chunks: with 1 s of context the frames are near the whole file's; without, far from them
    near = np.abs(np.concatenate(list(asr.stream_log_probs(wav, 1.0, 1.0))) - whole_lp).mean()
    far = np.abs(np.concatenate(list(asr.stream_log_probs(wav, 1.0, 0.0))) - whole_lp).mean()
    assert near < far / 2
    scores = [
        evaluate_model(folder, test_set[0], chunk_seconds=chunk, context_seconds=context, progress=False).summary["wer"]
        for chunk, context in ((None, None), (100.0, 0.0), (0.5, 0.0), (0.5, 1.0))
    ]
    assert scores[0] == scores[1] and scores[2] > scores[3] >= scores[0] - 5


def test_greedy_decoding_carries_the_last_token_over_a_chunk_boundary():
    log_probs = np.log(np.eye(3)[[1, 1, 0, 2]] * 0.97 + 0.01)  # best path 1 1 _ 2 (blank 0)
    assert greedy_decode(log_probs, blank=0) == [1, 2]
    assert greedy_decode(log_probs, blank=0, previous=1) == [2]  # the 1 began in the chunk before
    assert greedy_decode(log_probs, blank=0, previous=0) == [1, 2]
    assert greedy_decode(log_probs[:0], blank=0, previous=1) == []


def test_export_cli_and_an_unsupported_folder(tmp_path, capsys):
    from speech_kd.cli import main, run

    main(["export", str(SHIPPED_TEACHER), "--out", str(tmp_path / "ts"), "--format", "torchscript"])
    assert "model.ts" in capsys.readouterr().out and (tmp_path / "ts" / "transcribe.py").exists()
    assert run(["export", str(tmp_path / "ts"), "--out", str(tmp_path / "x")]) == 2  # not a model folder
    assert "hyperparams.yaml" in capsys.readouterr().err
