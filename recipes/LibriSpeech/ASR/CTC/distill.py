#!/usr/bin/env python3
"""Recipe: distil the LibriSpeech conformer CTC student from a public teacher folder.

Run (from the repository root, or from this folder with hparams/...):
    python recipes/LibriSpeech/ASR/CTC/distill.py recipes/LibriSpeech/ASR/CTC/hparams/distill_wav2vec2_base_960h.yaml \
        --data_folder=/path/to/LibriSpeech --teacher_source=teachers/wav2vec2-base-960h \
        [--targets_cache=CACHE_DIR] [--kd_weight=0.5]

Multi-GPU (PyTorch DDP, one process per GPU; the teacher runs beside the student on each):
    torchrun --nproc_per_node=4 recipes/LibriSpeech/ASR/CTC/distill.py recipes/LibriSpeech/ASR/CTC/hparams/... \
        --data_folder=/path/to/LibriSpeech

--kd_weight=0 trains the identical student without KD (the baseline). Everything
else is speech_kd.training.distill.run_distillation; see README.md in this folder.
"""

import sys
from pathlib import Path

from speech_kd.training.distill import run_distillation


def _hparams_here(argv: list[str]) -> list[str]:
    """Accept hparams/X.yaml relative to this folder, as SpeechBrain recipes are run."""
    if argv and not Path(argv[0]).exists() and (Path(__file__).parent / argv[0]).exists():
        argv = [str(Path(__file__).parent / argv[0]), *argv[1:]]
    return argv


if __name__ == "__main__":
    run_distillation(_hparams_here(sys.argv[1:]))
