"""Reading a run folder for the report: history, settings, manifests."""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)


def load_history(run_dir: str | os.PathLike) -> list[dict]:
    """The per-epoch rows of ``RUN_DIR/history.jsonl`` (the last row per epoch wins, as after a resume)."""
    path = Path(run_dir) / "history.jsonl"
    if not path.exists():
        return []
    rows = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a crash (power loss); the rerun wrote the epoch again
            logger.warning("%s line %d is not JSON (cut short?): skipped", path, number)
            continue
        rows[row["epoch"]] = row
    return [rows[e] for e in sorted(rows)]


def _yaml_value(text: str, key: str) -> str:
    """Top-level scalar ``key: value`` of the run's saved hyperparams.yaml (no yaml evaluation)."""
    for line in text.splitlines():
        if line.startswith(f"{key}:"):
            value = line.split(":", 1)[1].split("#", 1)[0].strip()
            return value.strip("'\"")
    return ""


@dataclass
class RunFolder:
    """What the report needs to know about a run folder."""

    folder: Path
    hparams_text: str
    resolved: dict  # kd_run.json: the KD settings as the run resolved them (empty: no KD in this run)

    @classmethod
    def read(cls, folder: Path) -> RunFolder:
        """The run folder ``folder`` as written by ``speech-kd train``/``distill``."""
        text = (folder / "hyperparams.yaml").read_text() if (folder / "hyperparams.yaml").exists() else ""
        resolved_path = folder / "kd_run.json"
        resolved = json.loads(resolved_path.read_text()) if resolved_path.exists() else {}
        return cls(folder, text, resolved)

    def setting(self, key: str) -> str:
        """A setting of the run: from ``kd_run.json`` (resolved values), else the saved hyperparams.yaml."""
        value = self.resolved.get(key)
        return str(value) if value is not None else _yaml_value(self.hparams_text, key)

    @property
    def kd(self) -> bool:
        """Whether the student was trained with KD (``kd_run.json`` is written only then)."""
        if self.resolved:
            return True
        try:  # a run folder older than kd_run.json
            # distill has written kd_run.json since it existed; an older distill yaml always names kd_weight,
            # and a run of speech-kd train (no kd_weight in its yaml) has no teacher
            return float(_yaml_value(self.hparams_text, "kd_weight") or 0) > 0
        except ValueError:
            return False

    def teacher_sources(self) -> list[str]:
        """The teacher folder(s) of a KD run (empty for plain training and ``kd_weight=0``)."""
        if not self.kd:
            return []
        value = self.resolved.get("teacher_source", _yaml_value(self.hparams_text, "teacher_source"))
        if isinstance(value, (list, tuple)):
            return [str(v) for v in value]
        return [s.strip() for s in str(value or "").split(",") if s.strip()]


def read_rows(csv_path: Path, limit: int | None = None) -> list[dict]:
    """The rows of a CSV manifest (the first ``limit`` of them)."""
    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return rows[:limit] if limit else rows


def subset_csv(csv_path: Path, limit: int | None, out: Path) -> Path:
    """``csv_path`` cut to its first ``limit`` rows (the whole file when ``limit`` is falsy or larger)."""
    rows = read_rows(csv_path)
    if not limit or limit >= len(rows):
        return csv_path
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows[:limit])
    return out


def scoring_csv(run_dir: Path) -> Path:
    """The run's test manifest (``test.csv``, or ``data/test*.csv`` as written by prepare), else its dev manifest."""
    tests = [p for p in sorted((run_dir / "data").glob("test*.csv")) if not p.stem.endswith("_skipped")]
    for candidate in [run_dir / "test.csv", *tests, run_dir / "dev.csv"]:
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"{run_dir}: no test or dev manifest to score the models on")
