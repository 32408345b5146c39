"""CR-CTC's pieces on tiny tensors: the consistency term, the two views, the option, the bench variants."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from hyperpyyaml import load_hyperpyyaml
from speechbrain.augment.freq_domain import SpectrogramDrop
from speechbrain.nnet.losses import ctc_loss

from speech_kd import hparams_files
from speech_kd.bench.experiments.variants import variant_args
from speech_kd.kd.consistency import (
    ConsistencySetupError,
    CRConfig,
    check_ctc_reduction,
    consistency_loss,
    ctc_reduction,
    two_views,
    view_rows,
)
from speech_kd.nnet.chain import run_chain
from speech_kd.report.plots import learning_curves
from speech_kd.training.settings import ADDED_KEYS, check_run_settings, trains_as_absent


def _log_probs(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.log_softmax(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_consistency_is_zero_for_identical_views_and_positive_otherwise():
    one_view = _log_probs(3, 7, 5)
    assert float(consistency_loss(one_view.repeat(2, 1, 1), torch.ones(6))) == 0.0
    views = torch.cat([one_view, _log_probs(3, 7, 5, seed=1)])
    assert float(consistency_loss(views, torch.ones(6))) > 0.0


def test_consistency_is_the_symmetric_kl_summed_over_frames_divided_by_the_rows():
    a, b = _log_probs(2, 4, 3), _log_probs(2, 4, 3, seed=1)
    lengths = torch.tensor([1.0, 0.5, 1.0, 0.5])  # utterance 1 has 2 of the 4 frames
    frames = torch.tensor([4, 2])

    def kl(p_log, q_log):  # KL(p || q) per frame [B, T]
        return (p_log.exp() * (p_log - q_log)).sum(-1)

    symmetric = kl(a, b) + kl(b, a)
    expected = sum(symmetric[i, : frames[i]].sum() for i in range(2)) / 4  # 2B = 4 rows, as the CTC's batchmean
    assert float(consistency_loss(torch.cat([a, b]), lengths)) == pytest.approx(float(expected), rel=1e-6)
    # padding frames count for nothing
    padded = torch.cat([a, b]).clone()
    padded[1, 2:], padded[3, 2:] = _log_probs(2, 3, seed=5), _log_probs(2, 3, seed=6)
    assert float(consistency_loss(padded, lengths)) == pytest.approx(float(expected), rel=1e-6)


def test_each_direction_trains_only_the_view_that_is_not_its_target():
    """KL(stopgrad(p_a) || p_b) + KL(stopgrad(p_b) || p_a): the gradient is that of each row against a constant."""
    logits = torch.randn(4, 3, 5, requires_grad=True)
    consistency_loss(torch.log_softmax(logits, -1), torch.ones(4)).backward()
    constant = torch.log_softmax(logits.detach(), -1)
    swapped = torch.cat([constant[2:], constant[:2]])
    reference = logits.detach().clone().requires_grad_(True)
    own = torch.log_softmax(reference, -1)
    (swapped.exp() * (swapped - own)).sum().div(4).backward()
    assert torch.allclose(logits.grad, reference.grad, atol=1e-6)


def test_an_odd_number_of_rows_is_not_two_views():
    with pytest.raises(ValueError, match="two views"):
        consistency_loss(_log_probs(3, 2, 2), torch.ones(3))


def test_two_views_draw_independent_masks_and_leave_the_input_alone():
    torch.manual_seed(0)
    feats = torch.randn(3, 50, 8)
    before = feats.clone()
    views = two_views(feats, SpectrogramDrop(drop_length_low=5, drop_length_high=10, drop_count_low=2, dim=1))
    assert views.shape == (6, 50, 8)
    assert torch.equal(feats, before)  # SpectrogramDrop masks in place: each view gets a copy
    assert not torch.equal(views[:3], views[3:])
    assert view_rows(3).tolist() == [0, 1, 2, 0, 1, 2]


def test_a_chain_hook_may_double_the_rows_with_their_lengths():
    seen = {}

    class Lengths(torch.nn.Module):
        def forward(self, x, lengths):
            seen["lengths"] = lengths
            return x

    lens = torch.tensor([1.0, 0.5])
    out = run_chain(
        {"a": torch.nn.Identity(), "b": Lengths()},
        ["a", "b"],
        torch.zeros(2, 4, 1),
        lens,
        after={"a": lambda x: (torch.cat([x, x]), lens.repeat(2))},
    )
    assert out.shape[0] == 4 and seen["lengths"].tolist() == [1.0, 0.5, 1.0, 0.5]


@pytest.mark.parametrize("value", [-0.1, float("nan"), "high", True])
def test_a_bad_weight_is_refused_naming_the_key(value):
    with pytest.raises(ConsistencySetupError, match="cr_ctc_weight"):
        CRConfig.from_hparams({"cr_ctc_weight": value})


def test_the_ctc_reduction_is_read_from_the_yamls_partial():
    assert ctc_reduction(functools.partial(ctc_loss, blank_index=0, reduction="batchmean")) == "batchmean"
    assert ctc_reduction(functools.partial(ctc_loss, blank_index=0)) == "mean"  # SpeechBrain's default
    assert ctc_reduction(lambda *args: args) is None and ctc_reduction(functools.partial(len)) is None


@pytest.mark.parametrize("reduction", ["mean", "sum", "batch"])
def test_cr_with_a_ctc_not_reduced_as_batchmean_is_refused_in_one_line_naming_the_key(reduction):
    """CR is a per-utterance frame sum averaged over the rows: a CTC divided by its transcript length (mean) would
    make it about frames/tokens times stronger, a summed one 2B times weaker."""
    cost = functools.partial(ctc_loss, blank_index=0, reduction=reduction)
    with pytest.raises(ConsistencySetupError, match=f"ctc_cost has reduction: {reduction} ") as refused:
        check_ctc_reduction(0.2, cost)
    assert "\n" not in str(refused.value) and "reduction: batchmean under ctc_cost" in str(refused.value)
    check_ctc_reduction(0.0, cost)  # CR off: any CTC
    check_ctc_reduction(0.2, functools.partial(ctc_loss, blank_index=0, reduction="batchmean"))
    check_ctc_reduction(0.2, lambda *args: args)  # a user's own loss: cannot be read, taken as batchmean


def test_off_by_default():
    assert not CRConfig().enabled and CRConfig.from_hparams({}).cr_ctc_weight == 0.0


def test_the_cr_variants_and_their_suffixes():
    cr = ["--cr_ctc_weight=0.2", "--spec_augment=True", "--n_time_masks=10"]
    assert variant_args("scratch_cr") == (["--kd_weight=0", "--lr=0.002", *cr], False)  # no teacher: no cache
    assert variant_args("kd_cr") == (cr, True)
    assert variant_args("kd_cr_online") == (cr, False)
    assert variant_args("kd_cr_sp") == ([*cr, "--speed_perturb=True"], False)
    assert variant_args("scratch_cr_sp") == (["--kd_weight=0", "--lr=0.002", *cr, "--speed_perturb=True"], False)
    assert variant_args("scratch_sa") == (["--kd_weight=0", "--lr=0.002", *cr[1:]], False)
    assert variant_args("kd_sa") == (cr[1:], True)


def test_the_report_draws_the_consistency_loss():
    rows = [
        {"epoch": e, "lr": 1e-3, "train": {"loss": 9.0 / e, "cr_loss": 1.0 / e}, "valid": {"loss": 8.0, "WER": 90.0}}
        for e in (1, 2)
    ]
    assert learning_curves(rows)[1:4] == b"PNG"


def test_a_run_folder_older_than_the_key_continues_with_cr_off(tmp_path):
    """A folder whose recorded settings predate cr_ctc_weight trained without CR-CTC: 0 continues it, 0.2 does not."""
    (tmp_path / "save" / "CKPT+1").mkdir(parents=True)
    (tmp_path / "run_settings.json").write_text(json.dumps({"hparams_file": "teacher.yaml", "lr": 0.001}))
    check_run_settings({"output_folder": str(tmp_path), "lr": 0.001, "cr_ctc_weight": 0.0}, "teacher.yaml")
    (tmp_path / "run_settings.json").write_text(json.dumps({"hparams_file": "teacher.yaml", "lr": 0.001}))
    with pytest.raises(ValueError, match=r"cr_ctc_weight '\(unset\)' != 0.2"):
        check_run_settings({"output_folder": str(tmp_path), "lr": 0.001, "cr_ctc_weight": 0.2}, "teacher.yaml")


def test_keys_added_after_folders_were_made_continue_at_the_shipped_yamls_values():
    """The value the shipped yamls give each of ``ADDED_KEYS`` trains as its absence did."""
    for name in ("distill.yaml", "teacher.yaml"):
        text = hparams_files.path(name).read_text()
        loaded = load_hyperpyyaml(text, {"data_folder": "unused", "output_folder": "unused"})
        for key in ADDED_KEYS:
            if key in loaded:
                assert trains_as_absent(key, loaded[key]), (name, key)


@pytest.mark.parametrize("off", [None, {}, "", "off"])
def test_a_folder_older_than_kd_layers_continues_with_any_spelling_of_off(tmp_path, off):
    (tmp_path / "save" / "CKPT+1").mkdir(parents=True)
    before = json.dumps({"hparams_file": "distill.yaml", "lr": 0.001})
    (tmp_path / "run_settings.json").write_text(before)
    check_run_settings({"output_folder": str(tmp_path), "lr": 0.001, "kd_layers": off}, "distill.yaml")
    (tmp_path / "run_settings.json").write_text(before)
    with pytest.raises(ValueError, match=r"kd_layers '\(unset\)' != 'auto'"):
        check_run_settings({"output_folder": str(tmp_path), "lr": 0.001, "kd_layers": "auto"}, "distill.yaml")
