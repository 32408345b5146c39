"""The offline demo: corpus -> teacher -> cached targets -> KD and scratch students -> WER table.

Every figure it prints is measured in the run. The teacher is the one
shipped in ``speech_kd/pretrained/teacher_synth`` (trained by the package's
own recipe; the command is in its ``speech_kd.json``), or trained on the spot
when that folder is missing.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from speech_kd import hparams_files
from speech_kd.bench.experiments import main as bench_kd
from speech_kd.data.synth import SplitSpec, SynthConfig, synthesize_corpus
from speech_kd.report import build_report
from speech_kd.training.train import run_training

__all__ = ["run_demo", "SHIPPED_TEACHER", "DemoSizes", "MARKER_NAME", "check_demo_folder"]

logger = logging.getLogger(__name__)

SHIPPED_TEACHER = hparams_files.shipped_teacher()
#: written first into a demo's ``--out``: a rerun continues in a folder that holds it, and only there
MARKER_NAME = "speech_kd_demo.json"


class DemoSizes:
    """How much data and training the demo uses (``quick`` for smoke tests)."""

    def __init__(self, quick: bool = False) -> None:
        self.train_hours = 0.03 if quick else 1.0
        self.eval_hours = 0.01 if quick else 0.15
        self.speakers = 4 if quick else 100
        self.eval_speakers = 2 if quick else 10
        self.epochs = 2 if quick else 12
        self.student_overrides = (
            ["--d_model=32", "--d_ffn=64", "--num_encoder_layers=1", "--cnn_channels_1=8", "--cnn_channels_2=4"]
            if quick
            else []
        )


def _synth(out: Path, sizes: DemoSizes) -> Path:
    corpus = out / "corpus"
    splits = (
        SplitSpec("train", sizes.train_hours, sizes.speakers),
        SplitSpec("dev", sizes.eval_hours, sizes.eval_speakers),
        SplitSpec("test", sizes.eval_hours, sizes.eval_speakers),
    )
    # seed 1234 with 100 training speakers: the same speakers and sentences, a prefix of the
    # corpus the shipped teacher was trained on, so dev/test stay unseen by the teacher
    print(json.dumps(synthesize_corpus(corpus, SynthConfig(splits=splits, seed=1234)), indent=2))
    return corpus


def _teacher(out: Path, corpus: Path, sizes: DemoSizes, quick: bool) -> Path:
    if SHIPPED_TEACHER.exists() and not quick:
        return SHIPPED_TEACHER

    run = out / "teacher"
    overrides = ["--d_model=48", "--d_ffn=96", "--num_encoder_layers=1"] if quick else []
    run_training(
        [
            str(hparams_files.path("teacher.yaml")),
            f"--data_folder={corpus}",
            f"--output_folder={run}",
            f"--number_of_epochs={sizes.epochs}",
            *overrides,
        ]
    )
    return run / "model"


def check_demo_folder(out: Path) -> None:
    """Refuse an ``out`` that is a file, or a non-empty folder without :data:`MARKER_NAME` (not a demo run).

    A demo writes a corpus, runs and a report into ``out``, replacing files of those names; in a folder of
    the user's that would overwrite them, so nothing is done: ``FileExistsError`` naming the folder.
    """
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out}: a file, not a folder; choose a new folder")
    if out.is_dir() and not (out / MARKER_NAME).is_file() and any(out.iterdir()):
        raise FileExistsError(
            f"--out {out}: not empty and not a folder of speech-kd demo (no {MARKER_NAME}); nothing changed: "
            "choose a new or empty folder"
        )


def run_demo(out: str | Path = "demo_run", quick: bool = False) -> dict:
    """Run the whole demo into ``out``; return the results table as a dict.

    ``out`` must be new, empty or an earlier demo's folder (:func:`check_demo_folder`): a rerun continues there.
    """
    started = time.time()
    out = Path(out)
    check_demo_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER_NAME).write_text(json.dumps({"written_by": "speech-kd demo", "quick": quick}) + "\n")
    sizes = DemoSizes(quick)
    print("== 1/4 synthesising the corpus", flush=True)
    corpus = _synth(out, sizes)
    print("== 2/4 teacher", flush=True)
    teacher = _teacher(out, corpus, sizes, quick)
    print(f"teacher: {teacher}", flush=True)
    print("== 3/4 cache the teacher's soft targets, then train the student with KD and from scratch", flush=True)
    argv = [
        "--data",
        str(corpus),
        "--teacher",
        str(teacher),
        "--out",
        str(out),
        "--epochs",
        str(sizes.epochs),
        "--variants",
        "scratch",
        "kd",
    ]
    if sizes.student_overrides:
        argv.append("--extra=" + " ".join(sizes.student_overrides))
    results = bench_kd(argv)
    print("== 4/4 report", flush=True)

    report = build_report(out / "kd", compare={"scratch": out / "scratch" / "model"}, max_utts=None)
    print(f"report: {report}")
    print(f"demo finished in {(time.time() - started) / 60:.1f} min; everything is in {out}")
    return results
