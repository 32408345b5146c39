"""``speech-kd lm``, ``evaluate --beam_size/--lm/--tune_lm``, ``export --lm`` and ``transcribe.py --lm``.

The shipped teacher (speech_kd/pretrained/teacher_synth) on the tiny synthesised corpus, an LM built by
KenLM's lmplz from the corpus' training transcripts. Skipped, saying so, without lmplz or kenlm
(``scripts/install_kenlm.sh``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from speech_kd.cli import run
from speech_kd.data.prepare import prepare_split
from speech_kd.deploy import lm_runtime, runtime
from speech_kd.report import build_report
from speech_kd.scoring import evaluate as evaluate_mod
from speech_kd.scoring.compare import compare_decoder_files, format_decoder_comparisons
from speech_kd.scoring.decoding import BeamDecoder
from speech_kd.scoring.lm import LMError, find_kenlm_tool
from speech_kd.scoring.metrics import read_utterance_decoder, read_utterance_errors
from speech_kd.testing import make_tiny_hf_ctc
from speech_kd.training.train import run_training
from tests.conftest import TINY_MODEL

REPO = Path(__file__).resolve().parents[2]
TEACHER = REPO / "speech_kd" / "pretrained" / "teacher_synth"
DECODER_KEYS = {"name", "beam_size", "lm", "lm_weight", "word_bonus"}


@pytest.fixture(scope="module")
def csvs(tiny_corpus, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("csv")
    return {split: Path(prepare_split(tiny_corpus, split, out).csv_files[split]) for split in ("train", "dev", "test")}


@pytest.fixture(scope="module")
def arpa(csvs, tmp_path_factory) -> Path:
    try:
        find_kenlm_tool("lmplz")
    except LMError as err:
        pytest.skip(f"KenLM's lmplz is not installed (run scripts/install_kenlm.sh): {err}")
    pytest.importorskip("kenlm", reason="the kenlm module is not installed (run scripts/install_kenlm.sh)")
    out = tmp_path_factory.mktemp("lm") / "train3.arpa"
    assert run(["lm", "--csv", str(csvs["train"]), "--order", "3", "--out", str(out)]) == 0
    return out


def _one_line_error(capsys, argv: list[str], *needles: str) -> str:
    capsys.readouterr()
    assert run(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("speech-kd ")]
    assert len(lines) == 1 and lines[0].startswith(f"speech-kd {argv[0]}: error: "), lines
    err = lines[0]
    for needle in needles:
        assert needle in err, err
    return err


def _argparse_error(capsys, argv: list[str], *needles: str) -> None:
    """A number out of range: argparse's one error line (after its usage lines), exit 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        run(argv)
    assert exit_.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error: argument" in last, last
    for needle in needles:
        assert needle in last, last


def test_lm_verb(csvs, arpa, tmp_path, capsys):
    text = arpa.read_text()
    assert "\\3-grams:" in text and "THE" in text  # upper case, as transcripts are scored
    # never overwrites what it did not write
    _one_line_error(capsys, ["lm", "--csv", str(csvs["train"]), "--out", str(arpa)], "exists")
    assert arpa.read_text() == text
    _one_line_error(capsys, ["lm", "--out", str(tmp_path / "x.arpa")], "--text", "--csv")
    _one_line_error(capsys, ["lm", "--text", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "x.arpa")], "nope")
    _argparse_error(
        capsys, ["lm", "--csv", str(csvs["train"]), "--order", "9", "--out", str(tmp_path / "x.arpa")], "--order"
    )
    assert not (tmp_path / "x.arpa").exists()


def test_evaluate_beam_lm_records_the_decoder(tiny_corpus, csvs, arpa, tmp_path, capsys):
    greedy_json, lm_json = tmp_path / "greedy.json", tmp_path / "lm.json"
    assert run(["evaluate", "--asr", str(TEACHER), "--csv", str(csvs["test"]), "--json", str(greedy_json)]) == 0
    argv = ["evaluate", "--asr", str(TEACHER), "--data_folder", str(tiny_corpus), "--split", "test"]
    argv += ["--beam_size", "8", "--lm", str(arpa), "--tune_lm", "--json", str(lm_json)]
    assert run(argv) == 0
    out = capsys.readouterr().out
    assert "tune_lm: lm_weight" in out and "picked by dev WER" in out and "decoder beam+lm 8" in out
    greedy, fused = json.loads(greedy_json.read_text()), json.loads(lm_json.read_text())
    assert greedy["decoder"] == {"name": "greedy", "beam_size": None, "lm": None, "lm_weight": None, "word_bonus": None}
    assert set(fused["decoder"]) == DECODER_KEYS and fused["decoder"]["name"] == "beam+lm"
    assert fused["decoder"]["beam_size"] == 8 and fused["decoder"]["lm"] == str(arpa)
    assert (fused["tune_lm"]["lm_weight"], fused["tune_lm"]["word_bonus"]) == (
        fused["decoder"]["lm_weight"],
        fused["decoder"]["word_bonus"],
    )
    assert len(fused["tune_lm"]["grid"]) == 12 and fused["rtf"] > 0
    # the per-utterance files say which decoder made them, and still read as before
    g_utts, l_utts = tmp_path / "greedy_utts.txt", tmp_path / "lm_utts.txt"
    assert read_utterance_decoder(g_utts)["name"] == "greedy"
    assert read_utterance_decoder(l_utts) == fused["decoder"]
    assert set(read_utterance_errors(g_utts)) == set(read_utterance_errors(l_utts))
    # compare: one comparison per decoder (the same files standing in for the three models)
    results = compare_decoder_files([g_utts, l_utts], [g_utts, l_utts], [l_utts, g_utts], draws=50)
    assert list(results) == ["greedy", "beam+lm"]
    assert "## greedy" in format_decoder_comparisons(results)


def test_evaluate_ensemble_and_exported_folders_decode_with_the_lm(csvs, arpa, tmp_path):
    onnx = tmp_path / "onnx"
    assert run(["export", str(TEACHER), "--out", str(onnx), "--lm", str(arpa), "--lm_weight", "0.3"]) == 0
    config = json.loads((onnx / "deploy.json").read_text())
    assert config["lm"]["file"] == "lm.arpa" and config["lm"]["lm_weight"] == 0.3
    assert (onnx / "lm.arpa").read_bytes() == arpa.read_bytes()
    hyps = {}
    for name, asr in (("sb", str(TEACHER)), ("ensemble", f"{TEACHER},{TEACHER}"), ("onnx", str(onnx))):
        result = evaluate_mod.evaluate_model(
            asr, csvs["test"], beam_size=4, lm=arpa, lm_weight=0.3, word_bonus=1.0, progress=False
        )
        assert result.summary["decoder"]["name"] == "beam+lm", name
        hyps[name] = sorted((u.utt_id, u.hyp) for u in result.utterances)
    assert hyps["sb"] == hyps["ensemble"]  # two copies of one model average to that model
    # the exported folder's evaluate stays greedy unless asked, though it holds an LM
    assert evaluate_mod.evaluate_model(onnx, csvs["test"], progress=False).summary["decoder"]["name"] == "greedy"


def test_transcribe_py_beam_lm_gives_speechbrains_transcripts(tiny_corpus, csvs, arpa, tmp_path):
    onnx = tmp_path / "onnx"
    assert run(["export", str(TEACHER), "--out", str(onnx), "--lm", str(arpa), "--beam_size", "10"]) == 0
    rows = evaluate_mod.read_manifest(csvs["test"])
    asr = runtime.ExportedASR(onnx, threads=1)
    assert asr.lm is not None and asr.beam_size == 10  # the folder's own LM, by default
    log_probs = asr.log_probs([runtime.read_audio(r["wav"], asr.sample_rate) for r in rows])
    batch, lengths = evaluate_mod.pad_log_probs(log_probs)
    for weight, bonus in ((0.5, 1.5), (1.0, 0.0)):
        local = runtime.ExportedASR(onnx, threads=1, lm=arpa, lm_weight=weight, word_bonus=bonus, beam_size=10)
        got = [local.decode(lp) for lp in log_probs]
        expected = BeamDecoder(asr.tokens, asr.blank_index, 10, arpa, weight, bonus).decode(batch, lengths)
        same = sum(a == b for a, b in zip(got, expected)) / len(rows)
        assert same >= 0.95, list(zip(got, expected))  # test_lm_decoding.py's tolerance; identical in practice
    # the script itself, with the folder's LM and weights
    script = subprocess.run(
        [sys.executable, str(onnx / "transcribe.py"), *[r["wav"] for r in rows]], capture_output=True, text=True
    )
    assert script.returncode == 0, script.stderr
    printed = [line.split("\t", 1)[1] for line in script.stdout.splitlines()]
    assert printed == [asr.decode(lp) for lp in log_probs]
    greedy = subprocess.run(
        [sys.executable, str(onnx / "transcribe.py"), rows[0]["wav"], "--lm", "none"], capture_output=True, text=True
    )
    assert greedy.stdout.split("\t", 1)[1].strip() == asr.text(runtime.greedy_decode(log_probs[0], asr.blank_index))
    bad = subprocess.run(
        [sys.executable, str(onnx / "transcribe.py"), rows[0]["wav"], "--lm", str(tmp_path / "nope.arpa")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "nope.arpa: no such language model file" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_one_copy_of_the_beam_search():
    # lm_runtime names the runtime's code: the exported transcribe.py and the tested search are one copy
    for name in ("ctc_beam_search", "KenLMScorer", "read_lm_words"):
        assert getattr(lm_runtime, name) is getattr(runtime, name)
    source = Path(runtime.__file__).read_text()
    assert "import speech_kd" not in source and "from speech_kd" not in source


def test_bad_decoding_input_is_one_line_before_decoding(csvs, arpa, tmp_path, capsys, monkeypatch):
    def no_decoding(*args, **kwargs):
        raise AssertionError("audio was read: the error came after decoding started")

    monkeypatch.setattr(evaluate_mod, "load_batch", no_decoding)
    base = ["evaluate", "--asr", str(TEACHER), "--csv", str(csvs["test"])]
    _argparse_error(capsys, [*base, "--beam_size", "0"], "--beam_size", "'0'")
    _one_line_error(capsys, [*base, "--lm", str(tmp_path / "nope.arpa")], "nope.arpa: no such language model file")
    truncated = tmp_path / "truncated.arpa"
    truncated.write_text(arpa.read_text()[: len(arpa.read_text()) // 2])
    _one_line_error(capsys, [*base, "--lm", str(truncated)], "truncated.arpa", "truncated")
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x00\x01not a language model" * 10)
    _one_line_error(capsys, [*base, "--lm", str(garbage)], "garbage.bin", "neither an ARPA file")
    lower = tmp_path / "lower.arpa"
    lower.write_text(arpa.read_text().lower())
    _one_line_error(capsys, [*base, "--lm", str(lower)], "lower.arpa", "lower case")
    _one_line_error(capsys, [*base, "--tune_lm"], "need a language model")
    _one_line_error(capsys, [*base, "--lm", str(arpa), "--tune_lm"], "--dev_csv")
    # a sub-word model without a word boundary (pieces, no '|' nor '\u2581')
    vocab = ["<pad>", "<s>", "</s>", "<unk>", "'", *"ABCDEFGHIJKLMNOPQRSTUVWXYZ", "TH", "ING", "ED", "THE", "AND"]
    hf = make_tiny_hf_ctc(tmp_path / "hf_no_delimiter", vocab=vocab)
    _one_line_error(
        capsys,
        ["evaluate", "--asr", hf, "--csv", str(csvs["test"]), "--lm", str(arpa)],
        "sub-word units have no word boundary",
    )
    # export --lm refuses the same before writing anything
    _one_line_error(capsys, ["export", str(TEACHER), "--out", str(tmp_path / "o"), "--lm", str(lower)], "lower case")
    assert not (tmp_path / "o").exists()


def test_training_final_test_with_lm(tiny_corpus, arpa, tmp_path):
    base = [str(REPO / "hparams/teacher.yaml"), f"--data_folder={tiny_corpus}", "--number_of_epochs=1", *TINY_MODEL]
    # a bad test_lm is refused before the training starts
    with pytest.raises(LMError, match="no such language model file"):
        run_training([*base, f"--output_folder={tmp_path / 'bad'}", f"--test_lm={tmp_path / 'nope.arpa'}"])
    assert not (tmp_path / "bad" / "history.jsonl").exists()
    out = tmp_path / "run"
    results = run_training([*base, f"--output_folder={out}", f"--test_lm={arpa}", "--test_beam_size=4"])
    fused = results["test"]["beam_lm"]
    assert set(fused) >= {"WER", "CER", "rtf", "greedy_WER", "decoder"}
    assert fused["decoder"]["name"] == "beam+lm" and fused["decoder"]["beam_size"] == 4
    assert json.loads((out / "test_results.json").read_text())["test"]["beam_lm"] == fused
    assert read_utterance_decoder(out / "test_lm_test_utts.txt")["lm"] == str(arpa)
    assert read_utterance_decoder(out / "test_greedy_test_utts.txt")["name"] == "greedy"
    report = build_report(out, evaluate=False)
    assert "WER % beam+LM" in report.with_suffix(".md").read_text()
