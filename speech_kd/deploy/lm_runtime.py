"""CTC beam search with an optional KenLM word n-gram, on numpy only: for runtimes without SpeechBrain or torch.

The code lives in :mod:`speech_kd.deploy.runtime` (the single file copied into every exported folder as
``transcribe.py``); this module names it for the library (``scoring.lm`` reads LM vocabularies with
:func:`read_lm_words`). One copy, so the exported runtime and what ``tests/unit/test_lm_decoding.py``
checks against SpeechBrain's searcher cannot diverge.

``log_probs`` are ``[T, V]`` natural-log posteriors of one utterance (float32 as a model outputs them),
``tokens`` the ``V`` unit strings in index order (the blank included), word boundaries a space token
(``" "``, or ``"|"`` for wav2vec2-style vocabularies) or SentencePiece's ``"\u2581"`` prefix.
"""

from __future__ import annotations

from speech_kd.deploy.runtime import KenLMScorer, ctc_beam_search, read_lm_words

__all__ = ["KenLMScorer", "ctc_beam_search", "read_lm_words"]
