"""The default yamls (``hparams/`` of the repository), wherever speech_kd is installed.

A wheel ships them as package data, the package ``speech_kd.hparams`` (mapped
from the repository's ``hparams/`` folder in ``pyproject.toml``); a checkout
run without installing (``PYTHONPATH``) reads the repository's folder. Every
caller goes through :func:`path`, so neither case is special anywhere else.

Example
-------
>>> "distill.yaml" in names()
True
>>> path("teacher.yaml").name
'teacher.yaml'
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path

logger = logging.getLogger(__name__)
_told: set[str] = set()  # names already said to resolve to the packaged copy (said once per process)


def _say_packaged(name: str, packaged: Path) -> None:
    """Log once that ``name`` (not found here) stands for the packaged ``packaged``."""
    if name not in _told:
        _told.add(name)
        logger.info("%s: not found here, so the packaged copy is used (%s)", name, packaged)


__all__ = ["folder", "model_folder", "names", "path", "resolve", "shipped_teacher"]


def folder() -> Path:
    """The folder holding the default yamls (package data of an install, else the checkout's ``hparams/``)."""
    try:
        return Path(str(resources.files("speech_kd.hparams")))
    except ModuleNotFoundError:  # a checkout on PYTHONPATH: speech_kd.hparams exists only once installed
        return Path(str(resources.files("speech_kd"))).parent / "hparams"


def shipped_teacher() -> Path:
    """The teacher shipped with the package (``speech_kd/pretrained/teacher_synth``, package data too)."""
    return Path(str(resources.files("speech_kd"))) / "pretrained" / "teacher_synth"


def model_folder(source: str) -> str:
    """A model folder given on the command line or in a yaml: ``source`` itself, or the shipped copy of it.

    The documents name the shipped teacher ``speech_kd/pretrained/teacher_synth``, a path that exists in
    a checkout only; where no such folder exists (a pip install, another directory), a path ending in
    ``speech_kd/pretrained/NAME`` is the package's own ``pretrained/NAME``. Anything else is returned as
    given, for the caller's own "does not exist" message.

    Examples
    --------
    >>> model_folder("no/such/folder")
    'no/such/folder'
    >>> Path(model_folder("/elsewhere/speech_kd/pretrained/teacher_synth")) == shipped_teacher()
    True
    """
    given = Path(source)
    if given.exists() or given.parts[-3:-1] != ("speech_kd", "pretrained"):
        return source
    shipped = Path(str(resources.files("speech_kd"))) / "pretrained" / given.name
    if not shipped.is_dir():
        return source
    _say_packaged(source, shipped)
    return str(shipped)


def names() -> list[str]:
    """The default yamls' file names, sorted."""
    return sorted(p.name for p in folder().glob("*.yaml"))


def path(name: str) -> Path:
    """The default yaml ``name`` (``"distill.yaml"``; ``"hparams/distill.yaml"`` and ``"distill"`` too).

    Raises
    ------
    FileNotFoundError
        When no default yaml has that name (the message lists those that exist).
    """
    stem = Path(name).name
    candidate = folder() / (stem if stem.endswith(".yaml") else f"{stem}.yaml")
    if not candidate.is_file():
        raise FileNotFoundError(f"no default hparams file {name!r}; there are: {', '.join(names())}")
    return candidate


def resolve(name: str) -> str:
    """A yaml given on the command line: the file itself if it exists, else the default yaml of that name.

    ``hparams/distill.yaml`` therefore works from any directory, as in a checkout.

    Raises
    ------
    FileNotFoundError
        When ``name`` is neither a file nor a default yaml.
    """
    if Path(name).exists():
        return name
    parent = Path(name).parent
    if str(parent) in (".", "hparams") and Path(name).suffix in ("", ".yaml"):
        try:
            packaged = str(path(name))
        except FileNotFoundError:
            pass
        else:
            _say_packaged(name, Path(packaged))
            return packaged
    raise FileNotFoundError(f"hparams file {name} not found")
