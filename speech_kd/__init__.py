"""speech_kd: frame-level knowledge distillation of CTC acoustic models for SpeechBrain.

The public API, re-exported here (imported on first use, so ``import
speech_kd`` and the CLI start fast)::

    DistillBrain, KDMixin          Brains (speech_kd.distill_brain, speech_kd.kd)
    CTCBrain                       plain CTC training (speech_kd.brain)
    make_targets                   teacher targets from hparams, live or cached (speech_kd.distill)
    load_teacher                   SpeechBrain / Hugging Face / ensemble teachers (speech_kd.teachers.base)
    token_strings                  a tokenizer's token list (speech_kd.dataio)
    run_training, run_distillation the recipes, as functions
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "CTCBrain": "speech_kd.brain",
    "DistillBrain": "speech_kd.distill_brain",
    "KDMixin": "speech_kd.kd",
    "KDSetupError": "speech_kd.kd",
    "load_teacher": "speech_kd.teachers.base",
    "make_targets": "speech_kd.distill",
    "run_distillation": "speech_kd.distill",
    "run_training": "speech_kd.train",
    "token_strings": "speech_kd.dataio",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'speech_kd' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
