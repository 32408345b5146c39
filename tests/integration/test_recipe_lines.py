"""The README's "your own recipe" lines, applied as a user would to SpeechBrain-shaped recipes, then ``fit()``.

The recipes in ``tests/recipes/`` have the structure of SpeechBrain's LibriSpeech CTC recipe (SentencePiece
tokenizer it trains, ``Augmenter`` with ``concat_original`` and speed perturbation, a 3-tuple forward, its
own stage hooks) and of its TIMIT CRDNN recipe (20 ms frames, a 2-tuple forward, noise). The lines are read
from README.md, so the README cannot drift from what is tested.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from speech_kd.testing import make_tiny_sb_model
from tests.conftest import REPO

pytestmark = pytest.mark.slow

RECIPES = REPO / "tests" / "recipes"
HEADING = "Adding distillation to your own SpeechBrain CTC recipe"  # a heading of README.md, any level


def readme_lines() -> dict:
    """The section's code: the three python lines, the wrapping form and the yaml keys."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[re.search(rf"^#+ {re.escape(HEADING)}$", text, re.M).start() :]
    blocks = re.findall(r"```(\w+)\n(.*?)```", section, re.S)[:3]
    assert [lang for lang, _ in blocks] == ["python", "python", "yaml"], blocks
    code = [line.split("#")[0].rstrip() for line in blocks[0][1].splitlines()]
    marked = {m: next(c for c, line in zip(code, blocks[0][1].splitlines()) if f"({m})" in line) for m in "123"}
    wrap = [line.split("#")[0].rstrip() for line in blocks[1][1].splitlines() if line.strip()]
    return {**marked, "wrap": wrap, "yaml": blocks[2][1]}


def _statement_end(lines: list[str], start: int) -> int:
    """Index of the last line of the (parenthesised) statement starting at ``start``."""
    depth = 0
    for i in range(start, len(lines)):
        depth += lines[i].count("(") - lines[i].count(")")
        if depth <= 0:
            return i
    raise AssertionError("unbalanced statement")


def apply_readme(source: str, form: str, brain_class: str, tokenizer_var: str) -> str:
    """``source`` changed by exactly the README's lines (``form``: ``in_place`` or ``wrap``)."""
    lines_readme = readme_lines()
    lines = source.splitlines()
    # (1) after the last top-level import
    last_import = max(i for i, line in enumerate(lines) if re.match(r"(import|from) \S+", line))
    lines.insert(last_import + 1, lines_readme["1"])
    class_at = next(i for i, line in enumerate(lines) if line.startswith(f"class {brain_class}("))
    built_name = brain_class
    if form == "in_place":  # (2): the README's class line, with the recipe's own names
        mixin, readme_bases = re.match(r"class \w+\((\w+), (.+)\):", lines_readme["2"]).groups()
        recipe_bases = re.match(rf"class {brain_class}\((.+)\):", lines[class_at]).group(1)
        assert readme_bases.startswith("sb.") and recipe_bases.startswith("sb.")
        lines[class_at] = f"class {brain_class}({mixin}, {recipe_bases}):"
    else:  # (2) the wrapping class, right after the recipe's class
        wrap = [re.sub(r"\bASR\b", brain_class, line) for line in lines_readme["wrap"]]
        built_name = re.match(r"class (\w+)\(", wrap[0]).group(1)
        end = next(i for i in range(class_at + 1, len(lines)) if lines[i] and not lines[i][0].isspace())
        lines[end:end] = ["", "", *wrap, "", ""]
    # (3) right after the Brain is built
    built_at = next(i for i, line in enumerate(lines) if re.match(rf"\s+asr_brain = {brain_class}\(", line))
    lines[built_at] = lines[built_at].replace(f"= {brain_class}(", f"= {built_name}(")
    indent = re.match(r"\s*", lines[built_at]).group(0)
    attach = lines_readme["3"].replace("token_strings(tokenizer)", f"token_strings({tokenizer_var})")
    lines.insert(_statement_end(lines, built_at) + 1, indent + attach)
    return "\n".join(lines) + "\n"


def _recipe(tmp_path: Path, name: str, yaml_name: str, form: str, brain_class: str, tokenizer_var: str) -> Path:
    folder = tmp_path / f"{name}_{form}"
    if folder.exists():
        return folder
    shutil.copytree(RECIPES / name, folder)
    script = folder / "train.py"
    script.write_text(apply_readme(script.read_text(), form, brain_class, tokenizer_var))
    yaml = folder / "hparams" / yaml_name
    yaml.write_text(yaml.read_text() + "\n" + readme_lines()["yaml"])
    return folder


def _train(folder: Path, yaml_name: str, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "train.py", f"hparams/{yaml_name}", f"--output_folder={out}", *overrides]
    return subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=600)


def _weights(out: Path) -> dict:
    ckpt = next((out / "save").glob("CKPT+*")) if (out / "save").exists() else None
    assert ckpt is not None, f"no checkpoint in {out}"
    return {
        f"{p.stem}.{k}": v
        for p in sorted(ckpt.glob("*.ckpt"))
        if p.stem in ("model", "output")
        for k, v in torch.load(p, map_location="cpu").items()
    }


def _output_neurons(corpus: Path, extra: int) -> int:
    chars = set()
    for path in (corpus / "train").rglob("*.trans.txt"):
        for line in path.read_text().splitlines():
            chars |= set(line.split(" ", 1)[1])
    return len(chars) + extra


@pytest.fixture(scope="module")
def noise_csv(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("noise")
    sf.write(folder / "noise.wav", np.random.default_rng(0).standard_normal(48000).astype("float32") * 0.1, 16000)
    path = folder / "noise.csv"
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows(
            [
                ["ID", "duration", "wav", "wav_format", "wav_opts"],
                ["noise1", "3.0", str(folder / "noise.wav"), "wav", ""],
            ]
        )
    return path


def _ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]


def test_librispeech_ctc_recipe_distils_with_the_readme_lines_both_ways(trained_run, tiny_corpus, tmp_path):
    """SentencePiece chars, Augmenter(concat_original) with speed perturbation, 3-tuple outputs, its own hooks."""
    teacher = trained_run / "model"
    # the char SentencePiece model has one piece per character seen (space as '▁') + <unk>, <s>, </s>
    common = [
        f"--data_folder={tiny_corpus}",
        f"--teacher_source={teacher}",
        f"--output_neurons={_output_neurons(tiny_corpus, 3)}",
    ]
    runs = {}
    for form, kd_weight in (("in_place", 0.9), ("in_place", 0.0), ("wrap", 0.9)):
        folder = _recipe(tmp_path, "librispeech_ctc", "conformer.yaml", form, "ASR", "tokenizer")
        out = tmp_path / f"out_{form}_{kd_weight}"
        _ok(_train(folder, "conformer.yaml", out, *common, f"--kd_weight={kd_weight}"))
        runs[form, kd_weight] = (out, _weights(out), (out / "train_log.txt").read_text())
    _, kd_weights, kd_log = runs["in_place", 0.9]
    _, plain_weights, plain_log = runs["in_place", 0.0]
    assert "kd_loss" in kd_log and "agreement" in kd_log, kd_log  # the recipe's own train log, unedited
    assert "kd_loss" not in plain_log
    assert any(not torch.equal(kd_weights[k], plain_weights[k]) for k in kd_weights)
    # the wrapping form is the same distillation: bit-identical weights from the same seed
    _, wrap_weights, wrap_log = runs["wrap", 0.9]
    assert "kd_loss" in wrap_log
    assert all(torch.equal(kd_weights[k], wrap_weights[k]) for k in kd_weights)


def test_librispeech_ctc_recipe_distils_layers_with_one_more_yaml_key(tiny_corpus, tmp_path):
    """kd_layers: auto in the recipe's yaml: its TransformerASR's layers are found, the projections train."""
    teacher = make_tiny_sb_model(tmp_path / "teacher" / "model", num_encoder_layers=2)
    folder = _recipe(tmp_path, "librispeech_ctc", "conformer.yaml", "in_place", "ASR", "tokenizer")
    yaml = folder / "hparams" / "conformer.yaml"
    yaml.write_text(yaml.read_text() + "kd_layers: auto\n")
    out = tmp_path / "out"
    common = [f"--data_folder={tiny_corpus}", f"--teacher_source={teacher}"]
    result = _train(folder, "conformer.yaml", out, *common, f"--output_neurons={_output_neurons(tiny_corpus, 3)}")
    _ok(result)
    assert (
        "layers: student Transformer.encoder.layers (1) -> teacher speechbrain:model (2): 0->1"
        in (out / "log.txt").read_text()
    )
    log = (out / "train_log.txt").read_text()
    assert "layer_loss" in log and "kd_loss" in log, log  # the recipe's own train log
    assert (next((out / "save").glob("CKPT+*")) / "kd_layer_projections.ckpt").exists()


def test_crdnn_recipe_at_20ms_distils_from_a_40ms_teacher(trained_run, tiny_corpus, tmp_path, noise_csv):
    """CTCTextEncoder chars, 2-tuple outputs, Augmenter with noise + speed perturbation, no frame keys."""
    folder = _recipe(tmp_path, "crdnn_ctc", "crdnn.yaml", "in_place", "ASR_Brain", "label_encoder")
    common = [
        f"--data_folder={tiny_corpus}",
        f"--teacher_source={trained_run / 'model'}",
        f"--noise_annotation={noise_csv}",
        f"--output_neurons={_output_neurons(tiny_corpus, 1)}",
    ]
    kd = _train(folder, "crdnn.yaml", tmp_path / "kd", *common, "--kd_weight=0.9")
    _ok(kd)
    assert "student frame shift measured on the first batch: 0.020 s" in kd.stdout + kd.stderr
    plain = _train(folder, "crdnn.yaml", tmp_path / "plain", *common, "--kd_weight=0")
    _ok(plain)
    assert "kd_loss" in (tmp_path / "kd" / "train_log.txt").read_text()
    kd_weights, plain_weights = _weights(tmp_path / "kd"), _weights(tmp_path / "plain")
    assert any(not torch.equal(kd_weights[k], plain_weights[k]) for k in kd_weights)


def test_cache_with_speed_perturbation_is_refused_naming_the_key_and_kept_axis_augmentation_runs(
    trained_run, tiny_corpus, tmp_path
):
    """Cached targets: speed perturbation refused before training; drop freq/chunk with concat_original run."""
    teacher = trained_run / "model"
    csv_path = trained_run / "train.csv"
    cache = tmp_path / "cache"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "speech_kd.cli",
        "cache-targets",
        "--teacher",
        str(teacher),
        "--csv",
        str(csv_path),
        "--out",
        str(cache),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    _ok(done)
    folder = _recipe(tmp_path, "librispeech_ctc", "conformer.yaml", "in_place", "ASR", "tokenizer")
    common = [
        f"--data_folder={tiny_corpus}",
        f"--teacher_source={teacher}",
        f"--targets_cache={cache}",
        f"--output_neurons={_output_neurons(tiny_corpus, 3)}",
    ]
    yaml = folder / "hparams" / "conformer.yaml"
    yaml.write_text(yaml.read_text() + '\ntargets_cache: ""\n')
    refused = _train(folder, "conformer.yaml", tmp_path / "refused", *common)
    assert refused.returncode != 0
    assert "wav_augment (speed_perturb: SpeedPerturb)" in refused.stdout + refused.stderr, refused.stdout[-2000:]
    assert not list((tmp_path / "refused").glob("save/CKPT+*")), "refused only after training"
    # the same recipe without speed perturbation: concat_original rows reuse the cached targets
    # (as the message says: out of the Augmenter and out of the yaml)
    text = yaml.read_text().replace("!ref <speed_perturb>,", "")
    yaml.write_text(re.sub(r"\nspeed_perturb: !new:.*?\n(    .*\n)+", "\n", text))
    _ok(_train(folder, "conformer.yaml", tmp_path / "cached", *common))
    assert "kd_loss" in (tmp_path / "cached" / "train_log.txt").read_text()
