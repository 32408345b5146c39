"""``python -m speech_kd.bench_kd``: the same as ``speech-kd bench-kd``."""

from speech_kd.bench_kd.main import main

if __name__ == "__main__":
    main()
