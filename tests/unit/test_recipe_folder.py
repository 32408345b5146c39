"""Reading a SpeechBrain recipe's output folder (``speech_kd.deploy.recipe_folder``) on tiny hand-made folders.

Each folder is what SpeechBrain's ``create_experiment_directory`` and ``Checkpointer`` write (a resolved
``hyperparams.yaml``, ``save/CKPT+*``), made here in a second with a linear layer over 8 mel bins instead of
a trained network: which checkpoints go in (averaging as the stock LibriSpeech CTC recipe evaluates), that
loading the yaml leaves nothing on disk, and which tokenizer files are read. The recipes trained through
their own ``train.py`` are in ``tests/integration/test_export_recipe.py``.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import sentencepiece
import torch
from hyperpyyaml import load_hyperpyyaml
from speechbrain.dataio.encoder import CTCTextEncoder

from speech_kd.cli import run
from speech_kd.deploy.onnx_export import export_recipe
from speech_kd.deploy.recipe_folder import RecipeFolderError, find_tokenizer, is_recipe_folder, load_recipe, read_tokens
from speech_kd.model_folder import ModelFolderError, load_asr

#: a resolved copy as ``create_experiment_directory`` writes it: every path literal, ``checkpoints_dir`` too
RECIPE_YAML = """\
output_folder: {run}
save_folder: {save}
data_folder: !PLACEHOLDER
avg_checkpoints: {avg}
sample_rate: 16000
n_mels: 8
output_neurons: {neurons}
blank_index: 0
compute_features: !new:speechbrain.lobes.features.Fbank
    n_mels: 8
normalize: !new:speechbrain.processing.features.InputNormalization
    norm_type: global
output: !new:speechbrain.nnet.linear.Linear
    input_size: 8
    n_neurons: {neurons}
modules:
    normalize: !ref <normalize>
    output: !ref <output>
model: !new:torch.nn.ModuleList
    - [!ref <output>]
epoch_counter: !new:speechbrain.utils.epoch_loop.EpochCounter
    limit: 2
checkpointer: !new:speechbrain.utils.checkpoints.Checkpointer
    checkpoints_dir: {save}
    recoverables:
        model: !ref <model>
        normalizer: !ref <normalize>
        counter: !ref <epoch_counter>
"""
#: the labels of the tiny recipes' ``label_encoder.txt`` (the blank first)
LABELS = "abcd"


def _recipe(
    run_folder: Path, scores: list[float | None], weights: list[float], avg: int = 1, neurons: int = len(LABELS) + 1
) -> list[float]:
    """Write a recipe output folder with one checkpoint per ``(WER, weight)``, oldest first.

    The output layer's weights are all ``weight`` in its checkpoint; the normaliser's mean moves at each one.
    ``None`` records no WER. Returns the normaliser's mean in each checkpoint.
    """
    save = run_folder / "save"
    text = RECIPE_YAML.format(run=run_folder, save=save, avg=avg, neurons=neurons)
    hparams = load_hyperpyyaml(text, {"data_folder": "unused"})
    means = []
    for score, weight in zip(scores, weights):
        with torch.no_grad():
            for parameter in hparams["output"].parameters():
                parameter.fill_(weight)
        hparams["normalize"].train()
        hparams["normalize"](torch.full((1, 20, 8), weight) + torch.randn(1, 20, 8), torch.ones(1))
        means.append(float(hparams["normalize"].glob_mean.mean()))
        hparams["checkpointer"].save_checkpoint(meta={} if score is None else {"WER": score}, verbosity=0)
    (run_folder / "hyperparams.yaml").write_text(text)
    encoder = CTCTextEncoder()
    encoder.insert_blank(index=0)
    encoder.update_from_iterable(LABELS)
    encoder.save(save / "label_encoder.txt")
    return means


def _sentencepiece(folder: Path) -> Path:
    """A SentencePiece character model as SpeechBrain's recipes train it (unk 0, the blank; bos 1, eos 2)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "text.txt").write_text("abc dab\ncab bad\n" * 20)
    sentencepiece.SentencePieceTrainer.train(
        input=str(folder / "text.txt"),
        model_prefix=str(folder / "chars"),
        model_type="char",
        vocab_size=8,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        minloglevel=2,
    )
    return folder / "chars.model"


def test_a_sentencepiece_model_is_known_by_its_content(tmp_path):
    """``save/tokenizer.ckpt`` (what SpeechBrain's Pretrainer collects in the LibriSpeech CTC recipe) is a
    SentencePiece model under another name: found in the folder, and read as one given with --tokenizer."""
    model = _sentencepiece(tmp_path / "sp")
    pieces = sentencepiece.SentencePieceProcessor(model_file=str(model))
    run_folder = tmp_path / "run"
    _recipe(run_folder, [10.0], [0.5], neurons=pieces.get_piece_size())
    (run_folder / "save" / "label_encoder.txt").unlink()
    collected = run_folder / "save" / "tokenizer.ckpt"
    collected.write_bytes(model.read_bytes())
    tokens, blank = read_tokens(collected, 0)
    assert (tokens, blank) == read_tokens(model, 0)
    assert tokens[1:3] == ["", ""] and tokens[3:] == [pieces.id_to_piece(i) for i in range(3, len(tokens))]
    assert find_tokenizer([run_folder / "save", run_folder], {}) == collected
    assert load_recipe(run_folder).tokens == tokens
    elsewhere = tmp_path / "given.bin"
    elsewhere.write_bytes(model.read_bytes())
    collected.unlink()
    assert load_recipe(run_folder, tokenizer=elsewhere).tokens == tokens
    # a CTCTextEncoder under that name (a model folder's tokenizer.ckpt) is still read as one
    encoder = CTCTextEncoder()
    encoder.insert_blank(index=0)
    encoder.update_from_iterable(LABELS)
    encoder.save(collected)
    assert read_tokens(collected, 0) == (["<blank>", *LABELS], 0)
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"\x00not a model")
    with pytest.raises(
        RecipeFolderError, match="garbage.model: neither a SentencePiece model nor a SpeechBrain CTCTextEncoder"
    ):
        read_tokens(garbage, 0)


def _snapshot(folder: Path) -> set[str]:
    """Every path under ``folder``."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


#: a second checkpointer under a placeholder (``data_folder``: a relative dummy, so under the working folder)
PLACEHOLDER_CHECKPOINTER = """
scratch: !new:speechbrain.utils.checkpoints.Checkpointer
    checkpoints_dir: !ref <data_folder>/scratch
"""


@pytest.mark.parametrize("refused", [True, False])
def test_loading_the_yaml_creates_nothing_outside_out(refused, tmp_path, monkeypatch):
    """A save_folder recorded outside the output folder (``--save_folder=`` at training) and a checkpointer under
    a placeholder: SpeechBrain's Checkpointer creates its folder when the yaml is loaded; the export leaves
    nothing behind, whether it is refused (no tokenizer) or writes ``--out``."""
    pytest.importorskip("onnxruntime")
    run_folder = tmp_path / "rf" / "run"
    _recipe(run_folder, [10.0], [0.5])
    elsewhere = tmp_path / "rf_elsewhere" / "user" / "save"
    text = (run_folder / "hyperparams.yaml").read_text().replace(str(run_folder / "save"), str(elsewhere))
    (run_folder / "hyperparams.yaml").write_text(text + PLACEHOLDER_CHECKPOINTER)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    if refused:
        (run_folder / "save" / "label_encoder.txt").unlink()
    before = _snapshot(tmp_path)
    out = tmp_path / "onnx"
    if refused:
        with pytest.raises(RecipeFolderError, match="no tokenizer"):
            export_recipe(run_folder, out)
    else:
        export_recipe(run_folder, out)
        assert (out / "deploy.json").is_file()
    assert not (tmp_path / "rf_elsewhere").exists() and not any(work.iterdir())
    assert {p for p in _snapshot(tmp_path) if not p.startswith("onnx")} == before


def _weight(model) -> float:
    """The (one) value of the restored output layer's weights."""
    weights = model.steps["output"].w.weight
    assert torch.all(weights == weights.flatten()[0])
    return float(weights.detach().flatten()[0])


def _checkpoint_names(run_folder: Path) -> list[str]:
    """The checkpoint folders' names, oldest first."""
    return sorted(p.name for p in (run_folder / "save").glob("CKPT+*"))


def test_checkpoints_are_averaged_as_the_recipe_evaluates_them(tmp_path):
    """avg_checkpoints > 1: the model is the average of every checkpoint with a WER, as the stock recipe's
    ``on_evaluate_start`` computes it (``find_checkpoints(min_key=...)``, ``average_checkpoints`` of ``model``);
    the rest (the normaliser) as its ``super().on_evaluate_start()`` recovers it: the newest checkpoint."""
    run_folder = tmp_path / "run"
    means = _recipe(run_folder, [30.0, 10.0, 20.0, None], [1.0, 2.0, 6.0, 100.0], avg=3)
    names = _checkpoint_names(run_folder)
    model = load_recipe(run_folder)
    assert _weight(model) == pytest.approx(3.0)  # (1 + 2 + 6) / 3: the unscored newest is not averaged
    assert float(model.steps["normalize"].glob_mean.mean()) == pytest.approx(means[-1])
    assert [p.name for p in model.averaged] == [names[1], names[2], names[0]]  # lowest WER first
    assert (
        all(name in model.checkpoint_note for name in names[:3])
        and "average of the 3 checkpoints recording a WER" in model.checkpoint_note
    )
    assert model.checkpoint.name == names[-1]
    # the other choices are still there, and the default without avg_checkpoints > 1 is the best
    assert _weight(load_recipe(run_folder, checkpoint="best")) == pytest.approx(2.0)
    assert _weight(load_recipe(run_folder, checkpoint="newest")) == pytest.approx(100.0)
    assert _weight(load_recipe(run_folder, checkpoint=names[0])) == pytest.approx(1.0)
    assert _weight(load_recipe(run_folder, overrides={"avg_checkpoints": 1})) == pytest.approx(2.0)
    assert load_recipe(run_folder, checkpoint="best").averaged == []


def test_average_needs_scored_checkpoints(tmp_path):
    """One scored checkpoint: nothing to average (that one); none: the default falls back, asking is refused."""
    one = tmp_path / "one"
    _recipe(one, [None, 5.0, None], [1.0, 2.0, 3.0], avg=5)
    model = load_recipe(one)
    assert _weight(model) == pytest.approx(2.0) and model.averaged == []
    assert "nothing to average" in model.checkpoint_note
    none = tmp_path / "none"
    _recipe(none, [None, None], [1.0, 2.0], avg=5)
    assert _weight(load_recipe(none)) == pytest.approx(2.0)  # the newest, as "best" without scores
    with pytest.raises(RecipeFolderError, match="--checkpoint average: no checkpoint in .* records a WER, CER or PER"):
        load_recipe(none, checkpoint="average")


def test_the_cli_says_what_the_parity_check_compared(tmp_path):
    """The check runs the yaml's modules one after the other: the message names them, in order, and says to
    compare one transcript with the recipe's own (what a compute_forward does between them is not seen)."""
    pytest.importorskip("onnxruntime")
    run_folder = tmp_path / "run"
    _recipe(run_folder, [10.0, 20.0], [0.5, 0.7], avg=2)
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = run(["export", str(run_folder), "--out", str(tmp_path / "onnx")])
    assert code == 0, stderr.getvalue()
    text = stdout.getvalue()
    assert "the yaml's modules in order: normalize (InputNormalization), output (Linear), log-softmax" in text
    assert "compare one transcript with your recipe's" in text
    names = _checkpoint_names(run_folder)
    assert "averaged model from 2 checkpoints" in text and all(name in text for name in names)


def test_a_training_runs_yaml_is_not_read_as_a_model_folder(tmp_path):
    """A recipe's output folder without checkpoints: evaluate/load_asr and export each say so in one line."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "hyperparams.yaml").write_text("seed: 1\noutput_folder: run\nnumber_of_epochs: 2\n")
    with pytest.raises(ModelFolderError, match=f"{run}: not a model folder .*no pretrainer"):
        load_asr(run)
    assert is_recipe_folder(run)  # so export takes the recipe route, which names the missing checkpoints
    with pytest.raises(RecipeFolderError, match="no checkpoints"):
        load_recipe(run)
