"""What the teacher-confidence filter leaves out: the teacher's greedy WER on kept and left-out utterances.

Reads the teacher's posteriors from a soft-target cache of untranscribed
audio, the per-utterance confidences a run wrote
(``OUTPUT/unlabeled_confidence.csv``) and reference transcripts that the
run itself never saw (``speech-kd synth``'s ``untranscribed.references.txt``,
or LibriSpeech ``.trans.txt`` lines: ``ID WORDS...``)::

    python scripts/teacher_wer_by_confidence.py CACHE CONFIDENCE_CSV REFERENCES THRESHOLD
"""

from __future__ import annotations

import argparse
import csv

import torch

from speech_kd.scoring.metrics import error_rates
from speech_kd.scoring.teacher_check import greedy_texts
from speech_kd.targets.cache.reader import CacheReader


def main() -> None:
    """Print the teacher's WER and CER on all, kept and left-out utterances."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cache", help="soft-target cache folder of the untranscribed utterances")
    parser.add_argument("confidence_csv", help="OUTPUT/unlabeled_confidence.csv of a run (ID,confidence,duration)")
    parser.add_argument("references", help="text file of lines 'ID WORDS...'")
    parser.add_argument("threshold", type=float, help="the run's unlabeled_min_confidence")
    args = parser.parse_args()

    reader = CacheReader(args.cache)
    tokens, blank = reader.metadata["teacher_tokens"], int(reader.metadata["blank_index"])
    with open(args.references, encoding="utf-8") as fh:
        references = dict(line.rstrip("\n").split(" ", 1) for line in fh if line.strip())
    with open(args.confidence_csv, encoding="utf-8", newline="") as fh:
        confidence = {row["ID"]: float(row["confidence"]) for row in csv.DictReader(fh)}
    groups: dict[str, tuple[list[str], list[str]]] = {"kept": ([], []), "left out": ([], []), "all": ([], [])}
    for utt_id, score in confidence.items():
        log_probs = reader.get(utt_id)
        hypothesis = greedy_texts(log_probs[None], torch.tensor([len(log_probs)]), tokens, blank)[0]
        for group in ("all", "kept" if score >= args.threshold else "left out"):
            groups[group][0].append(references[utt_id])
            groups[group][1].append(hypothesis)
    for group, (refs, hyps) in groups.items():
        rates = error_rates(refs, hyps)
        print(f"{group}: {len(refs)} utterances, teacher WER {rates.wer:.2f}, CER {rates.cer:.2f}")


if __name__ == "__main__":
    main()
