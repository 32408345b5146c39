"""The KD term: what distillation adds to a CTC Brain.

Owns the KD options and their defaults (:mod:`~speech_kd.kd.config`, ``KDConfig``), the KD mixin
(:mod:`~speech_kd.kd.mixin`, one class; the per-batch math as pure functions in :mod:`~speech_kd.kd.term`),
the losses on teacher and student posteriors (:mod:`~speech_kd.kd.losses`), weight and temperature
schedules (:mod:`~speech_kd.kd.schedules`), teacher annealing (:mod:`~speech_kd.kd.anneal`), the
per-epoch KD statistics (:mod:`~speech_kd.kd.stats`), finding a stock recipe's CTC outputs
(:mod:`~speech_kd.kd.recipe_outputs`), the rows augmentation adds to a batch
(:mod:`~speech_kd.kd.augment_rows`), layer distillation's student side (:mod:`~speech_kd.kd.layers`:
tapped encoder layers, learned projections) and CR-CTC's consistency between two augmented views of each
utterance (:mod:`~speech_kd.kd.consistency`: a self-distillation without a teacher, which
``training.ctc_brain.CTCBrain`` uses with or without KD). It may import ``targets`` (frame alignment), ``nnet``
(``nnet.layers``), the training
infrastructure (``training.checkpoints``, ``training.distributed``, ``training.precision``) and
``scoring.teacher_check`` (``anneal`` only, which is therefore not re-exported here: ``scoring``
imports ``kd.losses``); never the Brains or recipes of ``training``, which build on them.
"""

from speech_kd.kd.config import KDConfig, KDSetupError
from speech_kd.kd.consistency import ConsistencySetupError, CRConfig
from speech_kd.kd.losses import collapse_greedy, kd_loss
from speech_kd.kd.mixin import KDMixin
from speech_kd.kd.recipe_outputs import OutputLayoutError, find_ctc_outputs
from speech_kd.kd.schedules import WarmupCosine, linear_ramp

__all__ = [
    "CRConfig",
    "ConsistencySetupError",
    "KDConfig",
    "KDMixin",
    "KDSetupError",
    "OutputLayoutError",
    "WarmupCosine",
    "collapse_greedy",
    "find_ctc_outputs",
    "kd_loss",
    "linear_ramp",
]
