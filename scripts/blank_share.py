"""Share of output frames whose best token is the blank, for an exported folder on a prepared csv.

int8 models that lose words usually do it through more blank frames (deletions): compare
the share of an int8 export with its fp32 export's (docs/deploy.md, "int8")::

    python scripts/blank_share.py deploy/onnx data/test.csv
    python scripts/blank_share.py deploy/onnx_int8 data/test.csv

Uses only the folder's own ``transcribe.py`` (numpy, soundfile, onnxruntime), one utterance at a time.
"""

from __future__ import annotations

import argparse
import csv
import sys


def main() -> None:
    """Print the blank share over every utterance of the csv's ``wav`` column."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="a folder written by speech-kd export")
    parser.add_argument("csv", help="a csv with a wav column (speech-kd prepare's)")
    args = parser.parse_args()
    sys.path.insert(0, args.folder)
    from transcribe import ExportedASR, best_tokens, read_audio

    asr = ExportedASR(args.folder, threads=1)
    blank = frames = 0
    with open(args.csv, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            log_probs = asr.log_probs([read_audio(row["wav"], asr.sample_rate)])[0]
            best = best_tokens(log_probs, asr.blank_index, asr.blank_penalty)
            blank += int((best == asr.blank_index).sum())
            frames += best.shape[0]
    print(f"{args.folder}: blank share {100 * blank / max(frames, 1):.2f} % of {frames} frames")


if __name__ == "__main__":
    main()
