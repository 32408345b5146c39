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

from speech_kd.nnet.layers import auto_layer_map

__all__ = [
    "KDConfig",
    "KDSetupError",
    "KD_LOSS_NAMES",
    "HARD_TARGET_LOSSES",
    "REDUCTIONS",
    "BLANK_MODES",
    "LAYER_LOSS_NAMES",
]

#: ``none``: no KD on the output posteriors (only ``kd_layers``)
KD_LOSS_NAMES = ("kl", "ce", "mse", "ctc", "none")
#: the losses that read the teacher's best path (``Targets.hard_labels``) rather than its distribution
HARD_TARGET_LOSSES = frozenset({"ce", "ctc"})
REDUCTIONS = ("auto", "utterance", "frame")
BLANK_MODES = ("none", "downweight", "drop")
#: losses between a projected student layer and its teacher layer (:func:`speech_kd.kd.losses.layer_loss`)
LAYER_LOSS_NAMES = ("l1_cos", "mse")


class KDSetupError(ValueError):
    """KD cannot run as set up (the message says what to change; ``speech-kd`` prints it as one line)."""


@dataclass(frozen=True)
class KDConfig:
    """The KD options of a run (yaml keys of the same names).

    Attributes
    ----------
    kd_weight : float
        ``loss = (1 - kd_weight) * recipe loss + kd_weight * KD``; 0 trains without a teacher. With
        ``kd_layers``, ``KD = output KD + kd_layer_weight * layer loss``.
    kd_weight_final, temperature_final : float, optional
        Values reached linearly over ``kd_ramp_epochs`` (``None``: constant).
    temperature : float
        KD temperature ``T`` (the KL is scaled by ``T^2``).
    kd_ramp_epochs : int
        Epochs of the linear ramp.
    kd_loss : str
        ``kl`` | ``ce`` | ``mse`` | ``ctc`` | ``none`` (no output KD: ``kd_layers`` alone).
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
    kd_layers : str or tuple of (int, int), optional
        Layer-to-layer distillation: ``auto`` (each student encoder layer to an evenly spaced
        teacher layer, :func:`~speech_kd.nnet.layers.auto_layer_map`) or ``(student, teacher)``
        pairs of 0-based layer indices (a yaml mapping ``{2: 4, 5: 11}``); ``None``: off.
    kd_layer_weight : float
        Weight of the layer loss inside the KD term.
    kd_layer_loss : str
        ``l1_cos`` (DistilHuBERT: L1 + cosine) | ``mse``.
    kd_student_layers, kd_teacher_layers : str, optional
        Dotted paths to the student's / the teacher's list of encoder layers (a SpeechBrain teacher's
        ``mods``, a Hugging Face model's children: ``wav2vec2.encoder.layers``; ``None``: found,
        :func:`~speech_kd.nnet.layers.find_layer_stack`).
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
    kd_layers: str | tuple[tuple[int, int], ...] | None = None
    kd_layer_weight: float = 1.0
    kd_layer_loss: str = "l1_cos"
    kd_student_layers: str | None = None
    kd_teacher_layers: str | None = None

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
        if self.kd_layer_loss not in LAYER_LOSS_NAMES:
            raise KDSetupError(f"kd_layer_loss={self.kd_layer_loss!r}: one of {', '.join(LAYER_LOSS_NAMES)}")
        weight = float(self.kd_layer_weight)
        if not (math.isfinite(weight) and weight >= 0.0):
            raise KDSetupError(f"kd_layer_weight={self.kd_layer_weight}: must be >= 0")
        if self.kd_layers is not None and self.kd_layers != "auto":
            if not self.kd_layers or any(s < 0 or t < 0 for s, t in self.kd_layers):
                raise KDSetupError(f"kd_layers={self.kd_layers}: student and teacher layers count from 0")
        if self.kd_loss == "none" and not self.layer_term_on:
            raise KDSetupError(
                "kd_loss=none turns the output KD off, and "
                + ("kd_layer_weight is 0" if self.uses_layers else "kd_layers is empty")
                + ": nothing to distil; set kd_layers (auto, or {student: teacher}) with kd_layer_weight > 0, or a "
                "kd_loss (kl, ce, mse, ctc), or kd_weight: 0 for no teacher"
            )
        if self.unlabeled_kd_loss == "none" and not self.layer_term_on:
            raise KDSetupError(
                "unlabeled_kd_loss=none leaves untranscribed batches no loss at all (kd_layers "
                + ("has kd_layer_weight 0" if self.uses_layers else "is off")
                + "): set a loss (kl, ce, mse, ctc; null: kd_loss's), or kd_layers with kd_layer_weight > 0"
            )
        if self.uses_layers and not self.uses_teacher:
            raise KDSetupError(
                f"kd_layers={self.kd_layers!r} but kd_weight is 0 (and no kd_weight_final above 0): no teacher is "
                "attached, so the layers would not be distilled; set kd_weight > 0 or kd_layers: {} (off)"
            )

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
        if "kd_layers" in given:
            given["kd_layers"] = cls.parse_layers(given["kd_layers"])
        for key in ("kd_student_layers", "kd_teacher_layers"):
            if key in given and not given[key]:
                given[key] = None
        return cls(**given)

    @staticmethod
    def parse_layers(value: Any) -> str | tuple[tuple[int, int], ...] | None:
        """``kd_layers`` as given in a yaml: ``auto``, a ``{student: teacher}`` mapping (or ``"2:4,5:11"``), or off.

        Off: ``None``, ``{}``, ``""``, ``none``/``null``/``off``. A mapping becomes sorted
        ``(student, teacher)`` pairs of ints; anything else is a :class:`KDSetupError`.

        Examples
        --------
        >>> KDConfig.parse_layers({5: 11, 2: 4}), KDConfig.parse_layers("auto"), KDConfig.parse_layers({})
        (((2, 4), (5, 11)), 'auto', None)
        >>> KDConfig.parse_layers("2:4, 5:11")
        ((2, 4), (5, 11))
        >>> KDConfig.parse_layers("0:1,0:3")
        Traceback (most recent call last):
        ...
        speech_kd.kd.config.KDSetupError: kd_layers='0:1,0:3': student layer 0 mapped twice; one each
        """
        given = value
        if value is None or (isinstance(value, (Mapping, str)) and not value):
            return None
        if isinstance(value, str):
            text = value.strip().lower()
            if text in ("none", "null", "off", "{}"):
                return None
            if text == "auto":
                return "auto"
            if ":" in text:  # "2:4,5:11", for a yaml whose kd_layers is not a mapping a command line can override
                value = [tuple(part.split(":", 1)) for part in text.replace(" ", "").split(",") if part]
        if isinstance(value, (list, tuple)) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in value):
            students = [str(student).strip() for student, _ in value]
            repeated = sorted({s for s in students if students.count(s) > 1})
            if repeated:
                raise KDSetupError(f"kd_layers={given!r}: student layer {', '.join(repeated)} mapped twice; one each")
            value = dict(value)
        if isinstance(value, Mapping):
            try:
                pairs = tuple(sorted((int(s), int(t)) for s, t in value.items()))
            except (TypeError, ValueError):
                pairs = ()
            if pairs and all(not isinstance(v, bool) for pair in value.items() for v in pair):
                return pairs
        raise KDSetupError(
            f"kd_layers={given!r}: auto, or a mapping of student to teacher layers counted from 0, e.g. {{2: 4, 5: 11}}"
        )

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
    def uses_layers(self) -> bool:
        """Whether layer-to-layer distillation is on (``kd_layers`` set).

        Examples
        --------
        >>> KDConfig(kd_layers="auto").uses_layers, KDConfig().uses_layers
        (True, False)
        """
        return self.kd_layers is not None

    @property
    def layer_term_on(self) -> bool:
        """Whether the layer loss adds to the KD term (``kd_layers`` set and ``kd_layer_weight`` above 0).

        Examples
        --------
        >>> KDConfig(kd_layers="auto").layer_term_on, KDConfig(kd_layers="auto", kd_layer_weight=0).layer_term_on
        (True, False)
        """
        return self.uses_layers and float(self.kd_layer_weight) > 0.0

    def layer_pairs(
        self, student_depth: int, teacher_depth: int, student: str = "the student", teacher: str = "the teacher"
    ) -> dict[int, int]:
        """``{student layer: teacher layer}`` for models of these depths (``auto`` resolved); ``{}`` when off.

        ``student``/``teacher`` name the models in the :class:`KDSetupError` raised for a layer past
        either depth (the index and the depth said too).

        Examples
        --------
        >>> KDConfig(kd_layers="auto").layer_pairs(3, 6)
        {0: 1, 1: 3, 2: 5}
        >>> KDConfig(kd_layers=((0, 7),)).layer_pairs(3, 6, teacher="T")
        Traceback (most recent call last):
        ...
        speech_kd.kd.config.KDSetupError: kd_layers: teacher layer 7 is past the depth of T (6 layers, 0..5)
        """
        if self.kd_layers is None:
            return {}
        if self.kd_layers == "auto":
            return auto_layer_map(student_depth, teacher_depth)
        for side, name, depth, position in (
            ("student", student, student_depth, 0),
            ("teacher", teacher, teacher_depth, 1),
        ):
            for pair in self.kd_layers:
                if pair[position] >= depth:
                    raise KDSetupError(
                        f"kd_layers: {side} layer {pair[position]} is past the depth of {name} "
                        f"({depth} layers, 0..{depth - 1})"
                    )
        return dict(self.kd_layers)

    @property
    def highest_temperature(self) -> float:
        """The largest temperature the run trains at (what a soft-target cache must serve)."""
        return max(self.temperature, self.temperature_final or 0.0)

    def to_dict(self) -> dict[str, Any]:
        """The options as a plain dict (for ``kd_run.json`` and reports)."""
        return asdict(self)
