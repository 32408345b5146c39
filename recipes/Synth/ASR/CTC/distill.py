#!/usr/bin/env python3
"""Recipe: distil a small CTC student from a teacher folder.

Run (from the repository root):
    python recipes/Synth/ASR/CTC/distill.py hparams/distill.yaml --teacher_source=TEACHER/model \
        --data_folder=DATA --output_folder=OUT [--targets_cache=CACHE_DIR] [--kd_weight=0.5]

--kd_weight=0 trains the identical student without KD (the baseline).
"""

import sys

from speech_kd.training.distill import run_distillation

if __name__ == "__main__":
    run_distillation(sys.argv[1:])
