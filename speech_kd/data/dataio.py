"""Datasets, tokenizer and loaders: CSV manifests to padded batches.

Each batch carries ``id``, ``sig`` (waveforms ``[B, S]`` with relative
lengths ``[B]``) and ``tokens`` (character IDs ``[B, L]`` with relative
lengths). Transcripts with characters the tokenizer lacks are an error that
names the utterances; utterances too short for their labels under CTC are
skipped and reported, never trained on. Training and dev sets built with
``skip_unreadable=True`` drop an utterance whose audio fails to decode when it
is read (damage inside a file that ``prepare``'s probes of its two ends did
not reach) with a warning naming the file, instead of ending a long run:
:func:`collate_readable` then pads the rest of the batch.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from pathlib import Path

import speechbrain as sb
import torch
from speechbrain.dataio.dataset import DynamicItemDataset
from speechbrain.dataio.encoder import CTCTextEncoder
from speechbrain.dataio.sampler import DynamicBatchSampler

from speech_kd.data.audio import AudioError, read_audio

__all__ = [
    "make_tokenizer",
    "token_strings",
    "merge_csvs",
    "read_csv_rows",
    "ctc_min_frames",
    "load_dataset",
    "collate_readable",
    "pad_right_or_empty",
    "dynamic_batch_sampler",
    "TranscriptError",
]

logger = logging.getLogger(__name__)


class TranscriptError(ValueError):
    """Transcripts that cannot be turned into the model's tokens."""


def make_tokenizer(alphabet: str, blank_index: int = 0) -> CTCTextEncoder:
    """Character tokenizer: CTC blank at ``blank_index``, then ``alphabet`` in order.

    Examples
    --------
    >>> tok = make_tokenizer(" AB")
    >>> tok.encode_sequence(list("BA A"))
    [3, 2, 1, 2]
    >>> len(tok)
    4
    """
    tokenizer = CTCTextEncoder()
    labels = list(alphabet)
    if len(set(labels)) != len(labels):
        raise ValueError(f"alphabet {alphabet!r} repeats a character")
    labels.insert(blank_index, "<blank>")
    for label in labels:
        if label == "<blank>":
            tokenizer.insert_blank(index=len(tokenizer.lab2ind))
        else:
            tokenizer.add_label(label)
    return tokenizer


def token_strings(tokenizer) -> list[str]:
    """Token strings in index order: the student's output units, as the vocabulary mapping reads them.

    Accepts SpeechBrain's ``CTCTextEncoder`` (``ind2lab``), SpeechBrain's
    ``SentencePiece`` wrapper (its ``.sp`` model, character or BPE units), a
    ``sentencepiece.SentencePieceProcessor``, or a plain list of token
    strings (index order, blank included).

    Examples
    --------
    >>> token_strings(make_tokenizer("AB"))
    ['<blank>', 'A', 'B']
    >>> token_strings(["<blank>", "▁", "A"])
    ['<blank>', '▁', 'A']
    """
    if isinstance(tokenizer, (list, tuple)):
        if not all(isinstance(token, str) for token in tokenizer):
            raise TypeError("a token list must hold strings (index order, blank included)")
        return list(tokenizer)
    if hasattr(tokenizer, "ind2lab"):
        return [str(tokenizer.ind2lab[i]) for i in range(len(tokenizer.ind2lab))]
    processor = getattr(tokenizer, "sp", tokenizer)  # SpeechBrain's SentencePiece wraps the processor as .sp
    if hasattr(processor, "id_to_piece"):
        return [processor.id_to_piece(i) for i in range(processor.get_piece_size())]
    raise TypeError(
        f"unsupported tokenizer type {type(tokenizer).__name__}: pass a CTCTextEncoder, SpeechBrain's SentencePiece, "
        "a sentencepiece processor, or the list of token strings in index order"
    )


def read_csv_rows(csv_path: str | os.PathLike, required: tuple[str, ...] = ("ID", "duration", "wav")) -> list[dict]:
    r"""Rows of a SpeechBrain CSV manifest, checked: every problem is a ``ValueError`` naming the file (and row).

    A UTF-8 byte-order mark is ignored. Refused: text that is not UTF-8, a
    malformed CSV, a header without one of the ``required`` columns, a row
    with fewer fields than the header or an empty ``ID``, and a ``duration``
    (when the file has that column) that is not a finite, non-negative number
    of seconds.

    Parameters
    ----------
    csv_path : path-like
        The manifest.
    required : tuple of str
        Columns that must be in the header.

    Returns
    -------
    list of dict
        One dict per data row (column -> text), blank lines left out.

    Raises
    ------
    ValueError
        What is wrong and where (``FILE: row N (ID): ...``); ``OSError`` for a file that cannot be opened.

    Examples
    --------
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "m.csv"
    >>> _ = path.write_text("ID,duration,wav\na,1.5,a.wav\nb,long,b.wav\n")
    >>> read_csv_rows(path)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: ...m.csv: row 3 (b): duration 'long' is not a number of seconds
    """
    rows: list[dict] = []
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [str(name) for name in (reader.fieldnames or [])]
            missing = [col for col in required if col not in header]
            if missing:
                shown = ",".join(header)[:200] if header else "empty file"
                raise ValueError(f"{csv_path}: no column(s) {', '.join(missing)} in the header ({shown}); a "
                                 f"manifest needs {','.join(required)}")
            for row in reader:
                line = reader.line_num
                if None in row:
                    raise ValueError(f"{csv_path}: row {line} has more fields than the header")
                if not any((value or "").strip() for value in row.values()):
                    continue
                if any(value is None for value in row.values()):
                    raise ValueError(f"{csv_path}: row {line} has fewer fields than the header ({len(header)})")
                uid = row.get("ID")
                if "ID" in header and not (uid or "").strip():
                    raise ValueError(f"{csv_path}: row {line}: empty ID")
                if "duration" in header:
                    _check_duration(row["duration"], f"{csv_path}: row {line} ({uid})")
                rows.append(row)
    except UnicodeDecodeError as err:
        raise ValueError(f"{csv_path}: not UTF-8 text ({err})") from err
    except csv.Error as err:
        raise ValueError(f"{csv_path}: not a readable CSV ({err})") from err
    return rows


def _check_duration(value: str, where: str) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: duration {value!r} is not a number of seconds") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{where}: duration {value!r} is not a number of seconds")
    return seconds


def merge_csvs(csv_files: list[str], out_csv: str | os.PathLike) -> str:
    """Concatenate manifests with the same header into ``out_csv`` (atomically)."""
    rows: list[dict] = []
    header = None
    for path in csv_files:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            header = header or reader.fieldnames
            rows.extend(reader)
    out_csv = Path(out_csv)
    tmp = out_csv.with_name(out_csv.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=header or ["ID", "duration", "wav", "spk_id", "wrd"])
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, out_csv)
    return str(out_csv)


def ctc_min_frames(labels: str) -> int:
    """Fewest encoder frames a CTC path needs for ``labels``.

    One frame per label, plus one blank between each pair of repeated labels.

    Examples
    --------
    >>> ctc_min_frames("HELLO")
    6
    """
    repeats = sum(1 for a, b in zip(labels, labels[1:]) if a == b)
    return len(labels) + repeats


def load_dataset(
    csv_path: str | os.PathLike,
    tokenizer: CTCTextEncoder,
    sample_rate: int = 16000,
    frame_shift: float | None = 0.04,
    max_duration: float | None = None,
    sorting: str = "random",
    skip_unreadable: bool = False,
) -> DynamicItemDataset:
    """Dataset for one manifest, with audio and token pipelines attached.

    Parameters
    ----------
    csv_path : path-like
        SpeechBrain CSV with ``ID,duration,wav,spk_id,wrd``.
    tokenizer : CTCTextEncoder
        Its labels must cover every transcript character, else
        :class:`TranscriptError` lists the offending utterances.
    sample_rate : int
        Audio at another rate is resampled on reading.
    frame_shift : float, optional
        The model's output frame shift in seconds; utterances with fewer
        frames than their labels need (:func:`ctc_min_frames`) are skipped and
        logged. ``None`` disables the check (evaluation).
    max_duration : float, optional
        Longer utterances are skipped and logged.
    sorting : str
        ``ascending``, ``descending`` or ``random`` (order left as in the CSV).
    skip_unreadable : bool
        An utterance whose audio raises :class:`~speech_kd.data.audio.AudioError`
        when read gets ``sig = None`` and a warning naming the file, for
        :func:`collate_readable` to drop; otherwise the error propagates.
    """
    if not read_csv_rows(csv_path, required=("ID", "duration", "wav", "wrd")):
        # SpeechBrain's from_csv fails with an IndexError on a header-only file
        raise TranscriptError(f"{csv_path}: no utterances (an empty split, or every file was skipped by prepare)")
    data = DynamicItemDataset.from_csv(csv_path=str(csv_path))
    known = set(tokenizer.lab2ind)
    bad = {uid: sorted(set(ex["wrd"]) - known) for uid, ex in data.data.items() if set(ex["wrd"]) - known}
    if bad:
        shown = "; ".join(f"{uid}: {''.join(chars)!r}" for uid, chars in list(bad.items())[:10])
        raise TranscriptError(
            f"{csv_path}: {len(bad)} transcripts use characters the tokenizer lacks ({shown}). "
            "Fix the transcripts, or widen `alphabet` in the yaml."
        )

    keep = set(data.data)
    if frame_shift:
        too_short = {
            uid
            for uid, ex in data.data.items()
            if math.floor(float(ex["duration"]) / frame_shift) < ctc_min_frames(ex["wrd"])
        }
        for uid in sorted(too_short):
            logger.warning("skipping %s (%s): too short for its %d labels", uid, csv_path, len(data.data[uid]["wrd"]))
        keep -= too_short
    if max_duration:
        too_long = {uid for uid, ex in data.data.items() if float(ex["duration"]) > max_duration}
        for uid in sorted(too_long):
            logger.warning("skipping %s (%s in %s): %.1f s, longer than %.1f s", uid, data.data[uid]["wav"], csv_path,
                           float(data.data[uid]["duration"]), max_duration)
        keep -= too_long
    if not keep:
        raise TranscriptError(f"{csv_path}: no usable utterance left")

    @sb.utils.data_pipeline.takes("wav")
    @sb.utils.data_pipeline.provides("sig")
    def audio_pipeline(wav):
        try:
            return read_audio(wav, sample_rate)
        except AudioError as err:
            if not skip_unreadable:
                raise
            logger.warning("skipping %s: %s (fix or remove the file; this utterance is left out)", err.path, err.reason)
            return None

    @sb.utils.data_pipeline.takes("wrd")
    @sb.utils.data_pipeline.provides("tokens")
    def text_pipeline(wrd):
        return torch.LongTensor(tokenizer.encode_sequence(list(wrd)))

    data.add_dynamic_item(audio_pipeline)
    data.add_dynamic_item(text_pipeline)
    data.set_output_keys(["id", "sig", "tokens", "wrd", "duration"])
    key_min = {"duration": 0.0}
    if sorting == "random":
        return data.filtered_sorted(key_test={"id": lambda uid: uid in keep}) if len(keep) < len(data) else data
    return data.filtered_sorted(
        sort_key="duration",
        reverse=sorting == "descending",
        key_min_value=key_min,
        key_test={"id": lambda uid: uid in keep},
    )


def collate_readable(examples: list[dict]) -> sb.dataio.batch.PaddedBatch:
    """``PaddedBatch`` of the examples whose audio could be read (``sig`` not ``None``).

    The collate function of loaders over datasets made with
    ``load_dataset(..., skip_unreadable=True)``. A batch in which no audio
    could be read is a ``ValueError`` naming its utterances (a padded batch
    cannot be empty; each file was named in its own warning).
    """
    readable = [ex for ex in examples if ex["sig"] is not None]
    if not readable:
        ids = ", ".join(str(ex["id"]) for ex in examples)
        raise ValueError(f"utterances {ids}: none of this batch's audio could be read (the warnings above name "
                         "each file); fix the files or delete their manifest rows")
    return sb.dataio.batch.PaddedBatch(readable, padding_func=pad_right_or_empty)


def pad_right_or_empty(tensors: list[torch.Tensor], **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """SpeechBrain's ``batch_pad_right``, plus a batch of empty sequences (untranscribed audio's ``tokens``).

    SpeechBrain divides by the longest length, so a batch of empty sequences
    fails there; it becomes ``[B, 0]`` with relative lengths 0.

    Examples
    --------
    >>> padded, lengths = pad_right_or_empty([torch.tensor([], dtype=torch.long)] * 2)
    >>> padded.shape, lengths.tolist()
    (torch.Size([2, 0]), [0.0, 0.0])
    """
    if tensors and all(t.dim() == 1 and t.shape[0] == 0 for t in tensors):
        return torch.zeros(len(tensors), 0, dtype=tensors[0].dtype), torch.zeros(len(tensors))
    return sb.utils.data_utils.batch_pad_right(tensors, **kwargs)


def dynamic_batch_sampler(
    dataset: DynamicItemDataset,
    max_batch_length: float,
    num_buckets: int = 20,
    max_batch_ex: int | None = None,
    shuffle: bool = True,
    seed: int = 42,
) -> DynamicBatchSampler:
    """Batches of similar duration holding at most ``max_batch_length`` seconds."""
    return DynamicBatchSampler(
        dataset,
        max_batch_length=max_batch_length,
        num_buckets=num_buckets,
        length_func=lambda ex: float(ex["duration"]),
        shuffle=shuffle,
        batch_ordering="random" if shuffle else "descending",
        max_batch_ex=max_batch_ex,
        seed=seed,
    )
