"""The wheel holds every package and the default yamls (the wheel itself: scripts/check_wheel.sh)."""

from __future__ import annotations

import pytest

from speech_kd import hparams_files
from tests.conftest import REPO

tomllib = pytest.importorskip("tomllib")


def test_pyproject_lists_every_package():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "speech_kd").rglob("__init__.py")}
    assert listed == on_disk | {"speech_kd.hparams"}


def test_default_yamls_are_the_repository_hparams():
    assert hparams_files.names() == sorted(p.name for p in (REPO / "hparams").glob("*.yaml"))
    assert hparams_files.resolve("hparams/distill.yaml").endswith("distill.yaml")
