"""Benchmarks: speed (``speech-kd bench``) and distillation experiments (``speech-kd bench-kd``).

:mod:`~speech_kd.bench.speed` times features, training steps (plain, live and cached KD) and
inference; :mod:`~speech_kd.bench.deployed` the exported students against the PyTorch teacher
(speed, memory, size); :mod:`~speech_kd.bench.timing` the one timing helper;
:mod:`~speech_kd.bench.experiments` trains teacher, scratch and KD students over seeds and tabulates
them. It may import every other subpackage except ``cli``; nothing imports it but ``cli``.
"""

__all__: list[str] = []
