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
- :func:`fast_fbank`: the same output as a plain ``Fbank`` (bit-identical on
  CPU in our tests) in fewer passes over memory: SpeechBrain's forward squares
  a strided ``view_as_real`` copy, raises it to the power 1 (another copy),
  rebuilds the filter matrix and multiplies a transposed spectrogram; ours
  squares the real and imaginary parts directly and applies the filters to
  the ``[B, F, T]`` spectrum as it comes out of ``torch.stft``. The training
  Brains call it for the chain's ``Fbank`` (:func:`speech_kd.brain.run_chain`);
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


def _filter_matrix(banks: torch.nn.Module, device: torch.device) -> torch.Tensor:
    """The ``[n_mels, F]`` filters of a frozen SpeechBrain ``Filterbank``, built by its own code."""
    n_freqs = banks.all_freqs_mat.shape[1]
    f_central = banks.f_central.repeat(n_freqs, 1).transpose(0, 1)
    band = banks.band.repeat(n_freqs, 1).transpose(0, 1)
    return banks._create_fbank_matrix(f_central, band).to(device).T.contiguous()


def fast_fbank(module: torch.nn.Module, wavs: torch.Tensor) -> torch.Tensor:
    """``module(wavs)`` for a SpeechBrain ``Fbank``, computed faster: log-mel ``[B, T, n_mels]`` from ``wavs [B, S]``.

    The spectrum is computed in fp32 with autocast off, as SpeechBrain's
    ``Fbank`` does (so bf16/fp16 training never computes it in half
    precision). Requires :func:`fast_fbank_applies`.

    Example
    -------
    >>> from speechbrain.lobes.features import Fbank
    >>> fbank = Fbank(n_mels=80)
    >>> wavs = torch.randn(2, 16000) * 0.1
    >>> torch.allclose(fast_fbank(fbank, wavs), fbank(wavs), atol=1e-4)
    True
    """
    stft, banks = module.compute_STFT, module.compute_fbanks
    with torch.autocast(device_type=wavs.device.type, enabled=False):
        wavs = wavs.float()
        window = stft.window.to(wavs.device)
        spec = torch.stft(wavs, stft.n_fft, stft.hop_length, stft.win_length, window, stft.center, stft.pad_mode,
                          stft.normalized_stft, stft.onesided, return_complex=True)  # fmt: skip
        power = spec.real.square() + spec.imag.square()  # [B, F, T]
        mel = torch.matmul(_filter_matrix(banks, wavs.device), power)  # [B, n_mels, T]
        db = mel.clamp_(min=banks.amin).log10_().mul_(banks.multiplier)
        db -= banks.multiplier * banks.db_multiplier
        floor = db.amax(dim=(1, 2), keepdim=True) - banks.top_db  # per utterance, as SpeechBrain
        return torch.maximum(db, floor).transpose(1, 2)


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
