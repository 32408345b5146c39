"""CR-CTC with real SpeechBrain on the tiny corpus: two views per utterance, alone and with KD.

The Brains are built from the package's yamls (tiny model overrides); the batches are the tiny
synthesised corpus's first training utterances.
"""

from __future__ import annotations

import copy
import functools
import json

import pytest
import speechbrain as sb
import torch
from hyperpyyaml import load_hyperpyyaml
from speechbrain.augment.augmenter import Augmenter
from speechbrain.augment.freq_domain import SpectrogramDrop
from speechbrain.augment.time_domain import AddNoise
from speechbrain.dataio.batch import PaddedData
from speechbrain.nnet.losses import ctc_loss

from speech_kd import KDMixin, make_targets, token_strings
from speech_kd.cli import run
from speech_kd.data.dataio import load_dataset, make_tokenizer
from speech_kd.data.prepare import prepare_librispeech
from speech_kd.kd.config import KDSetupError
from speech_kd.kd.consistency import ConsistencySetupError, consistency_loss
from speech_kd.nnet.chain import run_chain
from speech_kd.testing import make_tiny_sb_model
from speech_kd.training.ctc_brain import CTCBrain
from speech_kd.training.distill_brain import DistillBrain
from tests.conftest import REPO, TINY_MODEL
from tests.integration.test_training import _overrides

TEACHER = REPO / "hparams/teacher.yaml"
DISTILL = REPO / "hparams/distill.yaml"


@pytest.fixture(scope="module")
def batches(tiny_corpus, tmp_path_factory):
    """A transcribed batch of 3 utterances of the tiny corpus, and the same batch without transcripts."""
    folder = tmp_path_factory.mktemp("cr_data")
    csv = prepare_librispeech(tiny_corpus, folder, splits=["train"]).csv_files["train"]
    data = load_dataset(csv, make_tokenizer(" 'ABCDEFGHIJKLMNOPQRSTUVWXYZ"), sorting="ascending")
    rows = [data[i] for i in range(3)]
    untranscribed = [{**row, "wrd": ""} for row in rows]
    return sb.dataio.batch.PaddedBatch(rows), sb.dataio.batch.PaddedBatch(untranscribed)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_tiny_sb_model(tmp_path_factory.mktemp("cr_teacher") / "model")


def _brain(tmp_path, yaml=TEACHER, cls=CTCBrain, extra_hparams: dict | None = None, **overrides):
    hparams = load_hyperpyyaml(
        yaml.read_text(),
        {
            "data_folder": "unused",
            "output_folder": str(tmp_path),
            **_overrides(TINY_MODEL),
            "speed_perturb": False,
            **overrides,
        },
    )
    hparams.update(extra_hparams or {})
    brain = cls(
        modules=hparams["modules"],
        opt_class=hparams["opt_class"],
        hparams=hparams,
        run_opts={"device": "cpu", "noprogressbar": True},
        checkpointer=hparams["checkpointer"],
    )
    brain.tokenizer = make_tokenizer(hparams["alphabet"], hparams["blank_index"])
    brain.modules.train()
    return brain


def _train_loss(brain, batch) -> tuple[torch.Tensor, tuple]:
    predictions = brain.compute_forward(batch, sb.Stage.TRAIN)
    return brain.compute_objectives(predictions, batch, sb.Stage.TRAIN), predictions


def test_with_cr_ctc_weight_0_the_loss_is_the_plain_ctc_of_one_view(tmp_path, batches):
    """The default draws and computes exactly what a run without CR-CTC did: the recipe's CTC of one view."""
    brain = _brain(tmp_path, spec_augment=True)
    batch = batches[0]
    torch.manual_seed(3)
    loss, (log_probs, lens) = _train_loss(brain, batch)
    assert log_probs.shape[0] == 3 and brain.output_rows is None and brain.consistency_term is None

    hp = brain.hparams
    torch.manual_seed(3)  # the same draws (SpecAugment, dropout) as the Brain's forward
    wavs, wav_lens = batch.sig
    table = {**{name: brain.modules[name] for name in brain.modules}, "log_softmax": hp.log_softmax}
    reference = run_chain(
        table,
        hp.encoder_chain,
        wavs,
        wav_lens,
        after={"normalize": lambda feats: hp.spec_augment_freq(hp.spec_augment_time(feats))},
        epoch=hp.epoch_counter.current,
    )
    expected = hp.ctc_cost(reference, batch.tokens[0], wav_lens, batch.tokens[1])
    assert torch.equal(log_probs, reference)
    assert torch.equal(loss, expected)


def test_two_views_consistency_is_zero_when_they_are_identical_and_positive_otherwise(tmp_path, batches):
    batch = batches[0]
    no_masks = {"drop_length_low": 0, "drop_length_high": 1, "drop_count_low": 0, "drop_count_high": 0}
    same = _brain(tmp_path / "same", spec_augment=True, cr_ctc_weight=0.2)
    same.hparams.spec_augment_time = SpectrogramDrop(**no_masks, dim=1)  # SpecAugment that masks nothing
    same.hparams.spec_augment_freq = SpectrogramDrop(**no_masks, dim=2)
    for name in ("CNN", "enc"):  # and no dropout (normalize keeps collecting its statistics): the same numbers
        same.modules[name].eval()
    loss, (log_probs, lens) = _train_loss(same, batch)
    assert log_probs.shape[0] == 6 and same.output_rows.tolist() == [0, 1, 2, 0, 1, 2]
    assert float(same.consistency_term.detach()) == pytest.approx(0.0, abs=1e-6)

    brain = _brain(tmp_path / "masked", spec_augment=True, cr_ctc_weight=0.2)
    torch.manual_seed(0)
    loss, (log_probs, lens) = _train_loss(brain, batch)
    consistency = consistency_loss(log_probs, lens)
    assert float(consistency.detach()) > 0.0
    # loss = CTC of the 2B rows (batchmean: the mean of the two views) + cr_ctc_weight * CR
    tokens, token_lens = batch.tokens
    ctc = brain.hparams.ctc_cost(log_probs, tokens.repeat(2, 1), lens, token_lens.repeat(2))
    assert float(loss.detach()) == pytest.approx(float((ctc + 0.2 * consistency).detach()), rel=1e-6)
    assert torch.equal(lens, batch.sig[1].repeat(2))
    # dev and test keep one view
    with torch.no_grad():
        valid = brain.compute_forward(batch, sb.Stage.VALID)
    assert valid[0].shape[0] == 3 and brain.output_rows is None


def test_cr_without_feature_augmentation_is_refused_in_one_line(tmp_path, tiny_corpus, capsys):
    brain = _brain(tmp_path / "brain", spec_augment=False, cr_ctc_weight=0.2)
    with pytest.raises(ConsistencySetupError, match="spec_augment: True"):
        brain.on_fit_start()
    argv = [
        "train",
        str(TEACHER),
        f"--data_folder={tiny_corpus}",
        f"--output_folder={tmp_path / 'run'}",
        "--number_of_epochs=1",
        "--spec_augment=False",
        "--cr_ctc_weight=0.2",
        *TINY_MODEL,
    ]
    assert run(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "ConsistencySetupError" in err and "--spec_augment=True" in err
    assert not (tmp_path / "run" / "history.jsonl").exists()  # refused before the first batch


def test_cr_with_the_ctc_at_reduction_mean_is_refused_before_the_first_batch(tmp_path):
    """ctc_cost at reduction: mean divides each utterance's CTC by its transcript length: the consistency term (a
    frame sum per utterance) would weigh about frames/tokens times more than cr_ctc_weight says."""
    brain = _brain(tmp_path / "brain", spec_augment=True, cr_ctc_weight=0.2)
    brain.hparams.ctc_cost = functools.partial(ctc_loss, blank_index=brain.hparams.blank_index, reduction="mean")
    with pytest.raises(ConsistencySetupError, match="ctc_cost has reduction: mean"):
        brain.on_fit_start()
    brain.hparams.cr_ctc_weight = 0.0  # without CR the recipe's CTC is the recipe's business
    brain.check_consistency_setup()


def _history(out) -> list[dict]:
    return [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]


def test_one_epoch_of_train_and_of_distill_log_the_consistency_loss(tiny_corpus, tmp_path, teacher):
    common = [
        f"--data_folder={tiny_corpus}",
        "--number_of_epochs=1",
        "--cr_ctc_weight=0.2",
        "--spec_augment=True",
        *TINY_MODEL,
    ]
    out = tmp_path / "train"
    assert run(["train", str(TEACHER), f"--output_folder={out}", *common]) == 0
    train = _history(out)[-1]["train"]
    assert train["cr_loss"] > 0
    assert "cr_loss" in (out / "train_log.txt").read_text()

    out = tmp_path / "distill"
    argv = ["distill", str(DISTILL), f"--output_folder={out}", f"--teacher_source={teacher}"]
    assert run([*argv, "--report_after_run=False", *common]) == 0
    train = _history(out)[-1]["train"]
    assert train["cr_loss"] > 0 and train["kd_loss"] > 0 and train["ctc_loss"] > 0
    log = (out / "train_log.txt").read_text()
    assert "cr_loss" in log and "kd_loss" in log
    assert json.loads((out / "kd_run.json").read_text())["cr_ctc_weight"] == 0.2


class Recording:
    """Wraps a real target strategy and keeps what it was asked for and what it gave."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, batch, lengths, student_max, **extra):
        targets = self.inner(batch, lengths, student_max, **extra)
        self.calls.append((extra, targets))
        return targets


def test_with_kd_both_views_read_their_utterances_targets_and_cr_keeps_its_weight(tmp_path, batches, teacher):
    """Transcribed batch: 2B rows, each view against the same teacher targets (teacher run once on B utterances);
    loss = (1 - w) CTC + w KD + cr_ctc_weight CR. Untranscribed batch: one view, KD only."""
    brain = _brain(
        tmp_path, yaml=DISTILL, cls=DistillBrain, spec_augment=True, cr_ctc_weight=0.2, teacher_source=teacher
    )
    recording = Recording(make_targets(vars(brain.hparams), token_strings(brain.tokenizer)))
    brain.attach_targets(recording)
    weight = brain.kd_schedule()[0]
    batch, untranscribed = batches
    torch.manual_seed(0)
    loss, predictions = _train_loss(brain, batch)

    (extra, targets), *_ = recording.calls
    assert extra["rows"].tolist() == [0, 1, 2, 0, 1, 2]
    assert extra["features"].feats.shape[0] == 3  # the teacher heard the 3 utterances once
    assert torch.equal(targets.log_probs[:3], targets.log_probs[3:])
    assert predictions[0].shape[0] == 6

    consistency = brain.consistency_term
    ctc = brain.ctc_objective(predictions, batch)
    kd, _ = brain.kd_term(predictions, batch, brain.kd_schedule()[1])
    expected = (1 - weight) * ctc + weight * kd + consistency
    consistency, loss, expected = (float(x.detach()) for x in (consistency, loss, expected))
    assert consistency > 0 and loss == pytest.approx(expected, rel=1e-5)
    assert consistency == pytest.approx(0.2 * float(consistency_loss(*predictions).detach()), rel=1e-6)

    loss, predictions = _train_loss(brain, untranscribed)
    assert predictions[0].shape[0] == 3 and brain.output_rows is None and brain.consistency_term is None


def test_a_recipe_brain_without_two_views_is_refused(teacher):
    class Recipe(KDMixin, sb.Brain):
        pass

    with pytest.raises(ConsistencySetupError, match="does not make"):
        Recipe(modules={}, hparams={"cr_ctc_weight": 0.2, "teacher_source": teacher}, run_opts={"device": "cpu"})


class AugmentingDistill(DistillBrain):
    """A Brain on DistillBrain that augments as SpeechBrain recipes do: an ``Augmenter`` (``rows_augment``) adds rows
    to the waveforms before the forward, its labels replicated with them; CTCBrain then makes two views of each row.
    With ``views_of_utterances`` it (wrongly) makes the views of the batch's utterances, not of the augmented rows."""

    views_of_utterances = False

    def compute_forward(self, batch, stage):
        self.rows_batch = batch
        if stage == sb.Stage.TRAIN:
            augment = self.hparams.rows_augment
            wavs, lens = augment(*batch.sig)
            utterances = augment.replicate_labels(torch.arange(len(batch.id)))
            if not self.views_of_utterances:
                self.rows_batch = copy.copy(batch)
                self.rows_batch.sig = PaddedData(wavs, lens)
                self.rows_batch.tokens = PaddedData(*(x[utterances] for x in batch.tokens))
                self.rows_batch.wrd = [batch.wrd[i] for i in utterances.tolist()]
        return super().compute_forward(self.rows_batch, stage)

    def ctc_objective(self, predictions, batch):
        return super().ctc_objective(predictions, self.rows_batch)


def test_with_an_augmenter_that_adds_rows_the_views_read_the_targets_of_their_rows_utterances(
    tmp_path, batches, teacher
):
    """Augmenter rows first (3 utterances -> 6 rows: originals + noisy copies), then CR-CTC's two views of each
    (12 rows): KD reads each row's utterance's targets, the two row maps composed (was: "cannot tell which utterance
    each row is")."""
    augment = Augmenter(
        concat_original=True, min_augmentations=1, max_augmentations=1, augmentations=[AddNoise(snr_low=0, snr_high=5)]
    )
    brain = _brain(
        tmp_path / "composed",
        yaml=DISTILL,
        cls=AugmentingDistill,
        extra_hparams={"rows_augment": augment},
        spec_augment=True,
        cr_ctc_weight=0.2,
        teacher_source=teacher,
    )
    recording = Recording(make_targets(vars(brain.hparams), token_strings(brain.tokenizer)))
    brain.attach_targets(recording)
    batch = batches[0]
    torch.manual_seed(0)
    loss, predictions = _train_loss(brain, batch)

    utterances = augment.replicate_labels(torch.arange(3))
    assert utterances.shape[0] == 6 and predictions[0].shape[0] == 12
    (extra, targets), *_ = recording.calls
    assert extra["rows"].tolist() == utterances.repeat(2).tolist()  # row r of view a or b: utterance of row r
    assert "wavs" not in extra and "features" not in extra  # noise keeps time: the teacher heard the 3 clean utterances
    first_row = {}  # every row of an utterance gets the same targets
    for row, utterance in enumerate(extra["rows"].tolist()):
        assert torch.equal(targets.log_probs[row], targets.log_probs[first_row.setdefault(utterance, row)])
    assert torch.isfinite(loss) and float(brain.consistency_term.detach()) > 0

    brain.views_of_utterances = True  # views of the 3 utterances while the Augmenter made 6 rows: refused
    with pytest.raises(KDSetupError, match=r"two views of 3, but the Augmenter \(rows_augment\) gave 6 rows"):
        _train_loss(brain, batch)
