"""Is the teacher better than the student? Score it on dev before distilling, and say when the student catches up.

A teacher that knows less than the data (trained too briefly, on other data,
a smaller or older model) is common, and KD then pulls the student toward
its errors. ``speech-kd distill`` therefore scores the teacher on the dev set
before the first batch (greedy CTC decoding on the teacher's own tokens, the
same WER/CER as ``speech-kd evaluate`` and as the student's dev WER in the
log) and writes ``OUTPUT/teacher_dev.json``:

- from the cache when the ``targets_cache`` holds every dev utterance (no
  audio is read, the teacher does not run);
- else with the live teacher (``teacher_source``): one pass over dev, a few
  seconds for the demo's teacher;
- else (a cache without dev and no teacher folder) not at all, with a warning.

Each epoch the student's dev WER is compared with it
(:class:`speech_kd.kd.anneal.TeacherAnnealMixin`); the report shows both.

Data flow: dev manifest -> teacher posteriors (cache or live) -> greedy text
-> :func:`speech_kd.scoring.metrics.error_rates` -> :class:`TeacherDevScore`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from speech_kd.kd.losses import collapse_greedy
from speech_kd.scoring.evaluate import duration_batches, load_batch, read_manifest
from speech_kd.scoring.metrics import error_rates
from speech_kd.targets.teachers.ensemble import load_teachers, teacher_sources

__all__ = [
    "TEACHER_DEV_FILE",
    "TeacherDevScore",
    "greedy_texts",
    "score_from_cache",
    "score_live",
    "score_teacher_on_dev",
    "preserved_random_state",
    "read_teacher_score",
    "check_teacher",
    "REACHED_ADVICE",
]

logger = logging.getLogger(__name__)

#: the file, in the run folder, that holds the teacher's dev score
TEACHER_DEV_FILE = "teacher_dev.json"

#: what to do when the student reaches the teacher on dev (log and report)
REACHED_ADVICE = (
    "the teacher no longer knows more than the student on dev, and KD now pulls the student toward the "
    "teacher's errors. What to do: keep kd_anneal on (the default: the KD weight fades to 0 as the student "
    "reaches the teacher, and the student goes on learning from the transcripts); compare with the same student "
    "from scratch (--kd_weight=0 --lr=0.002) and `speech-kd compare`; or train a stronger teacher (longer: the "
    "shipped teacher's recipe went from 51.49 to 37.43 test WER between 8 and 16 epochs; on more data; a larger model)"
)


@dataclass
class TeacherDevScore:
    """The teacher's greedy WER/CER (percent) on the run's dev set.

    Attributes
    ----------
    wer, cer : float
        Corpus error rates, percent (normalised as the student's dev WER is).
    num_utts : int
        Dev utterances scored.
    source : str
        ``cache`` (decoded from the targets cache) or ``live`` (the teacher ran).
    teacher : str
        The teacher's name (folder, or the cache's record of it).
    csv : str
        The dev manifest.
    """

    wer: float
    cer: float
    num_utts: int
    source: str
    teacher: str
    csv: str

    def to_dict(self) -> dict:
        """The fields as a JSON-ready dict."""
        return asdict(self)

    def write(self, folder: str | os.PathLike) -> Path:
        """Write ``folder/teacher_dev.json``; return its path."""
        path = Path(folder) / TEACHER_DEV_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


def read_teacher_score(run_dir: str | os.PathLike) -> TeacherDevScore | None:
    """The ``teacher_dev.json`` of a run folder, or ``None`` when the run has none."""
    path = Path(run_dir) / TEACHER_DEV_FILE
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return TeacherDevScore(**{key: data[key] for key in TeacherDevScore.__dataclass_fields__})


@contextlib.contextmanager
def preserved_random_state() -> Iterator[None]:
    """Restore Python's, NumPy's and torch's CPU generators on exit.

    Loading a teacher initialises its layers with random numbers before
    reading its weights: without this, scoring the teacher would shift every
    random draw of the training run that follows.
    """
    py, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)


def greedy_texts(log_probs: torch.Tensor, lengths: torch.Tensor, tokens: list[str], blank: int) -> list[str]:
    """Greedy CTC transcripts of ``log_probs [B, T, V]`` with ``lengths [B]`` valid frames, on ``tokens``.

    Word delimiters (``|`` of wav2vec2, ``▁`` of SentencePiece) become spaces.

    Examples
    --------
    >>> lp = torch.log(torch.tensor([[[0.1, 0.9, 0.0], [0.9, 0.1, 0.0], [0.1, 0.0, 0.9], [0.1, 0.9, 0.0]]]) + 1e-9)
    >>> greedy_texts(lp, torch.tensor([4]), ["<blank>", "A", "|"], blank=0)
    ['A A']
    """
    labels, counts = collapse_greedy(log_probs, lengths, blank)
    texts = []
    for row, count in zip(labels.cpu().tolist(), counts.cpu().tolist()):
        text = "".join(tokens[t] for t in row[:count]).replace("|", " ").replace("▁", " ")
        texts.append(" ".join(text.split()))
    return texts


def _score(rows: list[dict], hyps: dict[str, str], source: str, teacher: str, csv_path) -> TeacherDevScore:
    rates = error_rates([r["wrd"] for r in rows], [hyps[r["ID"]] for r in rows])
    return TeacherDevScore(round(rates.wer, 3), round(rates.cer, 3), rates.num_utts, source, teacher, str(csv_path))


def score_from_cache(reader, rows: list[dict], csv_path: str = "", batch: int = 16) -> TeacherDevScore:
    """Score the cached teacher posteriors of ``rows`` (every ID must be in the cache).

    Parameters
    ----------
    reader : speech_kd.targets.cache.CacheReader
        The targets cache.
    rows : list of dict
        Manifest rows (``ID``, ``wrd``).
    csv_path : str
        The manifest's path (recorded).
    batch : int
        Utterances decoded at once.

    Returns
    -------
    TeacherDevScore
        ``source="cache"``.
    """
    meta = reader.metadata
    tokens, blank = list(meta["teacher_tokens"]), int(meta["blank_index"])
    hyps = {}
    for start in range(0, len(rows), batch):
        ids = [r["ID"] for r in rows[start : start + batch]]
        out = reader.batch(ids)
        hyps.update(zip(ids, greedy_texts(out.log_probs, out.lengths, tokens, blank)))
    return _score(rows, hyps, "cache", str(meta.get("teacher_name", "?")), csv_path)


def score_live(
    teacher, rows: list[dict], csv_path: str = "", device: str = "cpu", batch_seconds: float = 60.0
) -> TeacherDevScore:
    """Run ``teacher`` (a :class:`~speech_kd.targets.teachers.base.Teacher`) on ``rows``' audio and score it.

    Audio is read at the teacher's sample rate, in length-sorted batches of
    at most ``batch_seconds``, without gradients.

    Returns
    -------
    TeacherDevScore
        ``source="live"``.
    """
    hyps = {}
    with torch.no_grad():
        for batch in duration_batches(rows, batch_seconds):
            wavs, lengths = load_batch(batch, teacher.sample_rate)
            out = teacher(wavs.to(device), (lengths / lengths.max()).to(device))
            texts = greedy_texts(out.log_probs, out.lengths, list(teacher.tokens), teacher.blank_index)
            hyps.update(zip((r["ID"] for r in batch), texts))
    return _score(rows, hyps, "live", str(getattr(teacher, "name", "teacher")), csv_path)


def score_teacher_on_dev(
    hparams: dict,
    dev_csv: str | os.PathLike,
    reader=None,
    teacher=None,
    device: str = "cpu",
    ids: list[str] | None = None,
) -> TeacherDevScore | None:
    """The teacher's dev score: from the cache when it covers dev, else live, else ``None`` (with a warning).

    Parameters
    ----------
    hparams : dict
        The run's hparams (``teacher_source``, ``teacher_kind``, ``teacher_overrides``, ``ensemble_weights``).
    dev_csv : path-like
        The run's merged dev manifest.
    reader : speech_kd.targets.cache.CacheReader, optional
        The run's targets cache.
    teacher : speech_kd.targets.teachers.base.Teacher, optional
        The run's live teacher, already loaded (else loaded from ``teacher_source`` when needed).
    device : str
        Where a live teacher runs.
    ids : list of str, optional
        Score only these utterances (the ones the student's dev WER covers).

    Returns
    -------
    TeacherDevScore or None
        ``None`` when neither the cache nor a teacher folder can score dev.
    """
    rows = read_manifest(dev_csv)
    if ids is not None:
        wanted = set(ids)
        rows = [r for r in rows if r["ID"] in wanted]
    if reader is not None and all(r["ID"] in reader for r in rows):
        return score_from_cache(reader, rows, str(dev_csv))
    if teacher is not None:
        return score_live(teacher, rows, str(dev_csv), device=device)
    sources = teacher_sources(hparams.get("teacher_source"))
    if not sources:
        covered = sum(r["ID"] in reader for r in rows) if reader is not None else 0
        logger.warning(
            "teacher not scored on dev: the targets cache holds %d of the %d dev utterances and no "
            "--teacher_source is given; the student's dev WER cannot be compared with the teacher's and kd_anneal "
            "has nothing to anneal toward (give --teacher_source=FOLDER)",
            covered,
            len(rows),
        )
        return None
    with preserved_random_state():
        teacher = load_teachers(
            sources,
            kind=hparams.get("teacher_kind", "auto"),
            device=device,
            overrides=hparams.get("teacher_overrides") or None,
            weights=hparams.get("ensemble_weights"),
        )
        score = score_live(teacher, rows, str(dev_csv), device=device)
    del teacher
    return score


def check_teacher(brain, hparams: dict, targets, datasets: dict) -> TeacherDevScore | None:
    """Score the run's teacher on its dev set before training: ``OUTPUT/teacher_dev.json``, the log, the Brain.

    Called by ``speech-kd distill`` once the targets are attached. The
    score covers the utterances of ``datasets["dev"]`` (those the student's
    dev WER covers) and is handed to ``brain.set_teacher_dev`` (the per-epoch
    comparison and ``kd_anneal``).

    Parameters
    ----------
    brain : speech_kd.training.distill_brain.DistillBrain
        The student's Brain.
    hparams : dict
        The run's hparams.
    targets : speech_kd.targets.strategies.OnlineTargets or speech_kd.targets.strategies.CachedTargets
        The attached KD targets (their teacher or cache is reused).
    datasets : dict
        The run's datasets (``dev``).

    Returns
    -------
    TeacherDevScore or None
        ``None`` when the teacher cannot be scored (warned).
    """
    import speechbrain as sb

    out = Path(hparams["output_folder"])
    dev = datasets.get("dev")
    score = score_teacher_on_dev(
        hparams,
        out / "dev.csv",
        reader=getattr(targets, "reader", None),
        teacher=getattr(targets, "teacher", None),
        device=str(brain.device),
        ids=list(dev.data_ids) if dev is not None else None,
    )
    if score is not None:
        if sb.utils.distributed.if_main_process():
            score.write(out)
        logger.info(
            "teacher %s on dev (%d utterances, %s): WER %.2f %%, CER %.2f %% (%s); the student's dev WER is "
            "compared with it every epoch",
            score.teacher,
            score.num_utts,
            "decoded from the targets cache" if score.source == "cache" else "live",
            score.wer,
            score.cer,
            out / TEACHER_DEV_FILE,
        )
    if hasattr(brain, "set_teacher_dev"):
        brain.set_teacher_dev(score)
    return score
