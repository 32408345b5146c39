"""Scoring: WER/CER of model folders and what they say about distillation.

:mod:`~speech_kd.scoring.metrics` computes and normalises error rates (one ``jiwer`` call) and
per-utterance alignments; :mod:`~speech_kd.scoring.evaluate` loads a model folder (PyTorch, exported or
an ensemble) and scores it on a manifest; :mod:`~speech_kd.scoring.compare` the share of the
scratch-teacher gap a KD student closes, with a bootstrap interval; :mod:`~speech_kd.scoring.teacher_check`
the teacher's dev WER before distilling. It may import ``data``, ``targets.teachers``, ``kd.losses``
(greedy decoding) and ``deploy`` (exported folders); never ``training`` or ``report``.
"""

from speech_kd.scoring.compare import compare_files, gap_closed
from speech_kd.scoring.evaluate import EvalResult, evaluate_model, load_asr
from speech_kd.scoring.metrics import error_rates, normalize_text

__all__ = ["EvalResult", "compare_files", "error_rates", "evaluate_model", "gap_closed", "load_asr", "normalize_text"]
