"""How close a soft-target cache is to its teacher: per-frame ``T^2 KL(teacher || cache)`` at T = 1, 2, 4.

Runs the teacher on every utterance the cache holds (from the manifest it was made from) and compares
its posteriors with the cache's decoded ones; prints one JSON object (mean, 99th percentile and max per
temperature, bytes per frame of the folder)::

    python scripts/cache_fidelity.py --teacher speech_kd/pretrained/teacher_synth --cache cache/teacher \
        --csv data/csv/test.csv
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import torch

from speech_kd import load_teacher
from speech_kd.data.audio import read_audio
from speech_kd.targets.cache import CacheReader


def scaled_kl(teacher: torch.Tensor, cached: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per frame ``T^2 KL(teacher^T || cached^T)`` ``[N]`` from ``[N, V]`` log-probabilities."""
    a = torch.log_softmax(teacher.double() / temperature, -1)
    b = torch.log_softmax(cached.double() / temperature, -1)
    return temperature**2 * (a.exp() * (a - b)).sum(-1)


def main() -> None:
    """Parse the arguments, compare, print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--cache", required=True)
    parser.add_argument("--csv", required=True, help="the manifest the cache was made from")
    args = parser.parse_args()
    teacher = load_teacher(args.teacher)
    reader = CacheReader(args.cache)
    true, cached = [], []
    with open(args.csv, newline="") as fh, torch.no_grad():
        for row in csv.DictReader(fh):
            if row["ID"] not in reader:
                continue
            out = teacher(read_audio(row["wav"], teacher.sample_rate)[None], torch.ones(1))
            alone, stored = out.log_probs[0, : int(out.lengths[0])].float(), reader.get(row["ID"])
            frames = min(len(alone), len(stored))  # a padded batch can end a frame apart from one run alone
            true.append(alone[:frames])
            cached.append(stored[:frames])
    true_lp, cached_lp = torch.cat(true), torch.cat(cached)
    folder_bytes = sum(f.stat().st_size for f in Path(args.cache).iterdir())
    result = {
        "frames": len(true_lp),
        "max_temperature": reader.metadata["scheme"]["max_temperature"],
        "bytes_per_frame": round(folder_bytes / len(true_lp), 3),
    }
    for temperature in (1.0, 2.0, 4.0):
        kl = scaled_kl(true_lp, cached_lp, temperature)
        result[f"T{temperature:g}"] = {
            "mean": round(float(kl.mean()), 4),
            "p99": round(float(kl.quantile(0.99)), 4),
            "max": round(float(kl.max()), 4),
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
