"""A Hugging Face teacher exported for `speech-kd bench` (like with like) gives the PyTorch teacher's output."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from speech_kd.testing import make_tiny_hf_ctc, whitenoise

pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("stable_layer_norm", [False, True], ids=["base-style", "large-style"])
def test_exported_hf_teacher_matches_pytorch(tmp_path, stable_layer_norm):
    from speech_kd.bench.deployed import _HFTeacherRun, peak_rss_mb
    from speech_kd.bench.hf_onnx import HFOnnxCTC, export_hf_onnx

    folder = make_tiny_hf_ctc(tmp_path / "hf", stable_layer_norm=stable_layer_norm)
    wavs = torch.zeros(3, 40000)
    lengths = [40000, 27000, 16000]
    for i, n in enumerate(lengths):
        wavs[i, :n] = whitenoise(n / 16000, seed=i)[:n] * (i + 1)
    lens = torch.tensor(lengths, dtype=torch.float32) / 40000

    pytorch = _HFTeacherRun(folder)
    log_probs = pytorch.teacher(wavs, lens)
    exported = export_hf_onnx(folder, tmp_path / "onnx")
    model = HFOnnxCTC(exported, threads=1, max_batch_seconds=0)
    assert [model.frames(n) for n in lengths] == log_probs.lengths.tolist()

    # the same frames, greedy, as the PyTorch teacher's argmax over its own valid frames
    tokens, blank = model.config["tokens"], model.config["blank"]
    for i, logits in enumerate(model._run([wavs[i, :n].numpy() for i, n in enumerate(lengths)])):
        best = logits.argmax(-1)
        expected = log_probs.log_probs[i, : log_probs.lengths[i]].argmax(-1).numpy()
        assert np.mean(best == expected) > 0.99, i
    texts = model.transcribe_batch(wavs, lens)
    assert len(texts) == 3 and all(set(t) <= set("".join(tokens).replace("|", " ")) for t in texts)
    # grouped runs (as transcribe.py) give the group's own padding, not the batch's: still the same model
    grouped = HFOnnxCTC(exported, threads=1, max_batch_seconds=2.0).transcribe_batch(wavs.numpy(), lens.numpy())
    assert len(grouped) == 3

    int8 = export_hf_onnx(folder, tmp_path / "int8", quantize="int8")
    import onnx

    ops = {node.op_type for node in onnx.load(str(int8 / "model.onnx")).graph.node}
    assert "MatMulInteger" in ops and "DynamicQuantizeLinear" in ops  # the matrix products run in int8
    assert len(HFOnnxCTC(int8).transcribe_batch(wavs, lens)) == 3
    assert not any(int8.glob("fp32*"))

    import soundfile as sf

    files = []
    for i, n in enumerate(lengths):
        files.append(str(tmp_path / f"{i}.wav"))
        sf.write(files[-1], wavs[i, :n].numpy(), 16000)
    onnx_mb, torch_mb = peak_rss_mb(exported, files, 1, 0.0), peak_rss_mb(folder, files, 1)
    assert 0 < onnx_mb < torch_mb  # the exported teacher's process imports no torch
    assert blank == 0


def test_exported_wavlm_teacher_matches_pytorch(tmp_path):
    """WavLM (relative position buckets in its attention) exports as wav2vec2 does: wavlm-large's shape, tiny."""
    from dataclasses import replace

    from speech_kd.bench.deployed import _HFTeacherRun
    from speech_kd.bench.hf_onnx import HFOnnxCTC, export_hf_onnx
    from speech_kd.bench.teacher_archs import build_hf_teacher, teacher_arch

    tiny = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    small_conv = {"conv_dim": (16,) * 7, "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 4}
    large = teacher_arch("wavlm-large")
    folder = build_hf_teacher(replace(large, config={**large.config, **tiny, **small_conv}), tmp_path / "wavlm")
    wavs = torch.stack([whitenoise(3.0, seed=0), whitenoise(3.0, seed=1)])
    wavs[1, 28800:] = 0
    lens = torch.tensor([1.0, 0.6])
    out = _HFTeacherRun(folder).teacher(wavs, lens)
    model = HFOnnxCTC(export_hf_onnx(folder, tmp_path / "onnx"))
    for i, logits in enumerate(model._run([wavs[0].numpy(), wavs[1, :28800].numpy()])):
        best = logits.argmax(-1)
        expected = out.log_probs[i, : out.lengths[i]].argmax(-1).numpy()
        assert len(best) == len(expected) and np.mean(best == expected) > 0.99
