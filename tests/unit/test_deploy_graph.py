"""The exported network's building blocks against what SpeechBrain computes for one utterance alone."""

from __future__ import annotations

import torch
from speechbrain.nnet.attention import RelPosMHAXL

from speech_kd.deploy.graph import reflect_past_length, relative_positions, relative_self_attention


def test_reflect_past_length_is_reflection_padding_of_each_utterance_alone():
    """Every utterance, cut to its length and reflection-padded alone, reads what the batch holds past its end."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 9)
    lengths = torch.tensor([9, 8, 5, 3])  # full, one frame short, shorter, the shortest 2 reflected frames allow
    for frames in (1, 2):
        got = reflect_past_length(x, lengths, frames)
        for i, n in enumerate(lengths.tolist()):
            alone = torch.nn.functional.pad(x[i, ..., :n], (0, frames), mode="reflect")
            keep = min(n + frames, x.shape[-1])
            assert torch.equal(got[i, ..., :keep], alone[..., :keep])
            assert torch.equal(got[i, ..., keep:], x[i, ..., keep:])  # frames no convolution reads: unchanged


def test_relative_self_attention_is_speechbrains_with_padded_keys():
    torch.manual_seed(0)
    mha = RelPosMHAXL(embed_dim=16, num_heads=4).eval()
    x = torch.randn(3, 7, 16)
    lengths = torch.tensor([7, 4, 1])
    padding = torch.arange(7)[None] >= lengths[:, None]
    pos_embs = relative_positions(7, 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16)))
    with torch.no_grad():
        ours = relative_self_attention(mha, x, padding, pos_embs)
        theirs, _ = mha(x, x, x, pos_embs=pos_embs, key_padding_mask=padding)
    for i, n in enumerate(lengths.tolist()):
        assert torch.allclose(ours[i, :n], theirs[i, :n], atol=1e-6)


def test_run_groups_covers_every_utterance_once_within_the_budget():
    """Each utterance in one group; groups longest first, padded size within the budget unless one is longer."""
    from speech_kd.deploy.runtime import run_groups

    lengths = [120, 700, 95, 430, 430, 2000, 60, 310]
    groups = run_groups(lengths, budget=900)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for group in groups:
        longest = max(lengths[i] for i in group)
        assert lengths[group[0]] == longest  # longest first: the group's padded length
        assert longest * len(group) <= 900 or len(group) == 1  # 2000 frames run alone
    order = [lengths[g[0]] for g in groups]
    assert order == sorted(order, reverse=True)
    assert run_groups([], budget=900) == []
