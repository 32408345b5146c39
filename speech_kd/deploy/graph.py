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
  that utterance's own reflection (:func:`reflect_past_length`); the conformer
  masks padded keys and zeroes padded frames before its depth-wise
  convolutions. A padded batch therefore gives each utterance the output it
  gets alone (tested).

Shapes: ``B`` batch, ``T`` fbank frames, ``F`` mel bins, ``T'`` output frames
(``T`` divided by the front end's strides, rounded up), ``V`` tokens.
"""

from __future__ import annotations

import torch

__all__ = ["CTCGraph", "UnsupportedModelError", "reflect_past_length", "conv_out_length"]


class UnsupportedModelError(ValueError):
    """A model folder whose chain this exporter does not know how to rebuild exactly."""


def reflect_past_length(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Frames past each utterance's length replaced by its reflection (``x[L-2], x[L-3], ...``).

    Parameters
    ----------
    x : torch.Tensor
        ``[B, T, ...]`` padded frames.
    lengths : torch.Tensor
        ``[B]`` int64 valid frames per utterance (at least 2).

    Returns
    -------
    torch.Tensor
        ``[B, T, ...]``: frame ``t >= L`` is frame ``max(2L - 2 - t, 0)`` of the same utterance, which is what
        ``F.pad(..., mode="reflect")`` puts after the utterance when it is alone.

    Example
    -------
    >>> x = torch.arange(5.0).view(1, 5, 1)
    >>> reflect_past_length(x, torch.tensor([3])).flatten().tolist()
    [0.0, 1.0, 2.0, 1.0, 0.0]
    """
    steps = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
    ends = lengths.unsqueeze(1)
    index = torch.where(steps < ends, steps, torch.clamp(2 * ends - 2 - steps, min=0))
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    picked = torch.gather(flat, 1, index.unsqueeze(2).expand(-1, -1, flat.shape[2]))
    return picked.reshape(x.shape)


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


def _front_end_blocks(cnn: torch.nn.Module) -> list[tuple[torch.nn.Module, list[tuple[int, int]]]]:
    """Each block of a ``ConvolutionFrontEnd`` with the (kernel, stride) of its time convolutions."""
    from speechbrain.nnet.CNN import Conv2d

    blocks = list(cnn.values()) if hasattr(cnn, "values") else list(cnn.children())
    out = []
    for block in blocks:
        convs = [m for m in block.modules() if isinstance(m, Conv2d)]
        if not convs or getattr(block, "reduce_conv", None) is not None or getattr(block, "residual", False):
            raise UnsupportedModelError(f"convolution block {type(block).__name__} (residual or without Conv2d)")
        times = []
        for conv in convs:
            if conv.padding != "same" or conv.padding_mode != "reflect" or conv.dilation[0] != 1:
                raise UnsupportedModelError(f"Conv2d with padding={conv.padding!r}/{conv.padding_mode!r}")
            times.append((conv.kernel_size[0], conv.stride[0]))
        out.append((block, times))
    return out


class CTCGraph(torch.nn.Module):
    """``(feats [B, T, F], lengths [B]) -> (log_probs [B, T', V], out_lengths [B])`` of a model folder's chain.

    Parameters
    ----------
    encoder : torch.nn.Module
        The loaded folder's ``encoder`` (``LengthsCapableSequential`` with ``normalize``, ``CNN``, ``enc``,
        ``ctc_lin``, ``log_softmax``), as ``EncoderASR.mods.encoder``.
    """

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        names = list(encoder.keys()) if hasattr(encoder, "keys") else [n for n, _ in encoder.named_children()]
        expected = ["compute_features", "normalize", "CNN", "enc", "ctc_lin", "log_softmax"]
        if names != expected:
            raise UnsupportedModelError(f"encoder chain {names}; this exporter rebuilds {expected}")
        norm = encoder.normalize
        if norm.norm_type != "global":
            raise UnsupportedModelError(f"InputNormalization norm_type={norm.norm_type!r} (only 'global')")
        transformer = encoder.enc.transformer
        if type(transformer.encoder).__name__ != "ConformerEncoder" or any(
            layer.convolution_module.causal for layer in transformer.encoder.layers
        ):
            raise UnsupportedModelError(f"encoder {type(transformer.encoder).__name__} (only non-causal conformer)")
        if transformer.attention_type != "RelPosMHAXL" or transformer.causal:
            raise UnsupportedModelError(f"transformer attention {transformer.attention_type!r} causal="
                                        f"{transformer.causal} (only non-causal RelPosMHAXL)")  # fmt: skip
        std = norm.glob_std if norm.std_norm else torch.ones_like(norm.glob_std)
        self.register_buffer("mean", norm.glob_mean.detach().clone().float())
        self.register_buffer("std", std.detach().clone().float().clamp(min=norm.epsilon))
        self.blocks = torch.nn.ModuleList()
        self.block_convs: list[list[tuple[int, int]]] = []
        for block, convs in _front_end_blocks(encoder.CNN):
            self.blocks.append(block)
            self.block_convs.append(convs)
        self.src_module = transformer.custom_src_module
        self.positional_encoding = transformer.positional_encoding
        self.encoder = transformer.encoder
        self.ctc_lin = encoder.ctc_lin
        self.eval()

    def out_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Output frames ``[B]`` for ``lengths`` ``[B]`` fbank frames."""
        for convs in self.block_convs:
            for kernel, stride in convs:
                lengths = conv_out_length(lengths, kernel, stride)
        return lengths

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probabilities ``[B, T', V]`` and their lengths ``[B]`` (int64) of fbank ``feats [B, T, F]``."""
        x = (feats - self.mean) / self.std
        for block, convs in zip(self.blocks, self.block_convs):
            x = block(reflect_past_length(x, lengths))
            for kernel, stride in convs:
                lengths = conv_out_length(lengths, kernel, stride)
        x = x.reshape(x.shape[0], x.shape[1], -1)
        padding = torch.arange(x.shape[1], device=x.device).unsqueeze(0) >= lengths.unsqueeze(1)
        x = self.src_module(x)
        pos_embs = self.positional_encoding(x)
        for layer in self.encoder.layers:
            x = _conformer_layer(layer, x, padding, pos_embs)
        x = self.encoder.norm(x)
        return torch.log_softmax(self.ctc_lin(x), dim=-1), lengths


def _conformer_layer(layer: torch.nn.Module, x: torch.Tensor, padding: torch.Tensor, pos_embs: torch.Tensor):
    """SpeechBrain's ``ConformerEncoderLayer.forward`` (eval) with padded frames zeroed before the depth-wise conv.

    SpeechBrain masks the convolution module's output only, so its depth-wise
    convolution reads the padded frames' values into an utterance's last
    frames; alone, the utterance would see zeros there. ``x [B, T', D]``,
    ``padding [B, T']`` (True past the length), ``pos_embs [1, 2T'-1, D]``.
    """
    x = x + 0.5 * layer.ffn_module1(x)
    skip = x
    y = layer.norm1(x)
    y, _ = layer.mha_layer(y, y, y, attn_mask=None, key_padding_mask=padding, pos_embs=pos_embs)
    x = y + skip
    conv = layer.convolution_module
    y = conv.bottleneck(conv.layer_norm(x).transpose(1, 2))
    y = conv.conv(y.masked_fill(padding.unsqueeze(1), 0.0)).transpose(1, 2)
    x = x + conv.after_conv(y).masked_fill(padding.unsqueeze(2), 0.0)
    return layer.norm2(x + 0.5 * layer.ffn_module2(x))
