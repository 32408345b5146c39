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
from speech_kd.kd.config import KDConfig
from speech_kd.report import build_report
from speech_kd.scoring.teacher_check import check_teacher
from speech_kd.targets.build import check_cache_covers, check_cache_data, make_targets
from speech_kd.targets.strategies import CachedTargets
from speech_kd.targets.teachers.ensemble import teacher_sources
from speech_kd.training.distill_brain import DistillBrain
from speech_kd.training.train import run_training
from speech_kd.training.unlabeled import filter_unlabeled

__all__ = ["run_distillation", "RUN_KEYS"]

#: resolved settings written to OUTPUT/kd_run.json (SpeechBrain's saved hyperparams.yaml keeps
#: the yaml's text, in which command-line overrides of some keys do not show)
RUN_KEYS = (
    "teacher_source",
    "teacher_kind",
    "teacher_overrides",
    "ensemble_weights",
    "targets_cache",
    "kd_weight",
    "kd_weight_final",
    "temperature",
    "temperature_final",
    "kd_ramp_epochs",
    "kd_loss",
    "kd_reduction",
    "kd_anneal",
    "kd_anneal_margin",
    "kd_topk",
    "blank_mode",
    "blank_threshold",
    "blank_weight",
    "blank_index",
    "frame_shift",
    "max_unmapped_mass",
    "frame_tolerance",
    "number_of_epochs",
    "seed",
    "unlabeled_splits",
    "unlabeled_fraction",
    "unlabeled_min_confidence",
    "unlabeled_kd_loss",
    "cr_ctc_weight",
)

logger = logging.getLogger(__name__)


def _absolute_if_local(source: str) -> str:
    """``source`` made absolute when it names an existing local path; anything else (a hub ID) as given."""
    path = Path(source)
    return str(path.resolve()) if path.exists() else source


def run_distillation(argv: list[str] | None = None) -> dict:
    """Distil as ``hparams/distill.yaml`` says; same arguments as :func:`run_training`."""
    argv = list(sys.argv[1:] if argv is None else argv)

    run = {}

    def setup(brain, hparams, datasets):
        run.update(
            output_folder=hparams["output_folder"],
            report_after_run=hparams.get("report_after_run", True),
            device=str(brain.device),
        )
        if not KDConfig.from_hparams(hparams).uses_teacher:  # a yaml without kd_weight: KDConfig's default
            logger.info("kd_weight=0: training the student without a teacher (the baseline)")
            return
        targets = make_targets(hparams, token_strings(brain.tokenizer), device=str(brain.device))
        unlabeled = datasets.get("unlabeled")
        if isinstance(targets, CachedTargets):
            ids = list(datasets["train"].data_ids) + (list(unlabeled.data_ids) if unlabeled is not None else [])
            # other audio under the run's IDs first: completing such a cache (the advice for missing IDs) fails
            check_cache_data(targets.reader, [datasets["train"], unlabeled], hparams["targets_cache"])
            check_cache_covers(targets.reader, ids, hparams["targets_cache"])
        if unlabeled is not None and hparams.get("unlabeled_min_confidence"):
            threshold = float(hparams["unlabeled_min_confidence"])
            datasets["unlabeled"] = filter_unlabeled(
                targets, unlabeled, threshold, hparams["output_folder"], hparams["sample_rate"], brain.device
            )
        brain.attach_targets(targets)
        out = Path(hparams["output_folder"])
        layers = getattr(brain, "kd_layer_report", None)  # kd_layers: which student layer learns which teacher layer
        (out / "kd_setup.txt").write_text(targets.aligner.report() + "\n" + (layers + "\n" if layers else ""))
        resolved = {key: hparams.get(key) for key in RUN_KEYS}
        # the KD and CR-CTC options as they run: the defaults for keys the yaml leaves out, kd_reduction resolved
        resolved.update(
            brain.kd_config.to_dict(), **brain.cr_config.to_dict(), kd_reduction=brain.kd_option("kd_reduction")
        )

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
