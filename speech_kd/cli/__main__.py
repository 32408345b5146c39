"""``python -m speech_kd.cli``: the same as ``speech-kd``."""

import sys

from speech_kd.cli import run

if __name__ == "__main__":
    sys.exit(run())
