"""Checkpoints that a kill cannot break: SpeechBrain's Checkpointer, saved atomically.

SpeechBrain 1.1.2 writes a checkpoint's ``CKPT.yaml`` first and the parameter
files after it, and ``CKPT.yaml`` is what marks a folder as a checkpoint. A run
killed during a save therefore leaves a "checkpoint" whose model or optimizer
file is truncated, and the rerun dies on it (``EOFError`` inside
``torch.load``) instead of resuming.

:class:`AtomicCheckpointer` is a drop-in ``Checkpointer`` that

- writes the meta file as ``CKPT.yaml.partial`` and renames it to
  ``CKPT.yaml`` (atomic on POSIX) only after every parameter file is written
  and flushed to disk, so a killed save leaves a folder without ``CKPT.yaml``,
  which recovery never loads and removes;
- on recovery, if a checkpoint fails to load and one of its files is
  unreadable (empty, or a truncated torch zip archive: checkpoints written by
  the stock Checkpointer, or a disk that lost data), renames that folder to
  ``unreadable-CKPT+...`` (kept, not deleted), warns with the file and the
  problem, and loads the next checkpoint in order instead. A load error with
  every file readable (a checkpoint of a differently shaped model, say) is
  raised unchanged: that is a configuration problem, not damage.

:func:`make_atomic` turns a stock ``Checkpointer`` into one in place; the
Brains of this package call it, so a recipe's yaml may keep SpeechBrain's class.

:class:`RandomStates` (added by :func:`add_random_states`, which the Brains
also call) checkpoints the random number generators, so a resumed run draws
the same dropout masks, SpecAugment masks and speed factors as the run it
continues and ends with the same weights as an uninterrupted one.

:class:`FolderLock` keeps one writer per output or cache folder: a ``.lock``
file holding the writer's host and PID, taken over (with a message) when that
process is gone, so a killed run never leaves a folder stuck.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch
from speechbrain.utils.checkpoints import (
    METAFNAME,
    Checkpoint,
    Checkpointer,
    mark_as_loader,
    mark_as_saver,
    register_checkpoint_hooks,
)
from speechbrain.utils.distributed import ddp_barrier, if_main_process

from speech_kd.training.distributed import gather_objects, rank, world_size

__all__ = [
    "AtomicCheckpointer",
    "FolderLock",
    "FolderLockedError",
    "PARTIAL_META",
    "RandomStates",
    "add_random_states",
    "make_atomic",
    "unreadable_files",
]

logger = logging.getLogger(__name__)

PARTIAL_META = METAFNAME + ".partial"
_ZIP_MAGIC = b"PK\x03\x04"
LOCK_NAME = ".lock"


class FolderLockedError(ValueError):
    """Another live process is writing into the folder."""


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


class FolderLock:
    """One writer per folder: ``FOLDER/.lock`` holds ``HOST PID`` while a run writes there.

    Taken with ``O_CREAT | O_EXCL``. A lock whose process no longer runs on
    this host (a killed run) is taken over with a warning; a live one raises
    :class:`FolderLockedError` naming its PID. A lock written on another host
    (a shared file system) is honoured unless it is older than ``stale_hours``.
    Released when the ``with`` block (or :meth:`release`) ends; the process
    exiting without release leaves a lock the next run takes over.

    Parameters
    ----------
    folder : path-like
        The folder to guard (created if missing).
    what : str
        How errors name the user's command (e.g. ``"output folder"``).
    stale_hours : float
        Age after which another host's lock is treated as stale.
    """

    def __init__(self, folder: str | os.PathLike, what: str = "folder", stale_hours: float = 72.0) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.what = what
        self.stale_hours = stale_hours
        self.held = False

    def _owner(self) -> tuple[str, int] | None:
        try:
            host, _, pid = self.path.read_text().strip().partition(" ")
            return host, int(pid)
        except (OSError, ValueError):
            return None

    def acquire(self) -> FolderLock:
        """Take the lock or raise :class:`FolderLockedError`; return ``self``."""
        import socket
        import time

        self.folder.mkdir(parents=True, exist_ok=True)
        me = f"{socket.gethostname()} {os.getpid()}\n"
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and owner[1] == os.getpid() and owner[0] == socket.gethostname():
                    return self  # this process holds it already (an outer caller): not ours to release
                if owner is not None:
                    host, pid = owner
                    same_host = host == socket.gethostname()
                    try:
                        age_h = (time.time() - self.path.stat().st_mtime) / 3600
                    except OSError:
                        continue  # released meanwhile: try again
                    if (same_host and _process_alive(pid)) or (not same_host and age_h < self.stale_hours):
                        raise FolderLockedError(
                            f"{self.folder}: another run (PID {pid} on {host}) is writing this {self.what} "
                            f"({self.path}); wait for it, or use another folder"
                        ) from None
                    logger.warning(
                        "%s: taking over the lock of PID %d on %s, which is no longer running", self.folder, pid, host
                    )
                else:
                    logger.warning("%s: taking over an unreadable lock file %s", self.folder, self.path)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(me)
            self.held = True
            return self
        raise FolderLockedError(f"{self.folder}: could not take the lock {self.path} (another run keeps taking it)")

    def release(self) -> None:
        """Remove the lock file if this process holds it."""
        import socket

        if self.held and self._owner() == (socket.gethostname(), os.getpid()):
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def unreadable_files(folder: str | Path) -> dict[str, str]:
    """Files of a checkpoint folder that cannot be read back, with the reason.

    Checks what a kill or a full disk leaves: empty files, and torch archives
    (zip) whose central directory or member checksums are damaged. Text files
    (counters, dataloader state) are only checked for being non-empty.

    Parameters
    ----------
    folder : str or Path
        A checkpoint folder (``CKPT+...``).

    Returns
    -------
    dict
        ``{file name: problem}``, empty when every file reads.

    Example
    -------
    >>> import tempfile, torch
    >>> folder = Path(tempfile.mkdtemp())
    >>> torch.save({"w": torch.zeros(3)}, folder / "model.ckpt")
    >>> unreadable_files(folder)
    {}
    >>> data = (folder / "model.ckpt").read_bytes()
    >>> _ = (folder / "model.ckpt").write_bytes(data[: len(data) // 2])
    >>> unreadable_files(folder)
    {'model.ckpt': 'truncated or damaged torch archive (File is not a zip file)'}
    """
    problems: dict[str, str] = {}
    for path in sorted(Path(folder).iterdir()):
        if not path.is_file() or path.name in (METAFNAME, PARTIAL_META):
            continue
        if path.stat().st_size == 0:
            problems[path.name] = "empty file"
            continue
        with open(path, "rb") as handle:
            if handle.read(4) != _ZIP_MAGIC:
                continue
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as error:
            problems[path.name] = f"truncated or damaged torch archive ({error})"
            continue
        if bad is not None:
            problems[path.name] = f"damaged torch archive (checksum of {bad})"
    return problems


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicCheckpointer(Checkpointer):
    """A ``speechbrain.utils.checkpoints.Checkpointer`` whose saves are atomic (see module docstring).

    Same constructor and methods as SpeechBrain's; use it in HyperPyYAML as
    ``checkpointer: !new:speech_kd.training.checkpoints.AtomicCheckpointer``.

    Example
    -------
    >>> import tempfile, torch
    >>> layer = torch.nn.Linear(2, 2)
    >>> ckpt = AtomicCheckpointer(tempfile.mkdtemp(), {"layer": layer})
    >>> saved = ckpt.save_checkpoint()
    >>> sorted(p.name for p in saved.path.iterdir())
    ['CKPT.yaml', 'layer.ckpt']
    >>> ckpt.recover_if_possible().path == saved.path
    True
    """

    def _save_checkpoint_metafile(self, fpath, meta_to_include={}, end_of_epoch=True):  # noqa: B006 (SpeechBrain's signature)
        return super()._save_checkpoint_metafile(Path(fpath).with_name(PARTIAL_META), meta_to_include, end_of_epoch)

    def save_checkpoint(self, meta={}, end_of_epoch=True, name=None, verbosity=logging.INFO):  # noqa: B006
        """Save like SpeechBrain, then mark the folder complete by renaming its meta file."""
        checkpoint = super().save_checkpoint(meta, end_of_epoch, name, verbosity)
        ddp_barrier()  # every process has written its files (FSDP saves on all of them)
        if checkpoint is not None:
            folder = Path(checkpoint.path)
            for path in folder.iterdir():
                _fsync(path)
            os.replace(folder / PARTIAL_META, folder / METAFNAME)
            _fsync(folder)
        ddp_barrier()
        return checkpoint

    def remove_unfinished(self) -> list[Path]:
        """Delete folders of saves that never finished (``CKPT.yaml.partial``, no ``CKPT.yaml``).

        Nothing is lost: such a folder was never a checkpoint.

        Returns
        -------
        list of Path
            The folders removed.
        """
        removed = []
        if if_main_process():
            for folder in sorted(self.checkpoints_dir.glob("CKPT+*")):
                if (folder / PARTIAL_META).exists() and not (folder / METAFNAME).exists():
                    logger.warning("removing %s: a checkpoint save that was interrupted before it finished", folder)
                    shutil.rmtree(folder)
                    removed.append(folder)
        ddp_barrier()
        return removed

    def recover_if_possible(self, importance_key=None, max_key=None, min_key=None, ckpt_predicate=None):
        """Load the checkpoint SpeechBrain would choose, skipping (and setting aside) unreadable ones.

        Returns
        -------
        Checkpoint or None
            The checkpoint loaded, ``None`` when there is none.
        """
        self.remove_unfinished()
        while True:
            chosen = self.find_checkpoint(importance_key, max_key, min_key, ckpt_predicate)
            if chosen is None:
                logger.info("Would load a checkpoint here, but none found yet.")
                return None
            try:
                self.load_checkpoint(chosen)
                return chosen
            except Exception as error:
                problems = unreadable_files(chosen.path)
                if not problems:
                    raise
                self._set_aside(chosen, problems, error)

    def _set_aside(self, checkpoint: Checkpoint, problems: dict[str, str], error: Exception) -> None:
        folder = Path(checkpoint.path)
        aside = folder.with_name("unreadable-" + folder.name)
        details = "; ".join(f"{name}: {why}" for name, why in problems.items())
        logger.warning(
            "checkpoint %s cannot be loaded (%s: %s): moved to %s; trying the next checkpoint",
            folder,
            details,
            type(error).__name__,
            aside,
        )
        if if_main_process():
            os.replace(folder, aside)
        ddp_barrier()


def make_atomic(checkpointer: Checkpointer | None) -> Checkpointer | None:
    """Give a stock SpeechBrain ``Checkpointer`` the atomic saves and safe recovery of :class:`AtomicCheckpointer`.

    Changes the object's class in place (the subclass adds no state), so every
    reference to it, including the Brain's and the yaml's, gets the behaviour.
    Other classes (a user's own subclass) are left alone.

    Example
    -------
    >>> import tempfile
    >>> ckpt = make_atomic(Checkpointer(tempfile.mkdtemp()))
    >>> type(ckpt).__name__
    'AtomicCheckpointer'
    """
    if checkpointer is not None and type(checkpointer) is Checkpointer:
        checkpointer.__class__ = AtomicCheckpointer
        logger.debug("checkpointer %s: saves made atomic", checkpointer.checkpoints_dir)
    return checkpointer


class RandomStates:
    """Every process's Python, NumPy and torch (CPU, and its CUDA device) generator states, as one recoverable.

    Saved with each checkpoint, restored on recovery: without it a resumed run
    continued from the seed's initial state and drew other masks and speed
    factors than the run it replaces, ending with other weights. Under DDP the processes' states
    differ after the first batch (their batches differ), so the save gathers
    all of them and each process restores its own; a checkpoint made with
    another number of processes restores none (with a warning). The CUDA
    state is that of the process's current device, and only once CUDA is in
    use (reading it would otherwise start CUDA in a CPU run).
    """

    @staticmethod
    def _local() -> dict:
        cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        return {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": cuda,
        }

    @mark_as_saver
    def save(self, path: str | os.PathLike) -> None:
        """Gather every process's states; the main process writes them to ``path``.

        Runs on every process (registered with ``save_on_main_only=False``):
        the gather is a collective.
        """
        states = gather_objects(self._local())
        if if_main_process():
            torch.save({"states": states}, path)

    @mark_as_loader
    def load(self, path: str | os.PathLike, end_of_epoch: bool = False) -> None:
        """Restore this process's states from ``path``."""
        del end_of_epoch  # the same either way
        states = torch.load(path, weights_only=False)["states"]
        if len(states) != world_size():
            logger.warning(
                "%s: random states of %d processes, this run has %d: not restored (it goes on with other random draws)",
                path,
                len(states),
                world_size(),
            )
            return
        state = states[rank()]
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if state["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])


register_checkpoint_hooks(RandomStates, save_on_main_only=False)


def add_random_states(checkpointer: Checkpointer | None) -> None:
    """Checkpoint the random generators too (:class:`RandomStates`; optional, so older checkpoints still load)."""
    if checkpointer is not None and "random_states" not in checkpointer.recoverables:
        checkpointer.add_recoverable("random_states", RandomStates(), optional_load=True)
