"""``speech-kd bench``: speed ratios measured side by side, on this machine, in one run.

Each figure is the median over ``--repeats`` timed repetitions after a warm-up.
Models are the architectures of ``hparams/teacher.yaml`` and
``hparams/distill.yaml`` (random weights: speed does not depend on them);
audio is a few seconds of synthesised speech per utterance.

Measured:

- feature extraction (80-dim log-mel fbank): ours (``fast_fbank``, batched,
  on the training device, what the training Brains run), against librosa per
  utterance and SpeechBrain's ``Fbank`` batched and per utterance (audio
  seconds per second), plus ``torch.stft`` alone as the ceiling of any
  FFT-based fbank;
- one training step (forward, backward, optimizer) of the student alone, with
  an online teacher (KD), and with cached targets (KD);
- inference real-time factor of teacher and student, and the speed-up;
- ``speech-kd evaluate`` throughput (utterances per second, RTF);
- teacher and student exported to ONNX (fp32 and int8), timed side by side
  with the PyTorch models: RTF, speed-ups like with like, peak memory of a
  fresh process, size on disk
  (:mod:`speech_kd.bench.deployed`; needs onnxruntime, skipped without it). A Hugging
  Face teacher is exported with its own forward (:mod:`speech_kd.bench.hf_onnx`), so its
  ratios are like with like too.

JSON keys (``--json``): ``features_vs_librosa``, ``cached_kd_over_plain``,
``online_kd_over_plain``, ``student_speedup`` (PyTorch teacher over PyTorch
student), ``student_speedup_exported`` (ONNX fp32 teacher over ONNX fp32
student, same threads and batch) and ``student_speedup_exported_int8``: like
with like; ``student_speedup_onnx`` and ``student_speedup_int8`` (the PyTorch
teacher over the exported student: export and distillation mixed, kept
labelled as such; with ``student_speedup_side``, all timed in turn), ``peak_rss_mb_teacher``, ``peak_rss_mb_student``,
``params_teacher``, ``params_student``, ``student_params_fraction`` plus
the raw timings. ``--extra="--key=value ..."`` changes the student's yaml (e.g.
its shape), as ``speech-kd distill`` would.
"""

from __future__ import annotations

import argparse
import csv as csv_mod
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from speech_kd import hparams_files
from speech_kd.argtypes import non_negative_float, positive_int
from speech_kd.bench.deployed import ROUNDS, bench_deployed
from speech_kd.bench.teacher_archs import build_teacher, teacher_arch
from speech_kd.bench.timing import median_time
from speech_kd.data.dataio import load_dataset, make_tokenizer, token_strings
from speech_kd.data.prepare import prepare_librispeech
from speech_kd.data.synth import SplitSpec, SynthConfig, synthesize_corpus
from speech_kd.deploy.runtime import MAX_BATCH_SECONDS
from speech_kd.model_folder import defined_keys, export_model_folder, load_asr
from speech_kd.nnet.features import chunk_size, fast_fbank, librosa_fbank
from speech_kd.scoring.evaluate import evaluate_model
from speech_kd.targets.cache import CacheReader, write_cache
from speech_kd.targets.cache.format import SHARD_PATTERN
from speech_kd.targets.strategies import CachedTargets, OnlineTargets, TargetAligner
from speech_kd.targets.teachers.base import load_teacher
from speech_kd.training.distill_brain import DistillBrain

__all__ = ["main"]


def _corpus(tmp: Path) -> Path:
    root = tmp / "corpus"
    synthesize_corpus(root, SynthConfig(splits=(SplitSpec("train", 0.02, 4), SplitSpec("test", 0.01, 2)), seed=11))
    return root


def _batch(csv_path: str, tokenizer, n: int, device: str):
    import speechbrain as sb

    data = load_dataset(csv_path, tokenizer, sorting="descending")
    loader = sb.dataio.dataloader.make_dataloader(data, batch_size=n)
    return next(iter(loader)).to(device)


def _brain(yaml: str, out: Path, device: str, overrides: dict | None = None):
    from hyperpyyaml import load_hyperpyyaml

    hparams = load_hyperpyyaml(
        hparams_files.path(yaml).read_text(), {"data_folder": "unused", "output_folder": str(out), **(overrides or {})}
    )
    brain = DistillBrain(
        modules=hparams["modules"], opt_class=hparams["opt_class"], hparams=hparams, run_opts={"device": device}
    )
    return brain, hparams


def bench_features(batch, repeats: int, device: str) -> dict:
    """Audio seconds per second of feature extraction, five ways, and the FFT's ceiling.

    ``ours`` is what the training Brains run: :func:`speech_kd.nnet.features.fast_fbank`
    on the padded batch, on the training device. ``stft_only`` is ``torch.stft``
    alone on the same batch, in the same pieces as ``ours`` (on CPU a whole
    batch at once can page-fault its temporaries in on every call and run
    several times slower for the same work), a ceiling for any FFT-based fbank on this machine:
    ``features_stft_only_vs_librosa`` says how far past librosa any fbank could go.
    """
    from speechbrain.lobes.features import Fbank

    wavs, lens = batch.sig
    seconds = float((lens * wavs.shape[1]).sum()) / 16000
    fbank = Fbank(n_mels=80, n_fft=400, win_length=25, hop_length=10).to(device)
    stft = fbank.compute_STFT
    window = stft.window.to(device)
    per_utt = [wavs[i, : int(lens[i] * wavs.shape[1])] for i in range(wavs.shape[0])]
    cpu_utts = [w.cpu().numpy() for w in per_utt]

    runs = {
        "ours": lambda: fast_fbank(fbank, wavs),
        "sb_batched": lambda: fbank(wavs),
        "sb_per_utt": lambda: [fbank(w.unsqueeze(0)) for w in per_utt],
        "librosa": lambda: [librosa_fbank(w) for w in cpu_utts],
        "stft_only": lambda: [
            torch.stft(
                piece,
                stft.n_fft,
                stft.hop_length,
                stft.win_length,
                window,
                center=True,
                pad_mode="constant",
                return_complex=True,
            )
            for piece in wavs.split(chunk_size(fbank, wavs))
        ],
    }
    with torch.no_grad():
        # A few milliseconds each: more repeats than the steps get, the torch ones interleaved so drifts hit
        # all alike. librosa runs apart, after a pause: numpy's BLAS threads spin-wait after each call and
        # took the cores from whichever torch run came next (docs/speed.md).
        torch_runs = {name: run for name, run in runs.items() if name != "librosa"}
        samples: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(4):
            for name, run in torch_runs.items():
                samples[name].append(median_time(run, max(5, repeats)))
        time.sleep(0.5)
        samples["librosa"] = [median_time(runs["librosa"], max(5, repeats)) for _ in range(2)]
        times = {name: statistics.median(values) for name, values in samples.items()}
    results = {f"features_{name}_audio_s_per_s": seconds / t for name, t in times.items()}
    results.update(
        features_vs_librosa=times["librosa"] / times["ours"],
        features_vs_sb_batched=times["sb_batched"] / times["ours"],
        features_vs_sb_per_utt=times["sb_per_utt"] / times["ours"],
        features_stft_only_vs_librosa=times["librosa"] / times["stft_only"],
    )
    return results


def bench_steps(
    batch,
    csv_path: str,
    tokenizer,
    teacher_dir: Path,
    repeats: int,
    device: str,
    tmp: Path,
    student_overrides: dict | None = None,
) -> dict:
    """Seconds per training step: plain, online KD, cached KD."""
    import speechbrain as sb

    brain, hparams = _brain(
        "hparams/distill.yaml", tmp / "student", device, {**(student_overrides or {}), "kd_weight": 0.5}
    )
    brain.tokenizer = tokenizer
    brain.on_fit_start()
    brain.on_stage_start(sb.Stage.TRAIN, 1)
    teacher = load_teacher(teacher_dir, device=device)
    tokens = token_strings(tokenizer)
    # speed only: a random-weight teacher spreads its mass over tokens the student lacks (<s>, <unk>), which a
    # trained one does not; the mapping's check is left to real runs
    aligner = TargetAligner(
        teacher.tokens,
        teacher.blank_index,
        teacher.frame_shift,
        tokens,
        0,
        hparams["frame_shift"],
        max_unmapped_mass=1.0,
    )
    results = {}
    brain.hparams.kd_weight = 0.0
    results["step_plain_s"] = median_time(lambda: brain.fit_batch(batch), repeats)
    brain.hparams.kd_weight = 0.5
    brain.attach_targets(OnlineTargets(teacher, aligner, 16000))
    results["step_online_kd_s"] = median_time(lambda: brain.fit_batch(batch), repeats)
    csv = tmp / "batch.csv"
    with open(csv_path, newline="") as src, open(csv, "w", newline="") as dst:
        wanted = set(batch.id)
        rows = [row for row in csv_mod.DictReader(src) if row["ID"] in wanted]
        writer = csv_mod.DictWriter(dst, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    start = time.perf_counter()
    write_cache(teacher, csv, tmp / "cache", device=device, progress=False)
    results["cache_fill_audio_s_per_s"] = _batch_seconds(batch) / (time.perf_counter() - start)
    brain.attach_targets(CachedTargets(CacheReader(tmp / "cache"), aligner))
    results["step_cached_kd_s"] = median_time(lambda: brain.fit_batch(batch), repeats)
    results["cached_kd_over_plain"] = results["step_cached_kd_s"] / results["step_plain_s"]
    results["online_kd_over_plain"] = results["step_online_kd_s"] / results["step_plain_s"]
    return results


def _batch_seconds(batch) -> float:
    wavs, lens = batch.sig
    return float((lens * wavs.shape[1]).sum()) / 16000


def bench_inference(batch, model_dirs: dict, repeats: int, device: str) -> dict:
    """Real-time factor of each model folder (encode + greedy decode).

    A Hugging Face teacher folder is timed through its teacher adapter (the
    posteriors, whose greedy decoding costs next to nothing), as
    ``speech-kd cache-targets`` and a live teacher run it.
    """
    wavs, lens = batch.sig
    seconds = _batch_seconds(batch)
    out = {}
    for name, folder in model_dirs.items():
        if (Path(folder) / "hyperparams.yaml").exists():
            asr = load_asr(folder, device=device)
            run = lambda asr=asr: asr.transcribe_batch(wavs, lens)  # noqa: E731
        else:
            teacher = load_teacher(folder, device=device)
            run = lambda teacher=teacher: teacher(wavs, lens)  # noqa: E731
        with torch.no_grad():
            out[f"rtf_{name}"] = median_time(run, repeats) / seconds
    out["student_speedup"] = out["rtf_teacher"] / out["rtf_student"]
    return out


def _parameters(folder: Path) -> int:
    """Parameters of a model folder (ours: ``speech_kd.json``; a Hugging Face folder: counted)."""
    info = Path(folder) / "speech_kd.json"
    if info.exists():
        return int(json.loads(info.read_text())["params"])
    teacher = load_teacher(folder)
    return sum(p.numel() for p in teacher.parameters())


def cache_projection(batch, csv_path: str, teacher_dir: Path, tmp: Path, device: str) -> dict:
    """Bytes a soft-target cache takes per audio hour at the teacher's frame rate, and for LibriSpeech 960 h.

    A random-weight teacher's posteriors are flat, so the bytes per frame come
    from the shipped teacher's cache of the same batch (real CTC posteriors at
    40 ms), built for T = 1 (``cache-targets``' default) and for T = 2 (the
    LibriSpeech recipes' yamls); they are scaled to the benchmarked teacher's
    frames per second. Only the shards count: ``meta.json`` and ``shards.json``
    are a few kB per cache, whatever its size, and would dominate a batch's cache.
    """
    shipped = load_teacher(hparams_files.shipped_teacher(), device=device)
    csv = tmp / "batch.csv"
    if not csv.exists():
        raise FileNotFoundError(f"{csv}: written by bench_steps first")
    frame_shift = load_teacher(teacher_dir).frame_shift
    out = {"teacher_frame_shift_s": frame_shift}
    for suffix, temperature in (("", 1.0), ("_t2", 2.0)):
        folder = tmp / f"cache_shipped{suffix or '_t1'}"
        summary = write_cache(shipped, csv, folder, device=device, progress=False, max_temperature=temperature)
        shards = (folder / SHARD_PATTERN.format(i) for i in range(summary["shards"]))
        per_frame = sum(shard.stat().st_size for shard in shards) / max(summary["frames"], 1)
        per_hour = per_frame * 3600 / frame_shift
        out.update(
            {
                f"cache_bytes_per_frame{suffix}": per_frame,
                f"cache_mb_per_audio_hour{suffix}": per_hour / 1e6,
                f"cache_gb_librispeech_960h{suffix}": per_hour * 960 / 1e9,
            }
        )
    return out


def _export_random(yaml: str, out: Path, tokenizer, overrides: dict | None = None) -> Path:
    """A randomly initialised model of ``yaml``'s architecture (with ``overrides``) as a model folder."""
    text = hparams_files.path(yaml).read_text()
    _, hparams = _brain(yaml, out, "cpu", overrides)
    hparams["normalize"].train()
    hparams["normalize"](torch.randn(2, 50, int(hparams.get("n_mels", 80))), torch.ones(2))
    return export_model_folder(hparams, text, tokenizer, out / "model")


def build_parser(prog: str = "speech-kd bench") -> argparse.ArgumentParser:
    """The speed benchmark's options (``speech-kd bench --help``)."""
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", default=None, help="also write the measured numbers here")
    parser.add_argument(
        "--repeats", type=positive_int, default=5, help="timed repeats of each measurement (median kept)"
    )
    parser.add_argument("--batch_size", type=positive_int, default=8, help="utterances per benchmark batch")
    parser.add_argument(
        "--rounds",
        type=positive_int,
        default=ROUNDS,
        help="interleaved rounds of the side-by-side deployment timings (median round kept; 1 for the large "
        "teachers on a CPU)",
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu or cuda (default: cuda when available)",
    )
    parser.add_argument(
        "--max_batch_seconds",
        type=non_negative_float,
        default=MAX_BATCH_SECONDS,
        help="padded audio per run of the exported students (transcribe.py's default; "
        "0: the whole batch in one run, as the PyTorch models)",
    )
    parser.add_argument(
        "--teacher_arch",
        default="synth",
        help="the teacher's architecture, random weights (speech_kd.bench.teacher_archs): synth (the shipped "
        "teacher's shape), wav2vec2-base, wav2vec2-large, wavlm-large, sb-conformer-large",
    )
    parser.add_argument(
        "--extra",
        default="",
        help="overrides of the student's hparams/distill.yaml, "
        'e.g. --extra="--cnn_channels_1=32 --d_ffn=256" (docs/deploy.md)',
    )
    return parser


def parse_overrides(text: str) -> dict:
    """``"--key=value ..."`` (SpeechBrain's command-line overrides) as ``{key: value}``, values read as YAML.

    Example
    -------
    >>> parse_overrides("--cnn_channels_1=8 --dropout=0.1")
    {'cnn_channels_1': 8, 'dropout': 0.1}
    """
    import yaml

    out = {}
    for token in text.split():
        key, sep, value = token.removeprefix("--").partition("=")
        if not token.startswith("--") or not sep or not key:
            raise ValueError(f"--extra: {token!r} is not --key=value")
        out[key] = yaml.safe_load(value)
    return out


def main(argv: list[str] | None = None) -> dict:
    """Run every benchmark and print one table (see module docstring)."""
    args = build_parser().parse_args(argv)
    student_overrides = parse_overrides(args.extra)

    arch = teacher_arch(args.teacher_arch)  # an unknown name: one line, before any work
    known = defined_keys(hparams_files.path("distill.yaml").read_text())
    if set(student_overrides) - known:  # now, not after the corpus is synthesised
        raise ValueError(f"--extra: {sorted(set(student_overrides) - known)} not keys of hparams/distill.yaml")

    tmp = Path(tempfile.mkdtemp(prefix="speechkd_bench_"))
    tokenizer = make_tokenizer(" 'ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    corpus = _corpus(tmp)
    csvs = prepare_librispeech(corpus, tmp / "data").csv_files
    batch = _batch(csvs["train"], tokenizer, args.batch_size, args.device)
    models = {
        "teacher": build_teacher(
            arch.name, tmp / "teacher", lambda yaml, out, overrides: _export_random(yaml, out, tokenizer, overrides)
        ),
        "student": _export_random("hparams/distill.yaml", tmp / "student_export", tokenizer, student_overrides),
    }

    results = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "threads": torch.get_num_threads(),
        "batch_utts": args.batch_size,
        "batch_audio_s": float((batch.sig[1] * batch.sig[0].shape[1]).sum()) / 16000,
    }
    results.update(bench_features(batch, args.repeats, args.device))
    results["teacher_arch"] = arch.name
    results.update({f"params_{name}": _parameters(folder) for name, folder in models.items()})
    results["student_params_fraction"] = results["params_student"] / results["params_teacher"]
    results.update(
        bench_steps(
            batch, csvs["train"], tokenizer, models["teacher"], args.repeats, args.device, tmp, student_overrides
        )
    )
    results.update(bench_inference(batch, models, args.repeats, args.device))
    results.update(cache_projection(batch, csvs["train"], models["teacher"], tmp, args.device))
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        print("onnxruntime missing: exported-student figures skipped (pip install 'speech_kd[export]')")
    else:
        wavs, lens = batch.sig  # exported models run on the CPU: all are timed there
        results.update(
            bench_deployed(wavs.cpu(), lens.cpu(), models, args.repeats, tmp, args.max_batch_seconds, args.rounds)
        )
    ev = evaluate_model(models["student"], csvs["test"], device=args.device, progress=False).summary
    results.update(evaluate_utts_per_s=ev["utts_per_second"], evaluate_rtf=ev["rtf"])

    width = max(len(k) for k in results)
    for key, value in results.items():
        print(f"{key:<{width}}  {value:.4g}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
