"""Write a synthesised multi-speaker English corpus in LibriSpeech layout.

Layout (identical to a LibriSpeech download, so ``speech-kd prepare`` and
every recipe treat both the same)::

    OUT_DIR/SPLIT/SPK/CHAPTER/SPK-CHAPTER-UTT.flac
    OUT_DIR/SPLIT/SPK/CHAPTER/SPK-CHAPTER.trans.txt
    OUT_DIR/SPEAKERS.TXT
    OUT_DIR/synth_config.json
    OUT_DIR/synth_plan.json

Speakers and sentences are disjoint between splits. A split made with
``SplitSpec(..., transcribed=False)`` is *untranscribed*: no ``.trans.txt``
(its sentences go to ``OUT_DIR/SPLIT.references.txt``, for scoring pseudo-labels
only), its own speakers, and sentences that no other split has; adding one
leaves the other splits exactly as they were. Everything is drawn
from one seed, and each utterance's content depends only on its index, so
the corpus is identical whatever the number of worker processes (sox runs in
repeatable mode, so even its dither is the same), and a rerun after an
interruption only renders what is missing. ``synth_plan.json`` records what
each audio file was rendered from (speaker and sentence), written before any
rendering: a rerun keeps a file only when the new plan wants exactly that
audio there, renders it again otherwise, and removes the files of the old
plan that the new one does not have, so a rerun into the same folder with
another seed or speaker count never pairs old audio with new transcripts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import signal
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from speech_kd.data.synth.text import SentenceGenerator
from speech_kd.data.synth.voices import Speaker, check_engines, make_speakers, render

__all__ = ["SplitSpec", "SynthConfig", "synthesize_corpus", "DEFAULT_SPLITS"]

logger = logging.getLogger(__name__)

#: seconds of speech per transcript character, used to plan split sizes
_SECONDS_PER_CHAR = 0.068


@dataclass(frozen=True)
class SplitSpec:
    """One split to synthesise: its name, hours of audio, speaker count and whether it gets transcripts."""

    name: str
    hours: float
    speakers: int
    transcribed: bool = True


DEFAULT_SPLITS = (
    SplitSpec("train", 1.0, 100),
    SplitSpec("dev", 0.15, 10),
    SplitSpec("test", 0.15, 10),
)


@dataclass
class SynthConfig:
    """Everything that determines the corpus; saved as ``synth_config.json``."""

    splits: tuple[SplitSpec, ...] = DEFAULT_SPLITS
    seed: int = 1234
    chapters_per_speaker: int = 2
    jobs: int = field(default_factory=lambda: os.cpu_count() or 1)

    def to_dict(self) -> dict:
        """JSON-friendly view (``jobs`` omitted: it does not change the output)."""
        return {
            # a transcribed split is written as before this field existed (same config file, same corpus)
            "splits": [{k: v for k, v in vars(s).items() if k != "transcribed" or not v} for s in self.splits],
            "seed": self.seed,
            "chapters_per_speaker": self.chapters_per_speaker,
        }


@dataclass(frozen=True)
class _Utterance:
    split: str
    speaker: Speaker
    chapter: int
    index: int
    text: str

    @property
    def utt_id(self) -> str:
        return f"{self.speaker.speaker_id}-{self.chapter}-{self.index:04d}"

    def flac_path(self, root: Path) -> Path:
        spk = str(self.speaker.speaker_id)
        return root / self.split / spk / str(self.chapter) / f"{self.utt_id}.flac"


def _sentence_owner(sentence: str, n_splits: int) -> int:
    """Index of the split that owns ``sentence``: a stable hash partition.

    Split ``k >= 1`` owns hash bucket ``k - 1`` of 20; split 0 (the training
    split) owns the rest. Ownership depends only on the sentence, so splits
    stay disjoint whatever their sizes, and a smaller corpus made with the
    same seed is a prefix of a larger one.
    """
    bucket = zlib.crc32(sentence.encode()) % 20
    return bucket + 1 if bucket < n_splits - 1 else 0


def _plan(config: SynthConfig) -> list[_Utterance]:
    """Decide every utterance (split, speaker, chapter, text) before rendering."""
    if len(config.splits) > 20:
        raise ValueError("at most 20 splits")
    # sentence ownership is shared out among the transcribed splits only, so adding an untranscribed
    # split changes none of them; an untranscribed split takes sentences of the training split's share
    # from its own generator, skipping every sentence already planned
    owners = [s.name for s in config.splits if s.transcribed]
    plan: list[_Utterance] = []
    for k, split in enumerate(config.splits):
        if split.speakers < 1:
            raise ValueError(f"split {split.name!r} needs at least one speaker")
        speakers = make_speakers(split.speakers, seed=config.seed * 1000 + k, first_id=100 + 1000 * k)
        owner = owners.index(split.name) if split.transcribed else 0
        sentences = SentenceGenerator(seed=config.seed if split.transcribed else config.seed + 7919 * (k + 1))
        taken = set() if split.transcribed else {u.text for u in plan}
        budget = split.hours * 3600.0
        counters = [0] * len(speakers)
        n = 0
        while budget > 0:
            for text in sentences.take(256):
                if _sentence_owner(text, max(1, len(owners))) != owner or text in taken:
                    continue
                slot = n % len(speakers)
                n += 1
                spk = speakers[slot]
                idx = counters[slot]
                counters[slot] += 1
                chapter = spk.speaker_id * 10 + idx % config.chapters_per_speaker
                plan.append(_Utterance(split.name, spk, chapter, idx, text))
                budget -= len(text) * _SECONDS_PER_CHAR + 0.3
                if budget <= 0:
                    break
    return plan


def _render_job(job: tuple[Speaker, str, str]) -> None:
    speaker, text, path = job
    try:
        render(speaker, text, path)
    except Exception as err:  # noqa: BLE001 - re-raised with context for the pool
        raise RuntimeError(f"synthesis failed for {path} ({speaker.engine}/{speaker.voice}): {err}") from err


def _default_signals() -> None:
    """Pool-worker initializer: SIGTERM kills the worker, SIGINT is left to the parent.

    A forked worker inherits the parent's handlers; ``speech-kd``'s SIGTERM handler (raise
    ``KeyboardInterrupt``, so that a run ends as Ctrl-C ends it) made a worker that ``Pool.terminate``
    signalled keep waiting for work, and the parent waited for it forever when the pool closed.
    """
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def render_pool(jobs: int) -> mp.pool.Pool:
    """A fork pool of ``max(1, jobs)`` workers with default signal handling (:func:`_default_signals`)."""
    return mp.get_context("fork").Pool(max(1, jobs), initializer=_default_signals)


def synthesize_corpus(out_dir: str | os.PathLike, config: SynthConfig | None = None) -> dict:
    """Synthesise the corpus described by ``config`` into ``out_dir``.

    Returns a summary: utterances and hours of audio per split.
    """
    config = config or SynthConfig()
    check_engines()
    root = Path(out_dir)
    check_synth_folder(root)
    root.mkdir(parents=True, exist_ok=True)
    plan = _plan(config)
    _reconcile_with_previous_plan(root, plan)
    for u in plan:
        u.flac_path(root).parent.mkdir(parents=True, exist_ok=True)

    todo = [(u.speaker, u.text, str(u.flac_path(root))) for u in plan if not u.flac_path(root).exists()]
    if todo:
        with render_pool(config.jobs) as pool:
            for _ in tqdm(
                pool.imap_unordered(_render_job, todo, chunksize=8), total=len(todo), desc="synthesising", unit="utt", disable=None
            ):
                pass

    _write_transcripts(root, [u for u in plan if u.split in _transcribed(config)])
    _write_references(root, [u for u in plan if u.split not in _transcribed(config)])
    _write_speakers(root, plan)
    (root / "synth_config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    summary = _summarise(root, plan)
    for split in config.splits:
        got = summary.get(split.name, {}).get("speakers", 0)
        if got < split.speakers:
            logger.warning("split %s: %d of %d speakers have utterances (%.3f h is too little for them all)",
                           split.name, got, split.speakers, split.hours)
    return summary


PLAN_NAME = "synth_plan.json"


def _audio_key(u: _Utterance) -> str:
    """What decides an utterance's audio: its speaker (engine, voice, perturbations) and its sentence."""
    return hashlib.sha1(f"{u.speaker!r}|{u.text}".encode()).hexdigest()[:16]


def check_synth_folder(root: Path) -> None:
    """Refuse an ``out_dir`` that is a file, or a non-empty folder that is not a corpus of ``synth`` (no ``synth_plan.json``).

    A corpus of ours is completed or changed to the new plan (its files are
    ours); in any other folder synthesising would replace or delete the user's
    files, so nothing is done: ``FileExistsError`` naming the folder.
    """
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"{root}: a file, not a folder; choose a new folder for the corpus")
    if root.is_dir() and not (root / PLAN_NAME).is_file() and any(root.iterdir()):
        raise FileExistsError(
            f"{root}: not empty and not a corpus written by speech-kd synth (no {PLAN_NAME}); nothing changed: "
            "choose a new or empty folder"
        )


def _reconcile_with_previous_plan(root: Path, plan: list[_Utterance]) -> None:
    """Delete audio that the new ``plan`` does not want as it is, then record the plan (before rendering).

    Files of the previous plan (``synth_plan.json``) are kept where the new
    plan wants the same speaker and sentence at the same path; the rest are
    removed, with the transcripts of chapters the new plan no longer has. A
    non-empty folder without a plan record is refused before this
    (:func:`check_synth_folder`): its files are not ours to remove.
    """
    wanted = {str(u.flac_path(root).relative_to(root)): _audio_key(u) for u in plan}
    plan_file = root / PLAN_NAME
    previous = json.loads(plan_file.read_text()) if plan_file.exists() else {}  # none: an empty folder
    for part in root.glob("*/*/*/*.part.flac"):  # a render interrupted before its rename
        part.unlink()
    stale = {path for path, key in previous.items() if wanted.get(path) != key}
    stale |= {path for path in wanted if path not in previous}
    for path in sorted(stale):
        (root / path).unlink(missing_ok=True)
    chapters = {str(Path(path).parent) for path in wanted}
    for path in previous:
        chapter = Path(path).parent
        if str(chapter) not in chapters:
            for trans in (root / chapter).glob("*.trans.txt"):
                trans.unlink()
            for folder in (root / chapter, root / chapter.parent):
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
    tmp = plan_file.with_suffix(".json.part")
    tmp.write_text(json.dumps(wanted, indent=0, sort_keys=True) + "\n")
    os.replace(tmp, plan_file)


def _write_transcripts(root: Path, plan: list[_Utterance]) -> None:
    by_chapter: dict[Path, list[_Utterance]] = {}
    for u in plan:
        by_chapter.setdefault(u.flac_path(root).parent, []).append(u)
    for folder, utts in by_chapter.items():
        spk, chapter = utts[0].speaker.speaker_id, utts[0].chapter
        lines = [f"{u.utt_id} {u.text}\n" for u in sorted(utts, key=lambda u: u.utt_id)]
        tmp = folder / f"{spk}-{chapter}.trans.txt.part"
        tmp.write_text("".join(lines))
        os.replace(tmp, folder / f"{spk}-{chapter}.trans.txt")


def _transcribed(config: SynthConfig) -> set[str]:
    return {s.name for s in config.splits if s.transcribed}


def _write_references(root: Path, plan: list[_Utterance]) -> None:
    """``OUT_DIR/SPLIT.references.txt`` (``UTT_ID TEXT`` lines) of each untranscribed split, outside its folder."""
    by_split: dict[str, list[_Utterance]] = {}
    for u in plan:
        by_split.setdefault(u.split, []).append(u)
    for folder in {u.flac_path(root).parent for u in plan}:  # a folder that was transcribed in an earlier plan
        for trans in folder.glob("*.trans.txt"):
            trans.unlink()
    for split, utts in by_split.items():
        tmp = root / f"{split}.references.txt.part"
        tmp.write_text("".join(f"{u.utt_id} {u.text}\n" for u in sorted(utts, key=lambda u: u.utt_id)))
        os.replace(tmp, root / f"{split}.references.txt")


def _write_speakers(root: Path, plan: list[_Utterance]) -> None:
    seen: dict[int, tuple[Speaker, str]] = {}
    for u in plan:
        seen.setdefault(u.speaker.speaker_id, (u.speaker, u.split))
    lines = ["; ID  |SEX| SUBSET | NAME (engine/voice)\n"]
    for spk_id, (spk, split) in sorted(seen.items()):
        lines.append(f"{spk_id:<5}| {spk.sex} | {split:<6} | {spk.engine}/{spk.voice}\n")
    (root / "SPEAKERS.TXT").write_text("".join(lines))


def _summarise(root: Path, plan: list[_Utterance]) -> dict:
    import soundfile as sf

    summary: dict[str, dict] = {}
    for u in plan:
        info = sf.info(str(u.flac_path(root)))
        entry = summary.setdefault(u.split, {"utterances": 0, "hours": 0.0, "speakers": set()})
        entry["utterances"] += 1
        entry["hours"] += info.frames / info.samplerate / 3600.0
        entry["speakers"].add(u.speaker.speaker_id)
    return {
        name: {"utterances": e["utterances"], "hours": round(e["hours"], 3), "speakers": len(e["speakers"])}
        for name, e in summary.items()
    }
