#!/usr/bin/env python3
"""Recipe: train a CTC model (teacher or student) on a LibriSpeech-layout corpus.

Run (from the repository root):
    python recipes/Synth/ASR/CTC/train.py hparams/teacher.yaml --data_folder=DATA --output_folder=OUT

Any yaml key can be overridden with --key=value; SpeechBrain run options
(--device, --debug, --precision, --ckpt_interval_minutes) work as usual.
The trained model ends in OUT/model (EncoderASR-loadable).
"""

import sys

from speech_kd.training.train import run_training

if __name__ == "__main__":
    run_training(sys.argv[1:])
