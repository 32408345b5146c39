"""Vocabulary and frame-rate alignment between teacher and student."""

from __future__ import annotations

import pytest
import torch

from speech_kd.targets.align import FrameRateError, VocabMap, VocabMappingError, reconcile_lengths, resample_frames
from speech_kd.testing import WAV2VEC2_VOCAB

STUDENT = ["<blank>", " ", "'", *"ABCDEFGHIJKLMNOPQRSTUVWXYZ"]


def test_wav2vec2_vocabulary_maps_onto_characters():
    vmap = VocabMap.build(WAV2VEC2_VOCAB, 0, STUDENT, 0)
    assert set(vmap.unmapped) == {"<s>", "</s>", "<unk>"}
    assert vmap.matrix[WAV2VEC2_VOCAB.index("|"), STUDENT.index(" ")] == 1
    assert vmap.matrix[0, 0] == 1 and vmap.matrix[WAV2VEC2_VOCAB.index("Q"), STUDENT.index("Q")] == 1
    probs = torch.softmax(torch.randn(2, 6, len(WAV2VEC2_VOCAB)), -1)
    mapped, lost = vmap.map_log_probs(probs.log())
    assert torch.allclose(mapped.exp().sum(-1), torch.ones(2, 6), atol=1e-5)
    unmapped_ids = [WAV2VEC2_VOCAB.index(t) for t in ("<s>", "</s>", "<unk>")]
    assert torch.allclose(lost, probs[..., unmapped_ids].sum(-1), atol=1e-5)
    report = vmap.report()
    assert "<unk>" in report


def test_lowercase_teacher_is_case_folded():
    vmap = VocabMap.build(["<blank>", "a", "b", " "], 0, STUDENT, 0)
    assert not vmap.unmapped and vmap.matrix[1, STUDENT.index("A")] == 1


def test_teacher_that_loses_mass_is_an_error_naming_tokens():
    teacher = ["<blank>", "<s>", "#", "A", "S", "E"]  # characters, two without a student counterpart
    vmap = VocabMap.build(teacher, 0, STUDENT, 0)
    assert vmap.unmapped == ["<s>", "#"]
    probs = torch.full((1, 4, len(teacher)), 1.0 / len(teacher))
    _, lost = vmap.map_log_probs(probs.log())
    with pytest.raises(VocabMappingError, match="'<s>', '#'"):
        vmap.check_mass(lost, torch.ones(1, 4, dtype=torch.bool))


@pytest.mark.parametrize("swap", [False, True])
def test_subword_and_character_units_are_refused_before_training(swap):
    bpe = ["<blank>", "▁THE", "ING", "▁A", "S", "E"]
    pair = (STUDENT, bpe) if swap else (bpe, STUDENT)
    with pytest.raises(VocabMappingError, match="subwords.*characters|characters.*subwords") as err:
        VocabMap.build(pair[0], 0, pair[1], 0)
    assert "'▁THE'" in str(err.value)
    assert VocabMap.build(bpe, 0, list(bpe), 0).is_identity  # the same BPE units on both sides map one to one


def test_nothing_maps_is_an_error():
    with pytest.raises(VocabMappingError):
        VocabMap.build(["<blank>", "xx", "yy"], 0, STUDENT, 0)


def test_20ms_to_40ms_averages_frame_pairs():
    probs = torch.softmax(torch.randn(1, 8, 4), -1)
    out, lengths = resample_frames(probs.log(), torch.tensor([8]), 0.02, 0.04)
    assert out.shape[1] == 4 and lengths.tolist() == [4]
    expected = (probs[:, 0::2] + probs[:, 1::2]) / 2
    assert torch.allclose(out.exp(), expected, atol=1e-5)
    same, _ = resample_frames(probs.log(), torch.tensor([8]), 0.04, 0.04)
    assert torch.equal(same, probs.log())


def test_reconcile_within_tolerance_and_error_beyond():
    x = torch.log_softmax(torch.randn(2, 10, 3), -1)
    out = reconcile_lengths(x, torch.tensor([10, 8]), torch.tensor([11, 7]), 11, tolerance=2)
    assert out.shape == (2, 11, 3)
    assert torch.allclose(out[0, 10], x[0, 9]) and torch.allclose(out[1, :7], x[1, :7])
    with pytest.raises(FrameRateError):
        reconcile_lengths(x, torch.tensor([10, 8]), torch.tensor([10, 3]), 10, tolerance=2)
