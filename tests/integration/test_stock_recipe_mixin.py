"""KDMixin wrapped around a minimal CTC Brain, step by step: the KD mix, a frozen teacher kept out of checkpoints.

``StockASR`` is a CTC Brain reduced to its core (compute_forward returns
``(p_ctc, wav_lens)``; compute_objectives returns the CTC loss). The README's
lines applied to whole SpeechBrain-shaped recipes run through ``fit()`` are in
``test_recipe_lines.py``.
"""

from __future__ import annotations

import speechbrain as sb
import torch
from hyperpyyaml import load_hyperpyyaml

from speech_kd import KDMixin, make_targets, token_strings  # (1)
from speech_kd.data.dataio import load_dataset, make_tokenizer
from speech_kd.data.prepare import prepare_librispeech
from tests.conftest import REPO, TINY_MODEL


class StockASR(sb.Brain):
    def compute_forward(self, batch, stage):
        batch = batch.to(self.device)
        wavs, wav_lens = batch.sig
        feats = self.modules.compute_features(wavs)
        feats = self.modules.normalize(feats, wav_lens)
        x = self.modules.CNN(feats)
        x = self.modules.enc(x, wav_lens)
        logits = self.modules.ctc_lin(x)
        p_ctc = self.hparams.log_softmax(logits)
        return p_ctc, wav_lens

    def compute_objectives(self, predictions, batch, stage):
        p_ctc, wav_lens = predictions
        tokens, tokens_lens = batch.tokens
        return self.hparams.ctc_cost(p_ctc, tokens, wav_lens, tokens_lens)


class KDStockASR(KDMixin, StockASR):  # (2)
    pass


def _setup(tiny_corpus, tmp_path, teacher, kd_weight):
    overrides = {a[2:].split("=")[0]: float(a.split("=")[1]) if "." in a else int(a.split("=")[1]) for a in TINY_MODEL}
    hparams = load_hyperpyyaml(
        (REPO / "hparams/teacher.yaml").read_text(),
        {"data_folder": str(tiny_corpus), "output_folder": str(tmp_path), **overrides, "dropout": 0.0},
    )
    # the keys a user adds to their recipe's yaml (frame_shift and sample_rate are already there)
    hparams.update(teacher_source=str(teacher), kd_weight=kd_weight, temperature=2.0)
    tokenizer = make_tokenizer(hparams["alphabet"])
    csv = prepare_librispeech(tiny_corpus, tmp_path, splits=["train"]).csv_files["train"]
    batch = next(
        iter(sb.dataio.dataloader.make_dataloader(load_dataset(csv, tokenizer, sorting="ascending"), batch_size=4))
    )
    return hparams, tokenizer, batch


def test_three_lines_add_kd_to_a_stock_recipe(trained_run, tiny_corpus, tmp_path):
    teacher = trained_run / "model"
    hparams, tokenizer, batch = _setup(tiny_corpus, tmp_path, teacher, kd_weight=0.5)
    torch.manual_seed(0)
    brain = KDStockASR(
        modules=hparams["modules"],
        opt_class=hparams["opt_class"],
        hparams=hparams,
        run_opts={"device": "cpu"},
        checkpointer=hparams["checkpointer"],
    )
    brain.attach_targets(make_targets(hparams, token_strings(tokenizer)))  # (3)
    brain.on_fit_start()
    brain.on_stage_start(sb.Stage.TRAIN, 1)

    teacher_model = brain.kd_targets.teacher
    before = {k: v.clone() for k, v in teacher_model.state_dict().items()}
    predictions = brain.compute_forward(batch, sb.Stage.TRAIN)
    ctc_only = StockASR.compute_objectives(brain, predictions, batch, sb.Stage.TRAIN)
    mixed = brain.compute_objectives(predictions, batch, sb.Stage.TRAIN)
    stats = brain.kd_stats()
    assert torch.isfinite(mixed) and stats["kd_loss"] > 0
    assert not torch.allclose(mixed, ctc_only)
    assert torch.allclose(mixed, 0.5 * ctc_only + 0.5 * torch.tensor(stats["kd_loss"]), rtol=1e-4)

    for _ in range(3):
        brain.fit_batch(batch)
    for name, value in teacher_model.state_dict().items():
        assert torch.equal(value, before[name]), f"teacher weight {name} changed"
    assert all(not p.requires_grad for p in teacher_model.parameters())
    # the teacher is not a module of the Brain: not DDP-wrapped, not checkpointed
    assert not any(m is teacher_model for m in brain.modules.values())
    brain.checkpointer.save_checkpoint()
    saved = {p.name for p in next((tmp_path / "save").glob("CKPT+*")).iterdir()}
    assert not any("teacher" in name for name in saved)


def test_kd_weight_zero_is_the_plain_recipe(trained_run, tiny_corpus, tmp_path):
    hparams, tokenizer, batch = _setup(tiny_corpus, tmp_path, trained_run / "model", kd_weight=0.0)
    brain = KDStockASR(
        modules=hparams["modules"], opt_class=hparams["opt_class"], hparams=hparams, run_opts={"device": "cpu"}
    )
    brain.on_stage_start(sb.Stage.TRAIN, 1)
    predictions = brain.compute_forward(batch, sb.Stage.TRAIN)
    assert torch.equal(
        brain.compute_objectives(predictions, batch, sb.Stage.TRAIN),
        StockASR.compute_objectives(brain, predictions, batch, sb.Stage.TRAIN),
    )
