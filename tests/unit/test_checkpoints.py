"""A process SIGKILLed in the middle of a checkpoint save: the rerun resumes from the last complete one.

The kill is real: a save hook writes half of a torch archive and kills its
own process, so the folder left behind is exactly what a kill during
``torch.save`` leaves. SpeechBrain's stock Checkpointer marks such a folder as
a checkpoint (its ``CKPT.yaml`` is written first) and the next load fails;
:class:`AtomicCheckpointer` never marks it, and when given one written by the
stock class, sets it aside and loads the previous checkpoint.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from speechbrain.utils.checkpoints import Checkpointer

from speech_kd.training.checkpoints import PARTIAL_META, AtomicCheckpointer, make_atomic, unreadable_files

_SCRIPT = textwrap.dedent(
    """
    import io, os, signal, sys
    import torch
    from speechbrain.utils.checkpoints import Checkpointer
    from speech_kd.training.checkpoints import AtomicCheckpointer

    cls = {"stock": Checkpointer, "atomic": AtomicCheckpointer}[sys.argv[2]]
    model = torch.nn.Linear(4, 4)
    state = {"big": torch.zeros(20000)}

    def save_then_die(obj, path):
        if os.environ.get("DIE"):
            buffer = io.BytesIO()
            torch.save(obj, buffer)
            with open(path, "wb") as handle:
                handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                handle.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save(obj, path)

    ckpt = cls(sys.argv[1], {"model": model, "state": state}, custom_save_hooks={"state": save_then_die},
               custom_load_hooks={"state": lambda obj, path, end: obj.update(torch.load(path))})
    with torch.no_grad():
        model.weight.fill_(float(sys.argv[3]))
    ckpt.save_checkpoint(name=sys.argv[3])
    """
)


def _save(folder: Path, kind: str, value: float, die: bool) -> int:
    env = {"DIE": "1"} if die else {}
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(folder), kind, str(value)], env={**os.environ, **env}, capture_output=True
    )
    return proc.returncode


def _load_state(obj: dict, path: Path, end_of_epoch: bool) -> None:
    obj.update(torch.load(path))


def _recover(folder: Path, cls: type = AtomicCheckpointer) -> tuple[Checkpointer, torch.nn.Linear, dict]:
    model = torch.nn.Linear(4, 4)
    state: dict = {}
    ckpt = cls(folder, {"model": model, "state": state}, custom_load_hooks={"state": _load_state})
    return ckpt, model, state


def test_killed_atomic_save_leaves_no_checkpoint_and_is_cleaned_up(tmp_path, caplog):
    assert _save(tmp_path, "atomic", 1.0, die=False) == 0
    assert _save(tmp_path, "atomic", 2.0, die=True) == -signal.SIGKILL
    killed = tmp_path / "CKPT+2.0"
    assert (killed / PARTIAL_META).exists() and not (killed / "CKPT.yaml").exists()
    assert "state.ckpt" in unreadable_files(killed)  # the half-written archive really is broken

    ckpt, model, state = _recover(tmp_path)
    loaded = ckpt.recover_if_possible()
    assert loaded.path.name == "CKPT+1.0"
    assert float(model.weight[0, 0].detach()) == 1.0 and state["big"].shape == (20000,)
    assert not killed.exists() and "interrupted" in caplog.text


def test_stock_checkpoint_broken_by_a_kill_is_set_aside_not_deleted(tmp_path, caplog):
    assert _save(tmp_path, "stock", 1.0, die=False) == 0
    assert _save(tmp_path, "stock", 2.0, die=True) == -signal.SIGKILL
    broken = tmp_path / "CKPT+2.0"
    assert (broken / "CKPT.yaml").exists()  # the stock class calls it a checkpoint ...
    plain, _, _ = _recover(tmp_path, Checkpointer)
    with pytest.raises((EOFError, OSError, RuntimeError)):  # ... and cannot load it
        plain.recover_if_possible()

    ckpt, model, state = _recover(tmp_path)
    assert ckpt.recover_if_possible().path.name == "CKPT+1.0"
    assert float(model.weight[0, 0].detach()) == 1.0
    aside = tmp_path / "unreadable-CKPT+2.0"
    assert aside.is_dir() and (aside / "state.ckpt").exists() and not broken.exists()
    assert "state.ckpt: truncated or damaged torch archive" in caplog.text


def test_readable_checkpoint_of_another_model_still_raises(tmp_path):
    AtomicCheckpointer(tmp_path, {"model": torch.nn.Linear(4, 4)}).save_checkpoint()
    with pytest.raises(RuntimeError, match="size mismatch"):
        AtomicCheckpointer(tmp_path, {"model": torch.nn.Linear(4, 8)}).recover_if_possible()
    assert len(list(tmp_path.glob("CKPT+*"))) == 1  # a configuration error moves nothing aside


def test_make_atomic_upgrades_only_the_stock_class(tmp_path):
    class Mine(Checkpointer):
        pass

    assert type(make_atomic(Checkpointer(tmp_path / "a"))) is AtomicCheckpointer
    assert type(make_atomic(Mine(tmp_path / "b"))) is Mine
    assert make_atomic(None) is None


_RNG_SCRIPT = textwrap.dedent(
    """
    import os, sys, torch, torch.distributed as dist
    from speech_kd.training.checkpoints import RandomStates

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(100 + rank)  # the processes' generators differ, as after a few DDP batches
    path = sys.argv[1]
    RandomStates().save(path)  # a collective: every process takes part, the main one writes
    dist.barrier()
    expected = torch.rand(3)
    torch.manual_seed(7)  # a fresh process would start here
    RandomStates().load(path)
    got = torch.rand(3)
    print(rank, torch.equal(got, expected), expected.tolist())
    dist.destroy_process_group()
    """
)


def test_random_states_under_ddp_each_process_gets_its_own(tmp_path):
    """Two gloo processes with different generator states: after save and load, each draws what it would have."""
    import socket

    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = tmp_path / "rng.py"
    script.write_text(_RNG_SCRIPT)
    env = {
        **os.environ,
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": "1",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / "rng.ckpt")],
            stdout=subprocess.PIPE,
            text=True,
            env={**env, "RANK": str(r)},
        )
        for r in range(2)
    ]
    outputs = [p.communicate(timeout=120)[0].split(maxsplit=2) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert [o[1] for o in outputs] == ["True", "True"]  # each process restored its own state
    assert outputs[0][2] != outputs[1][2]  # and the two states were different ones


def test_random_states_from_another_process_count_are_not_restored(tmp_path, caplog):
    from speech_kd.training.checkpoints import RandomStates

    torch.save({"states": [RandomStates._local(), RandomStates._local()]}, tmp_path / "rng.ckpt")
    torch.manual_seed(3)
    expected = torch.rand(2)
    torch.manual_seed(3)
    RandomStates().load(tmp_path / "rng.ckpt")
    assert torch.equal(torch.rand(2), expected)
    assert "random states of 2 processes, this run has 1: not restored" in caplog.text
