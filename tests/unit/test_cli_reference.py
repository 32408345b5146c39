"""Every option of every verb has a help line, and docs/cli.md is what the parsers say."""

from __future__ import annotations

import argparse
import importlib.util

from speech_kd.cli import all_parsers
from tests.conftest import REPO


def test_every_option_has_help():
    missing = [
        f"{verb} {action.option_strings or action.dest}"
        for verb, parser in all_parsers().items()
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction) and not action.help
    ]
    assert not missing, missing


def test_cli_reference_is_current():
    spec = importlib.util.spec_from_file_location("cli_reference", REPO / "scripts" / "cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (REPO / "docs" / "cli.md").read_text() == module.render(), "run: python scripts/cli_reference.py"
