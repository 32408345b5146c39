"""Ensembles of CTC teachers: spike timing decides whether averaging helps or drops tokens."""

from __future__ import annotations

import logging

import torch

from speech_kd.targets.teachers.base import Teacher, TeacherOutput, load_teacher
from speech_kd.targets.teachers.ensemble import EnsembleTeacher
from speech_kd.testing import make_tiny_sb_model, whitenoise


class SpikeTeacher(Teacher):
    """A CTC 'model' that emits token 1 as a one-frame spike every 4 frames, starting at ``offset``."""

    def __init__(self, offset: int) -> None:
        super().__init__()
        self.offset = offset
        self.tokens, self.blank_index, self.frame_shift, self.sample_rate = ["<b>", "A"], 0, 0.04, 16000
        self.name = f"spikes@{offset}"

    def posteriors(self, wavs: torch.Tensor, wav_lens: torch.Tensor) -> TeacherOutput:
        frames = wavs.shape[1] // 640
        probs = torch.full((wavs.shape[0], frames, 2), 0.05)
        probs[..., 0] = 0.95
        probs[:, self.offset :: 4] = torch.tensor([0.05, 0.95])
        lengths = torch.round(wav_lens * frames).long()
        return TeacherOutput(probs.log(), lengths)


def test_misaligned_spikes_are_reported_and_aligned_ones_are_not(caplog):
    wavs, lens = torch.zeros(2, 16000), torch.tensor([1.0, 0.5])
    with caplog.at_level(logging.WARNING, logger="speech_kd.targets.teachers.ensemble"):
        shifted = EnsembleTeacher([SpikeTeacher(0), SpikeTeacher(2)])
        out = shifted(wavs, lens)
    assert shifted.spike_survival == 0.0
    assert (out.log_probs.argmax(-1) == 0).all(), "averaged, misaligned spikes are outvoted by blank"
    assert "survive averaging" in caplog.text and "spikes@0" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="speech_kd.targets.teachers.ensemble"):
        aligned = EnsembleTeacher([SpikeTeacher(1), SpikeTeacher(1)])
        aligned(wavs, lens)
    assert aligned.spike_survival == 1.0 and "survive" not in caplog.text


def test_a_real_model_averaged_with_itself_keeps_every_spike(tmp_path):
    folder = make_tiny_sb_model(tmp_path / "model", seed=5)
    teacher = load_teacher(folder)
    ensemble = EnsembleTeacher([teacher, load_teacher(folder)])
    wavs = torch.stack([whitenoise(1.5, seed=1), torch.cat([whitenoise(1.0, seed=2), torch.zeros(8000)])])
    lens = torch.tensor([1.0, 2 / 3])
    out, ref = ensemble(wavs, lens), teacher(wavs, lens)
    assert ensemble.spike_survival == 1.0
    assert torch.equal(out.lengths, ref.lengths)
    for b, length in enumerate(ref.lengths.tolist()):  # frames past the length are filler (masked downstream)
        assert torch.allclose(out.log_probs[b, :length].exp(), ref.log_probs[b, :length].exp(), atol=1e-6)
