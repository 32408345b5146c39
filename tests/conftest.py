"""Shared fixtures: a tiny synthesised corpus and tiny model overrides (real audio, real SpeechBrain)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent

#: re-created user recipes (run by tests/integration/test_recipe_lines.py as users run them), not test modules:
#: under --doctest-modules their two train.py files would collide as one module name
collect_ignore_glob = ["recipes/*"]


def _hypothesis_skips_lazy_modules() -> None:
    """Hypothesis (>= 6.13x) reads ``__file__`` of every module in ``sys.modules`` for constants; on SpeechBrain's
    lazy modules that imports optional integrations (k2) and fails the whole session. Mark those as seen first."""
    try:
        from hypothesis.internal.conjecture import providers
    except ImportError:
        return
    original = getattr(providers, "_get_local_constants", None)
    seen = getattr(providers, "_seen_modules", None)
    if original is None or seen is None or getattr(original, "_skips_lazy", False):
        return

    def get_local_constants():
        import sys

        for module in list(sys.modules.values()):
            if type(module).__name__ in ("LazyModule", "DeprecatedModuleRedirect"):
                seen.add(id(module))
        return original()

    get_local_constants._skips_lazy = True
    providers._get_local_constants = get_local_constants


_hypothesis_skips_lazy_modules()

#: overrides that shrink any of our yamls to a model that trains in seconds
TINY_MODEL = [
    "--d_model=32",
    "--d_ffn=64",
    "--num_encoder_layers=1",
    "--cnn_channels_1=8",
    "--cnn_channels_2=4",
    "--max_batch_length=40",
    "--warmup_steps=5",
    "--lr=0.003",
]


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", help="device for tests that train or run models")


@pytest.fixture(scope="session")
def device(request):
    return request.config.getoption("--device")


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """About 2 minutes of synthesised speech in LibriSpeech layout (train/dev/test)."""
    from speech_kd.data.synth import SplitSpec, SynthConfig, synthesize_corpus

    root = tmp_path_factory.mktemp("corpus") / "synth"
    config = SynthConfig(
        splits=(SplitSpec("train", 0.025, 4), SplitSpec("dev", 0.006, 2), SplitSpec("test", 0.006, 2)),
        seed=7,
        jobs=1,
    )
    synthesize_corpus(root, config)
    return root


@pytest.fixture()
def corpus_copy(tiny_corpus, tmp_path) -> Path:
    """A private, writable copy of the tiny corpus (for tests that break files)."""
    dst = tmp_path / "corpus"
    shutil.copytree(tiny_corpus, dst)
    return dst


@pytest.fixture(scope="session")
def trained_run(tiny_corpus, tmp_path_factory) -> Path:
    """A real 2-epoch training run of the tiny teacher; returns its output folder."""
    from speech_kd.training.train import run_training

    out = tmp_path_factory.mktemp("runs") / "teacher"
    run_training(
        [
            str(REPO / "hparams/teacher.yaml"),
            f"--data_folder={tiny_corpus}",
            f"--output_folder={out}",
            "--number_of_epochs=2",
            *TINY_MODEL,
        ]
    )
    return out
