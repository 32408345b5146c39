"""Synthesise a LibriSpeech-layout English corpus offline with Debian's TTS engines."""

from speech_kd.data.synth.corpus import DEFAULT_SPLITS, SplitSpec, SynthConfig, synthesize_corpus
from speech_kd.data.synth.text import ALPHABET, SentenceGenerator, normalize_transcript

__all__ = [
    "ALPHABET",
    "DEFAULT_SPLITS",
    "SentenceGenerator",
    "SplitSpec",
    "SynthConfig",
    "normalize_transcript",
    "synthesize_corpus",
]
