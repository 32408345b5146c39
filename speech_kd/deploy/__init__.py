"""Deployment: export a model folder or a recipe's output folder to ONNX or TorchScript, run and score the export.

Owns exporting and running; timing exported students is ``speech_kd.bench``'s. It may import
``scoring`` (loading model folders) and ``nnet``; ``runtime`` imports numpy only.

- :mod:`~speech_kd.deploy.graph`: the exportable network (fbank frames in, CTC log-probabilities out);
- :mod:`~speech_kd.deploy.onnx_export`: ``speech-kd export``, the ONNX/TorchScript exporter (int8 quantisation);
- :mod:`~speech_kd.deploy.recipe_folder`: a user's SpeechBrain recipe output folder (yaml, checkpoint, tokenizer)
  as the exporter's inputs;
- :mod:`~speech_kd.deploy.runtime`: the self-contained runner copied into each folder as ``transcribe.py``;
- :mod:`~speech_kd.deploy.asr`: an exported folder as ``speech-kd evaluate`` runs models.

Only ``runtime`` is imported here (numpy only); the others import torch/SpeechBrain when used.
"""

from speech_kd.deploy.runtime import ExportedASR, fbank, greedy_decode

__all__ = ["ExportedASR", "fbank", "greedy_decode"]
