"""Untranscribed audio, the parts that need no corpus: batch mixing, CTC masking, padding, confidence."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import speechbrain as sb
import torch
from speechbrain.dataio.sampler import DistributedSamplerWrapper

from speech_kd.data.dataio import collate_readable
from speech_kd.training.ctc_brain import CTCBrain
from speech_kd.training.unlabeled import MixedBatchSampler, teacher_confidence


class _Batches:
    """A batch sampler like SpeechBrain's: ``set_epoch`` reshuffles ``n`` one-index batches from seed + epoch."""

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed, self.batches = n, seed, []
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        self.batches = [[i] for i in order]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return self.n


def _mixed(fraction: float, seed: int = 3) -> MixedBatchSampler:
    return MixedBatchSampler(_Batches(4, seed), _Batches(10, seed), offset=4, unlabeled_fraction=fraction, seed=seed)


def test_mixed_batches_are_homogeneous_and_cover_the_pool_in_turn():
    sampler = _mixed(0.5)
    seen = []
    for epoch in (1, 2):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler) == 4 + 5 and sampler.counts == (4, 5)
        assert sorted(i for b in batches for i in b if i < 4) == [0, 1, 2, 3]  # every transcribed batch, each epoch
        assert all(all(i < 4 for i in b) or all(i >= 4 for i in b) for b in batches)
        seen += [i for b in batches for i in b if i >= 4]
    assert sorted(seen) == list(range(4, 14))  # fraction 0.5: two epochs see every untranscribed batch once
    sampler.set_epoch(3)
    assert sorted(i for b in sampler for i in b if i >= 4) != sorted(seen[:5])  # the next pass, another shuffle


def test_mixed_batches_depend_only_on_seed_and_epoch():
    """What makes a resumed (or DDP) run draw the same batches: a fresh sampler at epoch e equals the old one."""
    old, new = _mixed(2.0), _mixed(2.0)
    for epoch in (1, 2, 3):
        old.set_epoch(epoch)
    new.set_epoch(3)
    assert list(new) == list(old) and new.counts == (4, 20)
    other = _mixed(2.0, seed=4)
    other.set_epoch(3)
    assert list(other) != list(old)
    with pytest.raises(ValueError, match="unlabeled_fraction=0"):
        _mixed(0.0)


def test_mixed_batches_split_between_ddp_processes():
    sampler = _mixed(1.0)
    shares = [DistributedSamplerWrapper(sampler, num_replicas=2, rank=rank, shuffle=False) for rank in (0, 1)]
    for share in shares:
        share.set_epoch(2)
    batches = [b for share in shares for b in share]
    assert sorted(map(tuple, batches)) == sorted(map(tuple, list(sampler)))
    assert sorted(i for b in batches for i in b) == list(range(14))


def _batch(words: list[str]):
    examples = [
        {"id": f"u{i}", "sig": torch.randn(1600), "tokens": torch.arange(1, len(w) + 1), "wrd": w}
        for i, w in enumerate(words)
    ]
    return collate_readable(examples)


def test_untranscribed_only_batch_pads_to_empty_tokens():
    batch = _batch(["", ""])  # SpeechBrain's own padding divides by zero here
    tokens, lengths = batch.tokens
    assert tokens.shape == (2, 0) and lengths.tolist() == [0.0, 0.0]
    assert _batch(["AB", ""]).tokens[1].tolist() == [1.0, 0.0]


def test_ctc_objective_leaves_out_untranscribed_rows():
    brain = SimpleNamespace(hparams=SimpleNamespace(ctc_cost=lambda *a: sb.nnet.losses.ctc_loss(*a, blank_index=0)))
    log_probs = torch.randn(3, 12, 5).log_softmax(-1).requires_grad_()
    wav_lens = torch.tensor([1.0, 0.8, 0.9])
    mixed = _batch(["ABC", "", "AB"])
    loss = CTCBrain.ctc_objective(brain, (log_probs, wav_lens), mixed)
    labelled = _batch(["ABC", "AB"])
    alone = CTCBrain.ctc_objective(brain, (log_probs[[0, 2]], wav_lens[[0, 2]]), labelled)
    assert loss.item() == pytest.approx(alone.item(), rel=1e-6)
    none = CTCBrain.ctc_objective(brain, (log_probs, wav_lens), _batch(["", "", ""]))
    assert none.item() == 0.0 and none.requires_grad


def test_teacher_confidence_ignores_blank_and_padding():
    probs = torch.full((2, 4, 3), 0.05)
    probs[:, :, 0] = 0.9  # blank everywhere ...
    probs[0, 1] = torch.tensor([0.1, 0.6, 0.3])  # ... but one emitted token in utterance 0
    probs[1, 3] = torch.tensor([0.0, 1.0, 0.0])  # a token on utterance 1's padding frame
    scores = teacher_confidence(probs.log(), torch.tensor([4, 3]))
    assert scores.tolist() == pytest.approx([0.6, 0.0])
