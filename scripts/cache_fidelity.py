"""How close a soft-target cache is to its teacher: per-frame ``T^2 KL(teacher || cache)`` at T = 1, 2, 4.

Runs the teacher on every utterance the cache holds (from the manifest it was made from) and compares
its posteriors with the cache's decoded ones; prints one JSON object (mean, 99th percentile and max per
temperature, bytes per frame of the folder). For a cache with hidden states (``--hidden_layers``) it adds,
per stored layer, the relative error ``|h_stored - h| / |h|`` per frame of the storage alone (the
teacher's frames encoded and decoded: what the int8/fp16 coding loses) and of the cache against the
teacher run on the utterance alone (adds what batching with padding changes), the storage's error on
the channels other than each frame's largest (which a whole-frame error hides when one channel dwarfs
the rest), and the hidden states' bytes per frame::

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
from speech_kd.targets.cache.format import decode_hidden, encode_hidden, read_shard_header


def scaled_kl(teacher: torch.Tensor, cached: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per frame ``T^2 KL(teacher^T || cached^T)`` ``[N]`` from ``[N, V]`` log-probabilities."""
    a = torch.log_softmax(teacher.double() / temperature, -1)
    b = torch.log_softmax(cached.double() / temperature, -1)
    return temperature**2 * (a.exp() * (a - b)).sum(-1)


def _summary(values: torch.Tensor) -> dict:
    """Mean, 99th percentile and max of a 1-D tensor, rounded."""
    values = values.double()
    return {
        key: round(float(v), 6)
        for key, v in (("mean", values.mean()), ("p99", values.quantile(0.99)), ("max", values.max()))
    }


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """Per frame ``|approx - exact| / |exact|`` ``[N]`` (L2 norms over the width) of ``[N, D]`` hidden states."""
    return (approx.double() - exact.double()).norm(dim=-1) / exact.double().norm(dim=-1).clamp(min=1e-12)


def relative_error_beside_largest(approx: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """:func:`relative_error` ``[N]`` over each frame's channels but its largest ``|exact|`` one."""
    others = torch.ones_like(exact, dtype=torch.bool).scatter_(-1, exact.abs().argmax(-1, keepdim=True), False)
    zero = torch.zeros((), dtype=exact.dtype)
    return relative_error(torch.where(others, approx, zero), torch.where(others, exact, zero))


def hidden_bytes(cache: Path) -> int:
    """Compressed bytes of the hidden states in a cache's shards."""
    return sum(size for shard in cache.glob("shard-*.bin") for _, size in read_shard_header(shard).get("hidden", []))


def main() -> None:
    """Parse the arguments, compare, print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--cache", required=True)
    parser.add_argument("--csv", required=True, help="the manifest the cache was made from")
    args = parser.parse_args()
    teacher = load_teacher(args.teacher)
    reader = CacheReader(args.cache)
    spec = reader.hidden_spec()
    layers = list(spec.get("layers") or [])
    true, cached = [], []
    storage = {layer: [] for layer in layers}
    beside_largest = {layer: [] for layer in layers}
    against_alone = {layer: [] for layer in layers}
    with open(args.csv, newline="") as fh, torch.no_grad():
        for row in csv.DictReader(fh):
            if row["ID"] not in reader:
                continue
            out = teacher(read_audio(row["wav"], teacher.sample_rate)[None], torch.ones(1), hidden_layers=layers)
            alone, stored = out.log_probs[0, : int(out.lengths[0])].float(), reader.get(row["ID"])
            frames = min(len(alone), len(stored))  # a padded batch can end a frame apart from one run alone
            true.append(alone[:frames])
            cached.append(stored[:frames])
            stored_hidden = reader.hidden(row["ID"], layers) if layers else {}
            for layer in layers:
                exact = out.hiddens[layer][0, : int(out.lengths[0])]
                coded = decode_hidden(encode_hidden(exact, spec["dtype"]), len(exact), exact.shape[-1], spec["dtype"])
                storage[layer].append(relative_error(torch.from_numpy(coded), exact))
                beside_largest[layer].append(relative_error_beside_largest(torch.from_numpy(coded), exact))
                against_alone[layer].append(relative_error(stored_hidden[layer][:frames], exact[:frames]))
    true_lp, cached_lp = torch.cat(true), torch.cat(cached)
    folder_bytes = sum(f.stat().st_size for f in Path(args.cache).iterdir())
    result = {
        "frames": len(true_lp),
        "max_temperature": reader.metadata["scheme"]["max_temperature"],
        "bytes_per_frame": round(folder_bytes / len(true_lp), 3),
    }
    if layers:
        result["hidden"] = {
            "layers": layers,
            "dims": spec["dims"],
            "dtype": spec["dtype"],
            "bytes_per_frame": round(hidden_bytes(Path(args.cache)) / len(true_lp), 3),
            "relative_error_storage": {str(k): _summary(torch.cat(v)) for k, v in storage.items()},
            "relative_error_storage_beside_largest": {
                str(k): _summary(torch.cat(v)) for k, v in beside_largest.items()
            },
            "relative_error_vs_alone": {str(k): _summary(torch.cat(v)) for k, v in against_alone.items()},
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
