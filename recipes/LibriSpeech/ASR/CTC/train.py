#!/usr/bin/env python3
"""Recipe: train a CTC conformer (the student baseline, or a teacher of your own) on LibriSpeech.

Run (from the repository root, or from this folder with hparams/conformer_ctc.yaml):
    python recipes/LibriSpeech/ASR/CTC/train.py recipes/LibriSpeech/ASR/CTC/hparams/conformer_ctc.yaml \
        --data_folder=/path/to/LibriSpeech [--output_folder=...] [--precision=bf16]

Multi-GPU (PyTorch DDP, one process per GPU):
    torchrun --nproc_per_node=4 recipes/LibriSpeech/ASR/CTC/train.py \
        recipes/LibriSpeech/ASR/CTC/hparams/conformer_ctc.yaml \
        --data_folder=/path/to/LibriSpeech

Data preparation, training, checkpointing, testing and the export of
OUTPUT/model (loadable by SpeechBrain's EncoderASR) are speech_kd.training.train.run_training;
this file only finds the yaml.
"""

import sys
from pathlib import Path

from speech_kd.training.train import run_training


def _hparams_here(argv: list[str]) -> list[str]:
    """Accept hparams/X.yaml relative to this folder, as SpeechBrain recipes are run."""
    if argv and not Path(argv[0]).exists() and (Path(__file__).parent / argv[0]).exists():
        argv = [str(Path(__file__).parent / argv[0]), *argv[1:]]
    return argv


if __name__ == "__main__":
    run_training(_hparams_here(sys.argv[1:]))
