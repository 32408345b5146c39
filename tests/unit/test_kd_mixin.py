"""KDMixin around a user's Brain: where KD cannot run it says so, and the teacher hears the student's rows.

A small real SpeechBrain Brain (Fbank, a linear layer, log-softmax at 40 ms frames) with the hooks of a
SpeechBrain recipe (its own compute_objectives with ``replicate_labels``, an ``Augmenter`` with
``concat_original`` and speed perturbation) and a tiny real teacher folder.
"""

from __future__ import annotations

import csv

import pytest
import speechbrain as sb
import torch
from speechbrain.augment.augmenter import Augmenter
from speechbrain.augment.freq_domain import SpectrogramDrop
from speechbrain.augment.time_domain import DropChunk, SpeedPerturb
from speechbrain.dataio.batch import PaddedBatch

from speech_kd import KDMixin, make_targets, token_strings
from speech_kd.data.dataio import make_tokenizer
from speech_kd.kd import KDSetupError
from speech_kd.kd.augment_rows import AugmentationRows
from speech_kd.kd.recipe_outputs import OutputLayoutError, find_ctc_outputs
from speech_kd.targets.align import VocabMappingError
from speech_kd.testing import make_tiny_sb_model, whitenoise

ALPHABET = " 'ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class Recipe(sb.Brain):
    """A recipe's Brain: augments in compute_forward, replicates labels in compute_objectives."""

    def compute_forward(self, batch, stage):
        wavs, wav_lens = batch.sig
        if stage == sb.Stage.TRAIN and hasattr(self.hparams, "wav_augment"):
            wavs, wav_lens = self.hparams.wav_augment(wavs, wav_lens)
        self.seen_wavs = wavs
        feats = self.hparams.compute_features(wavs)[:, ::4]  # 40 ms frames
        return self.hparams.log_softmax(self.modules.lin(feats)), wav_lens, None

    def compute_objectives(self, predictions, batch, stage):
        p_ctc, wav_lens, _ = predictions
        if any(not w for w in batch.wrd):
            raise AssertionError("the recipe's objective saw an untranscribed utterance")
        tokens, token_lens = batch.tokens
        if stage == sb.Stage.TRAIN and hasattr(self.hparams, "wav_augment"):
            tokens = self.hparams.wav_augment.replicate_labels(tokens)
            token_lens = self.hparams.wav_augment.replicate_labels(token_lens)
        return sb.nnet.losses.ctc_loss(p_ctc, tokens, wav_lens, token_lens, blank_index=0)


class KDRecipe(KDMixin, Recipe):
    pass


def _hparams(teacher, augment=True, **extra) -> dict:
    hp = {
        "compute_features": sb.lobes.features.Fbank(n_mels=40),
        "log_softmax": torch.nn.LogSoftmax(dim=-1),
        "teacher_source": str(teacher),
        "kd_weight": 0.5,
        "temperature": 1.0,
        "blank_index": 0,
        "sample_rate": 16000,
        **extra,
    }
    if augment:
        hp["speed_perturb"] = SpeedPerturb(16000, speeds=[90])
        hp["drop_chunk"] = DropChunk(drop_length_low=100, drop_length_high=200)
        hp["wav_augment"] = Augmenter(
            concat_original=True,
            min_augmentations=2,
            max_augmentations=2,
            augmentations=[hp["speed_perturb"], hp["drop_chunk"]],
        )
    return hp


def _brain(cls, teacher, **kw):
    torch.manual_seed(0)
    modules = {"lin": torch.nn.Linear(40, len(ALPHABET) + 1)}
    brain = cls(
        modules=modules,
        opt_class=lambda p: torch.optim.SGD(p, lr=0.01),
        hparams=_hparams(teacher, **kw),
        run_opts={"device": "cpu", "noprogressbar": True},
    )
    brain.init_optimizers()
    return brain


def _batch(words=("HELLO", "A CAT")) -> PaddedBatch:
    tokenizer = make_tokenizer(ALPHABET)
    rows = [
        {
            "id": f"u{i}",
            "sig": whitenoise(1.0 + 0.3 * i, seed=i),
            "wrd": w,
            "tokens": tokenizer.encode_sequence_torch(list(w or " ")),
        }
        for i, w in enumerate(words)
    ]
    return PaddedBatch(rows)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_tiny_sb_model(tmp_path_factory.mktemp("teacher") / "model")


class Recording:
    """Wraps a real target strategy and keeps what it was asked for."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, batch, lengths, student_max, **extra):
        self.calls.append(extra)
        return self.inner(batch, lengths, student_max, **extra)


def _attach(brain, recording=False):
    targets = make_targets(vars(brain.hparams), token_strings(make_tokenizer(ALPHABET)))
    brain.attach_targets(Recording(targets) if recording else targets)
    return brain.kd_targets


def test_live_teacher_hears_the_rows_the_student_heard(teacher):
    brain = _brain(KDRecipe, teacher)
    recording = _attach(brain, recording=True)
    brain.on_stage_start(sb.Stage.TRAIN, 1)
    brain.fit_batch(_batch())
    (extra,) = recording.calls
    wavs, lens = extra["wavs"]
    assert wavs.shape[0] == 4  # concat_original: 2 original rows + 2 augmented
    assert torch.equal(wavs, brain.seen_wavs)  # exactly the audio the student heard, speed perturbation included
    assert "rows" not in extra  # one teacher row per student row
    brain.on_stage_end(sb.Stage.TRAIN, 0.0, 1)
    assert brain.kd_epoch_stats["kd_loss"] > 0


def test_feature_augmentation_repeats_teacher_rows_and_utterances():
    wav_aug = Augmenter(concat_original=True, augmentations=[DropChunk(drop_length_low=10, drop_length_high=20)])
    fea_aug = Augmenter(concat_original=True, augmentations=[SpectrogramDrop(drop_length_low=1, drop_length_high=2)])
    rows = AugmentationRows({"wav_augment": wav_aug, "fea_augment": fea_aug})
    rows.reset(3)
    rows.active = True
    wavs, lens = wav_aug(torch.randn(3, 1600), torch.ones(3))
    fea_aug(torch.randn(wavs.shape[0], 10, 8), lens)
    assert rows.utterance_rows.tolist() == [0, 1, 2] * 4
    assert rows.teacher_rows.tolist() == list(range(6)) * 2  # feature rows reuse the waveform rows' targets
    assert rows.wavs[0].shape[0] == 6 and rows.calls == ["wav_augment", "fea_augment"]


def test_mixin_after_the_brain_in_the_bases_is_refused(teacher):
    class Wrong(Recipe, KDMixin):
        pass

    brain = _brain(Wrong, teacher)
    with pytest.raises(KDSetupError, match=r"put KDMixin FIRST.*class Wrong\(KDMixin"):
        _attach(brain)


def test_kd_weight_without_a_teacher_is_an_error(teacher):
    brain = _brain(KDRecipe, teacher)
    brain.on_stage_start(sb.Stage.TRAIN, 1)
    with pytest.raises(KDSetupError, match="no teacher targets are attached"):
        brain.fit_batch(_batch())


def test_a_fit_batch_that_bypasses_compute_objectives_is_an_error(teacher):
    class Bypass(KDRecipe):
        def fit_batch(self, batch):
            predictions = self.compute_forward(batch, sb.Stage.TRAIN)
            loss = Recipe.compute_objectives(self, predictions, batch, sb.Stage.TRAIN)  # KD left out
            loss.backward()
            self.optimizer.step()
            return loss.detach()

    brain = _brain(Bypass, teacher)
    _attach(brain)
    brain.on_stage_start(sb.Stage.TRAIN, 1)
    with pytest.raises(KDSetupError, match="computed no KD term"):
        brain.fit_batch(_batch())


def test_untranscribed_batch_trains_on_kd_only_and_mixed_batches_are_refused(teacher):
    brain = _brain(KDRecipe, teacher, augment=False)
    _attach(brain)
    brain.on_stage_start(sb.Stage.TRAIN, 1)
    loss = brain.fit_batch(_batch(("", "")))  # the recipe's objective would raise if it saw these
    assert torch.isfinite(loss) and loss > 0
    brain.on_stage_end(sb.Stage.TRAIN, float(loss), 1)
    assert brain.kd_epoch_stats["untranscribed_share"] == 1.0
    assert brain.kd_epoch_stats["ctc_loss"] != brain.kd_epoch_stats["ctc_loss"]  # nan: no CTC batch
    with pytest.raises(KDSetupError, match="mixes 1 untranscribed and 1 transcribed"):
        brain.fit_batch(_batch(("HELLO", "")))


def test_a_wrong_frame_shift_is_named(teacher):
    brain = _brain(KDRecipe, teacher, augment=False, frame_shift=0.01)
    _attach(brain)
    brain.on_stage_start(sb.Stage.TRAIN, 1)
    with pytest.raises(KDSetupError, match=r"about 39.4 ms per frame, but frame_shift is 10.0 ms"):
        brain.fit_batch(_batch())


def test_ctc_outputs_are_found_in_ctc_and_joint_layouts():
    p_ctc = torch.log_softmax(torch.randn(2, 9, 5), -1)
    p_seq = torch.log_softmax(torch.randn(2, 3, 5), -1)
    lens = torch.tensor([1.0, 0.5])
    for layout in ((p_ctc, lens), (p_ctc, lens, None), (p_ctc, p_seq, lens, [[1], [2]])):
        found, found_lens = find_ctc_outputs(layout)
        assert found is p_ctc and found_lens is lens
    assert find_ctc_outputs((p_seq, p_ctc, lens), spec=[1, 2])[0] is p_ctc
    with pytest.raises(OutputLayoutError, match="logits are not accepted"):
        find_ctc_outputs((torch.randn(2, 9, 5), lens))
    with pytest.raises(OutputLayoutError, match="relative lengths"):
        find_ctc_outputs((p_ctc, torch.tensor([90.0, 45.0])))
    with pytest.raises(OutputLayoutError, match=r"output \[0\].*not frame log-probabilities"):
        find_ctc_outputs((torch.randn(2, 9, 5), lens), spec=[0, 1])


@pytest.mark.parametrize("model_type", ["char", "bpe"])
def test_sentencepiece_students(teacher, tmp_path, model_type):
    from speechbrain.tokenizers.SentencePiece import SentencePiece

    words = [
        "THE CAT SAT ON THE MAT",
        "A DOG AND A CAT",
        "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG",
        "WE'LL SEE THE SEA",
    ] * 20
    csv_path = tmp_path / "train.csv"
    with open(csv_path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["ID", "duration", "wav", "spk_id", "wrd"])
        writer.writerows([[f"u{i}", "1.0", "x.flac", "s", w] for i, w in enumerate(words)])
    sp = SentencePiece(
        model_dir=str(tmp_path / "sp"),
        vocab_size=60 if model_type == "bpe" else 31,
        annotation_train=str(csv_path),
        annotation_read="wrd",
        model_type=model_type,
        character_coverage=1.0,
        bos_id=1,
        eos_id=2,
    )
    tokens = token_strings(sp)
    assert tokens[:3] == ["<unk>", "<s>", "</s>"] and len(tokens) == sp.sp.get_piece_size()
    hparams = _hparams(teacher, augment=False, frame_shift=0.04)
    if model_type == "char":
        aligner = make_targets(hparams, tokens).aligner
        assert aligner.vocab.matrix[:, tokens.index("▁")].sum() == 1  # the teacher's space reaches '▁'
    else:
        with pytest.raises(VocabMappingError, match="teacher's units are characters and the student's are subwords"):
            make_targets(hparams, tokens)


def test_kd_weight_outside_zero_one_is_refused(teacher):
    brain = _brain(KDRecipe, teacher, augment=False)
    brain.hparams.kd_weight = 2.0
    with pytest.raises(KDSetupError, match="kd_weight=2.0: must be between 0 and 1"):
        _attach(brain)


@pytest.mark.parametrize(
    ("reduction", "expected"), [("batchmean", "utterance"), ("mean", "frame"), (None, "utterance")]
)
def test_kd_reduction_follows_the_recipes_ctc_loss(teacher, reduction, expected):
    import functools

    extra = {} if reduction is None else {"ctc_cost": functools.partial(sb.nnet.losses.ctc_loss, reduction=reduction)}
    if reduction == "mean":
        extra = {"compute_cost": functools.partial(sb.nnet.losses.ctc_loss, blank_index=0)}  # TIMIT: the default
    brain = _brain(KDRecipe, teacher, augment=False, **extra)
    assert brain.kd_option("kd_reduction") == expected
