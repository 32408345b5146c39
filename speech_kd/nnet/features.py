"""Acoustic features: the one place that says what our fbank is and how it is shared.

Every model in this package starts its ``encoder_chain`` with
``compute_features`` (SpeechBrain's ``Fbank``: 80-dim log-mel, 25 ms Hamming
window, 10 ms hop, power spectrum, HTK mel scale, 10*log10 with an 80 dB floor)
followed by ``normalize`` (``InputNormalization``, global mean/variance) and,
in training, SpecAugment-style masks (``SpectrogramDrop`` on time and
frequency). These run inside the model, so they are batched and on the
training device (CPU or CUDA, no code change), and the exported model folder
carries them. ``Fbank.forward`` is decorated by SpeechBrain to run in fp32
under autocast, so bf16/fp16 training never computes the spectrum in half
precision (``tests/unit/test_features.py`` checks this).

This module adds what the yaml cannot say:

- :func:`fbank_signature`: the settings that decide an fbank's output, so two
  models (a teacher and its student) can be told to share one computation;
- :class:`SharedFeatures`: the student's clean fbank of the current batch,
  handed to a teacher with the same signature so the spectrum is computed
  once per batch, not twice;
- :func:`fast_fbank`: the same output as a plain ``Fbank`` (within 1e-4 dB)
  with less work: fewer passes over memory, the mel filters' zeros skipped,
  the batch in cache-sized pieces on CPU (see its docstring). The training
  Brains call it for the chain's ``Fbank`` (:func:`speech_kd.nnet.chain.run_chain`);
  exported model folders keep SpeechBrain's ``Fbank`` class, so loading them
  never needs this package;
- :func:`librosa_fbank`: a reference implementation with librosa and the same
  settings, used by the tests (agreement within :data:`REFERENCE_TOLERANCE_DB`)
  and by ``speech-kd bench`` (throughput against per-utterance librosa).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "REFERENCE_TOLERANCE_DB",
    "SharedFeatures",
    "fast_fbank",
    "chunk_size",
    "fast_fbank_applies",
    "fbank_signature",
    "librosa_fbank",
]

#: agreement of our fbank with :func:`librosa_fbank` on speech, in dB on a ~80 dB range:
#: (mean absolute difference, 99th percentile). The residual comes from how the two
#: libraries place the triangular filters between FFT bins.
REFERENCE_TOLERANCE_DB = (0.15, 1.0)


def fbank_signature(module: torch.nn.Module) -> tuple | None:
    """The settings that fully decide a SpeechBrain ``Fbank``'s output, or ``None``.

    Two modules with equal signatures give identical features for the same
    waveforms, so one can reuse the other's output. Anything that is not a
    plain ``speechbrain.lobes.features.Fbank`` (deltas, context, learnable
    filters) returns ``None`` and is never shared.
    """
    from speechbrain.lobes.features import Fbank

    if type(module) is not Fbank or module.deltas or module.context:
        return None
    stft, banks = module.compute_STFT, module.compute_fbanks
    if getattr(banks, "freeze", True) is False:
        return None
    return (
        "fbank",
        stft.sample_rate,
        stft.n_fft,
        stft.win_length,
        stft.hop_length,
        bool(stft.center),
        stft.pad_mode,
        banks.n_mels,
        float(banks.f_min),
        float(banks.f_max),
        banks.filter_shape,
        bool(banks.log_mel),
        float(banks.top_db),
    )


@dataclass
class SharedFeatures:
    """The student's clean (un-augmented) fbank for the current batch.

    Attributes
    ----------
    feats : torch.Tensor
        ``[B, T, n_mels]`` log-mel features, on the training device.
    wav_lens : torch.Tensor
        ``[B]`` relative lengths of the waveforms they came from.
    signature : tuple
        :func:`fbank_signature` of the module that computed them.
    """

    feats: torch.Tensor
    wav_lens: torch.Tensor
    signature: tuple

    def usable_by(self, signature: tuple | None) -> bool:
        """Whether a model whose fbank has ``signature`` may use these features."""
        return signature is not None and signature == self.signature


def fast_fbank_applies(module: torch.nn.Module) -> bool:
    """Whether :func:`fast_fbank` reproduces ``module``'s output.

    True for a plain SpeechBrain ``Fbank`` (see :func:`fbank_signature`) with
    log-mel output, unless it randomly perturbs its filters in training
    (``param_rand_factor``).
    """
    signature = fbank_signature(module)
    if signature is None or not module.compute_fbanks.log_mel:
        return False
    return not (module.compute_fbanks.param_rand_factor != 0 and module.training)


def filter_matrix(banks: torch.nn.Module, device: torch.device) -> torch.Tensor:
    """The ``[n_mels, F]`` filters of a frozen SpeechBrain ``Filterbank``, built by its own code."""
    n_freqs = banks.all_freqs_mat.shape[1]
    f_central = banks.f_central.repeat(n_freqs, 1).transpose(0, 1)
    band = banks.band.repeat(n_freqs, 1).transpose(0, 1)
    return banks._create_fbank_matrix(f_central, band).to(device).T.contiguous()


#: how many filter blocks :func:`_mel_blocks` cuts the filterbank into (the fastest of the counts tried on CPU)
MEL_BLOCKS = 5
#: on CPU, :func:`fast_fbank` works through the batch in pieces whose complex spectrum stays below
#: this many bytes: small enough to stay in cache and below glibc's mmap threshold, so the big
#: temporaries are neither page-faulted in nor thrashed through memory on every call
CPU_CHUNK_BYTES = 2 * 1024 * 1024
_BLOCK_CACHE: dict[tuple, list[tuple[int, int, torch.Tensor]]] = {}


def _mel_blocks(module: torch.nn.Module, device: torch.device) -> list[tuple[int, int, torch.Tensor]]:
    """The mel filters as ``MEL_BLOCKS`` dense blocks ``(first, end, weights [end - first, n])`` over squared parts.

    Each triangular filter covers a few FFT bins, so the ``[F, n_mels]`` matrix
    is three-quarters zeros; cut into consecutive groups of filters, each group
    only needs the bins it touches. The blocks index the *interleaved* squared
    spectrum ``[re_0^2, im_0^2, re_1^2, im_1^2, ...]`` (``2 F`` columns, the
    memory order of ``torch.view_as_real``), each bin's filter weight written
    twice, so ``squares[:, first:end] @ weights`` is the groups' mel power with
    no separate ``re^2 + im^2`` pass. For the 80-filter default that is 2 x 3,328
    weights instead of the dense matrix's 2 x 16,080. Concatenating the blocks'
    products along the mel axis gives exactly ``power @ filters``. Cached per
    signature and device (the signature decides the filters, see :func:`fbank_signature`).
    """
    key = (fbank_signature(module), str(device))
    if key not in _BLOCK_CACHE:
        filters = filter_matrix(module.compute_fbanks, torch.device("cpu")).T  # [F, n_mels]
        blocks = []
        for group in torch.arange(filters.shape[1]).tensor_split(MEL_BLOCKS):
            if len(group) == 0:
                continue
            cols = filters[:, group[0] : group[-1] + 1]
            used = cols.abs().sum(dim=1).nonzero().flatten()
            first, end = (int(used[0]), int(used[-1]) + 1) if len(used) else (0, 1)
            weights = cols[first:end].repeat_interleave(2, dim=0).contiguous()  # [2 (end - first), n]
            blocks.append((2 * first, 2 * end, weights.to(device)))
        _BLOCK_CACHE[key] = blocks
    return _BLOCK_CACHE[key]


def chunk_size(module: torch.nn.Module, wavs: torch.Tensor) -> int:
    """How many utterances of ``wavs [B, S]`` :func:`fast_fbank` transforms at once.

    On CPU, as many as keep one piece's complex spectrum under
    :data:`CPU_CHUNK_BYTES` (at least one); on other devices the whole batch.
    """
    if wavs.device.type != "cpu":
        return max(1, wavs.shape[0])
    stft = module.compute_STFT
    per_utterance = 8 * (wavs.shape[1] // stft.hop_length + 1) * (stft.n_fft // 2 + 1)  # complex64 bytes
    return max(1, CPU_CHUNK_BYTES // per_utterance)


def _mel_power(module: torch.nn.Module, wavs: torch.Tensor, blocks: list) -> torch.Tensor:
    """Mel-filtered power spectrum ``[B, T, n_mels]`` (linear, not yet in dB) of fp32 ``wavs [B, S]``."""
    stft = module.compute_STFT
    window = stft.window.to(wavs.device)
    spec = torch.stft(
        wavs,
        stft.n_fft,
        stft.hop_length,
        stft.win_length,
        window,
        stft.center,
        stft.pad_mode,
        stft.normalized_stft,
        stft.onesided,
        return_complex=True,
    )
    spec = spec.transpose(1, 2)  # [B, T, F]: the memory order torch.stft wrote it in
    batch, frames, n_freqs = spec.shape
    parts = torch.view_as_real(spec).view(batch * frames, 2 * n_freqs)  # [re_0, im_0, re_1, ...] per frame
    # squared in place (the spectrum is ours alone) unless autograd needs the unsquared parts
    squares = parts.square() if parts.requires_grad else parts.square_()
    mel = torch.cat([squares[:, first:end] @ weights for first, end, weights in blocks], dim=1)
    return mel.view(batch, frames, -1)


def fast_fbank(module: torch.nn.Module, wavs: torch.Tensor) -> torch.Tensor:
    """``module(wavs)`` for a SpeechBrain ``Fbank``, computed faster: log-mel ``[B, T, n_mels]`` from ``wavs [B, S]``.

    The same numbers as ``Fbank`` (within 1e-4 dB, ``tests/unit/test_features.py``),
    by a different route: the real and imaginary parts squared in place, in
    the layout ``torch.stft`` writes (SpeechBrain squares a strided copy, then
    raises it to the power 1, another copy), and summed by the mel filters
    themselves, as a few dense blocks that skip the zeros (:func:`_mel_blocks`), the
    ``top_db`` floor applied before the logarithm (``max(log x, log m - k) =
    log max(x, m e^-k)``), and on CPU the batch in cache-sized pieces
    (:data:`CPU_CHUNK_BYTES`). The spectrum is computed in fp32 with autocast
    off, as SpeechBrain's ``Fbank`` does (so bf16/fp16 training never computes
    it in half precision). Requires :func:`fast_fbank_applies`.

    Example
    -------
    >>> from speechbrain.lobes.features import Fbank
    >>> fbank = Fbank(n_mels=80)
    >>> wavs = torch.randn(2, 16000) * 0.1
    >>> torch.allclose(fast_fbank(fbank, wavs), fbank(wavs), atol=1e-4)
    True
    """
    banks = module.compute_fbanks
    with torch.autocast(device_type=wavs.device.type, enabled=False):
        wavs = wavs.float()
        blocks = _mel_blocks(module, wavs.device)
        pieces = [_mel_power(module, piece, blocks) for piece in wavs.split(chunk_size(module, wavs))]
        mel = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        # SpeechBrain: db = m * log10(max(x, amin)) - m * db_multiplier, then max(db, max_utt(db) - top_db)
        peak = mel.amax(dim=(1, 2), keepdim=True).clamp(min=banks.amin)
        floor = (peak * 10.0 ** (-banks.top_db / banks.multiplier)).clamp(min=banks.amin)
        if mel.requires_grad:  # waveform gradients (an attack, a learnable front end): no in-place ops
            return torch.log10(torch.maximum(mel, floor)) * banks.multiplier - banks.multiplier * banks.db_multiplier
        db = mel.clamp_(min=floor).log10_().mul_(banks.multiplier)
        return db.sub_(banks.multiplier * banks.db_multiplier)


def librosa_fbank(
    wav: np.ndarray,
    sample_rate: int = 16000,
    n_fft: int = 400,
    win_length_ms: float = 25.0,
    hop_length_ms: float = 10.0,
    n_mels: int = 80,
    top_db: float = 80.0,
) -> np.ndarray:
    """Reference log-mel fbank ``[T, n_mels]`` in dB, with librosa, for one waveform ``[S]``.

    Same settings as SpeechBrain's ``Fbank`` defaults: Hamming window,
    centred frames with zero padding, power spectrum, HTK mel scale without
    area normalisation, ``10 * log10(max(x, 1e-10))`` clipped ``top_db``
    below the utterance's maximum.
    """
    import librosa

    mel = librosa.feature.melspectrogram(
        y=np.asarray(wav, dtype=np.float32),
        sr=sample_rate,
        n_fft=n_fft,
        win_length=round(sample_rate * win_length_ms / 1000),
        hop_length=round(sample_rate * hop_length_ms / 1000),
        window="hamming",
        center=True,
        pad_mode="constant",
        power=2.0,
        n_mels=n_mels,
        htk=True,
        norm=None,
        fmin=0.0,
        fmax=sample_rate / 2,
    )
    return librosa.power_to_db(mel, ref=1.0, amin=1e-10, top_db=top_db).T
