"""Teachers: SpeechBrain, Hugging Face and ensembles of them behind one protocol and a registry.

:mod:`~speech_kd.targets.teachers.base` holds the protocol (:class:`Teacher`, :class:`TeacherOutput`),
the registry and :func:`load_teacher`; :mod:`~speech_kd.targets.teachers.sb` and
:mod:`~speech_kd.targets.teachers.hf` the adapters (``transformers`` is imported only by ``hf``, when a
Hugging Face teacher is loaded); :mod:`~speech_kd.targets.teachers.ensemble` averages several. Single
teachers also return chosen encoder layers' hidden states (``hidden_layers``, layer distillation). They may
import ``data`` (tokens), ``nnet`` (features, layer lists) and ``targets.align``.
"""

from speech_kd.targets.teachers.base import Teacher, TeacherError, TeacherOutput, load_teacher, register_teacher
from speech_kd.targets.teachers.ensemble import EnsembleTeacher, load_ensemble, load_teachers, teacher_sources

__all__ = [
    "EnsembleTeacher",
    "Teacher",
    "TeacherError",
    "TeacherOutput",
    "load_ensemble",
    "load_teacher",
    "load_teachers",
    "register_teacher",
    "teacher_sources",
]
