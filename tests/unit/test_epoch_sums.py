"""An epoch's running sums (``training.epoch_sums.EpochSums``) and the KD statistics built on them (``kd.stats``)."""

from __future__ import annotations

import logging

import pytest
import torch

from speech_kd.kd.stats import KD_KEYS, KDEpochTotals
from speech_kd.training.epoch_sums import EpochSums


def test_each_key_counts_its_finite_values_of_the_batches_let_through():
    sums = EpochSums(("a", "b"))
    sums.add({"a": torch.tensor(1.0), "b": 4.0})
    sums.add({"a": torch.tensor(3.0)})  # b not given: its count stays
    sums.add({"a": torch.tensor(float("inf")), "b": torch.tensor(2.0)})  # a not finite: only a is left out
    sums.add({"a": torch.tensor(100.0), "b": 100.0}, only_if=torch.tensor(False))  # a skipped update
    assert sums.means() == {"a": 2.0, "b": 3.0}
    totals = sums.combined()
    assert totals.counts == {"a": 2.0, "b": 2.0} and totals.batches == 4
    sums.reset()
    assert sums.means() == {} and sums.combined().batches == 0


def test_a_key_not_declared_up_front_is_refused():
    """The processes' sums are combined as one tensor in declared order: a key met on the way would misalign it."""
    sums = EpochSums(("cr_loss",))
    with pytest.raises(ValueError, match="'kd_loss' is not one of the declared keys"):
        sums.add({"kd_loss": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="declared twice"):
        EpochSums(("a", "a"))


def test_saved_sums_load_into_a_fresh_object(tmp_path):
    sums = EpochSums(("a", "b"))
    sums.add({"a": torch.tensor(1.0), "b": 2.0})
    sums.add({"a": torch.tensor(5.0)})
    sums.save(tmp_path / "sums.ckpt")
    restored = EpochSums(("b", "a", "c"))  # declared keys not saved start at 0; the order is the object's own
    restored.add({"c": 7.0})  # what was summed before the load is replaced
    restored.load(tmp_path / "sums.ckpt")
    assert restored.means() == {"b": 2.0, "a": 3.0} and restored.combined().batches == 2


def test_sums_saved_by_another_number_of_processes_are_not_restored(tmp_path, caplog):
    entry = {"keys": ["a"], "sums": [4.0], "counts": [2.0], "batches": 2}
    torch.save({"processes": [entry, entry]}, tmp_path / "sums.ckpt")
    sums = EpochSums(("a",))
    with caplog.at_level(logging.WARNING):
        sums.load(tmp_path / "sums.ckpt")
    assert sums.means() == {} and "sums of 2 processes, this run has 1" in caplog.text


def test_cr_sums_in_the_first_layout_still_load(tmp_path):
    """``cr_epoch_sums`` of checkpoints written before the class served KD too: sums, then one count per key."""
    torch.save({"processes": [{"keys": ["cr_loss"], "values": [6.0, 3.0]}]}, tmp_path / "cr.ckpt")
    sums = EpochSums(("cr_loss",))
    sums.load(tmp_path / "cr.ckpt")
    assert sums.means() == {"cr_loss": 2.0}


def test_kd_statistics_in_the_layout_kd_saved_before_still_load(tmp_path):
    """``kd_epoch_totals`` as ``KDEpochTotals`` saved it before ``EpochSums`` served it: the sums of its keys, then
    the counted batches (3) and the counted transcribed ones (2, ``ctc_loss``'s)."""
    keys = ["ctc_loss", "kd_loss", "blank_share", "agreement", "lost_mass", "layer_loss"]
    old = {"keys": keys, "values": [4.0, 6.0, 1.5, 1.8, 0.3, 9.0, 3.0, 2.0], "batches": 3}
    torch.save({"processes": [old]}, tmp_path / "kd.ckpt")
    totals = KDEpochTotals()
    totals.load(tmp_path / "kd.ckpt")
    stats = totals.means()
    assert stats["ctc_loss"] == 2.0 and stats["kd_loss"] == 2.0 and stats["layer_loss"] == 3.0
    assert stats["blank_share"] == pytest.approx(0.5) and stats["agreement"] == pytest.approx(0.6)
    assert stats["untranscribed_share"] == pytest.approx(1 / 3)
    # and what it saves now loads the same
    totals.save(tmp_path / "kd_now.ckpt")
    again = KDEpochTotals()
    again.load(tmp_path / "kd_now.ckpt")
    assert again.means() == stats


def test_kd_statistics_count_a_batch_only_when_both_losses_are_finite():
    totals = KDEpochTotals()
    assert totals.means() == {}  # no batch: nothing to log
    totals.add(torch.tensor(2.0), torch.tensor(1.0), {"agreement": torch.tensor(0.4), "lost_mass": 0.0})
    totals.add(torch.tensor(float("nan")), torch.tensor(5.0), {"agreement": torch.tensor(1.0), "lost_mass": 1.0})
    stats = totals.means()
    assert stats["ctc_loss"] == 2.0 and stats["kd_loss"] == 1.0 and stats["agreement"] == pytest.approx(0.4)
    assert stats["lost_mass"] == 0.0 and stats["blank_share"] != stats["blank_share"]  # no batch gave one: NaN
    assert "layer_loss" not in stats and "untranscribed_share" not in stats  # not used / no untranscribed batch
    with pytest.raises(ValueError, match="not one of the declared keys"):
        totals.add(torch.tensor(1.0), torch.tensor(1.0), {"new_number": 1.0})
    assert set(KD_KEYS) >= {"ctc_loss", "kd_loss", "layer_loss"}
