"""The exportable network: normalised fbank frames in, CTC log-probabilities out, exact per utterance in a batch.

A model folder's ``encoder_chain`` (``compute_features, normalize, CNN, enc,
ctc_lin, log_softmax``) is rebuilt from the loaded SpeechBrain modules, with
their trained weights, as one ``torch.nn.Module`` whose inputs and outputs are
plain tensors (what ``torch.onnx.export`` and ``torch.jit.trace`` need):

- the fbank is left out (computed outside by :mod:`speech_kd.deploy.runtime`,
  tested equal to SpeechBrain's ``Fbank``);
- lengths are absolute frame counts (``int64``), not SpeechBrain's relative
  lengths, and the output lengths come out of the graph;
- padding cannot leak into an utterance's frames: SpeechBrain's convolution
  front end pads each sequence's end by reflection, so before every
  convolution block the frames past an utterance's length are refilled with
  that utterance's own reflection (:func:`reflect_past_length`), and the
  front end runs channels-first (:class:`FrontEnd`); the conformer
  masks padded keys and zeroes padded frames before its depth-wise
  convolutions. A padded batch therefore gives each utterance the output it
  gets alone (tested).

Shapes: ``B`` batch, ``T`` fbank frames, ``F`` mel bins, ``T'`` output frames
(``T`` divided by the front end's strides, rounded up), ``V`` tokens.
"""

from __future__ import annotations

import torch

__all__ = [
    "CTCGraph",
    "FrontEnd",
    "SelfAttention",
    "UnsupportedModelError",
    "conv_out_length",
    "reflect_past_length",
    "relative_positions",
    "relative_self_attention",
    "relative_shift",
]


class UnsupportedModelError(ValueError):
    """A model folder whose chain this exporter does not know how to rebuild exactly."""


def conv_out_length(lengths: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """Output frames of SpeechBrain's ``padding="same"`` convolution over ``lengths`` ``[B]`` input frames.

    Stride 1 keeps the length; stride ``s > 1`` pads ``kernel // 2`` frames on each side.

    Example
    -------
    >>> conv_out_length(torch.tensor([7, 8]), kernel=3, stride=2).tolist()
    [4, 4]
    """
    if stride == 1:
        return lengths
    pad = kernel // 2
    return torch.div(lengths + 2 * pad - kernel, stride, rounding_mode="floor") + 1


def reflect_past_length(x: torch.Tensor, lengths: torch.Tensor, frames: int) -> torch.Tensor:
    """The first ``frames`` frames past each utterance's length set to its reflection (``x[L-2], x[L-3], ...``).

    What ``F.pad(..., mode="reflect")`` puts after an utterance that is alone; a convolution reads at most
    ``kernel // 2`` frames past the last valid one, so those are the frames to set (frames further out do not
    reach a valid output). Time is the last dimension.

    Parameters
    ----------
    x : torch.Tensor
        ``[B, ..., T]`` padded frames.
    lengths : torch.Tensor
        ``[B]`` int64 valid frames per utterance (at least 2).
    frames : int
        How many frames past the length to set.

    Returns
    -------
    torch.Tensor
        ``[B, ..., T]``: frame ``L + j`` (``j < frames``) is frame ``max(L - 2 - j, 0)``, other frames unchanged.

    Example
    -------
    >>> x = torch.arange(6.0).view(1, 1, 6)
    >>> reflect_past_length(x, torch.tensor([3]), frames=2).flatten().tolist()
    [0.0, 1.0, 2.0, 1.0, 0.0, 5.0]
    """
    ones = [1] * (x.dim() - 2)
    last = x.shape[-1] - 1
    for j in range(frames):
        inside = lengths + j <= last  # utterances whose frame L + j exists (others: frame T - 1 onto itself)
        target = torch.where(inside, lengths + j, last)
        source = torch.where(inside, torch.clamp(lengths - 2 - j, min=0), last)
        source = source.view(-1, *ones, 1).expand(*x.shape[:-1], 1)
        # one scatter of B frames (a copy of x and B writes), not a comparison of every frame
        x = x.scatter(-1, target.view(-1, *ones, 1).expand(*x.shape[:-1], 1), torch.gather(x, -1, source))
    return x


class FrontEnd(torch.nn.Module):
    """SpeechBrain's ``ConvolutionFrontEnd`` (eval) computed channels-first, ``[B, C, F, T]``, throughout.

    SpeechBrain's ``Conv2d`` transposes ``[B, T, F, C]`` to ``[B, C, F, T]`` and back around every
    convolution and normalises in the first layout; here the tensor stays in the convolution's layout and is
    transposed once at the end (same weights, same reflection padding, same numbers; the transposes were a
    third of the exported student's run time in onnxruntime's profile). Before every block the frames past
    each utterance's length that a convolution reads are set to its reflection (:func:`reflect_past_length`).
    """

    def __init__(self, cnn: torch.nn.Module) -> None:
        super().__init__()
        from speechbrain.nnet.CNN import Conv2d
        from speechbrain.nnet.normalization import LayerNorm

        blocks = list(cnn.values()) if hasattr(cnn, "values") else list(cnn.children())
        self.layers = torch.nn.ModuleList()
        self.kinds: list[list[str]] = []
        for block in blocks:
            if getattr(block, "reduce_conv", None) is not None or not hasattr(block, "convs"):
                raise UnsupportedModelError(f"convolution block {type(block).__name__} (residual, or no convs)")
            layers, kinds = torch.nn.ModuleList(), []
            for module in block.convs.children():
                if isinstance(module, Conv2d):
                    if (
                        module.padding != "same"
                        or module.padding_mode != "reflect"
                        or module.swap
                        or module.skip_transpose
                        or tuple(module.dilation) != (1, 1)
                    ):
                        raise UnsupportedModelError(f"Conv2d padding={module.padding!r}/{module.padding_mode!r}")
                    kinds.append("conv")
                elif isinstance(module, LayerNorm):
                    kinds.append("norm")
                elif isinstance(module, torch.nn.Dropout):
                    kinds.append("skip")
                elif isinstance(module, (torch.nn.LeakyReLU, torch.nn.ReLU, torch.nn.GELU, torch.nn.SiLU)):
                    kinds.append("act")
                else:
                    raise UnsupportedModelError(f"{type(module).__name__} in a convolution block")
                layers.append(module)
            self.layers.append(layers)
            self.kinds.append(kinds)

    def strides(self) -> list[list[tuple[int, int]]]:
        """(kernel, stride) on the time axis of each block's convolutions."""
        return [
            [(int(m.kernel_size[-1]), int(m.stride[-1])) for m, k in zip(layers, kinds) if k == "conv"]
            for layers, kinds in zip(self.layers, self.kinds)
        ]

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [B, T, F]`` normalised fbank -> ``[B, T', F' * C]`` (SpeechBrain's order) and lengths ``[B]``."""
        x = x.transpose(1, 2).unsqueeze(1)  # [B, 1, F, T]
        for layers, kinds, convs in zip(self.layers, self.kinds, self.strides()):
            x = reflect_past_length(x, lengths, frames=max(k // 2 for k, _ in convs))
            for module, kind in zip(layers, kinds):
                if kind == "conv":
                    kernel, stride = module.kernel_size, module.stride
                    pad_t = _same_padding(kernel[-1], stride[-1])
                    pad_f = _same_padding(kernel[-2], stride[-2])
                    x = module.conv(torch.nn.functional.pad(x, pad_t + pad_f, mode="reflect"))
                    lengths = conv_out_length(lengths, kernel[-1], stride[-1])
                elif kind == "norm":  # each frame over (F, C), in place (2 transposes + fused norm: slower)
                    norm = module.norm
                    mean = x.mean(dim=(1, 2), keepdim=True)
                    var = (x - mean).pow(2).mean(dim=(1, 2), keepdim=True)
                    x = (x - mean) / torch.sqrt(var + norm.eps)
                    if norm.weight is not None:
                        x = x * norm.weight.t().unsqueeze(-1) + norm.bias.t().unsqueeze(-1)
                elif kind == "act":
                    x = module(x)
        x = x.permute(0, 3, 2, 1)  # [B, T', F', C]
        return x.reshape(x.shape[0], x.shape[1], -1), lengths


def _same_padding(kernel: int, stride: int) -> list[int]:
    """SpeechBrain's ``get_padding_elem`` for ``padding="same"`` (independent of the input length)."""
    if stride > 1:
        return [kernel // 2, kernel // 2]
    return [(kernel - 1) // 2, (kernel - 1) // 2]


class CTCGraph(torch.nn.Module):
    """``(feats [B, T, F], lengths [B]) -> (log_probs [B, T', V], out_lengths [B])`` of a conformer CTC model.

    Built from the trained SpeechBrain modules themselves (their weights are shared, not copied):
    :meth:`from_encoder` takes a model folder's chain, a recipe's modules are given one by one
    (:mod:`speech_kd.deploy.recipe_folder`).

    Parameters
    ----------
    normalize : torch.nn.Module
        ``InputNormalization`` with ``norm_type: global`` (its running mean and standard deviation are used).
    cnn : torch.nn.Module
        ``ConvolutionFrontEnd`` of plain blocks (``padding="same"``, reflection, no residual).
    enc : torch.nn.Module
        ``EncoderWrapper`` of a ``TransformerASR`` whose encoder is a non-causal conformer with
        ``RelPosMHAXL`` attention.
    ctc_lin : torch.nn.Module
        The output layer (``[B, T', D] -> [B, T', V]``).

    Raises
    ------
    UnsupportedModelError
        Any other module or setting, named.
    """

    def __init__(
        self, normalize: torch.nn.Module, cnn: torch.nn.Module, enc: torch.nn.Module, ctc_lin: torch.nn.Module
    ) -> None:
        super().__init__()
        norm = normalize
        if getattr(norm, "norm_type", None) != "global":
            raise UnsupportedModelError(
                f"{type(norm).__name__} norm_type={getattr(norm, 'norm_type', None)!r} (only global InputNormalization)"
            )
        transformer = getattr(enc, "transformer", None)
        if transformer is None or not hasattr(transformer, "encoder") or not hasattr(transformer, "custom_src_module"):
            raise UnsupportedModelError(f"encoder {type(enc).__name__} (only EncoderWrapper of a TransformerASR)")
        if type(transformer.encoder).__name__ != "ConformerEncoder" or any(
            layer.convolution_module.causal for layer in transformer.encoder.layers
        ):
            raise UnsupportedModelError(f"encoder {type(transformer.encoder).__name__} (only non-causal conformer)")
        if transformer.attention_type != "RelPosMHAXL" or transformer.causal:
            raise UnsupportedModelError(
                f"transformer attention {transformer.attention_type!r} causal="
                f"{transformer.causal} (only non-causal RelPosMHAXL)"
            )
        if not isinstance(ctc_lin, torch.nn.Module) or not any(
            isinstance(m, torch.nn.Linear) for m in ctc_lin.modules()
        ):
            raise UnsupportedModelError(f"output layer {type(ctc_lin).__name__} (only a linear layer)")
        std = norm.glob_std if norm.std_norm else torch.ones_like(norm.glob_std)
        self.register_buffer("mean", norm.glob_mean.detach().clone().float())
        self.register_buffer("std", std.detach().clone().float().clamp(min=norm.epsilon))
        self.front_end = FrontEnd(cnn)
        self.block_convs = self.front_end.strides()
        self.src_module = transformer.custom_src_module
        self.positional_encoding = transformer.positional_encoding
        self.encoder = transformer.encoder
        self.attention = torch.nn.ModuleList(SelfAttention(layer.mha_layer) for layer in self.encoder.layers)
        self.ctc_lin = ctc_lin
        self.eval()

    @classmethod
    def from_encoder(cls, encoder: torch.nn.Module) -> CTCGraph:
        """The graph of a model folder's ``encoder``, as ``EncoderASR.mods.encoder``.

        A ``LengthsCapableSequential`` with ``compute_features``, ``normalize``, ``CNN``, ``enc``, ``ctc_lin``,
        ``log_softmax``; any other chain is an :class:`UnsupportedModelError`.
        """
        names = list(encoder.keys()) if hasattr(encoder, "keys") else [n for n, _ in encoder.named_children()]
        expected = ["compute_features", "normalize", "CNN", "enc", "ctc_lin", "log_softmax"]
        if names != expected:
            raise UnsupportedModelError(f"encoder chain {names}; this exporter rebuilds {expected}")
        return cls(encoder.normalize, encoder.CNN, encoder.enc, encoder.ctc_lin)

    def out_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Output frames ``[B]`` for ``lengths`` ``[B]`` fbank frames."""
        for convs in self.block_convs:
            for kernel, stride in convs:
                lengths = conv_out_length(lengths, kernel, stride)
        return lengths

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probabilities ``[B, T', V]`` and their lengths ``[B]`` (int64) of fbank ``feats [B, T, F]``."""
        x, lengths = self.front_end((feats - self.mean) / self.std, lengths)
        padding = torch.arange(x.shape[1], device=x.device).unsqueeze(0) >= lengths.unsqueeze(1)
        x = self.src_module(x)
        pos_embs = relative_positions(x.shape[1], self.positional_encoding.inv_freq)
        for layer, attention in zip(self.encoder.layers, self.attention):
            x = _conformer_layer(layer, attention, x, padding, pos_embs)
        x = self.encoder.norm(x)
        return torch.log_softmax(self.ctc_lin(x), dim=-1), lengths


def relative_positions(length: int | torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """SpeechBrain's ``RelPosEncXL.make_pe(length)`` (``[1, 2 * length - 1, D]``) without in-place writes.

    ``inv_freq [D / 2]``; row ``i`` is the embedding of distance ``length - 1 - i``: sines and cosines
    interleaved, the same for past and future (cosine is even). Built from ``stack`` instead of strided
    assignments, so the exported graph has no scatter.
    """
    positions = torch.arange(length, dtype=torch.float32, device=inv_freq.device).unsqueeze(-1) * inv_freq
    table = torch.stack([torch.sin(positions), torch.cos(positions)], dim=-1).reshape(positions.shape[0], -1)
    return torch.cat([torch.flip(table, (0,)), table[1:]], dim=0).unsqueeze(0)


def relative_shift(scores: torch.Tensor) -> torch.Tensor:
    """SpeechBrain's ``RelPosMHAXL.rel_shift`` (non-causal) of position scores whose zero column is already there.

    ``rel_shift`` pads the ``[B, H, T', 2T'-1]`` position scores with a zero column on the left, a copy of the
    largest tensor of the attention; computed with a zero position vector in front (``scores [B, H, T', 2T']``,
    first column 0), the product brings that column itself. Returns ``[B, H, T', T']``: query ``i``, key ``j``
    gets the score of distance ``i - j``.

    Example
    -------
    >>> from speechbrain.nnet.attention import RelPosMHAXL
    >>> x = torch.randn(2, 3, 5, 9)
    >>> padded = torch.cat([torch.zeros_like(x[..., :1]), x], dim=-1)
    >>> torch.equal(relative_shift(padded), RelPosMHAXL(8, 2).rel_shift(x))
    True
    """
    batch, heads, frames, width = scores.shape
    shifted = scores.reshape(batch, heads, width, frames)[:, :, 1:]  # the first row dropped, as rel_shift does
    return shifted.reshape(batch, heads, frames, width - 1)[..., :frames]


#: added to the attention scores of padded keys (exp of it is 0 in float32; finite, so no inf * 0 = NaN)
MASKED_SCORE = -1e9


def relative_self_attention(
    mha: torch.nn.Module, x: torch.Tensor, padding: torch.Tensor, pos_embs: torch.Tensor
) -> torch.Tensor:
    """SpeechBrain's ``RelPosMHAXL`` self-attention (eval, no ``attn_mask``) with the key padding in the product.

    SpeechBrain fills padded keys' scores with ``-inf`` before the softmax and zeroes their weights after it:
    two ``Where`` passes over the ``[B, H, T', T']`` scores, a tenth of the exported student's run time. Here
    each query gets one more component, ``1``, and each key ``0`` (valid) or :data:`MASKED_SCORE` (padded),
    so the score matrix product adds the mask itself (padded keys get weight 0 from the softmax, as in
    SpeechBrain). ``x [B, T', D]``, ``padding [B, T']``, ``pos_embs [1, 2T'-1, D]``; returns ``[B, T', D]``.
    """
    batch, frames, _ = x.shape
    heads, head_dim = mha.num_heads, mha.head_dim
    query, key, value = (
        torch.nn.functional.linear(x, mha.in_proj_weight).view(batch, frames, heads, head_dim * 3).chunk(3, dim=-1)
    )
    if mha.vbias is not None:
        value = value + mha.value_bias_weight.view(1, 1, heads, mha.vhead_dim)
    p_k = mha.linear_pos(pos_embs).view(1, -1, heads, head_dim).permute(0, 2, 3, 1)  # [1, H, d, 2T'-1]
    p_k = torch.cat([torch.zeros_like(p_k[..., :1]), p_k], dim=-1)  # [1, H, d, 2T']: relative_shift's zero column
    q_u = ((query + mha.pos_bias_u.view(1, 1, heads, head_dim)) * mha.scale).transpose(1, 2)  # [B, H, T', d]
    q_v = ((query + mha.pos_bias_v.view(1, 1, heads, head_dim)) * mha.scale).transpose(1, 2)
    key_bias = (padding.to(x.dtype) * MASKED_SCORE).view(batch, 1, 1, frames).expand(batch, heads, 1, frames)
    q_u = torch.cat([q_u, torch.ones_like(q_u[..., :1])], dim=-1)  # [B, H, T', d + 1]
    keys = torch.cat([key.permute(0, 2, 3, 1), key_bias], dim=2)  # [B, H, d + 1, T']
    scores = torch.matmul(q_u, keys) + relative_shift(torch.matmul(q_v, p_k))
    weights = torch.softmax(scores, dim=-1)
    out = torch.matmul(weights, value.transpose(1, 2)).transpose(1, 2).reshape(batch, frames, -1)
    return mha.out_proj(out)


class SelfAttention(torch.nn.Module):
    """:func:`relative_self_attention` of one ``RelPosMHAXL`` as a module (its nodes keep a name in the graph)."""

    def __init__(self, mha: torch.nn.Module) -> None:
        super().__init__()
        self.mha = mha

    def forward(self, x: torch.Tensor, padding: torch.Tensor, pos_embs: torch.Tensor) -> torch.Tensor:
        """``x [B, T', D]``, ``padding [B, T']``, ``pos_embs [1, 2T'-1, D]`` -> ``[B, T', D]``."""
        return relative_self_attention(self.mha, x, padding, pos_embs)


def _conformer_layer(
    layer: torch.nn.Module, attention: torch.nn.Module, x: torch.Tensor, padding: torch.Tensor, pos_embs: torch.Tensor
) -> torch.Tensor:
    """SpeechBrain's ``ConformerEncoderLayer.forward`` (eval) with padded frames zeroed before the depth-wise conv.

    SpeechBrain masks the convolution module's output only, so its depth-wise
    convolution reads the padded frames' values into an utterance's last
    frames; alone, the utterance would see zeros there. ``x [B, T', D]``,
    ``padding [B, T']`` (True past the length), ``pos_embs [1, 2T'-1, D]``.
    """
    x = x + 0.5 * layer.ffn_module1(x)
    x = x + attention(layer.norm1(x), padding, pos_embs)
    conv = layer.convolution_module
    y = conv.bottleneck(conv.layer_norm(x).transpose(1, 2))
    y = conv.conv(y.masked_fill(padding.unsqueeze(1), 0.0)).transpose(1, 2)
    x = x + conv.after_conv(y).masked_fill(padding.unsqueeze(2), 0.0)
    return layer.norm2(x + 0.5 * layer.ffn_module2(x))
