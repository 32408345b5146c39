r"""Greedy, beam search and beam search + an n-gram LM (tuned on dev), side by side, for model folders.

Builds a word n-gram from the training transcripts (KenLM's lmplz, ``speech-kd lm``), then scores every
model folder on the test manifest three ways: greedy, beam search without an LM, and beam search with the
LM at the weight and word bonus ``--tune_lm`` picks on the dev manifest. Prints a Markdown table (WER,
CER, RTF with decoding) and writes every ``evaluate`` summary to ``--out``::

    python scripts/lm_benchmark.py --models speech_kd/pretrained/teacher_synth OUT/kd/model \
        --train_csv OUT/data/train.csv --dev_csv OUT/data/dev.csv --test_csv OUT/data/test.csv --out lm_bench
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from speech_kd.scoring.evaluate import evaluate_model
from speech_kd.scoring.lm import build_lm, read_texts


def build_parser() -> argparse.ArgumentParser:
    """The script's options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", required=True, help="model folders (any evaluate accepts)")
    parser.add_argument("--train_csv", required=True, nargs="+", help="manifests whose transcripts make the LM")
    parser.add_argument("--dev_csv", required=True, help="dev manifest: the LM weight and word bonus are tuned on it")
    parser.add_argument("--test_csv", required=True, help="test manifest")
    parser.add_argument("--order", type=int, default=3, help="n-gram order")
    parser.add_argument("--beam_size", type=int, default=32, help="beams of both beam searches")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", required=True, help="folder for the LM and the summaries (results.json)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Build the LM, score each model three ways, print the table."""
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lm = out / f"train_{args.order}gram.arpa"
    if not lm.exists():
        build_lm(read_texts(csv_files=args.train_csv), args.order, lm)
    print(f"LM: {lm} ({args.order}-gram of {', '.join(args.train_csv)})", file=sys.stderr)
    ways = {
        "greedy": {},
        f"beam {args.beam_size}": {"beam_size": args.beam_size},
        f"beam {args.beam_size} + LM (tuned on dev)": {
            "beam_size": args.beam_size,
            "lm": lm,
            "tune_lm": True,
            "dev_csv": args.dev_csv,
        },
    }
    rows = []
    for model in args.models:
        for way, options in ways.items():
            s = evaluate_model(model, args.test_csv, device=args.device, progress=False, **options).summary
            rows.append({"model": model, "decoding": way, **s})
    (out / "results.json").write_text(json.dumps(rows, indent=2, default=str) + "\n")
    print(f"test: {args.test_csv} ({rows[0]['num_utts']} utterances); RTF on {args.device}, decoding included\n")
    print("| model | decoding | WER % | CER % | RTF | lm_weight | word_bonus |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        d = r["decoder"]
        weights = [f"{d['lm_weight']:g}", f"{d['word_bonus']:g}"] if d["lm"] else ["", ""]
        print(
            f"| {Path(r['model']).name} | {r['decoding']} | {r['wer']:.2f} | {r['cer']:.2f} | {r['rtf']:.4f} | "
            + " | ".join(weights)
            + " |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
