"""LibriSpeech-layout folders to SpeechBrain CSV manifests.

Input layout (a LibriSpeech download, or ``speech-kd synth`` output)::

    DATA_FOLDER/SPLIT/SPK/CHAPTER/SPK-CHAPTER-UTT.flac
    DATA_FOLDER/SPLIT/SPK/CHAPTER/SPK-CHAPTER.trans.txt

Output: ``SAVE_FOLDER/SPLIT.csv`` with SpeechBrain's LibriSpeech columns
``ID,duration,wav,spk_id,wrd``, plus ``SAVE_FOLDER/SPLIT_skipped.csv`` listing
every utterance left out and why. Bad utterances never stop the run: each is
reported by name and reason, counted and skipped. CSVs are written under a
temporary name and renamed, so an interrupted run leaves no half-written
manifest.

*Untranscribed* splits (``unlabeled_splits``) list every ``.flac``/``.wav``
file under the split folder, at any depth (LibriSpeech layout, whose
``.trans.txt`` files are then ignored, or any plain tree of audio files), with
an empty ``wrd``; the same audio checks apply and their ``_skipped.csv`` is
written the same way. Utterance IDs are the file names without extension
(the relative path, ``/`` replaced by ``__``, for names that occur twice).

Modules: :mod:`~speech_kd.data.prepare.splits` (one split), :mod:`~speech_kd.data.prepare.stamp`
(what a CSV was made from), :mod:`~speech_kd.data.prepare.librispeech` (several splits).
"""

from speech_kd.data.prepare.librispeech import prepare_librispeech
from speech_kd.data.prepare.splits import (
    AUDIO_EXTENSIONS,
    CSV_HEADER,
    LIBRISPEECH_ALPHABET,
    PrepareResult,
    Skipped,
    prepare_split,
    prepare_unlabeled_split,
)
from speech_kd.data.prepare.stamp import split_files

__all__ = [
    "AUDIO_EXTENSIONS",
    "CSV_HEADER",
    "LIBRISPEECH_ALPHABET",
    "PrepareResult",
    "Skipped",
    "prepare_librispeech",
    "prepare_split",
    "prepare_unlabeled_split",
    "split_files",
]
