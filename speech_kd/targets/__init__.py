"""Teacher targets: from a teacher (or a cache of its output) to soft targets on the student's tokens and frames.

Owns the teachers behind one protocol and a registry (:mod:`~speech_kd.targets.teachers`), the
vocabulary mapping (:mod:`~speech_kd.targets.vocab`) and frame alignment
(:mod:`~speech_kd.targets.align`), the soft-target cache (:mod:`~speech_kd.targets.cache`), live and
cached targets behind one interface (:mod:`~speech_kd.targets.strategies`) and building them from a
run's yaml with the checks made before training (:mod:`~speech_kd.targets.build`). It may import
``data`` (audio, manifests), ``nnet`` (features) and the training infrastructure
(``training.checkpoints``, ``training.precision``); never ``kd``, ``scoring`` or the Brains.
"""

from speech_kd.targets.build import check_cache_covers, check_cache_data, make_targets
from speech_kd.targets.strategies import CachedTargets, OnlineTargets, TargetAligner, Targets
from speech_kd.targets.teachers.base import Teacher, TeacherOutput, load_teacher
from speech_kd.targets.vocab import VocabMap, VocabMappingError

__all__ = [
    "CachedTargets",
    "OnlineTargets",
    "TargetAligner",
    "Targets",
    "Teacher",
    "TeacherOutput",
    "VocabMap",
    "VocabMappingError",
    "check_cache_covers",
    "check_cache_data",
    "load_teacher",
    "make_targets",
]
