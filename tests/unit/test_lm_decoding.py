"""Word n-gram LMs (KenLM's lmplz), CTC beam search with SpeechBrain's searchers, and the numpy runtime's port.

Needs KenLM's lmplz/build_binary and the kenlm module (``scripts/install_kenlm.sh``, run by
``scripts/setup.sh --test``); without lmplz the tests that build an LM are skipped, saying so.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from speech_kd.deploy.lm_runtime import KenLMScorer, ctc_beam_search
from speech_kd.scoring import lm as lm_mod
from speech_kd.scoring.decoding import BeamDecoder, DecodingError, GreedyDecoder, make_decoder, tune_lm
from speech_kd.scoring.lm import LMError, build_lm, check_lm_units, find_kenlm_tool, load_lm, read_texts

TOKENS = ["<blank>", " ", "'"] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
BLANK = 0
SENTENCES = [
    "the cat sat on the mat",
    "the dog sat on the log",
    "a cat and a dog sat on a mat",
    "the cat saw the dog",
    "a dog saw a cat on the log",
    "the mat and the log",
]
DECODER_KEYS = {"name", "beam_size", "lm", "lm_weight", "word_bonus"}


def _lmplz_or_skip() -> str:
    try:
        return find_kenlm_tool("lmplz")
    except LMError as err:
        pytest.skip(f"KenLM's lmplz is not installed (run scripts/install_kenlm.sh): {err}")


def _kenlm_or_skip() -> None:
    pytest.importorskip("kenlm", reason="the kenlm module is not installed (run scripts/install_kenlm.sh)")


@pytest.fixture(scope="module")
def arpa(tmp_path_factory) -> Path:
    _lmplz_or_skip()
    return build_lm(SENTENCES, 3, tmp_path_factory.mktemp("lm") / "cats.arpa")


@pytest.fixture(scope="module")
def binary_lm(tmp_path_factory) -> Path:
    _lmplz_or_skip()
    return build_lm(SENTENCES, 3, tmp_path_factory.mktemp("lm") / "cats.bin")


def _posteriors(
    text: str, confusions: dict[int, dict[str, float]] | None = None, floor: float = 1e-4, repeat: int = 2
) -> np.ndarray:
    """``[T, V]`` log-posteriors spelling ``text``: each character on ``repeat`` frames, then a blank frame.

    ``confusions`` maps a character position to the probabilities of that position's frames.
    """
    frames = []
    for pos, char in enumerate(text):
        probs = {char: 0.9} if not confusions or pos not in confusions else confusions[pos]
        for _ in range(repeat):
            row = np.full(len(TOKENS), floor)
            for token, p in probs.items():
                row[TOKENS.index(token)] = p
            frames.append(row)
        row = np.full(len(TOKENS), floor)
        row[BLANK] = 0.9
        frames.append(row)
    out = np.array(frames)
    return np.log(out / out.sum(-1, keepdims=True)).astype(np.float32)


def _batch(items: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    width = max(x.shape[0] for x in items)
    batch = np.full((len(items), width, len(TOKENS)), np.log(1.0 / len(TOKENS)), dtype=np.float32)
    for i, x in enumerate(items):
        batch[i, : x.shape[0]] = x
    return batch, np.array([x.shape[0] for x in items])


# ------------------------------------------------------------------------------------------- building LMs
def test_build_lm_normalises_text_and_reads_back(arpa, binary_lm, tmp_path):
    info = load_lm(arpa)
    assert info.format == "arpa" and info.order == 3 and set(info.counts) == {1, 2, 3}
    assert set(info.words) == {w.upper() for s in SENTENCES for w in s.split()}  # upper case, as transcripts
    assert info.counts[1] == len(info.words) + 3  # plus <s>, </s>, <unk>
    binary = load_lm(binary_lm)
    assert binary.format == "binary" and set(binary.words) == set(info.words)
    assert check_lm_units(arpa, TOKENS, BLANK) == 1.0

    csv = tmp_path / "train.csv"
    csv.write_text("ID,duration,wav,spk_id,wrd\nu1,1.0,a.wav,s,THE CAT\nu2,1.0,b.wav,s,\nu3,1.0,c.wav,s,A DOG\n")
    txt = tmp_path / "more.txt"
    txt.write_text("the  mat\n\n  a log \n")
    assert list(read_texts([txt], [csv])) == ["THE CAT", "A DOG", "the  mat\n", "  a log \n"]
    built = build_lm(read_texts([txt], [csv]), 2, tmp_path / "sub" / "small.arpa")
    assert set(load_lm(built).words) == {"THE", "CAT", "A", "DOG", "MAT", "LOG"}


def test_build_lm_refuses_bad_input(tmp_path, monkeypatch):
    with pytest.raises(LMError, match="--order must be an integer from 2 to 6, got 7"):
        build_lm(SENTENCES, 7, tmp_path / "x.arpa")
    with pytest.raises(LMError, match="no such program"):
        build_lm(SENTENCES, 3, tmp_path / "x.arpa", lmplz=str(tmp_path / "nowhere" / "lmplz"))
    # no lmplz next to Python nor on PATH: the error names the install script
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(LMError, match=r"lmplz is not installed .*scripts/install_kenlm.sh"):
        build_lm(SENTENCES, 3, tmp_path / "x.arpa")
    with pytest.raises(LMError, match="nope.csv"):
        list(read_texts(csv_files=[tmp_path / "nope.csv"]))
    (tmp_path / "nowrd.csv").write_text("ID,duration,wav\nu1,1.0,a.wav\n")
    with pytest.raises(LMError, match="no column.*wrd"):
        list(read_texts(csv_files=[tmp_path / "nowrd.csv"]))


def test_build_lm_refuses_empty_text(tmp_path):
    _lmplz_or_skip()
    with pytest.raises(LMError, match="no text"):
        build_lm(["", "   "], 3, tmp_path / "x.arpa")
    assert not (tmp_path / "x.arpa").exists()


# ------------------------------------------------------------------------------------------ bad LM files
def test_bad_lm_files_are_one_line_errors(arpa, binary_lm, tmp_path):
    text = arpa.read_text()
    cases = {
        "missing": (tmp_path / "missing.arpa", "no such language model file"),
        "dir": (tmp_path, "is a directory"),
        "empty": (tmp_path / "empty.arpa", "empty file"),
        "garbage": (tmp_path / "garbage.arpa", r"neither an ARPA file"),
        "truncated": (tmp_path / "truncated.arpa", r"truncated ARPA file"),
        "counts": (tmp_path / "counts.arpa", r"corrupt ARPA file: the header counts"),
        "binary": (tmp_path / "truncated.bin", "corrupt or truncated KenLM binary"),
    }
    cases["empty"][0].write_text("")
    cases["garbage"][0].write_text("this is not a language model\n")
    cases["truncated"][0].write_text(text[: len(text) // 2])
    cases["counts"][0].write_text(text.replace("ngram 1=", "ngram 1=9", 1))
    cases["binary"][0].write_bytes(binary_lm.read_bytes()[:200])
    for name, (path, message) in cases.items():
        with pytest.raises(LMError, match=message) as err:
            load_lm(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value), name
        with pytest.raises(LMError, match=message):  # the decoder checks before any decoding
            BeamDecoder(TOKENS, BLANK, beam_size=4, lm_path=path)


def test_gzipped_arpa_is_read(arpa, tmp_path):
    import gzip

    gz = tmp_path / "cats.arpa.gz"
    gz.write_bytes(gzip.compress(arpa.read_bytes()))
    assert load_lm(gz).words == load_lm(arpa).words


# --------------------------------------------------------------------------------------- unit mismatch
def test_lm_units_must_match_the_model(arpa, tmp_path):
    lower = tmp_path / "lower.arpa"
    lower.write_text(arpa.read_text().lower())  # ARPA keywords are lower case already
    with pytest.raises(LMError, match=r"lower.arpa: only 0% .* lower case and the model's units upper case"):
        check_lm_units(lower, TOKENS, BLANK)
    with pytest.raises(LMError, match="lower case"):
        BeamDecoder(TOKENS, BLANK, beam_size=4, lm_path=lower)
    lower_tokens = [t.lower() for t in TOKENS]
    with pytest.raises(LMError, match="upper case and the model's units lower case"):
        check_lm_units(arpa, lower_tokens, BLANK)
    # sub-word units without a word-boundary marker; characters without a space unit
    with pytest.raises(LMError, match="sub-word units have no word boundary"):
        check_lm_units(arpa, ["<blank>", "TH", "E", "CA", "T", "DO", "G", "AN", "D"], 0)
    with pytest.raises(LMError, match="character units have no word boundary"):
        check_lm_units(arpa, ["<blank>"] + TOKENS[3:], 0)
    # SentencePiece pieces (▁ marks a word's start) and wav2vec2's '|' are fine
    assert (
        check_lm_units(arpa, ["<blank>", "\u2581THE", "\u2581C", "AT", "S", "O", "N", "M", "D", "G", "L", "A"], 0) > 0.5
    )
    assert check_lm_units(arpa, ["<pad>", "|"] + TOKENS[3:]) == 1.0


# ------------------------------------------------------------------------------------------- decoders
def test_bad_settings_are_one_line_errors(arpa):
    for bad in (0, -3, 1.5, True, None):
        with pytest.raises(DecodingError, match=r"--beam_size must be a positive integer"):
            BeamDecoder(TOKENS, BLANK, beam_size=bad)
        with pytest.raises(DecodingError, match=r"--beam_size must be a positive integer"):
            make_decoder(TOKENS, BLANK, beam_size=bad)
    with pytest.raises(DecodingError, match="--lm_weight must be >= 0"):
        BeamDecoder(TOKENS, BLANK, beam_size=4, lm_path=arpa, lm_weight=-1)
    with pytest.raises(DecodingError, match="--word_bonus must be a finite number"):
        BeamDecoder(TOKENS, BLANK, beam_size=4, lm_path=arpa, word_bonus=float("nan"))
    with pytest.raises(DecodingError, match="blank index 40"):
        GreedyDecoder(TOKENS, 40)
    with pytest.raises(DecodingError, match="--tune_lm needs a language model"):
        BeamDecoder(TOKENS, BLANK, beam_size=4).tune(np.zeros((1, 2, len(TOKENS))), [2], ["A"])
    with pytest.raises(DecodingError, match="28 units per frame, the decoder's vocabulary 29"):
        GreedyDecoder(TOKENS, BLANK).decode(np.zeros((1, 3, 28)), [3])


def test_describe_is_the_json_contract(arpa):
    greedy = make_decoder(TOKENS, BLANK)
    beam = make_decoder(TOKENS, BLANK, beam_size=8)
    fused = make_decoder(TOKENS, BLANK, beam_size=8, lm_path=arpa, lm_weight=0.7, word_bonus=0.5)
    assert greedy.describe() == {"name": "greedy", "beam_size": None, "lm": None, "lm_weight": None, "word_bonus": None}
    assert beam.describe() == {"name": "beam", "beam_size": 8, "lm": None, "lm_weight": None, "word_bonus": None}
    assert fused.describe() == {"name": "beam+lm", "beam_size": 8, "lm": str(arpa), "lm_weight": 0.7, "word_bonus": 0.5}
    for decoder in (greedy, beam, fused):
        assert set(decoder.describe()) == DECODER_KEYS
        json.dumps(decoder.describe())


def test_greedy_equals_beam_of_one():
    rng = np.random.default_rng(3)
    items = []
    for _ in range(20):
        logits = rng.standard_normal((int(rng.integers(5, 40)), len(TOKENS))) * 2.5
        logits[:, BLANK] += 1.0
        items.append((logits - np.log(np.exp(logits).sum(-1, keepdims=True))).astype(np.float32))
    batch, lengths = _batch(items)
    greedy = GreedyDecoder(TOKENS, BLANK).decode(batch, lengths)
    assert BeamDecoder(TOKENS, BLANK, beam_size=1).decode(batch, lengths) == greedy
    # torch tensors and SpeechBrain's relative lengths are accepted too
    import torch

    relative = torch.tensor(lengths / batch.shape[1], dtype=torch.float32)
    assert GreedyDecoder(TOKENS, BLANK).decode(torch.from_numpy(batch), relative) == greedy


def _cat_example() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Acoustics that prefer 'KAT' (0.5) to 'CAT' (0.4), and 'MAP' (0.5) to 'MAT' (0.4)."""
    items = [
        _posteriors("THE CAT SAT ON THE MAT", {4: {"K": 0.5, "C": 0.4}}),
        _posteriors("A DOG SAT ON A MAT", {17: {"P": 0.5, "T": 0.4}}),
        _posteriors("THE CAT SAW THE DOG", {4: {"K": 0.5, "C": 0.4}}),
    ]
    batch, lengths = _batch(items)
    return batch, lengths, ["THE CAT SAT ON THE MAT", "A DOG SAT ON A MAT", "THE CAT SAW THE DOG"]


@pytest.mark.parametrize("searcher", ["beam", "prefix"])
def test_lm_moves_the_result_to_in_domain_words(arpa, binary_lm, searcher):
    batch, lengths, refs = _cat_example()
    greedy = GreedyDecoder(TOKENS, BLANK).decode(batch, lengths)
    assert greedy == ["THE KAT SAT ON THE MAT", "A DOG SAT ON A MAP", "THE KAT SAW THE DOG"]
    assert BeamDecoder(TOKENS, BLANK, beam_size=16, searcher=searcher).decode(batch, lengths) == greedy
    for lm in (arpa, binary_lm):
        fused = BeamDecoder(TOKENS, BLANK, beam_size=16, lm_path=lm, lm_weight=0.5, word_bonus=1.0, searcher=searcher)
        assert fused.decode(batch, lengths) == refs, lm


def test_tune_picks_a_grid_point(arpa):
    batch, lengths, refs = _cat_example()
    decoder = BeamDecoder(TOKENS, BLANK, beam_size=16, lm_path=arpa)
    grid = {"lm_weight": [0.0, 0.5, 1.0], "word_bonus": [0.0, 2.0]}
    result = decoder.tune(batch, lengths, refs, grid)
    assert len(result.table) == 6 and {(r["lm_weight"], r["word_bonus"]) for r in result.table} == {
        (a, b) for a in grid["lm_weight"] for b in grid["word_bonus"]
    }
    assert (result.lm_weight, result.word_bonus) in {(a, b) for a in grid["lm_weight"] for b in grid["word_bonus"]}
    assert result.wer == min(r["wer"] for r in result.table) == 0.0
    assert result.lm_weight > 0.0  # the LM is what fixes 'KAT' and 'MAP'
    assert (decoder.lm_weight, decoder.word_bonus) == (result.lm_weight, result.word_bonus)
    assert decoder.describe()["lm_weight"] == result.lm_weight
    assert "picked by dev WER 0.00 (grid of 6" in result.summary()
    # ties go to the grid's first point (smallest weight, then bonus)
    flat = tune_lm(lambda lp, n, a, b: ["A"], None, None, ["A"], {"lm_weight": [1.0, 0.5], "word_bonus": [3, 1]})
    assert (flat.lm_weight, flat.word_bonus) == (0.5, 1.0)
    with pytest.raises(DecodingError, match="at least one lm_weight"):
        tune_lm(lambda lp, n, a, b: ["A"], None, None, ["A"], {"lm_weight": [], "word_bonus": [0]})


# ------------------------------------------------------------------------- numpy runtime vs SpeechBrain
def _synthetic_set(seed: int, count: int) -> list[np.ndarray]:
    """Posteriors of random LM-vocabulary sentences, from clean to nearly uniform, random lengths."""
    rng = np.random.default_rng(seed)
    words = sorted({w.upper() for s in SENTENCES for w in s.split()} | {"KAT", "MAP", "DOGS"})
    items = []
    for i in range(count):
        text = " ".join(rng.choice(words, size=int(rng.integers(1, 6))))
        lp = _posteriors(text, repeat=int(rng.integers(1, 3))).astype(np.float64)
        noise = rng.standard_normal(lp.shape) * (0.5 + 3.0 * i / count)
        lp = lp + noise
        items.append((lp - np.log(np.exp(lp).sum(-1, keepdims=True))).astype(np.float32))
    return items


def test_numpy_runtime_agrees_with_speechbrain(arpa, binary_lm):
    _kenlm_or_skip()
    items = _synthetic_set(seed=7, count=40)
    batch, lengths = _batch(items)
    settings = [(None, 0.5, 1.5), (arpa, 0.5, 1.0), (arpa, 1.5, 0.0), (binary_lm, 0.8, 2.0)]
    for lm, alpha, beta in settings:
        decoder = BeamDecoder(TOKENS, BLANK, beam_size=10, lm_path=lm, lm_weight=alpha, word_bonus=beta)
        expected = decoder.decode(batch, lengths)
        scorer = None if lm is None else KenLMScorer(lm, alpha=alpha, beta=beta)
        got = [ctc_beam_search(batch[i, :n], TOKENS, BLANK, beam_size=10, lm=scorer) for i, n in enumerate(lengths)]
        same = sum(a == b for a, b in zip(expected, got)) / len(items)
        # the port does SpeechBrain's operations in its order on the same numpy types: identical in practice;
        # the stated tolerance is 95 % of utterances
        assert same >= 0.95, (lm, alpha, beta, [(a, b) for a, b in zip(expected, got) if a != b][:3])
        assert same == 1.0, (lm, alpha, beta)
    # and the LM made a difference on this set
    assert BeamDecoder(TOKENS, BLANK, beam_size=10).decode(batch, lengths) != BeamDecoder(
        TOKENS, BLANK, beam_size=10, lm_path=arpa, lm_weight=1.5
    ).decode(batch, lengths)


def test_numpy_runtime_spm_and_pipe_delimiters(arpa):
    _kenlm_or_skip()
    # wav2vec2-style '|' delimiter: same words as with ' '
    pipe_tokens = ["<pad>", "|"] + TOKENS[2:]
    batch, lengths, refs = _cat_example()
    scorer = KenLMScorer(arpa, alpha=0.5, beta=1.0)
    got = [
        ctc_beam_search(batch[i, :n], pipe_tokens, 0, beam_size=16, lm=scorer, space_token="|")
        for i, n in enumerate(lengths)
    ]
    assert got == refs
    fused = BeamDecoder(pipe_tokens, 0, beam_size=16, lm_path=arpa, lm_weight=0.5, word_bonus=1.0)
    assert fused.decode(batch, lengths) == refs


def test_lm_module_does_not_need_kenlm_for_checks(arpa, monkeypatch):
    # load_lm/check_lm_units read the file themselves (no kenlm import), so they run before any model loads
    monkeypatch.setitem(sys.modules, "kenlm", None)
    assert load_lm(arpa).order == 3
    assert lm_mod.check_lm_units(arpa, TOKENS, BLANK) == 1.0
