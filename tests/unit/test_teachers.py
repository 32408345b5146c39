"""Teachers behind one interface: SpeechBrain folders, Hugging Face CTC folders, ensembles; offline."""

from __future__ import annotations

import socket

import pytest
import torch

from speech_kd.targets.teachers.base import TeacherError, load_teacher
from speech_kd.testing import make_tiny_sb_model, whitenoise

transformers = pytest.importorskip("transformers")

from speech_kd.testing import WAV2VEC2_VOCAB, make_tiny_hf_ctc  # noqa: E402


@pytest.fixture(scope="module")
def sb_folder(tmp_path_factory):
    return make_tiny_sb_model(tmp_path_factory.mktemp("sb") / "model")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    return make_tiny_hf_ctc(tmp_path_factory.mktemp("hf") / "w2v")


@pytest.fixture()
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access attempted during an offline load")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _batch():
    wavs = torch.stack([whitenoise(2.0, seed=1), torch.cat([whitenoise(1.2, seed=2), torch.zeros(12800)])])
    return wavs, torch.tensor([1.0, 0.6])


def test_speechbrain_teacher(sb_folder, no_network):
    teacher = load_teacher(sb_folder)
    assert len(teacher.tokens) == 29 and teacher.tokens[0] == "<blank>" and teacher.blank_index == 0
    assert teacher.frame_shift == pytest.approx(0.04, rel=0.02)
    out = teacher(*_batch())
    assert out.log_probs.shape[0] == 2 and out.log_probs.shape[2] == 29
    assert torch.allclose(out.log_probs.exp().sum(-1), torch.ones(out.log_probs.shape[:2]), atol=1e-4)
    assert out.lengths[0] == out.log_probs.shape[1] and out.lengths[1] < out.lengths[0]
    assert not out.log_probs.requires_grad


def test_huggingface_teacher_offline(hf_folder, no_network):
    teacher = load_teacher(hf_folder)
    assert teacher.tokens == WAV2VEC2_VOCAB and teacher.blank_index == 0
    assert teacher.frame_shift == pytest.approx(0.02, rel=0.02)
    wavs, lens = _batch()
    out = teacher(wavs, lens)
    assert torch.allclose(out.log_probs.exp().sum(-1), torch.ones(out.log_probs.shape[:2]), atol=1e-4)
    # the padded second utterance gives the same posteriors as alone, on its valid frames
    alone = teacher(wavs[1:, :19200], torch.ones(1))
    n = int(alone.lengths[0])
    assert int(out.lengths[1]) == n
    diff = (out.log_probs[1, :n].exp() - alone.log_probs[0, :n].exp()).abs().max()
    assert diff < 0.02, diff  # attention is masked; the first conv layer still sees the zero padding


def test_fingerprints(sb_folder, tmp_path):
    assert load_teacher(sb_folder).fingerprint() == load_teacher(sb_folder).fingerprint()
    other = make_tiny_sb_model(tmp_path / "other", seed=1)
    assert load_teacher(other).fingerprint() != load_teacher(sb_folder).fingerprint()


def test_bad_teacher_folders(tmp_path):
    with pytest.raises(TeacherError, match="nowhere.*does not exist"):
        load_teacher(tmp_path / "nowhere")
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    plain = tmp_path / "not_ctc"
    Wav2Vec2Model(
        Wav2Vec2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    ).save_pretrained(plain)
    with pytest.raises(TeacherError, match="not a CTC teacher"):
        load_teacher(plain)


def test_ensemble_of_hf_and_sb_teachers(sb_folder, hf_folder):
    from speech_kd.targets.teachers.ensemble import EnsembleTeacher

    sb_teacher, hf_teacher = load_teacher(sb_folder), load_teacher(hf_folder)
    ensemble = EnsembleTeacher([sb_teacher, hf_teacher], weights=[0.7, 0.3])
    assert ensemble.tokens == sb_teacher.tokens and ensemble.frame_shift == sb_teacher.frame_shift
    wavs, lens = _batch()
    out = ensemble(wavs, lens)
    ref = sb_teacher(wavs, lens)
    assert out.log_probs.shape == ref.log_probs.shape
    assert torch.equal(out.lengths, ref.lengths)
    assert torch.allclose(out.log_probs.exp().sum(-1), torch.ones(out.log_probs.shape[:2]), atol=1e-3)


def test_load_teachers_one_folder_or_an_ensemble(sb_folder, hf_folder):
    """``teacher_source`` with one folder is that teacher; ``A,B`` is their ensemble; overrides need one teacher."""
    from speech_kd.targets.teachers.ensemble import EnsembleTeacher, load_teachers

    single = load_teachers(str(sb_folder))
    assert not isinstance(single, EnsembleTeacher) and single.fingerprint() == load_teacher(sb_folder).fingerprint()
    pair = load_teachers(f"{sb_folder}, {hf_folder}")
    assert isinstance(pair, EnsembleTeacher) and len(pair.members) == 2
    assert pair.fingerprint() != single.fingerprint()
    with pytest.raises(ValueError, match="apply to one teacher"):
        load_teachers([str(sb_folder), str(hf_folder)], overrides={"sample_rate": 8000})
    with pytest.raises(ValueError, match="no teacher folder"):
        load_teachers(" , ")
