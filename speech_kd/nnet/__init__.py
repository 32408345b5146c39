"""Model pieces shared by students and teachers: fbank features and running a SpeechBrain module chain.

:mod:`~speech_kd.nnet.features` computes Kaldi-style log-mel filterbanks batched (and
checks two models read the same features); :mod:`~speech_kd.nnet.chain` runs a yaml's
``Sequential``-like chain of modules with relative lengths; :mod:`~speech_kd.nnet.layers` finds a
model's encoder layers and taps their outputs (layer distillation, for students and teachers alike).
Imports nothing else of speech_kd.
"""

from speech_kd.nnet.chain import run_chain
from speech_kd.nnet.features import SharedFeatures, fast_fbank, fbank_signature

__all__ = ["SharedFeatures", "fast_fbank", "fbank_signature", "run_chain"]
