"""Where an exported ONNX model spends its time: onnxruntime's own profiler, by part of the network.

Runs ``model.onnx`` of each folder written by ``speech-kd export`` on random
fbank frames (``--seconds`` per utterance, ``--batch`` utterances, all the
same length) with ``--threads`` intra-op threads, and prints the network's
milliseconds per run and the share of its kernel time in each part: the
convolution front end, self-attention, feed-forward, the conformer's
convolution module, the layout reorders of onnxruntime's convolutions, and the
rest (normalisation, output layer)::

    python scripts/profile_export.py deploy/onnx deploy/teacher_onnx --batch 1 8 --threads 1 2

``--shapes`` profiles students of ``hparams/distill.yaml`` with random weights
instead (speed does not depend on the weights), one per override string, the
empty string being the yaml's own shape::

    python scripts/profile_export.py --shapes "" "--cnn_channels_1=32 --d_ffn=256" --batch 8 --threads 1
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

#: substrings of onnxruntime node names (the exporter keeps the PyTorch module path) -> part
PARTS = {
    "front_end": "front end",
    "attention": "self-attention",
    "mha_layer": "self-attention",
    "ffn_module": "feed-forward",
    "convolution_module": "conformer conv module",
    "bottleneck": "conformer conv module",
    "after_conv": "conformer conv module",
    "/conv/": "conformer conv module",
    "Reorder": "conv layout reorders",
}


def profile(folder: Path, batch: int, threads: int, seconds: float, runs: int) -> tuple[float, dict[str, float]]:
    """(median ms per run, {part: share of kernel time}) of ``folder``'s ``model.onnx``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.enable_profiling = True
    options.profile_file_prefix = str(folder / "ort_profile")
    session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
    frames = int(seconds * 100)
    feats = (np.random.default_rng(0).standard_normal((batch, frames, 80)) * 10 - 40).astype(np.float32)
    inputs = {"feats": feats, "lengths": np.full(batch, frames, dtype=np.int64)}
    session.run(None, inputs)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, inputs)
        times.append(1000 * (time.perf_counter() - start))
    trace = Path(session.end_profiling())
    totals: collections.Counter = collections.Counter()
    for event in json.loads(trace.read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            part = next((p for key, p in PARTS.items() if key in event["name"]), "other")
            totals[part] += event["dur"]
    trace.unlink()
    total = sum(totals.values()) or 1
    return statistics.median(times), {part: value / total for part, value in totals.most_common()}


def random_student(overrides: str, out: Path) -> Path:
    """An ONNX export of a randomly initialised ``hparams/distill.yaml`` student with ``overrides``."""
    from speech_kd.bench.speed import _export_random, parse_overrides
    from speech_kd.data.dataio import make_tokenizer
    from speech_kd.deploy.onnx_export import export_asr

    tokenizer = make_tokenizer(" 'ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    folder = _export_random("hparams/distill.yaml", out / "model_folder", tokenizer, parse_overrides(overrides))
    export_asr(folder, out / "onnx", "onnx")
    return out / "onnx"


def main() -> None:
    """Print one line per folder, batch and thread count."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="*", type=Path, help="folders written by speech-kd export --format onnx")
    parser.add_argument("--shapes", nargs="+", default=[], help="random-weight students: yaml override strings")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="utterances per run")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="intra-op threads")
    parser.add_argument("--seconds", type=float, default=5.0, help="audio seconds per utterance")
    parser.add_argument("--runs", type=int, default=20, help="timed runs (median kept)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    tmp = Path(tempfile.mkdtemp(prefix="profile_export_"))
    folders = list(args.folders)
    for i, overrides in enumerate(args.shapes):
        folders.append(random_student(overrides, tmp / f"shape_{i}"))
        params = json.loads((folders[-1] / "deploy.json").read_text()).get("params")
        print(f"{folders[-1]}: hparams/distill.yaml {overrides or '(as it is)'}, {params:,} parameters", flush=True)
    for folder in folders:
        for threads in args.threads:
            for batch in args.batch:
                ms, shares = profile(folder, batch, threads, args.seconds, args.runs)
                parts = ", ".join(f"{part} {100 * share:.0f} %" for part, share in shares.items())
                print(
                    f"{folder}  batch {batch}  threads {threads}: {ms:.2f} ms per run "
                    f"({ms / (batch * args.seconds):.3f} ms per audio s); {parts}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
