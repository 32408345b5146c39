"""The distillation recipe: the training recipe plus teacher targets from the yaml.

``teacher_source`` names the teacher folder(s) (comma-separated for an
ensemble); ``targets_cache`` switches from the live teacher to a cache made by
``speech-kd cache-targets`` (comma-separated: several caches of one teacher,
e.g. the transcribed and the untranscribed manifests). ``unlabeled_splits``
adds untranscribed audio, KD only (:mod:`speech_kd.training.unlabeled`). The
vocabulary mapping and frame-rate handling are reported at start-up, before
the first batch.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from speech_kd.data.dataio import token_strings
from speech_kd.report import build_report
from speech_kd.scoring.teacher_check import check_teacher
from speech_kd.targets.cache import CacheError, open_cache
from speech_kd.targets.cache.format import describe_data_differences, utt_data_differs
from speech_kd.targets.cache.writer import file_size
from speech_kd.targets.strategies import PERTURBED_CACHE_ERROR, CachedTargets, OnlineTargets, TargetAligner
from speech_kd.targets.teachers.ensemble import load_teachers, teacher_sources
from speech_kd.training.distill_brain import DistillBrain
from speech_kd.training.train import run_training
from speech_kd.training.unlabeled import filter_unlabeled

__all__ = ["run_distillation", "make_targets", "RUN_KEYS"]

#: resolved settings written to OUTPUT/kd_run.json (SpeechBrain's saved hyperparams.yaml keeps
#: the yaml's text, in which command-line overrides of some keys do not show)
RUN_KEYS = ("teacher_source", "teacher_kind", "teacher_overrides", "ensemble_weights", "targets_cache", "kd_weight",
            "kd_weight_final", "temperature", "temperature_final", "kd_ramp_epochs", "kd_loss", "kd_reduction",
            "kd_anneal", "kd_anneal_margin",
            "kd_topk", "blank_mode", "blank_threshold", "blank_weight", "blank_index", "frame_shift",
            "max_unmapped_mass", "frame_tolerance", "number_of_epochs", "seed", "unlabeled_splits",
            "unlabeled_fraction", "unlabeled_min_confidence", "unlabeled_kd_loss")  # fmt: skip

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
        teacher = load_teachers(sources, kind=hparams.get("teacher_kind", "auto"), device=device,
                                overrides=hparams.get("teacher_overrides") or None,
                                weights=hparams.get("ensemble_weights"))  # fmt: skip

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
    """Raise :class:`~speech_kd.targets.cache.CacheError` before training when training utterances have no cached targets.

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
    """Raise :class:`~speech_kd.targets.cache.CacheError` naming the IDs whose cached targets were made from other audio.

    Compared per utterance: the duration in the run's manifest and the size
    of its audio file against what the cache recorded under the same ID
    (:func:`~speech_kd.targets.cache.format.utt_data_differs`). A cache holding more
    utterances than the run uses is fine. A cache written before these
    records existed is used with a warning (its data cannot be checked).
    """
    cached = reader.utt_data()
    if not cached:
        logger.warning("--targets_cache=%s: made before caches recorded each utterance's duration and file size, "
                       "so whether it holds this run's audio cannot be checked; rebuild it to get the check",
                       cache_dir)  # fmt: skip
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


def _absolute_if_local(source: str) -> str:
    """``source`` made absolute when it names an existing local path; anything else (a hub ID) as given."""
    path = Path(source)
    return str(path.resolve()) if path.exists() else source


def run_distillation(argv: list[str] | None = None) -> dict:
    """Distil as ``hparams/distill.yaml`` says; same arguments as :func:`run_training`."""
    argv = list(sys.argv[1:] if argv is None else argv)

    run = {}

    def setup(brain, hparams, datasets):
        run.update(output_folder=hparams["output_folder"], report_after_run=hparams.get("report_after_run", True),
                   device=str(brain.device))  # fmt: skip
        if hparams.get("kd_weight", 0.0) == 0.0 and hparams.get("kd_weight_final") in (None, 0.0):
            logger.info("kd_weight=0: training the student without a teacher (the baseline)")
            return
        targets = make_targets(hparams, token_strings(brain.tokenizer), device=str(brain.device))
        unlabeled = datasets.get("unlabeled")
        if isinstance(targets, CachedTargets):
            ids = list(datasets["train"].data_ids) + (list(unlabeled.data_ids) if unlabeled is not None else [])
            check_cache_covers(targets.reader, ids, hparams["targets_cache"])
            check_cache_data(targets.reader, [datasets["train"], unlabeled], hparams["targets_cache"])
        if unlabeled is not None and hparams.get("unlabeled_min_confidence"):
            threshold = float(hparams["unlabeled_min_confidence"])
            datasets["unlabeled"] = filter_unlabeled(targets, unlabeled, threshold, hparams["output_folder"],
                                                     hparams["sample_rate"], brain.device)  # fmt: skip
        brain.attach_targets(targets)
        out = Path(hparams["output_folder"])
        (out / "kd_setup.txt").write_text(targets.aligner.report() + "\n")
        resolved = {key: hparams.get(key) for key in RUN_KEYS}

        for key in ("teacher_source", "targets_cache"):  # absolute, so `speech-kd report` finds them from anywhere
            if resolved.get(key):
                resolved[key] = ",".join(_absolute_if_local(s) for s in teacher_sources(resolved[key]))
        (out / "kd_run.json").write_text(json.dumps(resolved, indent=2, default=str) + "\n")
        check_teacher(brain, hparams, targets, datasets)  # OUTPUT/teacher_dev.json, compared every epoch

    results = run_training(argv, brain_class=DistillBrain, setup=setup)
    _report(run)
    return results


def _report(run: dict) -> None:
    """Write OUTPUT/report.html at the end of a run (main process; a failure only warns)."""
    import speechbrain as sb

    out = run.get("output_folder")
    if not out or not run.get("report_after_run", True) or not sb.utils.distributed.if_main_process():
        return
    try:
        logger.info("report: %s", build_report(out, max_utts=100, device=run.get("device", "cpu")))
    except Exception as err:  # the model is already saved; a report problem must not fail the run
        logger.warning("could not write the run report: %s", err)
