"""One split of a LibriSpeech-layout folder to a CSV manifest, bad input skipped and listed; untranscribed splits."""

from __future__ import annotations

import csv
import logging
import os
import secrets
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from speech_kd.data.audio import AudioError, probe_audio

logger = logging.getLogger(__name__)


#: Characters allowed in transcripts (after upper-casing): LibriSpeech's.
LIBRISPEECH_ALPHABET = " 'ABCDEFGHIJKLMNOPQRSTUVWXYZ"
AUDIO_EXTENSIONS = (".flac", ".wav")
CSV_HEADER = ["ID", "duration", "wav", "spk_id", "wrd"]


@dataclass(frozen=True)
class Skipped:
    """One utterance (or file) left out of a manifest."""

    split: str
    utt_id: str
    path: str
    reason: str


@dataclass
class PrepareResult:
    """What ``prepare_librispeech`` wrote and what it skipped, per split."""

    csv_files: dict[str, str] = field(default_factory=dict)
    kept: dict[str, int] = field(default_factory=dict)
    hours: dict[str, float] = field(default_factory=dict)
    skipped: list[Skipped] = field(default_factory=list)

    def skipped_counts(self) -> dict[str, Counter]:
        """Skipped utterances per split, counted by kind of reason."""
        out: dict[str, Counter] = {}
        for item in self.skipped:
            out.setdefault(item.split, Counter())[item.reason.split(":")[0].split(" (")[0]] += 1
        return out


def _read_transcripts(split_dir: Path, skipped: list[Skipped], split: str) -> dict[str, tuple[str, Path]]:
    """Map utterance ID to (raw transcript, chapter folder) for one split."""
    out: dict[str, tuple[str, Path]] = {}
    for trans in sorted(split_dir.glob("*/*/*.trans.txt")):
        try:
            lines = trans.read_text(encoding="utf-8-sig").splitlines()  # -sig: a byte-order mark is not text
        except (OSError, UnicodeDecodeError) as err:
            skipped.append(Skipped(split, "-", str(trans), f"unreadable transcript file ({err})"))
            continue
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            utt_id, _, text = line.strip().partition(" ")
            if utt_id in out:
                skipped.append(Skipped(split, utt_id, f"{trans}:{lineno}", "duplicate utterance ID"))
                continue
            out[utt_id] = (text, trans.parent)
    return out


def _find_audio(split_dir: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for ext in AUDIO_EXTENSIONS:
        for path in split_dir.glob(f"*/*/*{ext}"):
            if path.name.endswith(".part" + ext):
                continue  # an unfinished file from an interrupted synthesis
            files.setdefault(path.stem, path)
    return files


def _check_text(text: str, alphabet: str) -> tuple[str, str | None]:
    """Normalise a transcript; return it and a reason to skip, or None."""
    norm = " ".join(text.upper().split())
    if not norm:
        return norm, "empty transcript"
    bad = sorted(set(norm) - set(alphabet))
    if bad:
        return norm, f"characters outside the alphabet: {''.join(bad)!r}"
    return norm, None


def prepare_split(
    data_folder: str | os.PathLike,
    split: str,
    save_folder: str | os.PathLike,
    sample_rate: int = 16000,
    alphabet: str = LIBRISPEECH_ALPHABET,
    workers: int = 8,
) -> PrepareResult:
    """Write ``SAVE_FOLDER/SPLIT.csv`` for one split; see module docstring."""
    split_dir = Path(data_folder) / split
    if not split_dir.is_dir():
        raise FileNotFoundError(f"split folder {split_dir} does not exist (data_folder={data_folder})")
    result = PrepareResult()
    skipped = result.skipped
    transcripts = _read_transcripts(split_dir, skipped, split)
    audio = _find_audio(split_dir)

    for utt_id in sorted(set(audio) - set(transcripts)):
        skipped.append(Skipped(split, utt_id, str(audio[utt_id]), "audio without a transcript line"))
    candidates = []
    for utt_id in sorted(transcripts):
        text, chapter_dir = transcripts[utt_id]
        if utt_id not in audio:
            path = chapter_dir / f"{utt_id}.flac"
            skipped.append(Skipped(split, utt_id, str(path), "transcript line without audio"))
            continue
        norm, problem = _check_text(text, alphabet)
        if problem:
            skipped.append(Skipped(split, utt_id, str(audio[utt_id]), problem))
            continue
        candidates.append((utt_id, audio[utt_id], norm, speaker_chapter(utt_id)))

    rows = _probe_rows(candidates, split, skipped, sample_rate, workers)
    return _write_split(result, split, save_folder, rows)


def _probe_rows(candidates: list, split: str, skipped: list[Skipped], sample_rate: int, workers: int) -> list:
    """CSV rows of the ``(utt_id, path, wrd, spk_id)`` candidates whose audio passes the checks."""

    def probe(item):
        try:
            return item, probe_audio(item[1], sample_rate=sample_rate, channels=1), None
        except AudioError as err:
            return item, None, err.reason

    rows = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for (utt_id, path, norm, spk_id), info, problem in pool.map(probe, candidates):
            if problem:
                skipped.append(Skipped(split, utt_id, str(path), problem))
                continue
            # as SpeechBrain's librispeech_prepare.py writes them: the duration as str(frames / rate)
            rows.append([utt_id, str(info.duration), str(Path(path).resolve()), spk_id, norm])
    return rows


def _write_split(result: PrepareResult, split: str, save_folder: str | os.PathLike, rows: list) -> PrepareResult:
    """Write ``SPLIT.csv`` and ``SPLIT_skipped.csv`` atomically; log what was skipped."""
    skipped = result.skipped
    save = Path(save_folder)
    save.mkdir(parents=True, exist_ok=True)
    csv_path = save / f"{split}.csv"
    _atomic_csv(csv_path, CSV_HEADER, rows)
    _atomic_csv(
        save / f"{split}_skipped.csv",
        ["ID", "path", "reason"],
        [[s.utt_id, s.path, s.reason] for s in skipped],
    )
    result.csv_files[split] = str(csv_path)
    result.kept[split] = len(rows)
    result.hours[split] = round(sum(float(r[1]) for r in rows) / 3600.0, 4)
    for item in skipped:
        logger.warning("skipped %s (%s): %s", item.utt_id, item.path, item.reason)
    if not rows:
        logger.warning("%s: no usable utterance in split %s (%d skipped); its CSV is empty", csv_path, split,
                       len(skipped))
    return result


def _unlabeled_ids(split_dir: Path, files: list[Path]) -> list[str]:
    """Utterance IDs: file stems, or relative paths (``/`` -> ``__``) for stems that occur twice.

    Examples
    --------
    >>> root = Path("split")
    >>> _unlabeled_ids(root, [root / "a" / "1.wav", root / "b" / "1.wav", root / "b" / "2.flac"])
    ['a__1.wav', 'b__1.wav', '2']
    """
    counts = Counter(path.stem for path in files)
    return [
        path.stem if counts[path.stem] == 1 else str(path.relative_to(split_dir)).replace(os.sep, "__")
        for path in files
    ]


def speaker_chapter(utt_id: str) -> str:
    """``spk_id`` as SpeechBrain's ``librispeech_prepare.py`` writes it: ``SPK-CHAPTER`` of ``SPK-CHAPTER-UTT``.

    Examples
    --------
    >>> speaker_chapter("84-121123-0001")
    '84-121123'
    """
    return "-".join(utt_id.split("-")[0:2])


def _speaker_of(split: str, split_dir: Path, path: Path, utt_id: str) -> str:
    """LibriSpeech's ``SPK-CHAPTER`` of ``SPK-CHAPTER-UTT``, else the top folder under the split."""
    parts = utt_id.split("-")
    if len(parts) == 3 and all(part.isdigit() for part in parts):
        return speaker_chapter(utt_id)
    rel = path.relative_to(split_dir).parts
    return rel[0] if len(rel) > 1 else split


def prepare_unlabeled_split(
    data_folder: str | os.PathLike,
    split: str,
    save_folder: str | os.PathLike,
    sample_rate: int = 16000,
    workers: int = 8,
) -> PrepareResult:
    """Write ``SAVE_FOLDER/SPLIT.csv`` for an untranscribed split: every audio file under it, ``wrd`` empty.

    Parameters
    ----------
    data_folder : path-like
        Folder holding the split folder.
    split : str
        Split folder name; searched at any depth for ``.flac`` and ``.wav``
        files (``*.trans.txt`` files are ignored).
    save_folder : path-like
        Where ``SPLIT.csv`` and ``SPLIT_skipped.csv`` go.
    sample_rate : int
        Audio at another rate is skipped and reported, as for transcribed splits.
    workers : int
        Threads probing the audio files.

    Returns
    -------
    PrepareResult
        The CSV path, kept count, hours and skipped files of the split.

    Raises
    ------
    FileNotFoundError
        The split folder does not exist, or holds no ``.flac``/``.wav`` file.
    ValueError
        None of its audio files is usable (each unreadable, empty or at another rate).
    """
    split_dir = Path(data_folder) / split
    if not split_dir.is_dir():
        raise FileNotFoundError(f"unlabeled split folder {split_dir} does not exist (data_folder={data_folder})")
    files = sorted(
        Path(folder) / name
        for folder, _, names in os.walk(split_dir, followlinks=True)  # linked folders too (rglob skips them)
        for name in names
        if name.endswith(AUDIO_EXTENSIONS) and not name.endswith(tuple(".part" + ext for ext in AUDIO_EXTENSIONS))
    )
    if not files:
        raise FileNotFoundError(f"unlabeled split folder {split_dir} holds no .flac or .wav file")
    result = PrepareResult()
    ids = _unlabeled_ids(split_dir, files)
    candidates = [(uid, path, "", _speaker_of(split, split_dir, path, uid)) for uid, path in zip(ids, files)]
    rows = _probe_rows(candidates, split, result.skipped, sample_rate, workers)
    if not rows:  # a header-only CSV would train on nothing from this split without a word
        reasons = Counter(item.reason.split(" (")[0] for item in result.skipped)
        first = result.skipped[0]
        raise ValueError(
            f"unlabeled split folder {split_dir}: none of its {len(files)} audio file(s) is usable "
            f"({', '.join(f'{n}: {reason}' for reason, n in reasons.most_common(3))}; e.g. {first.path}: "
            f"{first.reason}); fix the files, or leave the split out of --unlabeled_splits"
        )
    return _write_split(result, split, save_folder, rows)


def _atomic_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    """Write the CSV via a temporary file of its own (never one of the user's) and ``os.replace``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")  # a new name, made with "x"
    out = open(tmp, "x", newline="", encoding="utf-8")  # outside the try: a name that exists is never removed
    try:
        with out as fh:
            writer = csv.writer(fh)
            writer.writerow(header)
            writer.writerows(rows)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
