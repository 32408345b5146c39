"""Experiments (``speech-kd bench-kd``): whether distillation helps.

The teacher against the same student trained from scratch and with KD variants, over seeds, with the
share of the gap closed and its interval.

:mod:`~speech_kd.bench.experiments.main` holds the options and one experiment from data to results
table (its docstring is ``speech-kd bench-kd --help``); :mod:`~speech_kd.bench.experiments.runs` runs the
commands side by side and scores each model; :mod:`~speech_kd.bench.experiments.variants` names the KD
variants; :mod:`~speech_kd.bench.experiments.summary` writes the tables and figures. Runs are ``speech-kd``
processes; the modules here may import ``scoring``, ``report``, ``data`` and ``targets.teachers``.
``python -m speech_kd.bench.experiments`` is the same as ``speech-kd bench-kd``.
"""

from speech_kd.bench.experiments.main import build_parser, main
from speech_kd.bench.experiments.runs import make_partition, train_seconds_per_epoch
from speech_kd.bench.experiments.summary import baseline_of, format_results, format_seed_summary, summarise_seeds
from speech_kd.bench.experiments.variants import VARIANTS, merge_overrides, variant_args
from speech_kd.scoring.compare import gap_closed

__all__ = [
    "VARIANTS",
    "baseline_of",
    "build_parser",
    "format_results",
    "format_seed_summary",
    "gap_closed",
    "main",
    "make_partition",
    "merge_overrides",
    "summarise_seeds",
    "train_seconds_per_epoch",
    "variant_args",
]
