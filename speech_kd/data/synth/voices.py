"""Synthetic speakers built from Debian's text-to-speech engines.

A :class:`Speaker` is one fixed combination of engine (espeak-ng, flite,
festival), voice, variant, speaking rate, pitch and a little room colour, so
that every utterance of a speaker sounds like the same person. ``render``
turns a sentence into a 16 kHz mono FLAC through ``sox``.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["Speaker", "make_speakers", "check_engines", "render", "SAMPLE_RATE"]

SAMPLE_RATE = 16000

ESPEAK_ACCENTS = (
    "en-us",
    "en-gb",
    "en-gb-scotland",
    "en-gb-x-rp",
    "en-gb-x-gbclan",
    "en-gb-x-gbcwmd",
    "en-029",
    "en-us-nyc",
)
ESPEAK_VARIANTS = (
    "m1 m2 m3 m4 m5 m6 m7 f1 f2 f3 f4 f5 klatt klatt2 klatt3 klatt4 "
    "adam andy annie aunty boris david ed edward gene iven john linda max "
    "michel paul pedro quincy rob robert steph travis victor zac"
).split()
FLITE_VOICES = ("kal", "kal16", "awb", "rms", "slt")
FESTIVAL_VOICES = ("kal_diphone", "ked_diphone", "cmu_us_slt_arctic_hts")

#: Debian packages that provide the engines (installed by ``make setup``).
DEBIAN_PACKAGES = (
    "espeak-ng",
    "flite",
    "festival",
    "festvox-kallpc16k",
    "festvox-kdlpc16k",
    "festvox-us-slt-hts",
    "sox",
    "libsox-fmt-all",
)


@dataclass(frozen=True)
class Speaker:
    """One synthetic speaker: a fixed voice and its perturbation settings."""

    speaker_id: int
    engine: str  # "espeak" | "flite" | "festival"
    voice: str
    rate: float  # tempo factor applied by sox (1.0 = unchanged)
    pitch_cents: int  # pitch shift applied by sox
    reverb: int  # 0 = dry, else sox reverberance in percent
    gain_db: float
    espeak_wpm: int = 175
    espeak_pitch: int = 50

    @property
    def sex(self) -> str:
        """'F' or 'M', as in LibriSpeech's SPEAKERS.TXT (a guess from the voice name)."""
        female = ("+f", "slt", "annie", "aunty", "linda", "steph")
        return "F" if any(key in self.voice for key in female) else "M"

    def to_dict(self) -> dict:
        """Plain-dict view, for the corpus description file."""
        return asdict(self)


def make_speakers(count: int, seed: int, first_id: int = 100) -> list[Speaker]:
    """Draw ``count`` distinct speakers deterministically from ``seed``.

    Engines are dealt in a fixed cycle (3 espeak-ng, 1 flite, 1 festival), so
    any consecutive run of speakers, hence every split, mixes all engines.
    """
    rng = random.Random(seed)
    cycle = ("espeak", "espeak", "flite", "espeak", "festival")
    speakers: list[Speaker] = []
    seen: set[tuple] = set()
    while len(speakers) < count:
        engine = cycle[len(speakers) % len(cycle)]
        if engine == "espeak":
            voice = f"{rng.choice(ESPEAK_ACCENTS)}+{rng.choice(ESPEAK_VARIANTS)}"
        elif engine == "flite":
            voice = rng.choice(FLITE_VOICES)
        else:
            voice = rng.choice(FESTIVAL_VOICES)
        spk = Speaker(
            speaker_id=first_id + len(speakers),
            engine=engine,
            voice=voice,
            rate=round(rng.uniform(0.85, 1.15), 3) if engine != "espeak" else 1.0,
            pitch_cents=rng.randint(-300, 300) if engine != "espeak" else 0,
            reverb=rng.choice([0, 0, 0, 20, 40]),
            gain_db=round(rng.uniform(-8.0, -1.0), 1),
            espeak_wpm=rng.randint(135, 195),
            espeak_pitch=rng.randint(25, 75),
        )
        key = (spk.engine, spk.voice, spk.rate, spk.pitch_cents, spk.espeak_wpm, spk.espeak_pitch)
        if key in seen:
            continue
        seen.add(key)
        speakers.append(spk)
    return speakers


def check_engines() -> None:
    """Raise a clear error when a TTS engine or sox is missing."""
    missing = [exe for exe in ("espeak-ng", "flite", "text2wave", "sox") if shutil.which(exe) is None]
    if missing:
        raise RuntimeError(
            f"missing programs {missing}: install Debian packages {' '.join(DEBIAN_PACKAGES)} (`make setup` does this)"
        )


def _synthesise_raw(speaker: Speaker, text: str, wav_path: str) -> None:
    """Run the TTS engine for ``text`` and write its native-rate WAV."""
    lower = text.lower()
    if speaker.engine == "espeak":
        cmd = [
            "espeak-ng", "-v", speaker.voice, "-s", str(speaker.espeak_wpm),
            "-p", str(speaker.espeak_pitch), "-w", wav_path, lower,
        ]
        subprocess.run(cmd, check=True, capture_output=True)
    elif speaker.engine == "flite":
        cmd = ["flite", "-voice", speaker.voice, "-t", lower, "-o", wav_path]
        subprocess.run(cmd, check=True, capture_output=True)
    elif speaker.engine == "festival":
        cmd = ["text2wave", "-eval", f"(voice_{speaker.voice})", "-o", wav_path]
        subprocess.run(cmd, input=lower.encode(), check=True, capture_output=True)
    else:
        raise ValueError(f"unknown engine {speaker.engine!r}")


def render(speaker: Speaker, text: str, out_path: str | os.PathLike) -> None:
    """Speak ``text`` as ``speaker`` into a 16 kHz mono FLAC at ``out_path``.

    The file appears atomically: it is written under a temporary name and
    renamed, so an interrupted run never leaves a truncated FLAC behind.
    """
    out_path = Path(out_path)
    with tempfile.TemporaryDirectory(prefix="speechkd_tts_") as tmp:
        raw = os.path.join(tmp, "raw.wav")
        _synthesise_raw(speaker, text, raw)
        part = out_path.with_name(out_path.stem + ".part.flac")
        effects = ["channels", "1", "rate", str(SAMPLE_RATE)]
        if speaker.rate != 1.0:
            effects += ["tempo", "-s", str(speaker.rate)]
        if speaker.pitch_cents:
            effects += ["pitch", str(speaker.pitch_cents)]
        if speaker.reverb:
            effects += ["reverb", str(speaker.reverb), "50", "60"]
        # normalise, then a fixed speaker gain; pad 0.1-0.2 s of silence at both ends
        effects += ["norm", str(speaker.gain_db), "pad", "0.15", "0.15"]
        cmd = ["sox", "-q", "-R", raw, "-b", "16", str(part), *effects]  # -R: repeatable dither
        subprocess.run(cmd, check=True, capture_output=True)
        os.replace(part, out_path)
