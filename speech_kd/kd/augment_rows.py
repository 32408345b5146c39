"""Follow a recipe's SpeechBrain ``Augmenter`` calls, so the teacher hears the student's rows.

SpeechBrain's recipes augment inside ``compute_forward``::

    wavs, wav_lens = self.hparams.wav_augment(wavs, wav_lens)   # may add rows (concat_original)
    feats, fea_lens = self.hparams.fea_augment(feats, wav_lens) # may add rows again

and replicate their labels with ``augmenter.replicate_labels``. A teacher that
heard ``batch.sig`` would then have fewer rows than the student, and rows
whose audio (speed perturbation) differs. :class:`AugmentationRows` hooks every
``Augmenter`` found in the hparams (forward hooks: the recipe is not edited)
and records, per training batch:

- ``wavs``: the last waveform augmenter's output ``(wavs [B', S'], lens [B'])``,
  the audio a live teacher must hear (``None``: ``batch.sig``);
- ``teacher_rows``: long ``[B'']``, for each student row the row of that
  audio it came from (feature augmenters repeat rows; the teacher's clean
  features are the ones before feature augmentation);
- ``utterance_rows``: long ``[B'']``, for each student row the index of its
  utterance in the batch (what a cache is read by).

Both are obtained by calling the augmenter's own ``replicate_labels`` on an
index tensor, right after its forward: the row bookkeeping is SpeechBrain's,
whatever ``concat_original``, ``repeat_augment`` or ``parallel_augment`` say.

With cached targets, only augmentations that keep the time axis can reuse the
targets of the original audio: :func:`time_changing_augmentations` names the
ones that do not (speed perturbation, resampling, time warping, shifts), so
they are refused before training.
"""

from __future__ import annotations

import torch

__all__ = ["AugmentationRows", "find_augmenters", "time_changing_augmentations", "TIME_KEEPING"]

#: SpeechBrain augmentations that leave every sample where it was (cached targets stay valid)
TIME_KEEPING = frozenset(
    {
        "AddNoise",
        "AddReverb",
        "DropFreq",
        "DropChunk",
        "DropBitResolution",
        "DoClip",
        "RandAmp",
        "SignFlip",
        "ChannelDrop",
        "ChannelSwap",
        "SpectrogramDrop",
        "Identity",
    }
)


def _augmenter_class():
    try:
        from speechbrain.augment.augmenter import Augmenter
    except ImportError:  # pragma: no cover - SpeechBrain < 1.0
        return None
    return Augmenter


def find_augmenters(hparams) -> dict[str, torch.nn.Module]:
    """The hparams' SpeechBrain ``Augmenter`` objects, by yaml key (``wav_augment``, ``fea_augment``, ...)."""
    augmenter = _augmenter_class()
    values = hparams if isinstance(hparams, dict) else vars(hparams)
    if augmenter is None:
        return {}
    return {key: value for key, value in values.items() if isinstance(value, augmenter)}


def _key_of(hparams, obj) -> str | None:
    values = hparams if isinstance(hparams, dict) else vars(hparams)
    return next((key for key, value in values.items() if value is obj), None)


def time_changing_augmentations(hparams) -> list[str]:
    """Yaml keys of augmentations that move samples in time, as ``"wav_augment (speed_perturb: SpeedPerturb)"``.

    Looks inside every ``Augmenter`` and at top-level augmentation objects
    (a ``SpeedPerturb`` applied in the data pipeline, as some recipes do).
    Anything not in :data:`TIME_KEEPING` is counted as changing time: an
    unknown augmentation cannot be trusted to leave cached targets aligned.
    """
    found = []
    for key, aug in find_augmenters(hparams).items():
        for inner in aug.augmentations.values():
            name = type(inner).__name__
            if name not in TIME_KEEPING:
                inner_key = _key_of(hparams, inner)
                found.append(f"{key} ({inner_key + ': ' if inner_key else ''}{name})")
    values = hparams if isinstance(hparams, dict) else vars(hparams)
    for key, value in values.items():
        if type(value).__name__ in {"SpeedPerturb", "Resample"} and isinstance(value, torch.nn.Module):
            if not any(key in entry for entry in found):
                where = "at the top level of the yaml: a data pipeline may apply it"
                found.append(f"{key} ({type(value).__name__}, {where})")
    return found


class AugmentationRows:
    """Record what a batch's ``Augmenter`` calls did to its rows (see the module docstring).

    Parameters
    ----------
    augmenters : dict
        ``{yaml key: Augmenter}`` to hook (from :func:`find_augmenters`).
    """

    def __init__(self, augmenters: dict[str, torch.nn.Module]) -> None:
        self.augmenters = augmenters
        self.active = False
        self.reset(0)
        self._handles = [aug.register_forward_hook(self._hook) for aug in augmenters.values()]

    def reset(self, batch_size: int) -> None:
        """Start a batch of ``batch_size`` utterances (nothing augmented yet)."""
        self.batch_size = batch_size
        self.wavs: tuple[torch.Tensor, torch.Tensor] | None = None
        self.teacher_rows: torch.Tensor | None = None
        self.utterance_rows: torch.Tensor | None = None
        self.calls: list[str] = []

    def _hook(self, module, inputs, output) -> None:
        if not self.active or not getattr(module, "do_augment", False):
            return
        x = inputs[0]
        rows_in = x.shape[0]
        utterances = self.utterance_rows if self.utterance_rows is not None else torch.arange(self.batch_size)
        if utterances.shape[0] != rows_in:
            raise ValueError(
                f"an Augmenter received {rows_in} rows where {utterances.shape[0]} were expected: speech_kd cannot "
                "tell which utterance each row is; call the augmenters on the batch's rows (as SpeechBrain recipes do)"
            )
        self.utterance_rows = module.replicate_labels(utterances)
        key = next((k for k, v in self.augmenters.items() if v is module), type(module).__name__)
        self.calls.append(key)
        if x.dim() == 2:  # waveforms [B, S]: the teacher hears this output, row for row
            out_wavs, out_lens = output
            self.wavs = (out_wavs, out_lens)
            self.teacher_rows = None
        else:  # features [B, T, F]: rows repeat; the teacher keeps the audio before feature augmentation
            teacher = self.teacher_rows if self.teacher_rows is not None else torch.arange(rows_in)
            self.teacher_rows = module.replicate_labels(teacher)

    def remove(self) -> None:
        """Detach the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
