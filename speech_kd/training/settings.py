"""A run's command line and settings, checked before any work.

Takes out what SpeechBrain's parser cannot take (:func:`preparse`), refuses
options that would fail later (:func:`check_run_options`), loads the yaml with
one-line errors (:func:`load_hparams`), and records the run's settings in
``OUTPUT/run_settings.json``, refusing a rerun with other ones
(:func:`check_run_settings`). Used by :mod:`speech_kd.training.train`.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import fields
from pathlib import Path

import speechbrain as sb
import torch
from hyperpyyaml import load_hyperpyyaml

from speech_kd.kd.config import KDConfig, KDSetupError
from speech_kd.kd.consistency import ConsistencySetupError, CRConfig
from speech_kd.training.precision import check_precision

__all__ = [
    "check_run_options",
    "check_run_settings",
    "launched_by_torchrun",
    "load_hparams",
    "preparse",
    "run_settings",
    "trains_as_absent",
]

logger = logging.getLogger(__name__)

#: the settings a run folder was made with (compared when it is run again)
SETTINGS_NAME = "run_settings.json"
#: keys that may change between runs of one folder: more epochs, other workers or batch sizes for
#: evaluation, checkpoint timing, moved data; and paths (compared through the folder itself)
RESUMABLE_KEYS = frozenset(
    {
        "number_of_epochs",
        "num_workers",
        "eval_batch_size",
        "ckpt_interval_minutes",
        "report_after_run",
        "skip_prep",
        "keep_checkpoints",
        "use_tensorboard",
        "allow_changed_settings",
        "max_eval_duration",
    }
)


#: keys added to the yamls after run folders were made: a folder whose recorded settings lack such a key
#: continues when the key's value now trains as its absence did (:func:`trains_as_absent`)
ADDED_KEYS = (
    "cr_ctc_weight",
    "kd_layers",
    "kd_layer_weight",
    "kd_layer_loss",
    "kd_student_layers",
    "kd_teacher_layers",
)


def trains_as_absent(key: str, value) -> bool:
    """Whether ``value`` of an option in :data:`ADDED_KEYS` trains as a yaml without the key did.

    Read as its config class reads it (:class:`~speech_kd.kd.config.KDConfig`,
    :class:`~speech_kd.kd.consistency.CRConfig`) and compared with that class's default, so every
    spelling of "off" it accepts (``kd_layers``: ``null``, ``{}``, ``""``, ...) continues a folder.

    Examples
    --------
    >>> trains_as_absent("kd_layers", None), trains_as_absent("kd_layers", {}), trains_as_absent("kd_layers", "auto")
    (True, True, False)
    """
    config = CRConfig if key in {f.name for f in fields(CRConfig)} else KDConfig
    try:
        read = config.from_hparams({key: value})
    except (KDSetupError, ConsistencySetupError):
        return False
    return getattr(read, key) == getattr(config(), key)


def _run_option(run_opts, hparams: dict, name: str):
    """A run option as ``sb.Brain`` resolves it: command line, else yaml, else SpeechBrain's default."""
    if name in getattr(run_opts, "overridden_args", ()):
        return run_opts[name]
    return hparams.get(name, run_opts[name])


def launched_by_torchrun() -> bool:
    """Whether torchrun started this process (it sets RANK and LOCAL_RANK)."""
    return os.environ.get("RANK") is not None and os.environ.get("LOCAL_RANK") is not None


def check_run_options(run_opts, hparams: dict | None = None) -> None:
    """Refuse settings that would fail later, with what to do instead (before any data preparation).

    * ``--precision=fp16`` (or ``--eval_precision``) on a CPU run: SpeechBrain
      supports fp16 autocast on CUDA only (bf16 works on CPU).
    * under ``torchrun`` without CUDA, the default ``nccl`` backend cannot
      work: ``--distributed_backend=gloo`` is needed.
    """
    hparams = hparams or {}
    device = _run_option(run_opts, hparams, "device") or sb.utils.distributed.infer_device()
    device_type = str(device).split(":")[0]
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"--device={device}: no CUDA GPU is available to this process (torch.cuda.is_available() is "
            "False); use --device=cpu"
        )
    check_precision(_run_option(run_opts, hparams, "precision"), device_type, "--precision")
    check_precision(_run_option(run_opts, hparams, "eval_precision"), device_type, "--eval_precision")
    backend = run_opts["distributed_backend"]
    if launched_by_torchrun() and backend == "nccl" and (device_type != "cuda" or not torch.cuda.is_available()):
        raise ValueError(
            f"torchrun launched this run on {device_type} with --distributed_backend=nccl, which needs CUDA "
            "GPUs: add --distributed_backend=gloo to train with CPU processes"
        )


def preparse(argv: list[str]) -> tuple[list[str], bool, dict]:
    """Take out what SpeechBrain's parser cannot take; return ``(argv, allow_changed_settings, yaml_overrides)``.

    * ``--allow_changed_settings[=True]``: rerun a folder with other settings
      (:func:`check_run_settings`); works with any yaml.
    * ``--ckpt_interval_minutes=0.5``: SpeechBrain's parser takes whole
      minutes only; a fraction is passed as a yaml override (the yamls have the key).
    * ``--key`` with no value (``--lr`` alone) is refused naming the key,
      instead of becoming ``lr: null`` and a traceback later.
    """
    out, allow, extra = [], False, {}
    flags = _SPEECHBRAIN_FLAGS
    for number, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if name == "--allow_changed_settings":
            allow = not eq or value.strip().lower() in ("true", "1", "yes")
            continue
        if name == "--ckpt_interval_minutes" and eq:
            try:
                minutes = float(value)
            except ValueError:
                raise ValueError(f"--ckpt_interval_minutes={value}: not a number of minutes") from None
            if minutes != int(minutes):
                extra["ckpt_interval_minutes"] = minutes
                continue
        if number > 0 and arg.startswith("--") and not eq and name[2:] not in flags:
            following = argv[number + 1] if number + 1 < len(argv) else None
            if following is None or following.startswith("--"):
                raise ValueError(f"{arg} needs a value: {arg}=VALUE")
        out.append(arg)
    return out, allow, extra


#: SpeechBrain run options that take no value (``--debug``, ...)
_SPEECHBRAIN_FLAGS = frozenset(
    {
        "test_only",
        "debug",
        "debug_persistently",
        "distributed_launch",
        "data_parallel_backend",
        "jit",
        "compile",
        "compile_using_fullgraph",
        "compile_using_dynamic_shape_tracing",
        "auto_mix_prec",
        "bfloat16_mix_prec",
        "skip_nonfinite_grads",
        "noprogressbar",
        "tqdm_colored_bar",
        "remove_vector_weight_decay",
        "profile_training",
        "find_unused_parameters",
        "allow_changed_settings",
    }
)


def _json_value(value):
    """``value`` when it is plain data (numbers, text, lists, dicts of them), else ``None``."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError):
        return None


def run_settings(hparams: dict, hparams_file: str) -> dict:
    """The plain-data top-level keys of a run's hyperparameters (paths and :data:`RESUMABLE_KEYS` left out)."""
    settings = {"hparams_file": Path(hparams_file).name}
    for key, value in hparams.items():
        if key in RESUMABLE_KEYS or key.endswith(("_folder", "_file", "_log", "_logs")):
            continue
        plain = _json_value(value)
        if plain is not None or value is None:
            settings[key] = plain
    return settings


def check_run_settings(hparams: dict, hparams_file: str, allow_changed: bool = False) -> None:
    """Refuse to continue a run folder with other settings than it was made with (``OUTPUT/run_settings.json``).

    Compared only when the folder holds checkpoints (there is work to lose
    or to mix): every plain-data key of the yaml plus command-line overrides,
    except :data:`RESUMABLE_KEYS` and paths (and :data:`ADDED_KEYS` a folder
    predates, at the value that trains as before). ``allow_changed`` (the
    ``--allow_changed_settings=True`` flag) turns the refusal into a warning
    that lists what differs; the file then records the new settings.

    Raises
    ------
    ValueError
        ``OUTPUT: made with other settings (folder != now): lr 0.001 != 0.003; ...``.
    """
    folder = Path(hparams["output_folder"])
    path = folder / SETTINGS_NAME
    now = run_settings(hparams, hparams_file)
    checkpointer = hparams.get("checkpointer")
    save = Path(getattr(checkpointer, "checkpoints_dir", folder / "save"))
    if path.exists() and any(save.glob("CKPT+*")):
        try:
            before = json.loads(path.read_text())
        except ValueError:
            before = {}
        diffs = [
            f"{key} {before.get(key, '(unset)')!r} != {now.get(key, '(unset)')!r}"
            for key in sorted(set(before) | set(now))
            if before.get(key) != now.get(key)
            and not (key not in before and key in ADDED_KEYS and trains_as_absent(key, now.get(key)))
        ]
        if diffs and not allow_changed:
            raise ValueError(
                f"{folder}: made with other settings than this run's (folder != now): {'; '.join(diffs[:8])}"
                + ("; ..." if len(diffs) > 8 else "")
                + ". Use another output_folder, or add --allow_changed_settings=True to continue it with these"
            )
        if diffs:
            logger.warning(
                "%s: continuing with changed settings (--allow_changed_settings): %s", folder, "; ".join(diffs)
            )
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(now, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def load_hparams(hparams_file: str, text: str, overrides) -> dict:
    """``load_hyperpyyaml`` with a one-line error naming the file for an unknown key or broken YAML."""
    from ruamel.yaml import YAMLError

    try:
        return load_hyperpyyaml(text, overrides)
    except KeyError as err:
        if "Override" not in str(err):
            raise
        key = str(err.args[0]).split(" not found in")[0].removeprefix("Override ")
        raise ValueError(f"{hparams_file}: --{key.strip(chr(39))}=... overrides a key this yaml does not have") from err
    except YAMLError as err:
        duplicate = re.search(r'found duplicate key "([^"]+)"', str(err))
        if duplicate:
            key = duplicate.group(1)
            given = str(overrides or "")
            if len(re.findall(rf"^{re.escape(key)}\s*:", given, re.M)) > 1:
                raise ValueError(f"--{key} is given twice on the command line (overrides of {hparams_file})") from None
            raise ValueError(f"{hparams_file}: the key {key} appears twice") from None
        raise ValueError(f"{hparams_file} with overrides {overrides!r}: not valid YAML ({err})") from err
