"""Every numeric option of every verb is range-checked: argparse's one-line error, exit status 2 (issue 30).

Run in-process through the ``speech-kd`` entry function (no subprocess): the error comes from the option's
``type=`` (:mod:`speech_kd.argtypes`), before any required argument or file is looked at.
"""

from __future__ import annotations

import argparse

import pytest

from speech_kd import argtypes
from speech_kd.cli import all_parsers, run

NAN_INF = ("nan", "inf", "-inf")
#: verb -> option -> values refused (every option also refuses nan and inf)
REFUSED = {
    "synth": {
        "--hours": ("-1", "0"),
        "--speakers": ("-1", "0", "1.5"),
        "--dev_hours": ("-1", "0"),
        "--dev_speakers": ("-1", "0"),
        "--test_hours": ("-1", "0"),
        "--test_speakers": ("-1", "0"),
        "--untranscribed_hours": ("-1",),
        "--untranscribed_speakers": ("-1", "0"),
        "--seed": ("-1",),
        "--jobs": ("-1", "0"),
    },
    "evaluate": {
        "--batch_seconds": ("-1", "0"),
        "--max_duration": ("-1",),
        "--blank_penalty": ("abc",),
        "--chunk_seconds": ("-1", "-5"),
        "--context_seconds": ("-1",),
        "--beam_size": ("-1", "0", "1.5"),
        "--lm_weight": ("-1",),
        "--word_bonus": ("abc",),
    },
    "export": {
        "--blank_penalty": ("abc",),
        "--beam_size": ("-1", "0"),
        "--lm_weight": ("-1",),
        "--word_bonus": ("abc",),
    },
    "lm": {"--order": ("1", "7", "-1")},
    "cache-targets": {
        "--top_k": ("-1", "0", "128"),
        "--mass": ("-1", "0", "1.5"),
        "--max_temperature": ("-1", "0"),
        "--batch_seconds": ("-1", "0"),
        "--max_duration": ("-1",),
        "--shard_utts": ("-1", "0"),
    },
    "report": {"--max_utts": ("-1",), "--posteriorgrams": ("-1",)},
    "compare": {"--draws": ("-1", "0")},
    "bench": {
        "--repeats": ("-1", "0"),
        "--batch_size": ("-1", "0"),
        "--rounds": ("-1", "0"),
        "--max_batch_seconds": ("-1",),
    },
    "bench-kd": {
        "--epochs": ("-1", "0"),
        "--teacher_epochs": ("-1", "0"),
        "--parallel": ("-1", "0"),
        "--seed": ("-1",),
        "--seeds": ("-1",),
        "--transcribed_fraction": ("-1", "0", "1.5"),
        "--min_confidence": ("-1", "1.5"),
    },
}
CASES = [
    (verb, option, value)
    for verb, options in REFUSED.items()
    for option, values in options.items()
    for value in (*values, *NAN_INF)
]


@pytest.mark.parametrize(("verb", "option", "value"), CASES, ids=[" ".join(case) for case in CASES])
def test_a_bad_number_is_a_one_line_error(verb, option, value, capsys):
    with pytest.raises(SystemExit) as exit_:
        run([verb, f"{option}={value}"])  # "=": a value starting with "-" is not taken for an option
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    message = err.strip().splitlines()[-1]  # argparse: usage lines, then this one
    assert f"error: argument {option}: {value!r}" in message, err
    assert "Traceback" not in err


def _numeric_options(parser: argparse.ArgumentParser) -> set[str]:
    """Options whose ``type=`` makes a number (int, float or a :mod:`speech_kd.argtypes` type)."""
    out = set()
    for action in parser._actions:
        kind = action.type
        if kind is None or not action.option_strings:
            continue
        if kind in (int, float) or getattr(kind, "__module__", "") == argtypes.__name__:
            out.add(action.option_strings[0])
    return out


def test_every_numeric_option_is_listed_and_range_checked():
    """A new numeric option must use a range-checked type and get its row in ``REFUSED``."""
    for verb, parser in all_parsers().items():
        numeric = _numeric_options(parser)
        assert numeric == set(REFUSED.get(verb, {})), verb
        for action in parser._actions:
            assert action.type not in (int, float), f"{verb} {action.option_strings}: plain {action.type.__name__}"


@pytest.mark.parametrize(
    ("kind", "text", "value"),
    [
        (argtypes.positive_float, "0.5", 0.5),
        (argtypes.non_negative_float, "0", 0.0),
        (argtypes.finite_float, "-3", -3.0),
        (argtypes.positive_int, "7", 7),
        (argtypes.non_negative_int, "0", 0),
    ],
)
def test_good_numbers_pass(kind, text, value):
    assert kind(text) == value
