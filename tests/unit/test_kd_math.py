"""The KD math on the paths off the default: cache at T > 1, loss scales, hard targets of 20 ms teachers,
untranscribed batches' weight, tokens no teacher reaches, the measured frame shift, the clean live teacher.

Real SpeechBrain losses and Brains, the shipped teacher on synthesised speech for the cache bound.
"""

from __future__ import annotations

import glob
import zlib
from pathlib import Path

import pytest
import speechbrain as sb
import torch
from speechbrain.augment.augmenter import Augmenter
from speechbrain.augment.time_domain import AddNoise, DropChunk

from speech_kd import load_teacher
from speech_kd.data.audio import read_audio
from speech_kd.kd.losses import collapse_greedy, collapse_path, kd_kl, kd_loss
from speech_kd.kd.term import restrict_to_reached
from speech_kd.targets.cache.format import decode, encode, to_codes
from speech_kd.targets.strategies import TargetAligner
from tests.unit.test_kd_mixin import ALPHABET, KDRecipe, _attach, _batch, _brain

SHIPPED_TEACHER = Path(__file__).resolve().parents[2] / "speech_kd" / "pretrained" / "teacher_synth"

#: the stated bound (docs/cache.md): mean per-frame T^2 KL(teacher || decoded) at T <= max_temperature
CACHE_KL_BOUND = {1.0: 0.03, 2.0: 0.1, 4.0: 0.2}


def _scaled_kl(teacher: torch.Tensor, decoded: torch.Tensor, temperature: float) -> torch.Tensor:
    a = torch.log_softmax(teacher.double() / temperature, -1)
    b = torch.log_softmax(decoded.double() / temperature, -1)
    return temperature**2 * (a.exp() * (a - b)).sum(-1)


@pytest.fixture(scope="module")
def shipped_teacher_frames(tiny_corpus) -> torch.Tensor:
    """``[N, V]`` log-posteriors of the shipped teacher on the tiny synthesised corpus (all splits)."""
    teacher = load_teacher(SHIPPED_TEACHER)
    frames = []
    with torch.no_grad():
        for path in sorted(glob.glob(str(tiny_corpus / "**" / "*.flac"), recursive=True))[:40]:
            out = teacher(read_audio(path, 16000)[None], torch.ones(1))
            frames.append(out.log_probs[0, : int(out.lengths[0])].float())
    return torch.cat(frames)


@pytest.mark.parametrize("max_temperature,top_k", [(1.0, 8), (2.0, 8), (4.0, 16)])
def test_cache_stays_close_to_the_teacher_at_every_temperature_it_serves(
    shipped_teacher_frames, max_temperature, top_k
):
    lp = shipped_teacher_frames
    enc = encode(lp, top_k=top_k, mass=0.98, max_temperature=max_temperature)
    decoded = decode(enc, lp.shape[1])
    for temperature in (1.0, 2.0, 4.0):
        if temperature > max_temperature:
            continue
        mean = float(_scaled_kl(lp, decoded, temperature).mean())
        assert mean <= CACHE_KL_BOUND[max_temperature], (max_temperature, temperature, mean)
    codes, ids, probs = to_codes(enc)
    stored = len(zlib.compress(codes.tobytes() + ids.tobytes() + probs.tobytes(), 9)) / len(lp)
    if max_temperature == 1.0:
        assert stored <= 4.0  # bytes per frame as a shard stores them (runs, then zlib)


def test_cache_refuses_a_temperature_above_what_it_was_built_for(tiny_corpus, tmp_path):
    from speech_kd.data.prepare import prepare_librispeech
    from speech_kd.kd import KDSetupError
    from speech_kd.targets.cache import write_cache

    prepare_librispeech(tiny_corpus, tmp_path / "csv", splits=["train"])
    teacher = load_teacher(SHIPPED_TEACHER)
    write_cache(teacher, tmp_path / "csv" / "train.csv", tmp_path / "cache", progress=False)
    brain = _brain(KDRecipe, SHIPPED_TEACHER, augment=False, temperature=2.0, targets_cache=str(tmp_path / "cache"))
    with pytest.raises(KDSetupError, match=r"temperature=2.0 but the targets cache was built for temperatures up to 1"):
        _attach(brain)


def _ctc_batch():
    torch.manual_seed(0)
    path = torch.tensor([[0, 3, 3, 0, 5, 0, 0, 7, 0, 0], [0, 2, 0, 2, 0, 4, 0, 0, 0, 0]])
    lengths = torch.tensor([10, 7])
    teacher = torch.nn.functional.one_hot(path, 9).float().clamp_min(1e-6).log()
    student = torch.log_softmax(torch.randn(2, 10, 9, requires_grad=True), -1)
    return student, teacher, path, lengths


def test_pseudo_label_ctc_has_the_recipes_ctc_scale():
    """kd_loss: ctc under kd_reduction utterance equals SpeechBrain's ctc_loss(batchmean) on the teacher's
    transcript; under frame it is that sum over the valid frames."""
    student, teacher, path, lengths = _ctc_batch()
    labels, label_lengths = collapse_greedy(teacher, lengths, 0)
    mask = torch.arange(10)[None] < lengths[:, None]
    reference = sb.nnet.losses.ctc_loss(
        student, labels, lengths / 10.0, label_lengths / labels.shape[1], blank_index=0, reduction="batchmean"
    )
    utterance = kd_loss("ctc", student, teacher, mask, student_lengths=lengths, reduction="utterance")
    frame = kd_loss("ctc", student, teacher, mask, student_lengths=lengths, reduction="frame")
    assert float(utterance) == pytest.approx(float(reference), rel=1e-4)
    assert float(frame) == pytest.approx(float(reference) * 2 / 17, rel=1e-4)


def test_frame_losses_sum_per_utterance_under_utterance_reduction():
    student, teacher, _, lengths = _ctc_batch()
    mask = torch.arange(10)[None] < lengths[:, None]
    per_frame = kd_kl(student, teacher, mask, reduction="frame")
    per_utt = kd_kl(student, teacher, mask, reduction="utterance")
    assert float(per_utt) == pytest.approx(float(per_frame) * 17 / 2, rel=1e-5)


def test_hard_targets_of_a_20ms_teacher_are_its_own_greedy_transcript():
    """A one-frame spike of 0.9 at 20 ms averages to 0.45 against blank 0.55 at 40 ms: the argmax after
    resampling deletes it. The hard targets come from the teacher's own frames instead."""
    tokens = ["<blank>", "A", "B", " "]
    aligner = TargetAligner(tokens, 0, 0.02, tokens, 0, 0.04)
    path = torch.tensor([0, 1, 0, 0, 2, 0, 0, 0, 1, 1, 1, 0, 0, 2, 0, 2, 0, 0, 0, 0])  # A B A B B
    probs = torch.full((20, 4), 0.1 / 3)
    probs[torch.arange(20), path] = 0.9
    from speech_kd.targets.teachers.base import TeacherOutput

    out = TeacherOutput(probs.log()[None], torch.tensor([20]))
    targets = aligner(out, torch.tensor([10]), 10)
    teacher_transcript, _ = collapse_path(path[None], torch.tensor([20]), 0)
    student_transcript, _ = collapse_path(targets.hard_labels, torch.tensor([10]), 0)
    assert student_transcript.tolist() == teacher_transcript.tolist() == [[1, 2, 1, 2, 2]]
    resampled_argmax, _ = collapse_greedy(targets.log_probs, torch.tensor([10]), 0)
    assert resampled_argmax.shape[1] < 5  # what the losses used to learn: deletions
    mask = torch.ones(1, 10, dtype=torch.bool)
    student = torch.log_softmax(torch.randn(1, 10, 4), -1)
    for name in ("ce", "ctc"):
        loss = kd_loss(name, student, targets.log_probs, mask, hard_labels=targets.hard_labels)
        assert torch.isfinite(loss)


def test_untranscribed_batches_follow_kd_weight(teacher_folder):
    """An all-untranscribed batch is trained on kd_weight * KD, as the KD part of a transcribed batch."""
    losses = {}
    for weight in (0.5, 1.0):
        brain = _brain(KDRecipe, teacher_folder, augment=False, kd_weight=weight)
        _attach(brain)
        brain.on_stage_start(sb.Stage.TRAIN, 1)
        batch = _batch(("", ""))
        predictions = brain.compute_forward(batch, sb.Stage.TRAIN)
        losses[weight] = float(brain.compute_objectives(predictions, batch, sb.Stage.TRAIN))
    assert losses[0.5] == pytest.approx(0.5 * losses[1.0], rel=1e-5)


def test_untranscribed_batch_after_kd_faded_out_teaches_nothing(teacher_folder):
    brain = _brain(KDRecipe, teacher_folder, augment=False)
    _attach(brain)
    brain.kd_weight_scale = 0.0  # what annealing sets when the student has reached the teacher
    brain.on_stage_start(sb.Stage.TRAIN, 1)
    batch = _batch(("", ""))
    predictions = brain.compute_forward(batch, sb.Stage.TRAIN)
    assert float(brain.compute_objectives(predictions, batch, sb.Stage.TRAIN)) == 0.0


def test_tokens_no_teacher_reaches_are_left_out_of_kd():
    student = torch.log_softmax(torch.randn(1, 3, 4, requires_grad=True), -1)
    teacher = torch.log(torch.tensor([[[0.7, 0.3 - 1e-8, 0.0, 1e-8]] * 3]).clamp_min(1e-12))
    reached = torch.tensor([True, True, True, False])
    s, t, _, blank = restrict_to_reached(student, teacher, None, reached, 0)
    loss = kd_kl(s, t, torch.ones(1, 3, dtype=torch.bool))
    loss.backward()
    assert s.shape[-1] == 3 and blank == 0
    # the unreached token's output gets no gradient from KD (before: pushed toward log 1e-8)
    grad = torch.autograd.grad(
        kd_kl(*restrict_to_reached(student, teacher, None, reached, 0)[:2], torch.ones(1, 3, dtype=torch.bool)), student
    )[0]
    assert torch.allclose(grad[..., 3], torch.zeros(1, 3))


def test_live_teacher_hears_clean_audio_when_augmentation_keeps_time(teacher_folder):
    noise = AddNoise(snr_low=0, snr_high=5)
    chunks = DropChunk(drop_length_low=100, drop_length_high=200)
    augment = Augmenter(concat_original=True, min_augmentations=2, max_augmentations=2, augmentations=[noise, chunks])
    brain = _brain(KDRecipe, teacher_folder, augment=False, wav_augment=augment)
    recording = _attach(brain, recording=True)
    brain.on_stage_start(sb.Stage.TRAIN, 1)
    brain.fit_batch(_batch())
    (extra,) = recording.calls
    assert "wavs" not in extra  # the teacher runs on batch.sig, the clean audio, as the cache does
    assert extra["rows"].tolist() == [0, 1, 0, 1]  # one target row per student row


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory):
    from speech_kd.testing import make_tiny_sb_model

    return make_tiny_sb_model(tmp_path_factory.mktemp("teacher") / "model")


def test_alphabet_is_shared():
    assert ALPHABET.startswith(" ")


def test_a_yaml_without_kd_options_gets_one_default_everywhere(teacher_folder):
    """KDConfig holds each default once: the mixin, distill's 'is there a teacher' and the report agree."""
    from speech_kd.kd import KDConfig

    hparams = {"teacher_source": str(teacher_folder), "blank_index": 0, "sample_rate": 16000}
    config = KDConfig.from_hparams(hparams)
    assert config.uses_teacher and config.kd_weight == KDConfig().kd_weight == 0.9 and config.temperature == 1.0
    brain = _brain(KDRecipe, teacher_folder, augment=False)
    del brain.hparams.kd_weight, brain.hparams.temperature  # as a yaml that never names them
    assert brain.kd_schedule() == (0.9, 1.0)
    with pytest.raises(ValueError, match="kd_weight=1.5: must be between 0 and 1"):
        KDConfig.from_hparams({"kd_weight": 1.5})


def test_hard_labels_are_made_only_for_the_losses_that_read_them(teacher_folder):
    for loss, expected in (("kl", False), ("ce", True), ("ctc", True)):
        brain = _brain(KDRecipe, teacher_folder, augment=False, kd_loss=loss)
        targets = _attach(brain)
        assert targets.aligner.hard_labels is expected
        brain.on_stage_start(sb.Stage.TRAIN, 1)
        loss_value = brain.fit_batch(_batch())
        assert torch.isfinite(loss_value)


def test_a_union_of_caches_serves_the_lowest_temperature_of_its_parts():
    from speech_kd.targets.strategies import CachedTargets

    class Part:
        def __init__(self, ceiling):
            self.metadata = {"scheme": {"max_temperature": ceiling}}

    class Union:
        readers = [Part(2.0), Part(1.0)]
        metadata = readers[0].metadata

    assert CachedTargets(Union(), aligner=None).max_temperature == 1.0


def test_blank_weighting_with_the_sequence_loss_is_refused():
    from speech_kd.kd import KDConfig

    with pytest.raises(ValueError, match="kd_loss=ctc is a sequence loss"):
        KDConfig(kd_loss="ctc", blank_mode="downweight")
    assert KDConfig.from_hparams({"kd_reduction": None}).kd_reduction == "auto"


def test_a_batch_too_short_to_measure_the_frame_shift_is_refused():
    from speech_kd.kd.term import measured_frame_shift

    assert measured_frame_shift(1.0, 26) == 0.04
    with pytest.raises(ValueError, match="too short to measure"):
        measured_frame_shift(0.25, 7)
