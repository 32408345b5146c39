"""``python -m speech_kd.bench.experiments``: the same as ``speech-kd bench-kd``."""

from speech_kd.bench.experiments.main import main

if __name__ == "__main__":
    main()
