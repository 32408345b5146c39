"""Teacher targets as a run's yaml asks for them: a live teacher or a cache, checked before training.

:func:`make_targets` builds :class:`~speech_kd.targets.strategies.OnlineTargets` (the teacher run on
each batch) or :class:`~speech_kd.targets.strategies.CachedTargets` (``speech-kd cache-targets``
output) from the distillation keys of the yaml; :func:`check_cache_covers` and
:func:`check_cache_data` refuse a cache that misses the run's utterances or was made from other audio,
before the first batch rather than hours in.
"""

from __future__ import annotations

import logging

from speech_kd.targets.cache import CacheError, open_cache
from speech_kd.targets.cache.folder import file_size
from speech_kd.targets.cache.format import describe_data_differences, utt_data_differs
from speech_kd.targets.strategies import PERTURBED_CACHE_ERROR, CachedTargets, OnlineTargets, TargetAligner
from speech_kd.targets.teachers.ensemble import load_teachers, teacher_sources

__all__ = ["check_cache_covers", "check_cache_data", "make_targets"]

logger = logging.getLogger(__name__)


def make_targets(hparams: dict, student_tokens: list[str], device: str = "cpu"):
    """Build ``OnlineTargets`` or ``CachedTargets`` as the yaml says.

    ``teacher_precision`` (fp32 default) is the autocast the live teacher
    runs under, independent of the student's ``--precision``;
    ``teacher_overrides`` (a dict) is passed to a SpeechBrain teacher's
    ``from_hparams`` (e.g. to point its wav2vec2 ``source`` at a local folder).
    """
    sources = teacher_sources(hparams.get("teacher_source"))
    cache_dir = str(hparams.get("targets_cache") or "")
    if not sources and not cache_dir:
        raise ValueError("distillation needs --teacher_source=FOLDER (or --targets_cache=CACHE_DIR)")
    teacher = None
    if sources:
        teacher = load_teachers(
            sources,
            kind=hparams.get("teacher_kind", "auto"),
            device=device,
            overrides=hparams.get("teacher_overrides") or None,
            weights=hparams.get("ensemble_weights"),
        )

    common = {
        "student_tokens": student_tokens,
        "student_blank": hparams.get("blank_index", 0),
        "student_frame_shift": hparams.get("frame_shift"),  # None: measured on the first training batch
        "max_unmapped_mass": hparams.get("max_unmapped_mass", 0.05),
        "frame_tolerance": hparams.get("frame_tolerance"),  # None: from the two frame shifts
    }
    if cache_dir:
        if hparams.get("speed_perturb") is True:  # CTCBrain's switch (a recipe's SpeedPerturb object: KDMixin)
            raise ValueError(f"--targets_cache={cache_dir}: {PERTURBED_CACHE_ERROR}")

        reader = open_cache(cache_dir)  # A,B,...: several caches of one teacher (e.g. transcribed + untranscribed)
        meta = reader.metadata
        if teacher is not None:
            reader.check_compatible(teacher_fingerprint=teacher.fingerprint(), teacher_tokens=teacher.tokens)
        reader.check_compatible(student_tokens=student_tokens)
        aligner = TargetAligner(meta["teacher_tokens"], meta["blank_index"], meta["frame_shift"], **common)
        strategy = CachedTargets(reader, aligner)
        source = f"cache {cache_dir} (teacher {meta.get('teacher_name')})"
    else:
        aligner = TargetAligner(teacher.tokens, teacher.blank_index, teacher.frame_shift, **common)
        strategy = OnlineTargets(teacher, aligner, hparams["sample_rate"], hparams.get("teacher_precision", "fp32"))
        source = f"live teacher {teacher.name}"
    logger.info("KD targets from %s\n%s", source, aligner.report())
    return strategy


def check_cache_covers(reader, train_ids: list[str], cache_dir) -> None:
    """Raise :class:`~speech_kd.targets.cache.CacheError` before training when utterances have no cached targets.

    A cache made for other data (or an older manifest) would otherwise fail at
    the first batch that holds such an utterance, possibly hours in.
    """
    missing = sorted(set(train_ids) - reader.ids)
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise CacheError(
            f"--targets_cache={cache_dir}: {len(missing)} of {len(train_ids)} training utterances have no cached "
            f"targets ({shown}); cache made from {reader.metadata.get('csv')}: run speech-kd cache-targets on this "
            "training CSV (it completes an existing cache); for untranscribed audio, cache OUTPUT/unlabeled.csv "
            "into its own folder and give both: --targets_cache=TRAIN_CACHE,UNLABELED_CACHE"
        )


def check_cache_data(reader, datasets: list, cache_dir) -> None:
    """Raise :class:`~speech_kd.targets.cache.CacheError` naming the IDs whose cached targets are of other audio.

    Compared per utterance: the duration in the run's manifest and the size
    of its audio file against what the cache recorded under the same ID
    (:func:`~speech_kd.targets.cache.format.utt_data_differs`). A cache holding more
    utterances than the run uses is fine. A cache written before these
    records existed is used with a warning (its data cannot be checked).
    """
    cached = reader.utt_data()
    if not cached:
        logger.warning(
            "--targets_cache=%s: made before caches recorded each utterance's duration and file size, "
            "so whether it holds this run's audio cannot be checked; rebuild it to get the check",
            cache_dir,
        )
        return
    diffs = []
    for dataset in datasets:
        for uid in [] if dataset is None else dataset.data_ids:
            row = dataset.data[uid]
            if uid in cached:
                given = (float(row["duration"]), file_size(row["wav"]))
                if utt_data_differs(cached[uid], given):
                    diffs.append((uid, cached[uid], given))
    if diffs:
        raise CacheError(
            f"--targets_cache={cache_dir}: cache made from {reader.metadata.get('csv')} holds other audio than this "
            f"run's: {describe_data_differences(diffs, 'run')}; make a cache of this run's train.csv in a new folder "
            "(speech-kd cache-targets --csv OUTPUT/train.csv --out NEW_CACHE)"
        )
