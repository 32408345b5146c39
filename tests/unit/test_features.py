"""Features: agreement with a librosa reference, fp32 spectrum under autocast, sharing with the teacher."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from speechbrain.lobes.features import Fbank

from speech_kd.nnet.features import (
    REFERENCE_TOLERANCE_DB,
    SharedFeatures,
    fast_fbank,
    fast_fbank_applies,
    fbank_signature,
    librosa_fbank,
)


def _speech_like(seconds: float = 1.5, seed: int = 0) -> torch.Tensor:
    """Harmonic tones with a moving pitch plus noise bursts: a spectrum with structure, not flat noise."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(int(16000 * seconds)) / 16000
    pitch = 120 + 40 * torch.sin(2 * torch.pi * 0.7 * t)
    phase = 2 * torch.pi * torch.cumsum(pitch, 0) / 16000
    wav = sum(torch.sin(k * phase) / k for k in range(1, 12))
    envelope = (torch.sin(2 * torch.pi * 3 * t) > 0).float() * 0.9 + 0.1
    return (0.1 * wav * envelope + 0.01 * torch.randn(t.shape, generator=gen)).float()


def test_fbank_matches_librosa_reference(tiny_corpus):
    from speech_kd.data.audio import read_audio

    fbank = Fbank(n_mels=80, n_fft=400, win_length=25, hop_length=10)
    files = sorted(tiny_corpus.glob("train/*/*/*.flac"))[:3]
    assert files
    for wav in [read_audio(f) for f in files] + [_speech_like()]:
        ours = fbank(wav.unsqueeze(0))[0].numpy()
        ref = librosa_fbank(wav.numpy())
        assert ours.shape == ref.shape
        diff = np.abs(ours - ref)
        mean_tol, p99_tol = REFERENCE_TOLERANCE_DB
        assert diff.mean() < mean_tol and np.percentile(diff, 99) < p99_tol, (diff.mean(), np.percentile(diff, 99))


def test_fast_fbank_is_speechbrains_fbank_on_a_padded_batch(tiny_corpus):
    from speech_kd.data.audio import read_audio

    wavs = [read_audio(f) for f in sorted(tiny_corpus.glob("train/*/*/*.flac"))[:4]] + [_speech_like()]
    batch = torch.zeros(len(wavs), max(len(w) for w in wavs))
    for i, w in enumerate(wavs):
        batch[i, : len(w)] = w
    for fbank in (Fbank(n_mels=80), Fbank(n_mels=40, n_fft=512, hop_length=20, f_min=20, f_max=7600)):
        ref = fbank(batch)
        got = fast_fbank(fbank, batch)
        assert got.shape == ref.shape and got.dtype == torch.float32
        assert (got - ref).abs().max() < 1e-4  # dB: another order of float operations, same numbers


def test_fast_fbank_in_pieces_is_the_same(monkeypatch):
    """On CPU the batch goes through in pieces; each utterance keeps its own top_db floor across them."""
    from speech_kd.nnet import features

    wavs = torch.stack([_speech_like(2.0, seed) * scale for seed, scale in ((0, 1.0), (1, 0.01), (2, 30.0))])
    fbank = Fbank(n_mels=80)
    monkeypatch.setattr(features, "CPU_CHUNK_BYTES", 1)  # one utterance per piece
    assert features.chunk_size(fbank, wavs) == 1
    assert (fast_fbank(fbank, wavs) - fbank(wavs)).abs().max() < 1e-4


def test_fast_fbank_applies_only_where_it_is_exact():
    assert fast_fbank_applies(Fbank(n_mels=80))
    assert not fast_fbank_applies(Fbank(n_mels=80, deltas=True))
    assert not fast_fbank_applies(torch.nn.Identity())
    perturbed = Fbank(n_mels=80, param_rand_factor=0.1)
    assert not fast_fbank_applies(perturbed.train()) and fast_fbank_applies(perturbed.eval())


def test_spectrum_stays_fp32_under_autocast():
    fbank = Fbank(n_mels=80)
    wav = _speech_like().unsqueeze(0)
    ref = fbank(wav)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fbank(wav.to(torch.bfloat16))
        fast = fast_fbank(fbank, wav.to(torch.bfloat16))
    assert got.dtype == torch.float32 and fast.dtype == torch.float32
    assert torch.allclose(fast, got, atol=1e-4)
    # bf16 input rounding is the only difference: far below the 1 dB quantum that matters
    assert (got - ref).abs().mean() < 0.5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_features_match_cpu_and_stay_fp32():
    fbank = Fbank(n_mels=80)
    wav = _speech_like().unsqueeze(0)
    ref = fbank(wav)
    gpu = fbank.to("cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        got = gpu(wav.cuda())
        fast = fast_fbank(gpu, wav.cuda())
    assert got.dtype == torch.float32 and got.device.type == "cuda"
    assert fast.dtype == torch.float32 and fast.device.type == "cuda"
    assert torch.allclose(got.cpu(), ref, atol=1e-2) and torch.allclose(fast.cpu(), ref, atol=1e-2)


def test_signature_tells_which_fbanks_may_share():
    base = fbank_signature(Fbank(n_mels=80))
    assert base is not None and base == fbank_signature(Fbank(n_mels=80))
    assert base != fbank_signature(Fbank(n_mels=40))
    assert base != fbank_signature(Fbank(n_mels=80, hop_length=20))
    assert fbank_signature(Fbank(n_mels=80, deltas=True)) is None
    assert fbank_signature(torch.nn.Identity()) is None
    shared = SharedFeatures(torch.zeros(1, 5, 80), torch.ones(1), base)
    assert shared.usable_by(base) and not shared.usable_by(None)


def test_teacher_starts_from_the_students_fbank(trained_run, monkeypatch):
    """A teacher with the student's fbank settings gives the same posteriors from shared features,
    and its own fbank is not run."""
    from speech_kd.targets.teachers.base import load_teacher

    teacher = load_teacher(trained_run / "model")
    assert teacher.feature_signature == fbank_signature(Fbank(n_mels=80))
    wavs = torch.stack([_speech_like(1.2, 0), _speech_like(1.2, 1)])
    wavs[1, 12000:] = 0.0
    lens = torch.tensor([1.0, 0.75])
    full = teacher(wavs, lens)
    feats = Fbank(n_mels=80)(wavs)

    import speech_kd.targets.teachers.sb as sb_teacher

    calls = []
    fbank_module = next(iter(teacher.asr.mods.encoder.values()))
    handle = fbank_module.register_forward_hook(lambda *args: calls.append("Fbank.forward"))
    real_fast = sb_teacher.fast_fbank
    monkeypatch.setattr(sb_teacher, "fast_fbank", lambda *a: calls.append("fast_fbank") or real_fast(*a))
    try:
        shared = teacher(wavs, lens, features=SharedFeatures(feats, lens, teacher.feature_signature))
        mismatched = SharedFeatures(feats, lens, fbank_signature(Fbank(n_mels=40)))
        teacher(wavs, lens, features=mismatched)
    finally:
        handle.remove()
    assert calls == ["fast_fbank"]  # only the mismatched call ran the teacher's own fbank
    assert torch.equal(shared.lengths, full.lengths)
    assert torch.allclose(shared.log_probs, full.log_probs, atol=1e-5)


def test_fast_fbank_passes_gradients_to_the_waveform():
    fbank = Fbank(n_mels=80)
    wav = _speech_like(0.5).unsqueeze(0)
    ours, theirs = wav.clone().requires_grad_(), wav.clone().requires_grad_()
    fast_fbank(fbank, ours).sum().backward()
    fbank(theirs).sum().backward()
    assert torch.allclose(ours.grad, theirs.grad, rtol=1e-3, atol=1e-3 * theirs.grad.abs().max().item())
