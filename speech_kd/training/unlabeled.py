"""Untranscribed audio for distillation: batches drawn from two pools, and a teacher-confidence filter.

Frame-level soft targets need no transcript, so a student can learn from the
teacher on audio nobody transcribed. ``unlabeled_splits`` (split folders
prepared by :func:`speech_kd.data.prepare.prepare_unlabeled_split`, ``wrd`` empty)
become a second training pool:

* :class:`MixedBatchSampler` makes every batch *homogeneous*, all transcribed or
  all untranscribed, so CTC stays a per-utterance matter and a recipe's
  ``compute_objectives`` never meets an utterance without a transcript:
  ``KDMixin`` gives an untranscribed batch the KD term alone. An epoch is
  every transcribed batch plus ``unlabeled_fraction`` of the untranscribed
  pool's batches (``1.0``: all of it; ``0.25``: a quarter, the next quarter in
  the next epoch, so four epochs see it all; ``2.0``: twice), shuffled
  together. The batches of an epoch depend only on ``seed`` and the epoch
  number (no global random state), so a resumed or DDP run draws the same.
* :func:`teacher_confidence` scores an utterance from the teacher's own
  posteriors, no reference needed: the mean, over the frames whose most
  probable token is not blank, of that token's probability (0 when the
  teacher emits nothing). :func:`filter_unlabeled` leaves out the
  untranscribed utterances scoring below ``unlabeled_min_confidence``, before
  training, from the soft-target cache or a live teacher pass; it logs how
  many, and writes every score to ``OUTPUT/unlabeled_confidence.csv`` and the
  utterances left out to ``OUTPUT/unlabeled_filtered.csv``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from pathlib import Path

import torch
from torch.utils.data import ConcatDataset, Sampler

from speech_kd.data.dataio import collate_readable, dynamic_batch_sampler
from speech_kd.targets.strategies import resample_wavs

__all__ = [
    "MixedBatchSampler",
    "mix_unlabeled",
    "teacher_confidence",
    "score_unlabeled",
    "filter_unlabeled",
    "CONFIDENCE_CSV",
    "FILTERED_CSV",
]

logger = logging.getLogger(__name__)

CONFIDENCE_CSV = "unlabeled_confidence.csv"
FILTERED_CSV = "unlabeled_filtered.csv"


class MixedBatchSampler(Sampler):
    """Batches from a transcribed and an untranscribed batch sampler, never mixed within a batch.

    Parameters
    ----------
    transcribed : batch sampler
        Yields lists of indices into the transcribed dataset (e.g. a
        ``DynamicBatchSampler``); ``set_epoch`` is passed on to it.
    untranscribed : batch sampler
        The same over the untranscribed dataset; its indices are shifted by
        ``offset`` (the length of the transcribed dataset in a
        ``ConcatDataset([transcribed, untranscribed])``).
    offset : int
        Index of the first untranscribed utterance in the concatenated dataset.
    unlabeled_fraction : float
        Share of the untranscribed pool's batches per epoch (> 0; above 1 repeats it).
    seed : int
        Seeds the shuffle of the two kinds of batches together (with the epoch).

    Example
    -------
    >>> lab, unl = [[0, 1], [2]], [[0], [1], [2], [3]]
    >>> class Fixed(list):
    ...     def set_epoch(self, epoch): pass
    >>> sampler = MixedBatchSampler(Fixed(lab), Fixed(unl), offset=3, unlabeled_fraction=0.5, seed=1)
    >>> sampler.set_epoch(1)
    >>> len(sampler), sorted(sampler)
    (4, [[0, 1], [2], [3], [4]])
    >>> sampler.set_epoch(2)
    >>> sorted(sampler)
    [[0, 1], [2], [5], [6]]
    """

    def __init__(self, transcribed, untranscribed, offset: int, unlabeled_fraction: float = 1.0, seed: int = 0):
        if not unlabeled_fraction > 0:
            raise ValueError(
                f"unlabeled_fraction={unlabeled_fraction}: must be > 0 (leave unlabeled_splits empty "
                "to train without untranscribed audio)"
            )
        self.transcribed = transcribed
        self.untranscribed = untranscribed
        self.offset = int(offset)
        self.fraction = float(unlabeled_fraction)
        self.seed = int(seed)
        self.epoch = 0
        self.counts = (0, 0)
        self._batches: list[list[int]] = []
        self.set_epoch(0)

    def _pass(self, number: int) -> list[list[int]]:
        """Batches of the untranscribed pool's pass ``number`` (each pass its own shuffle), shifted by ``offset``."""
        if hasattr(self.untranscribed, "set_epoch"):
            self.untranscribed.set_epoch(number)
        return [[int(i) + self.offset for i in batch] for batch in self.untranscribed]

    def set_epoch(self, epoch: int) -> None:
        """Draw epoch ``epoch``'s batches: all transcribed ones and the epoch's share of the untranscribed ones."""
        self.epoch = int(epoch)
        if hasattr(self.transcribed, "set_epoch"):
            self.transcribed.set_epoch(self.epoch)
        labeled = [[int(i) for i in batch] for batch in self.transcribed]
        first = self._pass(0)
        per_pass = max(1, len(first))
        wanted = max(1, round(self.fraction * per_pass))
        # the untranscribed batches form one endless stream of passes; epoch e >= 1 takes the e-th slice of it
        start = max(0, self.epoch - 1) * wanted
        number, position = divmod(start, per_pass)
        unlabeled: list[list[int]] = []
        while len(unlabeled) < wanted:
            batches = first if number == 0 else self._pass(number)
            unlabeled += batches[position : position + wanted - len(unlabeled)]
            number, position = number + 1, 0
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % (2**63))
        combined = labeled + unlabeled
        order = torch.randperm(len(combined), generator=generator).tolist()
        self._batches = [combined[i] for i in order]
        self.counts = (len(labeled), len(unlabeled))

    def __iter__(self):
        return iter(self._batches)

    def __len__(self) -> int:
        return len(self._batches)


def mix_unlabeled(train_set, unlabeled_set, train_sampler, hparams: dict) -> tuple[ConcatDataset, MixedBatchSampler]:
    """The training set and batch sampler of a run with untranscribed audio.

    Untranscribed utterances whose ID is also a transcribed one are left out
    (with a warning: the transcribed copy is used).

    Parameters
    ----------
    train_set : DynamicItemDataset
        The transcribed training set.
    unlabeled_set : DynamicItemDataset
        The untranscribed set (``wrd`` empty).
    train_sampler : batch sampler
        The transcribed set's batch sampler.
    hparams : dict
        ``max_batch_length``, ``num_buckets``, ``max_batch_ex``, ``seed`` and
        ``unlabeled_fraction`` (default 1.0).

    Returns
    -------
    tuple
        ``(ConcatDataset([train_set, unlabeled_set]), MixedBatchSampler)``.
    """
    overlap = set(train_set.data_ids) & set(unlabeled_set.data_ids)
    if overlap:
        shown = ", ".join(sorted(overlap)[:5]) + (", ..." if len(overlap) > 5 else "")
        logger.warning(
            "%d untranscribed utterances are also transcribed training utterances (%s): used as transcribed only",
            len(overlap),
            shown,
        )
        unlabeled_set = unlabeled_set.filtered_sorted(key_test={"id": lambda uid: uid not in overlap})
        if not len(unlabeled_set):
            raise ValueError(
                "every untranscribed utterance is also a transcribed one: nothing left in unlabeled_splits"
            )
    sampler = dynamic_batch_sampler(
        unlabeled_set,
        hparams["max_batch_length"],
        num_buckets=hparams["num_buckets"],
        max_batch_ex=hparams["max_batch_ex"],
        seed=hparams["seed"],
    )
    fraction = hparams.get("unlabeled_fraction", 1.0)
    mixed = MixedBatchSampler(train_sampler, sampler, len(train_set), unlabeled_fraction=fraction, seed=hparams["seed"])
    logger.info(
        "training on %d transcribed and %d untranscribed utterances: %d + %d batches per epoch (unlabeled_fraction=%s)",
        len(train_set),
        len(unlabeled_set),
        *mixed.counts,
        hparams.get("unlabeled_fraction", 1.0),
    )
    return ConcatDataset([train_set, unlabeled_set]), mixed


def teacher_confidence(log_probs: torch.Tensor, lengths: torch.Tensor, blank_index: int = 0) -> torch.Tensor:
    """Per-utterance confidence of a CTC model in its own output, without a reference.

    Mean over the valid frames whose most probable token is not blank of that
    token's probability; 0 for an utterance with no such frame.

    Parameters
    ----------
    log_probs : torch.Tensor
        ``[B, T, V]`` frame log-posteriors.
    lengths : torch.Tensor
        ``[B]`` valid frames per utterance (absolute).
    blank_index : int
        The blank token.

    Returns
    -------
    torch.Tensor
        ``[B]`` scores in ``[0, 1]``.

    Example
    -------
    >>> probs = torch.tensor([[[0.1, 0.9], [0.9, 0.1], [0.3, 0.7]], [[0.9, 0.1], [0.8, 0.2], [0.2, 0.8]]])
    >>> teacher_confidence(probs.log(), torch.tensor([3, 2]))
    tensor([0.8000, 0.0000])
    """
    top, token = log_probs.float().max(dim=-1)
    valid = torch.arange(log_probs.shape[1], device=lengths.device)[None, :] < lengths[:, None]
    emitted = valid.to(token.device) & (token != blank_index)
    counts = emitted.sum(dim=1)
    total = (top.exp() * emitted).sum(dim=1)
    return torch.where(counts > 0, total / counts.clamp(min=1), torch.zeros_like(total))


def _scores_from_cache(reader, ids: list[str]) -> dict[str, float]:
    blank = int(reader.metadata["blank_index"])
    scores = {}
    for uid in ids:
        log_probs = reader.get(uid)
        scores[uid] = float(teacher_confidence(log_probs[None], torch.tensor([len(log_probs)]), blank)[0])
    return scores


def _scores_live(teacher, dataset, sample_rate: int, device, batch_size: int = 8) -> dict[str, float]:
    from torch.utils.data import DataLoader

    ordered = dataset.filtered_sorted(sort_key="duration", reverse=True)  # little padding per batch
    loader = DataLoader(ordered, batch_size=batch_size, collate_fn=collate_readable)
    scores = {}
    teacher.to(device)
    with torch.no_grad():
        for batch in loader:
            wavs, wav_lens = batch.sig
            wavs, wav_lens = wavs.to(device), wav_lens.to(device)
            if teacher.sample_rate != sample_rate:
                wavs = resample_wavs(wavs, sample_rate, teacher.sample_rate)
            out = teacher(wavs, wav_lens)
            values = teacher_confidence(out.log_probs, out.lengths.to(out.log_probs.device), teacher.blank_index)
            scores.update(zip(batch.id, values.cpu().tolist()))
    return scores


def score_unlabeled(targets, dataset, out_folder: str | os.PathLike, sample_rate: int = 16000, device="cpu") -> dict:
    """Teacher confidence of every utterance of ``dataset``, written to ``OUT/unlabeled_confidence.csv``.

    Read from the soft-target cache when ``targets`` has one (``targets.reader``),
    else from one pass of the live teacher (``targets.teacher``). A previous
    run's file is reused when it was made by the same teacher and covers
    every utterance (a resumed run does not score again).

    Parameters
    ----------
    targets : CachedTargets or OnlineTargets
        The run's target strategy.
    dataset : DynamicItemDataset
        The untranscribed utterances.
    out_folder : path-like
        The run folder.
    sample_rate : int
        The data's sample rate (the live teacher's input is resampled to its own).
    device : str or torch.device
        Where a live teacher runs.

    Returns
    -------
    dict
        ``{utterance ID: score}``.
    """
    reader = getattr(targets, "reader", None)
    teacher = getattr(targets, "teacher", None)
    fingerprint = reader.metadata.get("teacher_fingerprint") if reader is not None else teacher.fingerprint()
    path = Path(out_folder) / CONFIDENCE_CSV
    stamp = path.with_suffix(".json")
    ids = list(dataset.data_ids)
    if path.exists() and stamp.exists() and json.loads(stamp.read_text()).get("teacher") == fingerprint:
        with open(path, newline="", encoding="utf-8") as fh:
            old = {row["ID"]: float(row["confidence"]) for row in csv.DictReader(fh)}
        if all(uid in old for uid in ids):
            logger.info("teacher confidence of the untranscribed utterances: reusing %s", path)
            return {uid: old[uid] for uid in ids}
    if reader is not None:
        scores = _scores_from_cache(reader, ids)
    else:
        logger.info("scoring %d untranscribed utterances with the live teacher (one pass)", len(ids))
        scores = _scores_live(teacher, dataset, sample_rate, device)
    durations = {uid: dataset.data[uid]["duration"] for uid in ids}
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["ID", "confidence", "duration"])
        writer.writerows([uid, repr(float(scores[uid])), durations[uid]] for uid in ids)  # exact: read back to filter
    os.replace(tmp, path)
    stamp.write_text(json.dumps({"teacher": fingerprint, "utterances": len(ids)}) + "\n")
    return scores


def _quantiles(values: list[float]) -> str:
    ordered = sorted(values)
    picks = [ordered[min(len(ordered) - 1, math.floor(q * len(ordered)))] for q in (0.1, 0.25, 0.5, 0.75, 0.9)]
    return ", ".join(f"{q}: {v:.3f}" for q, v in zip(("p10", "p25", "median", "p75", "p90"), picks))


def filter_unlabeled(
    targets, dataset, threshold: float, out_folder: str | os.PathLike, sample_rate: int = 16000, device="cpu"
):
    """Leave out the untranscribed utterances whose teacher confidence is below ``threshold``.

    Scores come from :func:`score_unlabeled` (on the main process under
    DDP; the others read its file). The utterances left out are logged and
    listed, with their scores, in ``OUT/unlabeled_filtered.csv``.

    Parameters
    ----------
    targets : CachedTargets or OnlineTargets
        The run's target strategy.
    dataset : DynamicItemDataset
        The untranscribed utterances.
    threshold : float
        ``unlabeled_min_confidence``; utterances scoring below it are left out.
    out_folder : path-like
        The run folder.
    sample_rate : int
        The data's sample rate.
    device : str or torch.device
        Where a live teacher runs.

    Returns
    -------
    DynamicItemDataset
        ``dataset`` without the utterances left out.

    Raises
    ------
    ValueError
        Every utterance scored below the threshold.
    """
    from speechbrain.utils.distributed import if_main_process, run_on_main

    out = Path(out_folder)
    run_on_main(score_unlabeled, args=[targets, dataset, out], kwargs={"sample_rate": sample_rate, "device": device})
    scores = score_unlabeled(targets, dataset, out, sample_rate, device)  # reads the file just written
    dropped = sorted((uid for uid, score in scores.items() if score < threshold), key=lambda uid: scores[uid])
    hours = sum(float(dataset.data[uid]["duration"]) for uid in dropped) / 3600.0
    total = sum(float(dataset.data[uid]["duration"]) for uid in scores) / 3600.0
    if if_main_process():
        with open(out / FILTERED_CSV, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["ID", "confidence", "duration", "wav"])
            writer.writerows(
                [uid, f"{scores[uid]:.5f}", dataset.data[uid]["duration"], dataset.data[uid]["wav"]] for uid in dropped
            )
    logger.info(
        "teacher-confidence filter (unlabeled_min_confidence=%s): left out %d of %d untranscribed "
        "utterances (%.3f of %.3f h), listed in %s; scores %s",
        threshold,
        len(dropped),
        len(scores),
        hours,
        total,
        out / FILTERED_CSV,
        _quantiles(list(scores.values())),
    )
    if len(dropped) == len(scores):
        raise ValueError(
            f"unlabeled_min_confidence={threshold} leaves out every untranscribed utterance (scores "
            f"{_quantiles(list(scores.values()))}; see {out / CONFIDENCE_CSV}): lower it"
        )
    keep = set(scores) - set(dropped)
    return dataset.filtered_sorted(key_test={"id": lambda uid: uid in keep}) if dropped else dataset
