"""Does distillation help? Teacher vs the same student from scratch and with KD variants.

Every student run uses identical data, epochs and seed; only the KD settings
differ (``scratch`` is ``--kd_weight=0``). Runs are independent processes
(one torch thread each, ``--parallel`` at a time) so two fit on two cores.

Example (the 40-epoch table of ``docs/results.md``)::

    speech-kd bench-kd --data demo_run/corpus --teacher speech_kd/pretrained/teacher_synth \
        --out results/kd_long --epochs 40 --variants scratch kd

With ``--seeds S1 S2 ...`` every variant is trained once per seed (``OUT/seed_S/``) and
``OUT/results.md`` adds the means over seeds, the gap closed with a 95 % bootstrap
interval over test utterances and seed pairs (:mod:`speech_kd.scoring.compare`) and
``OUT/dev_wer.png`` (dev WER per epoch, band over seeds); ``--test_data`` scores
another folder's (larger) test split. Finished runs are reused, so the same
command with more seeds only trains the new ones::

    speech-kd bench-kd --data data/synth --teacher speech_kd/pretrained/teacher_synth \
        --out results/kd3h12 --epochs 12 --seeds 1986 7 3 4 5 6 --test_data data/synth_bigtest

Untranscribed audio (``docs/untranscribed.md``):
``--transcribed_fraction F`` keeps the transcripts of a fraction ``F`` of the
training split (every ``1/F``-th utterance, ``OUT/partition/transcribed``) and
makes the rest an untranscribed split (``OUT/partition/untranscribed``, no
transcripts); ``--unlabeled SPLIT`` takes the untranscribed split from another
folder of ``--data`` instead (other speakers, say). Every student then trains on
``transcribed``; the ``kd_unlabeled*`` variants add ``untranscribed``
(``kd_unlabeled_filter`` with ``--unlabeled_min_confidence=--min_confidence``),
from a second cache::

    speech-kd bench-kd --data data/synth --teacher speech_kd/pretrained/teacher_synth --out results/unl \
        --epochs 12 --seeds 1986 7 --transcribed_fraction 0.1667 \
        --variants scratch kd kd_unlabeled kd_unlabeled_filter

``--teacher A,B,...`` distils from the ensemble of those folders (cached once; scored with
``speech-kd evaluate --asr A,B,...``). Without ``--teacher`` a teacher is first trained with
``hparams/teacher.yaml``.
Prints and writes ``OUT/results.md`` and ``OUT/results.json``: test WER, CER,
parameters, RTF per model, dev WER and CER, and the share of the
scratch-teacher WER gap each KD variant closes on test and on dev (two sets
of unseen speakers: with a small gap one set alone says little).
"""

from speech_kd.bench.experiments.main import build_parser, main
from speech_kd.bench.experiments.runs import REPO, make_partition, train_seconds_per_epoch
from speech_kd.bench.experiments.summary import baseline_of, format_results, format_seed_summary, summarise_seeds
from speech_kd.bench.experiments.variants import VARIANTS, merge_overrides, variant_args
from speech_kd.scoring.compare import gap_closed

__all__ = [
    "VARIANTS",
    "REPO",
    "baseline_of",
    "build_parser",
    "format_results",
    "format_seed_summary",
    "gap_closed",
    "main",
    "make_partition",
    "merge_overrides",
    "summarise_seeds",
    "train_seconds_per_epoch",
    "variant_args",
]
