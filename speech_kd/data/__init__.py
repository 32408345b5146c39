"""Data: audio files, SpeechBrain CSV manifests and datasets, LibriSpeech-layout preparation, a synthetic corpus.

:mod:`~speech_kd.data.audio` reads and probes audio files; :mod:`~speech_kd.data.dataio` builds
tokenizers, datasets and batch samplers from CSV manifests; :mod:`~speech_kd.data.prepare` turns a
LibriSpeech-layout folder into those CSVs; :mod:`~speech_kd.data.synth` synthesises such a folder
offline. Imports nothing else of speech_kd.
"""

from speech_kd.data.audio import AudioError, probe_audio, read_audio
from speech_kd.data.dataio import load_dataset, make_tokenizer, token_strings

__all__ = ["AudioError", "load_dataset", "make_tokenizer", "probe_audio", "read_audio", "token_strings"]
