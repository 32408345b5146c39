"""Write docs/cli.md from the argparse definitions, so the reference cannot drift from the code.

Run: ``python scripts/cli_reference.py`` (``make docs`` does; a test checks the file is current).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from speech_kd.cli import all_parsers, build_parser  # noqa: E402


def _option_rows(parser: argparse.ArgumentParser) -> list[str]:
    rows = ["| option | default | what it does |", "|---|---|---|"]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = ", ".join(action.option_strings) or action.dest
        if action.nargs in ("+", "*"):
            name += " ..."
        default = "" if action.default in (None, argparse.SUPPRESS) or action.required else f"`{action.default}`"
        if action.required:
            default = "required"
        text = (action.help or "").replace("%%", "%").replace("|", "\\|")
        rows.append(f"| `{name}` | {default} | {text} |")
    return rows


def render() -> str:
    """The whole reference as Markdown (usage lines wrapped at 100 columns, whatever the terminal)."""
    os.environ["COLUMNS"] = "100"
    top = build_parser()
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    helps = {choice.dest: choice.help for choice in sub._choices_actions}
    out = [
        "# `speech-kd` command reference",
        "",
        "Generated from the argparse definitions by `python scripts/cli_reference.py`; do not edit by hand.",
        "",
        "`speech-kd train HPARAMS.yaml` and `speech-kd distill HPARAMS.yaml` take SpeechBrain's own syntax:",
        "the yaml, then `--key=value` overrides of any of its keys and SpeechBrain's run options (`--device`,",
        "`--precision`, `--debug`, `--ckpt_interval_minutes`, ...); the keys are documented in",
        "`hparams/teacher.yaml` and `hparams/distill.yaml`.",
        "Without a yaml they use the packaged `teacher.yaml` / `distill.yaml` (`speech-kd hparams` lists the",
        "packaged yamls and writes one out for editing).",
        "",
    ]
    for name, parser in all_parsers().items():
        out += [
            f"## `speech-kd {name}`",
            "",
            helps.get(name, "") or "",
            "",
            "```text",
            parser.format_usage().strip(),
            "```",
            "",
            *_option_rows(parser),
            "",
        ]
    return "\n".join(out)


if __name__ == "__main__":
    path = REPO / "docs" / "cli.md"
    path.write_text(render())
    print(f"wrote {path}")
