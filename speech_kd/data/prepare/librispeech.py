"""``prepare_librispeech``: several splits of a folder, each redone only when its inputs changed."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from speech_kd.data.prepare.splits import LIBRISPEECH_ALPHABET, PrepareResult, prepare_split, prepare_unlabeled_split
from speech_kd.data.prepare.stamp import read_stamp, split_files, what_changed, write_stamp

logger = logging.getLogger(__name__)


def prepare_librispeech(
    data_folder: str | os.PathLike,
    save_folder: str | os.PathLike,
    splits: list[str] | tuple[str, ...] | None = None,
    sample_rate: int = 16000,
    alphabet: str = LIBRISPEECH_ALPHABET,
    skip_if_done: bool = True,
    unlabeled_splits: list[str] | tuple[str, ...] | None = None,
) -> PrepareResult:
    """Prepare several splits of a LibriSpeech-layout folder.

    Parameters
    ----------
    data_folder : path-like
        Folder holding one sub-folder per split (``train-clean-100``, ...).
    save_folder : path-like
        Where ``SPLIT.csv`` and ``SPLIT_skipped.csv`` go.
    splits : list of str, optional
        Split folder names; default: every sub-folder of ``data_folder``.
    sample_rate : int
        Audio at another rate is skipped and reported (resample it first).
    alphabet : str
        Allowed transcript characters after upper-casing.
    skip_if_done : bool
        Reuse a split's CSV when it was made from the same inputs and settings
        (recorded in ``SAVE_FOLDER/prepare_SPLIT.json``).
    unlabeled_splits : list of str, optional
        Split folders prepared as untranscribed audio
        (:func:`prepare_unlabeled_split`: every audio file, empty ``wrd``,
        transcripts ignored); never in the default ``splits``.

    Returns
    -------
    PrepareResult
        CSV paths, kept counts, hours and the skipped utterances.
    """
    data_folder = Path(data_folder)
    if not data_folder.is_dir():
        raise FileNotFoundError(f"data_folder {data_folder} does not exist")
    unlabeled = list(unlabeled_splits or [])
    both = sorted(set(unlabeled) & set(splits or []))
    if both:
        raise ValueError(f"split(s) {', '.join(both)} given as transcribed and as unlabeled: name each in one list")
    if not splits and not unlabeled:
        splits = sorted(p.name for p in data_folder.iterdir() if p.is_dir() and any(p.glob("*/*/*.trans.txt")))
        if not splits:
            raise FileNotFoundError(f"no LibriSpeech-layout split (SPLIT/SPK/CHAPTER/*.trans.txt) in {data_folder}")
    splits = list(splits or [])
    missing = [split for split in splits if not (data_folder / split).is_dir()]
    if missing:  # before any CSV is written: a typo in the last split must not leave the first ones half-done
        raise FileNotFoundError(f"no split folder {', '.join(missing)} in {data_folder}")
    missing = [split for split in unlabeled if not (data_folder / split).is_dir()]
    if missing:
        raise FileNotFoundError(f"unlabeled split folder {', '.join(missing)} does not exist in {data_folder}")
    check_own_csvs(Path(save_folder), [*splits, *unlabeled])  # before any CSV is written
    total = PrepareResult()
    for split in [*splits, *unlabeled]:
        is_unlabeled = split in unlabeled
        stamp = Path(save_folder) / f"prepare_{split}.json"
        settings = {
            "data_folder": str(data_folder.resolve()),
            "split": split,
            "sample_rate": sample_rate,
            "alphabet": alphabet,
            "files": split_files(data_folder / split, deep=is_unlabeled),
        }
        if is_unlabeled:
            settings["unlabeled"] = True
        csv_path = Path(save_folder) / f"{split}.csv"
        old = read_stamp(stamp) if skip_if_done and csv_path.exists() else None
        if old == settings:
            logger.info("%s is up to date, skipping preparation", csv_path)
            total.csv_files[split] = str(csv_path)
            continue
        if old is not None:
            logger.info("%s: redoing split %s (%s)", csv_path, split, what_changed(old, settings))
        Path(save_folder).mkdir(parents=True, exist_ok=True)
        # the stamp first (it never equals a finished split's): a CSV left by a killed run stays ours
        write_stamp(stamp, {**settings, "files": {}, "writing": True})
        if is_unlabeled:
            res = prepare_unlabeled_split(data_folder, split, save_folder, sample_rate)
        else:
            res = prepare_split(data_folder, split, save_folder, sample_rate, alphabet)
        total.csv_files.update(res.csv_files)
        total.kept.update(res.kept)
        total.hours.update(res.hours)
        total.skipped.extend(res.skipped)
        write_stamp(stamp, settings)
        logger.info(
            "%s written: %d utterances, %.2f h%s",
            csv_path,
            res.kept.get(split, 0),
            res.hours.get(split, 0.0),
            f", {len(res.skipped)} skipped (listed in {split}_skipped.csv)" if res.skipped else "",
        )
    return total


def check_own_csvs(save_folder: Path, splits: list[str]) -> None:
    """Refuse to replace a ``SPLIT.csv`` or ``SPLIT_skipped.csv`` that ``prepare`` did not write.

    Ours have ``prepare_SPLIT.json`` beside them (written before the CSVs); any
    other file of those names is the user's: ``FileExistsError`` naming it.
    """
    for split in splits:
        if (save_folder / f"prepare_{split}.json").is_file():
            continue
        for name in (f"{split}.csv", f"{split}_skipped.csv"):
            path = save_folder / name
            if path.exists() or path.is_symlink():
                raise FileExistsError(
                    f"{path}: exists and was not written by prepare (no prepare_{split}.json beside it); "
                    "not overwritten: move it away or choose another --save_folder"
                )
