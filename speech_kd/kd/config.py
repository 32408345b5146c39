"""``KDConfig``: every KD option and its default, in one place.

The mixin, ``speech-kd distill`` and teacher annealing read KD settings
through :meth:`KDConfig.from_hparams`, so a yaml without a key behaves the
same everywhere: the default here. These are the values ``hparams/distill.yaml``
writes out, except ``kd_reduction``: ``auto`` follows the recipe's CTC loss
(for ``speech-kd distill``'s own Brain that is ``utterance``, which the yaml
names). An unknown value is refused with a one-line message naming the key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

__all__ = ["KDConfig", "KDSetupError", "KD_LOSS_NAMES", "HARD_TARGET_LOSSES", "REDUCTIONS", "BLANK_MODES"]

KD_LOSS_NAMES = ("kl", "ce", "mse", "ctc")
#: the losses that read the teacher's best path (``Targets.hard_labels``) rather than its distribution
HARD_TARGET_LOSSES = frozenset({"ce", "ctc"})
REDUCTIONS = ("auto", "utterance", "frame")
BLANK_MODES = ("none", "downweight", "drop")


class KDSetupError(ValueError):
    """KD cannot run as set up (the message says what to change; ``speech-kd`` prints it as one line)."""


@dataclass(frozen=True)
class KDConfig:
    """The KD options of a run (yaml keys of the same names).

    Attributes
    ----------
    kd_weight : float
        ``loss = (1 - kd_weight) * recipe loss + kd_weight * KD``; 0 trains without a teacher.
    kd_weight_final, temperature_final : float, optional
        Values reached linearly over ``kd_ramp_epochs`` (``None``: constant).
    temperature : float
        KD temperature ``T`` (the KL is scaled by ``T^2``).
    kd_ramp_epochs : int
        Epochs of the linear ramp.
    kd_loss : str
        ``kl`` | ``ce`` | ``mse`` | ``ctc``.
    unlabeled_kd_loss : str, optional
        The KD loss of untranscribed batches (``None``: ``kd_loss``).
    kd_reduction : str
        ``utterance`` (sum over frames, mean over utterances: SpeechBrain's
        ``batchmean``) | ``frame`` | ``auto`` (follow the recipe's CTC loss).
    kd_topk : int, optional
        Keep the teacher's top-k tokens per frame.
    kd_outputs : list of int, optional
        Positions of the CTC log-probabilities and lengths in ``compute_forward``'s output.
    blank_mode, blank_threshold, blank_weight :
        Blank-dominated teacher frames: ``none`` | ``downweight`` (to ``blank_weight``) | ``drop``.
    blank_index : int
        The student's blank.
    sample_rate : int
        Hz of the training audio.
    kd_anneal : bool
        Fade KD out as the student reaches the teacher's dev WER (:mod:`speech_kd.kd.anneal`).
    kd_anneal_margin : float
        Relative margin above the teacher's dev WER at which the fade starts.
    """

    kd_weight: float = 0.9
    kd_weight_final: float | None = None
    temperature: float = 1.0
    temperature_final: float | None = None
    kd_ramp_epochs: int = 1
    kd_loss: str = "kl"
    unlabeled_kd_loss: str | None = None
    kd_reduction: str = "auto"
    kd_topk: int | None = None
    kd_outputs: tuple[int, int] | None = None
    blank_mode: str = "none"
    blank_threshold: float = 0.9
    blank_weight: float = 0.1
    blank_index: int = 0
    sample_rate: int = 16000
    kd_anneal: bool = True
    kd_anneal_margin: float = 0.1

    def __post_init__(self) -> None:
        for key in ("kd_weight", "kd_weight_final"):
            value = getattr(self, key)
            if value is not None and not (math.isfinite(float(value)) and 0.0 <= float(value) <= 1.0):
                raise KDSetupError(
                    f"{key}={value}: must be between 0 and 1 (loss = (1 - kd_weight) * recipe loss + kd_weight * KD)"
                )
        for key in ("temperature", "temperature_final"):
            value = getattr(self, key)
            if value is not None and not (math.isfinite(float(value)) and float(value) > 0.0):
                raise KDSetupError(f"{key}={value}: must be > 0")
        for key, allowed in (("kd_loss", KD_LOSS_NAMES), ("kd_reduction", REDUCTIONS), ("blank_mode", BLANK_MODES)):
            if getattr(self, key) not in allowed:
                raise KDSetupError(f"{key}={getattr(self, key)!r}: one of {', '.join(allowed)}")
        if self.unlabeled_kd_loss is not None and self.unlabeled_kd_loss not in KD_LOSS_NAMES:
            raise KDSetupError(f"unlabeled_kd_loss={self.unlabeled_kd_loss!r}: one of {', '.join(KD_LOSS_NAMES)}")
        if self.kd_topk is not None and int(self.kd_topk) < 1:
            raise KDSetupError(f"kd_topk={self.kd_topk}: must be a positive number of tokens (or null)")
        if self.kd_loss == "ctc" and self.blank_mode != "none":
            raise KDSetupError(
                f"blank_mode={self.blank_mode} weights frames, but kd_loss=ctc is a sequence loss on the teacher's "
                "transcript: it has no frames to weight; use blank_mode: none (or a frame loss: kl, ce, mse)"
            )
        if int(self.kd_ramp_epochs) < 1:
            raise KDSetupError(f"kd_ramp_epochs={self.kd_ramp_epochs}: must be at least 1")

    @classmethod
    def from_hparams(cls, hparams: Mapping[str, Any] | Any) -> KDConfig:
        """The KD options of ``hparams`` (a dict or SpeechBrain's hparams namespace); absent keys take the defaults.

        Examples
        --------
        >>> KDConfig.from_hparams({"kd_weight": 0.5}).kd_weight, KDConfig.from_hparams({}).kd_weight
        (0.5, 0.9)
        >>> KDConfig.from_hparams({"temperature": 0})
        Traceback (most recent call last):
        ...
        speech_kd.kd.config.KDSetupError: temperature=0: must be > 0
        """
        values = hparams if isinstance(hparams, Mapping) else vars(hparams)
        given = {f.name: values[f.name] for f in fields(cls) if f.name in values}
        if given.get("kd_reduction") is None and "kd_reduction" in given:
            given["kd_reduction"] = "auto"  # null in a yaml: follow the recipe's CTC loss
        if given.get("kd_outputs") is not None:
            given["kd_outputs"] = tuple(given["kd_outputs"])
        return cls(**given)

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """The yaml keys this class reads."""
        return tuple(f.name for f in fields(cls))

    @property
    def uses_teacher(self) -> bool:
        """Whether any epoch trains with KD (``kd_weight`` or ``kd_weight_final`` above 0).

        Examples
        --------
        >>> KDConfig(kd_weight=0).uses_teacher, KDConfig(kd_weight=0, kd_weight_final=0.5).uses_teacher
        (False, True)
        """
        return self.kd_weight > 0.0 or (self.kd_weight_final is not None and self.kd_weight_final > 0.0)

    @property
    def highest_temperature(self) -> float:
        """The largest temperature the run trains at (what a soft-target cache must serve)."""
        return max(self.temperature, self.temperature_final or 0.0)

    def to_dict(self) -> dict[str, Any]:
        """The options as a plain dict (for ``kd_run.json`` and reports)."""
        return asdict(self)
