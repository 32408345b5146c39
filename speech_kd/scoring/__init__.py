"""Scoring: WER/CER of model folders and what they say about distillation.

:mod:`~speech_kd.scoring.metrics` computes and normalises error rates (one ``jiwer`` call) and
per-utterance alignments; :mod:`~speech_kd.scoring.evaluate` runs a model folder (PyTorch, exported
or an ensemble; loaded by :mod:`speech_kd.model_folder` and :mod:`speech_kd.deploy`) on a manifest and
scores it, greedy or with :mod:`~speech_kd.scoring.decoding` (beam search, KenLM language models of
:mod:`~speech_kd.scoring.lm`); :mod:`~speech_kd.scoring.compare` the share of the scratch-teacher gap a
KD student closes, with a bootstrap interval; :mod:`~speech_kd.scoring.teacher_check` the teacher's dev
WER before distilling. It may import ``data``, ``targets.teachers``, ``kd.losses`` (greedy decoding),
``model_folder`` and ``deploy`` (exported folders); never ``training`` or ``report``.
"""

from speech_kd.scoring.compare import compare_files, gap_closed
from speech_kd.scoring.evaluate import EvalResult, evaluate_model
from speech_kd.scoring.metrics import error_rates, normalize_text

__all__ = ["EvalResult", "compare_files", "error_rates", "evaluate_model", "gap_closed", "normalize_text"]
