"""The offline demo: corpus -> teacher -> cached targets -> KD and scratch students -> WER table.

Every figure it prints is measured in the run. The teacher is the one
shipped in ``speech_kd/pretrained/teacher_synth`` (trained by the project's
own recipe; the command is in its ``speech_kd.json``), or trained on the spot
when that folder is missing.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from speech_kd.evaluate import evaluate_model

__all__ = ["run_demo", "SHIPPED_TEACHER", "DemoSizes"]

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
SHIPPED_TEACHER = Path(__file__).resolve().parent / "pretrained" / "teacher_synth"


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
    from speech_kd.synth import SplitSpec, SynthConfig, synthesize_corpus

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
    from speech_kd.train import run_training

    run = out / "teacher"
    overrides = ["--d_model=48", "--d_ffn=96", "--num_encoder_layers=1"] if quick else []
    run_training([str(REPO / "hparams/teacher.yaml"), f"--data_folder={corpus}", f"--output_folder={run}",
                  f"--number_of_epochs={sizes.epochs}", *overrides])  # fmt: skip
    return run / "model"


def run_demo(out: str | Path = "demo_run", quick: bool = False) -> dict:
    """Run the whole demo into ``out``; return the results table as a dict."""
    from speech_kd.cache import cache_targets
    from speech_kd.distill import run_distillation
    from speech_kd.prepare import prepare_librispeech

    started = time.time()
    out = Path(out)
    sizes = DemoSizes(quick)
    print("== 1/5 synthesising the corpus")
    corpus = _synth(out, sizes)
    print("== 2/5 teacher")
    teacher = _teacher(out, corpus, sizes, quick)
    print(f"teacher: {teacher}")
    print("== 3/5 caching the teacher's soft targets (the teacher runs once)")
    csvs = prepare_librispeech(corpus, out / "data", splits=["train", "test"]).csv_files
    cache = out / "cache"
    print(json.dumps(cache_targets(str(teacher), csvs["train"], cache), indent=2))
    common = [str(REPO / "hparams/distill.yaml"), f"--teacher_source={teacher}", f"--data_folder={corpus}",
              f"--number_of_epochs={sizes.epochs}", *sizes.student_overrides]  # fmt: skip
    print("== 4/5 students: distilled from the cached targets, and the same student from scratch")
    run_distillation([*common, f"--output_folder={out / 'student_kd'}", f"--targets_cache={cache}"])
    run_distillation([*common, f"--output_folder={out / 'student_scratch'}", "--kd_weight=0"])
    print("== 5/5 evaluating on the test split")
    models = {"teacher": teacher, "student_kd": out / "student_kd" / "model",
              "student_scratch": out / "student_scratch" / "model"}  # fmt: skip
    results = {}
    for name, folder in models.items():
        results[name] = evaluate_model(folder, csvs["test"], json_path=out / f"eval_{name}.json",
                                       utts_path=out / f"eval_{name}_utts.txt").summary  # fmt: skip
    table = format_table(results)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    try:
        from speech_kd.report import build_report

        print(f"report: {build_report(out / 'student_kd')}")
    except ImportError:
        pass
    print(table)
    print(f"demo finished in {(time.time() - started) / 60:.1f} min; results in {out}")
    return results


def format_table(results: dict) -> str:
    """Markdown table of WER, CER, parameters and RTF per model."""
    lines = ["| model | WER % | CER % | parameters | RTF |", "|---|---:|---:|---:|---:|"]
    for name, s in results.items():
        lines.append(f"| {name} | {s['wer']:.2f} | {s['cer']:.2f} | {s['params']:,} | {s['rtf']:.4f} |")
    return "\n".join(lines)
