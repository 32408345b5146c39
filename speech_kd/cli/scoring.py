"""``speech-kd evaluate``, ``compare``, ``report`` and ``lm``: scores of model folders and runs, language models."""

from __future__ import annotations

import sys
from pathlib import Path

from speech_kd.argtypes import (
    finite_float,
    int_range,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)
from speech_kd.cli.common import check_device
from speech_kd.report import build_report, evaluation_page
from speech_kd.report.evaluation import check_page_paths
from speech_kd.scoring.compare import (
    compare_decoder_files,
    compare_files,
    format_comparison,
    format_decoder_comparisons,
)
from speech_kd.scoring.evaluate import DEFAULT_LM_BEAM, check_writable, evaluate_model, write_outputs
from speech_kd.scoring.lm import LMError, build_lm, load_lm, read_texts

__all__ = ["add_compare", "add_evaluate", "add_lm", "add_report"]


def _cmd_lm(args) -> None:
    if not args.text and not args.csv:
        raise LMError(f"{args.out}: give the text to build it from: --text FILE... and/or --csv CSV...")
    if Path(args.out).exists():  # never overwrite what this command did not write
        raise LMError(f"--out {args.out}: exists; remove it or choose another file")
    path = build_lm(read_texts(args.text or (), args.csv or ()), args.order, args.out)
    info = load_lm(path)
    counts = ", ".join(f"{n}-grams {c:,}" for n, c in sorted(info.counts.items()))
    print(f"wrote {path}: {info.format}, {len(info.words):,} words" + (f", {counts}" if counts else ""))


def _cmd_evaluate(args) -> int:
    utts = args.utts
    if utts is None and args.json:
        json_path = Path(args.json)
        utts = str(json_path.with_name(json_path.stem + "_utts.txt"))  # x.json -> x_utts.txt, in its folder
    check_device(args.device)
    check_writable(args.json, utts)  # now, not after the scoring
    if args.html:
        check_page_paths(args.html)  # a page, .md or _files/ of the user's: refused before the scoring
    result = evaluate_model(
        args.asr,
        csv_path=args.csv,
        data_folder=args.data_folder,
        split=args.split,
        device=args.device,
        batch_seconds=args.batch_seconds,
        max_duration=args.max_duration,
        blank_penalty=args.blank_penalty,
        chunk_seconds=args.chunk_seconds,
        context_seconds=args.context_seconds,
        beam_size=args.beam_size,
        lm=args.lm,
        lm_weight=args.lm_weight,
        word_bonus=args.word_bonus,
        tune_lm=args.tune_lm,
        dev_csv=args.dev_csv,
    )
    s = result.summary
    if "tune_lm" in s:
        print(s["tune_lm"]["summary"], flush=True)
    d = s["decoder"]
    how = d["name"] if d["name"] == "greedy" else f"{d['name']} {d['beam_size']}"
    if d["lm"]:
        how += f", lm_weight {d['lm_weight']:g}, word_bonus {d['word_bonus']:g}"
    print(
        f"WER {s['wer']:.2f}%  CER {s['cer']:.2f}%  utterances {s['num_utts']}  "
        f"params {s['params']:,}  RTF {s['rtf']:.4f}  decoder {how}",
        flush=True,
    )
    write_outputs(result, args.json, utts)  # after the WER is printed: a failing disk does not hide it
    if args.json:
        print(f"wrote {args.json}" + (f" and {utts}" if utts else ""))
    if args.html:
        print(f"wrote {evaluation_page(result.summary, result.utterances, args.html, device=args.device)}")
    if result.failed:  # each named in a warning as it was met; the scores cover the others
        total = len(result.failed) + s["num_utts"]
        print(f"speech-kd evaluate: {len(result.failed)} of {total} file(s) not scored (see above)", file=sys.stderr)
        return 1
    return 0


def _cmd_report(args) -> None:
    compare = {}
    for item in args.compare or []:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise SystemExit(f"--compare expects NAME=FOLDER, got {item!r}")
        compare[name] = folder
    path = build_report(
        args.run_dir,
        compare=compare,
        max_utts=args.max_utts or None,
        evaluate=not args.no_eval,
        n_posteriorgrams=args.posteriorgrams,
        device=args.device,
    )
    print(f"wrote {path} and {path.with_suffix('.md')}")


def _cmd_compare(args) -> None:
    if len(args.teacher) > 1:  # files of several decoders (greedy, beam + LM): the gap closed under each
        results = compare_decoder_files(args.teacher, args.scratch, args.kd, json_path=args.json, draws=args.draws)
        print(format_decoder_comparisons(results))
        if args.json:
            print(f"wrote {args.json}")
        return
    result = compare_files(args.teacher[0], args.scratch, args.kd, json_path=args.json, draws=args.draws)
    print(format_comparison(result))
    if args.json:
        print(f"wrote {args.json}")


def add_evaluate(sub) -> None:
    """``speech-kd evaluate``."""
    p = sub.add_parser("evaluate", help="WER/CER, parameters and RTF of a model folder")
    p.add_argument("--asr", required=True, help="model folder (EncoderASR-loadable); A,B,... scores their ensemble")
    p.add_argument("--csv", default=None, help="SpeechBrain CSV manifest")
    p.add_argument("--data_folder", default=None, help="LibriSpeech-layout folder (with --split)")
    p.add_argument("--split", default=None, help="split folder under --data_folder (e.g. test-clean)")
    p.add_argument("--json", default=None, help="write the summary here")
    p.add_argument("--utts", default=None, help="per-utterance file (default: next to --json)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--batch_seconds", type=positive_float, default=60.0, help="seconds of audio per batch")
    p.add_argument(
        "--max_duration",
        type=non_negative_float,
        default=60.0,
        help="with --chunk_seconds 0 (each file read whole): longer utterances (seconds) are not scored, a "
        "warning names each; 0: no limit",
    )
    p.add_argument("--html", default=None, help="per-utterance page, worst first, with alignments")
    p.add_argument(
        "--blank_penalty",
        type=finite_float,
        default=None,
        help="exported folders only: subtracted from the blank's log-probability at decoding",
    )
    p.add_argument(
        "--chunk_seconds",
        type=non_negative_float,
        default=None,
        help="utterances transcribed in chunks of this many seconds, any model folder (default: those over "
        "60 s in 20 s chunks, as transcribe.py, so memory stays bounded; 0: each whole)",
    )
    p.add_argument(
        "--context_seconds",
        type=non_negative_float,
        default=None,
        help="with --chunk_seconds: audio before and after each chunk the network also reads "
        "(default 2; 0: independent chunks)",
    )
    p.add_argument(
        "--beam_size",
        type=positive_int,
        default=None,
        help=f"CTC beam search (SpeechBrain's CTCBeamSearcher) with this many beams; default: greedy, "
        f"or {DEFAULT_LM_BEAM} with --lm",
    )
    p.add_argument("--lm", default=None, help="word n-gram (ARPA, .arpa.gz or KenLM binary) fused into the beam search")
    p.add_argument(
        "--lm_weight", type=non_negative_float, default=None, help="weight of the LM's log-probability (default 0.5)"
    )
    p.add_argument("--word_bonus", type=finite_float, default=None, help="score added per word (default 1.5)")
    p.add_argument(
        "--tune_lm",
        action="store_true",
        help="pick --lm_weight/--word_bonus on a dev set by a small grid (says what it picked)",
    )
    p.add_argument("--dev_csv", default=None, help="dev manifest for --tune_lm (default: the dev split beside --split)")
    p.set_defaults(func=_cmd_evaluate)


def add_report(sub) -> None:
    """``speech-kd report``."""
    p = sub.add_parser("report", help="HTML/Markdown report of a run folder")
    p.add_argument("run_dir", help="a train or distill output folder")
    p.add_argument("--compare", action="append", metavar="NAME=FOLDER", help="another model folder for the table")
    p.add_argument("--max_utts", type=non_negative_int, default=200, help="test utterances scored per model (0: all)")
    p.add_argument("--posteriorgrams", type=non_negative_int, default=3, help="dev utterances drawn as posteriorgrams")
    p.add_argument(
        "--no-eval",
        dest="no_eval",
        action="store_true",
        help="skip scoring (the table shows the run's test_results.json)",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.set_defaults(func=_cmd_report)


def add_compare(sub) -> None:
    """``speech-kd compare``."""
    p = sub.add_parser("compare", help="share of the teacher gap KD closes, with a bootstrap interval")
    p.add_argument(
        "--teacher",
        required=True,
        nargs="+",
        help="the teacher's per-utterance file (speech-kd evaluate --utts); one per decoder (greedy, beam + LM: "
        "each file's first line names it) to get the gap closed under each",
    )
    p.add_argument(
        "--scratch", required=True, nargs="+", help="scratch students' files, one per seed (and per decoder)"
    )
    p.add_argument(
        "--kd", required=True, nargs="+", help="KD students' files, one per seed, in the same order (and per decoder)"
    )
    p.add_argument("--draws", type=positive_int, default=2000, help="bootstrap draws")
    p.add_argument("--json", default=None, help="also write the result here")
    p.set_defaults(func=_cmd_compare)


def add_lm(sub) -> None:
    """``speech-kd lm``."""
    p = sub.add_parser(
        "lm", help="word n-gram language model (KenLM lmplz, modified Kneser-Ney) from transcripts or text"
    )
    p.add_argument("--text", nargs="+", default=None, metavar="FILE", help="text files, one sentence a line")
    p.add_argument("--csv", nargs="+", default=None, metavar="CSV", help="CSV manifests (their wrd column)")
    p.add_argument("--order", type=int_range(2, 6), default=3, help="n-gram order, 2 to 6")
    p.add_argument(
        "--out", required=True, help="ARPA file to write (a name ending in .bin: KenLM binary); must not exist"
    )
    p.set_defaults(func=_cmd_lm)
