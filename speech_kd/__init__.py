"""speech_kd: frame-level knowledge distillation of CTC acoustic models for SpeechBrain.

The public API, re-exported here (imported on first use, so ``import
speech_kd`` and the CLI start fast)::

    DistillBrain, KDMixin          Brains (speech_kd.training.distill_brain, speech_kd.kd.mixin)
    CTCBrain                       plain CTC training (speech_kd.training.ctc_brain)
    make_targets                   teacher targets from hparams, live or cached (speech_kd.targets.build)
    load_teacher                   SpeechBrain / Hugging Face / ensemble teachers (speech_kd.targets.teachers.base)
    token_strings                  a tokenizer's token list (speech_kd.data.dataio)
    run_training, run_distillation the recipes, as functions
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "CTCBrain": "speech_kd.training.ctc_brain",
    "DistillBrain": "speech_kd.training.distill_brain",
    "KDMixin": "speech_kd.kd.mixin",
    "KDSetupError": "speech_kd.kd.config",
    "load_teacher": "speech_kd.targets.teachers.base",
    "make_targets": "speech_kd.targets.build",
    "run_distillation": "speech_kd.training.distill",
    "run_training": "speech_kd.training.train",
    "token_strings": "speech_kd.data.dataio",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'speech_kd' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
