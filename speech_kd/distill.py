"""The distillation recipe: the training recipe plus teacher targets from the yaml.

``teacher_source`` names the teacher folder(s) (comma-separated for an
ensemble); ``targets_cache`` switches from the live teacher to a cache made by
``speech-kd cache-targets``. The vocabulary mapping and frame-rate handling
are reported at start-up, before the first batch.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from speech_kd.dataio import token_strings
from speech_kd.kd import DistillBrain
from speech_kd.targets import PERTURBED_CACHE_ERROR, CachedTargets, OnlineTargets, TargetAligner
from speech_kd.train import run_training

__all__ = ["run_distillation", "make_targets", "RUN_KEYS"]

#: resolved settings written to OUTPUT/kd_run.json (SpeechBrain's saved hyperparams.yaml keeps
#: the yaml's text, in which command-line overrides of some keys do not show)
RUN_KEYS = ("teacher_source", "teacher_kind", "teacher_overrides", "ensemble_weights", "targets_cache", "kd_weight",
            "kd_weight_final", "temperature", "temperature_final", "kd_ramp_epochs", "kd_loss", "kd_reduction",
            "kd_topk", "blank_mode", "blank_threshold", "blank_weight", "blank_index", "frame_shift",
            "max_unmapped_mass", "frame_tolerance", "number_of_epochs", "seed")  # fmt: skip

logger = logging.getLogger(__name__)


def make_targets(hparams: dict, student_tokens: list[str], device: str = "cpu"):
    """Build ``OnlineTargets`` or ``CachedTargets`` as the yaml says.

    ``teacher_precision`` (fp32 default) is the autocast the live teacher
    runs under, independent of the student's ``--precision``;
    ``teacher_overrides`` (a dict) is passed to a SpeechBrain teacher's
    ``from_hparams`` (e.g. to point its wav2vec2 ``source`` at a local folder).
    """
    from speech_kd.teachers.ensemble import load_teachers, teacher_sources

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
        "student_blank": hparams["blank_index"],
        "student_frame_shift": hparams["frame_shift"],
        "max_unmapped_mass": hparams.get("max_unmapped_mass", 0.05),
        "frame_tolerance": hparams.get("frame_tolerance", 2),
    }
    if cache_dir:
        from speech_kd.cache import CacheReader

        if hparams.get("speed_perturb"):
            raise ValueError(f"--targets_cache={cache_dir}: {PERTURBED_CACHE_ERROR}")

        reader = CacheReader(cache_dir)
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
    """Raise :class:`~speech_kd.cache.CacheError` before training when training utterances have no cached targets.

    A cache made for other data (or an older manifest) would otherwise fail at
    the first batch that holds such an utterance, possibly hours in.
    """
    from speech_kd.cache import CacheError

    missing = sorted(set(train_ids) - reader.ids)
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise CacheError(
            f"--targets_cache={cache_dir}: {len(missing)} of {len(train_ids)} training utterances have no cached "
            f"targets ({shown}); cache made from {reader.metadata.get('csv')}: run speech-kd cache-targets on this "
            "training CSV (it completes an existing cache)"
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
        if isinstance(targets, CachedTargets):
            check_cache_covers(targets.reader, datasets["train"].data_ids, hparams["targets_cache"])
        brain.attach_targets(targets)
        out = Path(hparams["output_folder"])
        (out / "kd_setup.txt").write_text(targets.aligner.report() + "\n")
        resolved = {key: hparams.get(key) for key in RUN_KEYS}
        from speech_kd.teachers.ensemble import teacher_sources

        for key in ("teacher_source", "targets_cache"):  # absolute, so `speech-kd report` finds them from anywhere
            if resolved.get(key):
                resolved[key] = ",".join(_absolute_if_local(s) for s in teacher_sources(resolved[key]))
        (out / "kd_run.json").write_text(json.dumps(resolved, indent=2, default=str) + "\n")

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
        from speech_kd.report import build_report

        logger.info("report: %s", build_report(out, max_utts=100, device=run.get("device", "cpu")))
    except Exception as err:  # the model is already saved; a report problem must not fail the run
        logger.warning("could not write the run report: %s", err)
