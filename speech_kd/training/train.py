"""The training recipe: yaml + command-line overrides -> trained ``<output_folder>/model``.

Shared by ``speech-kd train``, ``speech-kd distill`` and ``recipes/*/train.py``
so every entry point behaves the same. Steps, as in SpeechBrain recipes:
prepare CSVs (on the main process), build datasets, fit with checkpoints,
test the best checkpoint, export the model folder. The command line and the
run's recorded settings are :mod:`speech_kd.training.settings`'s.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import speechbrain as sb
import torch
from speechbrain.utils.distributed import run_on_main

from speech_kd.data.dataio import (
    collate_readable,
    dynamic_batch_sampler,
    load_dataset,
    make_tokenizer,
    merge_csvs,
    token_strings,
)
from speech_kd.data.prepare import prepare_librispeech
from speech_kd.hparams_files import resolve as resolve_hparams_file
from speech_kd.model_folder import export_model_folder
from speech_kd.scoring.decoding import DecodingError
from speech_kd.scoring.evaluate import evaluate_model
from speech_kd.scoring.lm import check_lm_units, load_lm
from speech_kd.training.checkpoints import FolderLock
from speech_kd.training.ctc_brain import CTCBrain
from speech_kd.training.settings import (
    check_run_options,
    check_run_settings,
    launched_by_torchrun,
    load_hparams,
    preparse,
)
from speech_kd.training.unlabeled import mix_unlabeled

__all__ = ["run_training", "prepare_csvs"]

logger = logging.getLogger(__name__)

#: default longest dev/test utterance (seconds) when the yaml has no ``max_eval_duration``
MAX_EVAL_DURATION = 60.0


def prepare_csvs(hparams: dict) -> dict[str, list[str]]:
    """Run data preparation for all splits; return CSV paths per role."""
    folder = Path(hparams["output_folder"])
    roles = {"train": hparams["train_splits"], "dev": hparams["dev_splits"], "test": hparams["test_splits"]}
    splits = sorted({s for names in roles.values() for s in names})
    roles["unlabeled"] = list(
        hparams.get("unlabeled_splits") or []
    )  # untranscribed audio (speech_kd.training.unlabeled)
    result = prepare_librispeech(
        hparams["data_folder"],
        folder / "data",
        splits=splits,
        sample_rate=hparams["sample_rate"],
        alphabet=hparams["alphabet"],
        unlabeled_splits=roles["unlabeled"],
    )
    for split, counts in result.skipped_counts().items():
        logger.warning("%s: skipped %s (see %s/data/%s_skipped.csv)", split, dict(counts), folder, split)
    return {role: [result.csv_files[s] for s in names] for role, names in roles.items()}


def merge_role_csvs(hparams: dict, csvs: dict[str, list[str]]) -> None:
    """Write ``train.csv``, ``dev.csv`` and ``unlabeled.csv`` (each role's splits merged) into the run folder."""
    folder = Path(hparams["output_folder"])
    merge_csvs(csvs["train"], folder / "train.csv")
    merge_csvs(csvs["dev"], folder / "dev.csv")
    if csvs.get("unlabeled"):
        merge_csvs(csvs["unlabeled"], folder / "unlabeled.csv")


def build_datasets(hparams: dict, tokenizer, csvs: dict[str, list[str]], frame_shift: float) -> dict:
    """Datasets for train (merged splits), dev (merged), each test split and ``unlabeled`` (``None`` without).

    Train skips utterances longer than ``avoid_if_longer_than``, dev and test
    those longer than ``max_eval_duration`` (default 60 s), each with a
    warning naming it. Train and dev leave out, with a warning, utterances whose audio turns out
    unreadable when read (loaded with :func:`~speech_kd.data.dataio.collate_readable`);
    a test split still stops at one, so no test score silently covers fewer utterances.
    """
    folder = Path(hparams["output_folder"])
    train_csv, dev_csv = folder / "train.csv", folder / "dev.csv"
    common = {"tokenizer": tokenizer, "sample_rate": hparams["sample_rate"], "frame_shift": frame_shift}
    eval_max = hparams.get("max_eval_duration", MAX_EVAL_DURATION)  # memory bound for dev/test (0/null: none)
    datasets = {
        "train": load_dataset(
            train_csv, max_duration=hparams.get("avoid_if_longer_than"), skip_unreadable=True, **common
        ),
        "dev": load_dataset(dev_csv, sorting="descending", skip_unreadable=True, max_duration=eval_max, **common),
        "test": {
            Path(c).stem: load_dataset(
                c, sorting="descending", max_duration=eval_max, **{**common, "frame_shift": None}
            )
            for c in csvs["test"]
        },
        "unlabeled": None,
    }
    if csvs.get("unlabeled"):  # untranscribed audio (speech_kd.training.unlabeled): KD only
        max_duration = hparams.get("avoid_if_longer_than")
        datasets["unlabeled"] = load_dataset(
            folder / "unlabeled.csv", max_duration=max_duration, skip_unreadable=True, **common
        )
    return datasets


def _check_ddp_batches(sampler, hparams: dict) -> None:
    """Under DDP every process needs two or more batches (SpeechBrain's batch-sampler wrapper breaks on one)."""
    processes = int(os.environ.get("WORLD_SIZE", "1")) if launched_by_torchrun() else 1
    if processes > 1 and len(sampler) <= processes:
        raise ValueError(
            f"{len(sampler)} training batches for {processes} processes: each process needs two or more "
            f"(SpeechBrain's DistributedSamplerWrapper fails on one). Lower max_batch_length (now "
            f"{hparams['max_batch_length']} s) or use fewer processes"
        )


def run_training(argv: list[str] | None = None, brain_class: type[CTCBrain] = CTCBrain, setup=None) -> dict:
    """Train (or distill) as the yaml says; return the test results per split.

    Parameters
    ----------
    argv : list of str
        ``[HPARAMS.yaml, --key=value, ...]`` as for a SpeechBrain recipe
        (run options such as ``--device``, ``--debug``, ``--precision`` too).
    brain_class : type
        The Brain to use (``CTCBrain`` or ``DistillBrain``).
    setup : callable, optional
        ``setup(brain, hparams, datasets)`` called before fitting (the distill
        recipe attaches its targets here).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):
        argv[0] = resolve_hparams_file(argv[0])
    argv, allow_changed, extra = preparse(argv)
    if not sys.stderr.isatty() and "--noprogressbar" not in argv:
        argv.append("--noprogressbar")  # a log file gets the epoch lines, not thousands of progress-bar redraws
    hparams_file, run_opts, overrides = sb.parse_arguments(argv)
    if extra:  # fractional --ckpt_interval_minutes: a yaml override (the Brain reads the yaml's value)
        import yaml

        overrides = (overrides + "\n" if overrides else "") + yaml.safe_dump(extra)
    check_run_options(run_opts)
    sb.utils.distributed.ddp_init_group(run_opts)  # no-op unless launched by torchrun
    hparams_text = Path(hparams_file).read_text()
    hparams = load_hparams(hparams_file, hparams_text, overrides)
    check_run_options(run_opts, hparams)  # now with the yaml's precision
    epochs = hparams.get("number_of_epochs", 1)
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise ValueError(f"--number_of_epochs={epochs}: must be a whole number, 1 or more")
    lock = None
    if sb.utils.distributed.if_main_process():  # one writer per output folder (DDP: the main process holds it)
        lock = FolderLock(hparams["output_folder"], "output folder").acquire()
    try:
        if sb.utils.distributed.if_main_process():
            check_run_settings(hparams, hparams_file, allow_changed)
        return _run_locked(hparams_file, hparams_text, hparams, run_opts, overrides, brain_class, setup)
    finally:
        if lock is not None:
            lock.release()


def _run_locked(
    hparams_file: str, hparams_text: str, hparams: dict, run_opts, overrides: str, brain_class: type[CTCBrain], setup
) -> dict:
    """:func:`run_training` once the output folder is locked and its settings checked."""
    sb.create_experiment_directory(
        experiment_directory=hparams["output_folder"],
        hyperparams_to_save=hparams_file,
        overrides=overrides,
    )
    if not hparams.get("skip_prep", False):
        run_on_main(prepare_csvs, kwargs={"hparams": hparams})
    csvs = prepare_csvs(hparams)  # up to date now: only reads the stamps
    run_on_main(merge_role_csvs, kwargs={"hparams": hparams, "csvs": csvs})

    tokenizer = make_tokenizer(hparams["alphabet"], hparams["blank_index"])
    if len(tokenizer) != hparams["output_neurons"]:
        raise ValueError(f"output_neurons={hparams['output_neurons']} but the alphabet gives {len(tokenizer)} tokens")
    test_lm = test_lm_settings(hparams, tokenizer)  # a bad LM is told now, not after the training
    frame_shift = hparams.get("frame_shift", 0.04)
    datasets = build_datasets(hparams, tokenizer, csvs, frame_shift)

    brain = brain_class(
        modules=hparams["modules"],
        opt_class=hparams["opt_class"],
        hparams=hparams,
        run_opts=run_opts,
        checkpointer=hparams["checkpointer"],
    )
    brain.tokenizer = tokenizer
    brain.check_consistency_setup()  # told now, before a teacher is loaded and scored
    if setup is not None:
        setup(brain, hparams, datasets)

    sampler = dynamic_batch_sampler(
        datasets["train"],
        hparams["max_batch_length"],
        num_buckets=hparams["num_buckets"],
        max_batch_ex=hparams["max_batch_ex"],
        seed=hparams["seed"],
    )
    train_set = datasets["train"]
    if datasets.get("unlabeled") is not None:
        if getattr(brain, "kd_targets", None) is None:  # no teacher (kd_weight=0, or speech-kd train): no use for it
            logger.warning(
                "unlabeled_splits: not used, this run has no teacher targets (untranscribed audio only "
                "feeds the KD term)"
            )
        else:
            train_set, sampler = mix_unlabeled(train_set, datasets["unlabeled"], sampler, hparams)
    _check_ddp_batches(sampler, hparams)
    brain.fit(
        hparams["epoch_counter"],
        train_set,
        datasets["dev"],
        # the loader's own generator: starting an epoch's iterator draws a seed from it, which from the global
        # generator would shift every later draw of a run resumed mid-epoch (checkpoints.RandomStates)
        train_loader_kwargs={
            "batch_sampler": sampler,
            "num_workers": hparams["num_workers"],
            "generator": torch.Generator().manual_seed(hparams["seed"]),
            "collate_fn": collate_readable,
        },
        valid_loader_kwargs={"batch_size": hparams.get("eval_batch_size", 8), "collate_fn": collate_readable},
    )

    results = {}
    for name, dataset in datasets["test"].items():
        brain.evaluate(dataset, min_key="CER", test_loader_kwargs={"batch_size": hparams.get("eval_batch_size", 8)})
        results[name] = brain.test_stats
        if sb.utils.distributed.if_main_process():
            _write_hypotheses(Path(hparams["output_folder"]) / f"hyp_{name}.txt", brain.test_hypotheses)
    if not results:  # no test split: still load the best checkpoint before export
        brain.checkpointer.recover_if_possible(min_key="CER")

    info = {"trained_with": Path(hparams_file).name, "overrides": overrides, "test": results}
    run_on_main(
        export_model_folder,
        kwargs={
            "hparams": hparams,
            "hparams_text": hparams_text,
            "tokenizer": tokenizer,
            "out_dir": hparams["model_folder"],
            "extra_info": info,
        },
    )
    if test_lm is not None and sb.utils.distributed.if_main_process():
        for split, csv in zip(hparams["test_splits"], csvs["test"]):
            if split in results:
                results[split]["beam_lm"] = test_with_lm(hparams, split, csv, test_lm, str(brain.device))
    if sb.utils.distributed.if_main_process():
        (Path(hparams["output_folder"]) / "test_results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def test_lm_settings(hparams: dict, tokenizer) -> dict | None:
    """The final test's beam + LM decoding (``test_lm``, ``test_beam_size``, ...), checked; None: greedy only.

    Raises
    ------
    speech_kd.scoring.lm.LMError
        A missing or corrupt LM, or one whose words the model's units cannot spell.
    speech_kd.scoring.decoding.DecodingError
        ``test_beam_size`` < 1.
    """
    lm = hparams.get("test_lm")
    if not lm:
        return None
    beam = hparams.get("test_beam_size", 100)
    if isinstance(beam, bool) or not isinstance(beam, int) or beam < 1:
        raise DecodingError(f"--test_beam_size must be a positive integer, got {beam!r}")
    check_lm_units(load_lm(lm), token_strings(tokenizer), hparams["blank_index"])
    return {
        "beam_size": beam,
        "lm": str(lm),
        "lm_weight": float(hparams.get("test_lm_weight", 0.5)),
        "word_bonus": float(hparams.get("test_word_bonus", 1.5)),
    }


def test_with_lm(hparams: dict, split: str, csv: str, settings: dict, device: str) -> dict:
    """Score the run's model folder on a test split greedily and with beam + LM, both per-utterance files kept.

    Writes ``test_{greedy,lm}_<split>.json`` and ``..._utts.txt`` in the output folder (for
    ``speech-kd compare``); returns the beam + LM ``WER``, ``CER``, ``rtf`` and ``decoder`` record.
    """
    out = Path(hparams["output_folder"])
    common = {"device": device, "progress": False, "max_duration": hparams.get("max_eval_duration") or None}
    greedy = evaluate_model(
        hparams["model_folder"],
        csv,
        json_path=out / f"test_greedy_{split}.json",
        utts_path=out / f"test_greedy_{split}_utts.txt",
        **common,
    ).summary
    fused = evaluate_model(
        hparams["model_folder"],
        csv,
        json_path=out / f"test_lm_{split}.json",
        utts_path=out / f"test_lm_{split}_utts.txt",
        **settings,
        **common,
    ).summary
    logger.info(
        "test %s: WER greedy %.2f, beam+lm %.2f (%s)", split, greedy["wer"], fused["wer"], json.dumps(fused["decoder"])
    )
    return {
        "WER": fused["wer"],
        "CER": fused["cer"],
        "rtf": fused["rtf"],
        "greedy_WER": greedy["wer"],
        "greedy_rtf": greedy["rtf"],
        "decoder": fused["decoder"],
    }


def _write_hypotheses(path: Path, rows) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for uid, ref, hyp in rows:
            fh.write(f"{uid}\tREF: {ref}\n{uid}\tHYP: {hyp}\n")
