"""Property tests: the manifest reader and the vocabulary mapping over random bytes, encodings and
characters never fail with anything but their documented errors."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from speech_kd.data.dataio import make_tokenizer, read_csv_rows, token_strings  # noqa: E402
from speech_kd.scoring.evaluate import read_manifest  # noqa: E402
from speech_kd.targets.vocab import VocabMap, VocabMappingError  # noqa: E402

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ENCODINGS = ("utf-8", "utf-8-sig", "utf-16", "latin-1", "cp1252")

#: CSV-ish text: the manifest's own characters in abundance, plus anything
_cells = st.lists(
    st.sampled_from([*'ID,duration,wav,wrd"\n\r0123456789.-eE ', "nan", "inf", "\x00", "\u00e9", "\u2581", "\ufeff"])
    | st.characters(),
    max_size=120,
).map("".join)


def _read_both(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "m.csv"
        path.write_bytes(data)
        for reader in (read_csv_rows, read_manifest):
            try:
                rows = reader(path)
            except ValueError as err:  # the documented error: one line naming the file
                assert str(path) in str(err)
            else:
                assert all(isinstance(row, dict) for row in rows)


@FAST
@given(st.binary(max_size=300))
def test_manifest_reader_random_bytes(data):
    _read_both(data)


@FAST
@given(_cells, st.sampled_from(ENCODINGS), st.booleans())
def test_manifest_reader_random_text_in_any_encoding(text, encoding, with_header):
    header = "ID,duration,wav,wrd\n" if with_header else ""
    _read_both((header + text).encode(encoding, errors="replace"))


@FAST
@given(
    st.lists(st.text(max_size=4), min_size=0, max_size=12),
    st.integers(-2, 13),
    st.lists(st.text(max_size=3), min_size=0, max_size=12),
    st.integers(-2, 13),
    st.booleans(),
)
def test_vocab_mapping_random_tokens(teacher, t_blank, student, s_blank, case_fold):
    try:
        vmap = VocabMap.build(teacher, t_blank, student, s_blank, case_fold=case_fold)
    except VocabMappingError:
        return
    assert vmap.matrix.shape == (len(teacher), len(student))
    assert float(vmap.matrix[t_blank, s_blank]) == 1.0


@FAST
@given(st.text(max_size=40), st.integers(0, 3))
def test_tokenizer_and_token_strings_random_alphabets(alphabet, blank):
    try:
        tokenizer = make_tokenizer(alphabet, blank_index=min(blank, len(alphabet)))
    except ValueError:  # a repeated character: documented
        assert len(set(alphabet)) < len(alphabet)
        return
    tokens = token_strings(tokenizer)
    assert len(tokens) == len(alphabet) + 1 and tokens[min(blank, len(alphabet))] == "<blank>"
    assert token_strings(tokens) == tokens


@FAST
@given(st.lists(st.one_of(st.text(max_size=3), st.integers(), st.none(), st.binary(max_size=2)), max_size=6))
def test_token_strings_random_lists(items):
    try:
        assert token_strings(items) == items
    except TypeError:  # documented: a token list must hold strings
        assert not all(isinstance(item, str) for item in items)
