"""Layer-to-layer distillation end to end: live and cached, the export untouched, a resume bit-identical.

``speech-kd distill`` of the tiny student (2 conformer layers) from a random 3-layer teacher of the
teacher yaml's architecture on the tiny synthesised corpus: ``kd_layers: auto`` maps student layers
0, 1 to teacher layers 1, 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from speech_kd.cli import main
from speech_kd.deploy.onnx_export import export_asr
from speech_kd.kd.config import KDSetupError
from speech_kd.model_folder import count_parameters, load_asr
from speech_kd.targets.cache import CacheError
from speech_kd.testing import make_tiny_sb_model
from speech_kd.training.distill import run_distillation
from speech_kd.training.distill_brain import DistillBrain
from tests.conftest import REPO, TINY_MODEL

pytestmark = pytest.mark.slow

STUDENT = [a for a in TINY_MODEL if not a.startswith("--num_encoder_layers")] + ["--num_encoder_layers=2"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    return make_tiny_sb_model(tmp_path_factory.mktemp("teacher") / "model", num_encoder_layers=3)


def _argv(corpus: Path, out: Path, teacher: str, *extra: str) -> list[str]:
    given = {arg.split("=", 1)[0] for arg in extra}
    return [
        str(REPO / "hparams/distill.yaml"),
        f"--data_folder={corpus}",
        f"--output_folder={out}",
        f"--teacher_source={teacher}",
        "--number_of_epochs=1",
        "--report_after_run=False",
        *(arg for arg in STUDENT if arg.split("=", 1)[0] not in given),
        *extra,
    ]


class Killed(Exception):
    """Stands for a kill inside the training loop."""


def _kill_at_batch_then_rerun(argv: list[str], kill_at_batch: int, monkeypatch) -> None:
    """``run_distillation(argv)`` dies at training batch ``kill_at_batch``, then runs again to the end."""
    real, calls = DistillBrain.fit_batch, {"n": 0}

    def dies_at_a_batch(self, batch):
        calls["n"] += 1
        if calls["n"] == kill_at_batch:
            raise Killed
        return real(self, batch)

    monkeypatch.setattr(DistillBrain, "fit_batch", dies_at_a_batch)
    with pytest.raises(Killed):
        run_distillation(argv)
    monkeypatch.setattr(DistillBrain, "fit_batch", real)
    run_distillation(argv)


def _train_stats(out: Path) -> dict:
    return json.loads((out / "history.jsonl").read_text().splitlines()[-1])["train"]


def test_live_layer_kd_trains_projections_that_the_export_leaves_out(tiny_corpus, teacher, tmp_path):
    layers, plain = tmp_path / "layers", tmp_path / "plain"
    assert main(["distill", *_argv(tiny_corpus, layers, teacher, "--kd_layers=auto")]) == 0
    assert main(["distill", *_argv(tiny_corpus, plain, teacher)]) == 0
    stats = _train_stats(layers)
    assert stats["layer_loss"] > 0 and stats["kd_loss"] > 0 and "layer_loss" not in _train_stats(plain)
    setup = (layers / "kd_setup.txt").read_text()
    assert "layers: student enc.transformer.encoder.layers (2) -> teacher speechbrain:model (3): 0->1, 1->2" in setup
    assert json.loads((layers / "kd_run.json").read_text())["kd_layers"] == "auto"
    # the projections are trained and checkpointed ...
    (ckpt,) = (layers / "save").glob("CKPT+*")
    heads = torch.load(ckpt / "kd_layer_projections.ckpt")
    assert heads["heads.0.weight"].shape == (32, 32)
    # ... but the exported student is the same network as without kd_layers: same parameters, same files
    weights = {run: torch.load(run / "model" / "model.ckpt") for run in (layers, plain)}
    assert {k: v.shape for k, v in weights[layers].items()} == {k: v.shape for k, v in weights[plain].items()}
    assert any(not torch.equal(weights[layers][k], weights[plain][k]) for k in weights[plain])  # trained otherwise
    counts = [count_parameters(load_asr(run / "model")) for run in (layers, plain)]
    assert counts[0] == counts[1] == json.loads((layers / "model" / "speech_kd.json").read_text())["params"]
    exported = [export_asr(run / "model", tmp_path / f"onnx_{run.name}") for run in (layers, plain)]
    assert exported[0]["bytes"] == exported[1]["bytes"]


def test_cached_layer_kd_and_a_cache_without_the_layers_is_refused_before_training(tiny_corpus, teacher, tmp_path):
    run = tmp_path / "first"
    assert main(["distill", *_argv(tiny_corpus, run, teacher, "--kd_weight=0")]) == 0  # writes train.csv
    plain_cache, layer_cache = tmp_path / "cache", tmp_path / "cache_layers"
    cache = ["cache-targets", "--teacher", teacher, "--csv", str(run / "train.csv")]
    assert main([*cache, "--out", str(plain_cache)]) == 0
    assert main([*cache, "--out", str(layer_cache), "--hidden_layers", "auto:2"]) == 0
    refused = tmp_path / "refused"
    with pytest.raises(CacheError, match=r"cache .*cache stores no hidden states: .*--hidden_layers auto:2"):
        run_distillation(_argv(tiny_corpus, refused, teacher, "--kd_layers=auto", f"--targets_cache={plain_cache}"))
    assert not list(refused.glob("save/CKPT+*"))
    cached = tmp_path / "cached"
    argv = _argv(tiny_corpus, cached, teacher, "--kd_layers=auto", f"--targets_cache={layer_cache}")
    assert main(["distill", *argv]) == 0
    assert _train_stats(cached)["layer_loss"] > 0
    assert "(cache " in (cached / "kd_setup.txt").read_text()


def test_a_layer_kd_run_killed_mid_epoch_resumes_to_the_same_weights(tiny_corpus, teacher, tmp_path, monkeypatch):
    """Projections and their optimiser state are checkpointed: the resumed run ends where a straight one does."""

    def argv(out: Path) -> list[str]:
        return _argv(tiny_corpus, out, teacher, "--kd_layers=auto", "--ckpt_interval_steps=2", "--max_batch_length=10")

    _kill_at_batch_then_rerun(argv(tmp_path / "killed"), 4, monkeypatch)
    run_distillation(argv(tmp_path / "clean"))
    loads = [(tmp_path / o / "log.txt").read_text().count("Loading a checkpoint") for o in ("killed", "clean")]
    assert loads == [2, 1]  # the rerun resumed from the intra-epoch checkpoint (and both loaded the best for test)
    resumed, straight = (torch.load(tmp_path / o / "model" / "model.ckpt") for o in ("killed", "clean"))
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    heads = [
        torch.load(next((tmp_path / o / "save").glob("CKPT+*")) / "kd_layer_projections.ckpt")
        for o in ("killed", "clean")
    ]
    assert all(torch.equal(heads[0][k], heads[1][k]) for k in heads[1])
    assert _train_stats(tmp_path / "killed")["layer_loss"] == pytest.approx(
        _train_stats(tmp_path / "clean")["layer_loss"]
    )


def test_turning_kd_layers_on_in_a_folder_with_checkpoints_is_told_in_one_line(tiny_corpus, tmp_path, teacher):
    """Projections and optimiser groups the checkpoints lack: a one-line error, even with --allow_changed_settings."""
    out = tmp_path / "run"
    run_distillation(_argv(tiny_corpus, out, teacher))
    again = _argv(tiny_corpus, out, teacher, "--kd_layers=auto", "--allow_changed_settings=True")
    again = [arg for arg in again if arg != "--number_of_epochs=1"] + ["--number_of_epochs=2"]
    with pytest.raises(KDSetupError, match="checkpoints do not fit this run's modules .*use a new output_folder"):
        run_distillation(again)
