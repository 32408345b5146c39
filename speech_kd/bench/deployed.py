"""Speed, memory and size of exported teacher and student (``speech-kd bench``'s deployment part).

Every figure comes from one run on this machine, side by side with the
PyTorch models as users run them (``EncoderASR.transcribe_batch``, fp32):

- ``rtf_side_*``: real-time factor of transcribing the benchmark batch
  (fbank, network, greedy decoding; the exported models run it as their
  ``transcribe.py`` does, longest first in groups of ``max_batch_seconds``
  of padded audio) with the same number of threads, the six models timed
  in turn over :data:`ROUNDS` rounds (teacher and student in PyTorch, in
  ONNX fp32 and in ONNX int8);
- like with like, the teacher's RTF over the student's in the same runtime
  and format: ``student_speedup_side`` (PyTorch), ``student_speedup_exported``
  (ONNX fp32), ``student_speedup_exported_int8`` (ONNX int8);
- mixed, kept labelled as such: ``student_speedup_onnx`` /
  ``student_speedup_int8``, the PyTorch teacher over the exported student
  (what export gives and what distillation gives, together);
- ``peak_rss_mb_*``: peak resident memory of a fresh process that loads the
  model and transcribes the batch's files (PyTorch: ``speech_kd.model_folder.load_asr``;
  exported: the folder's own ``transcribe.py``, which imports no torch);
- ``disk_mb_*``: size of the weights file.

A Hugging Face teacher (wav2vec2, HuBERT, WavLM: ``speech-kd bench --teacher_arch``) runs through its
teacher adapter in PyTorch and through :mod:`speech_kd.bench.hf_onnx` exported (its own forward in
ONNX fp32 and int8, onnxruntime, greedy), so its ratios are like with like as well.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from speech_kd.bench.hf_onnx import CONFIG_NAME as HF_ONNX_CONFIG
from speech_kd.bench.hf_onnx import HFOnnxCTC, export_hf_onnx
from speech_kd.bench.timing import median_time
from speech_kd.deploy.asr import DeployedASR
from speech_kd.deploy.onnx_export import export_asr
from speech_kd.deploy.runtime import MAX_BATCH_SECONDS
from speech_kd.model_folder import load_asr
from speech_kd.targets.teachers.base import detect_kind

__all__ = ["bench_deployed", "peak_rss_mb", "ROUNDS"]

#: interleaved rounds of the four timings (each a median of ``repeats``); the median round is kept
ROUNDS = 3

_PYTORCH_CHILD = """
import resource, sys, torch, soundfile as sf
torch.set_num_threads({threads})
from speech_kd.model_folder import load_asr
from speech_kd.targets.teachers.base import detect_kind
asr = load_asr({folder!r})
wavs = [torch.from_numpy(sf.read(p, dtype="float32")[0]) for p in {files!r}]
lens = torch.tensor([len(w) for w in wavs], dtype=torch.float32)
asr.transcribe_batch(torch.nn.utils.rnn.pad_sequence(wavs, batch_first=True), lens / lens.max())
{report}
"""

_EXPORTED_CHILD = """
import resource, runpy, sys
sys.argv = ["transcribe.py", "--threads", "{threads}", "--batch", "{batch}", "--max_batch_seconds", "{seconds}",
            *{files!r}]
try:
    runpy.run_path({script!r}, run_name="__main__")
except SystemExit:
    pass
{report}
"""

_HF_CHILD = """
import resource, sys, torch, soundfile as sf
torch.set_num_threads({threads})
from speech_kd.targets.teachers.hf import HFCTCTeacher
teacher = HFCTCTeacher({folder!r})
wavs = [torch.from_numpy(sf.read(p, dtype="float32")[0]) for p in {files!r}]
lens = torch.tensor([len(w) for w in wavs], dtype=torch.float32)
teacher(torch.nn.utils.rnn.pad_sequence(wavs, batch_first=True), lens / lens.max())
{report}
"""

_HF_ONNX_CHILD = """
import resource, sys, numpy as np, soundfile as sf
from speech_kd.bench.hf_onnx import HFOnnxCTC
model = HFOnnxCTC({folder!r}, threads={threads}, max_batch_seconds={seconds})
wavs = [sf.read(p, dtype="float32")[0] for p in {files!r}]
batch = np.zeros((len(wavs), max(len(w) for w in wavs)), dtype=np.float32)
for i, w in enumerate(wavs):
    batch[i, : len(w)] = w
model.transcribe_batch(batch, np.array([len(w) for w in wavs]) / batch.shape[1])
{report}
"""

# VmHWM (this process's own peak; ru_maxrss survives exec, so a child would report its parent's peak)
_REPORT = """
try:
    peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
except (OSError, StopIteration):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("PEAK_RSS_KB", peak)
"""


def peak_rss_mb(
    folder: str | Path, files: list[str], threads: int, max_batch_seconds: float = MAX_BATCH_SECONDS
) -> float:
    """Peak resident memory (MB) of a new process that loads ``folder`` and transcribes ``files`` as one batch.

    An exported folder runs them as its ``transcribe.py`` does, in groups of ``max_batch_seconds``.
    """
    folder = Path(folder)
    if (folder / HF_ONNX_CONFIG).exists():
        code = _HF_ONNX_CHILD.format(
            threads=threads, folder=str(folder), files=files, seconds=max_batch_seconds, report=_REPORT
        )
    elif (folder / "deploy.json").exists():
        code = _EXPORTED_CHILD.format(
            threads=threads,
            batch=len(files),
            files=files,
            seconds=max_batch_seconds,
            script=str(folder / "transcribe.py"),
            report=_REPORT,
        )
    elif detect_kind(folder) == "huggingface":
        code = _HF_CHILD.format(threads=threads, folder=str(folder), files=files, report=_REPORT)
    else:
        code = _PYTORCH_CHILD.format(threads=threads, folder=str(folder), files=files, report=_REPORT)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=600)
    line = next(line for line in out.stdout.splitlines() if line.startswith("PEAK_RSS_KB"))
    return int(line.split()[1]) / 1024


def _disk_mb(folder: Path) -> float:
    """MB of a folder's weights: ``model.ckpt``, Hugging Face's ``*.safetensors``, an export's ``model_file``."""
    for config in (folder / "deploy.json", folder / HF_ONNX_CONFIG):
        if config.exists():
            return (folder / json.loads(config.read_text())["model_file"]).stat().st_size / 1e6
    weights = folder / "model.ckpt"
    if not weights.exists():
        weights = next(folder.glob("*.safetensors"), folder / "pytorch_model.bin")
    return weights.stat().st_size / 1e6


class _HFTeacherRun:
    """A Hugging Face teacher folder in PyTorch as ``cache-targets`` and a live teacher run it, plus the argmax."""

    def __init__(self, folder: Path) -> None:
        from speech_kd.targets.teachers.hf import HFCTCTeacher

        self.teacher = HFCTCTeacher(folder)

    def transcribe_batch(self, wavs: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.teacher(wavs, lens).log_probs.argmax(-1)


def bench_deployed(
    wavs: torch.Tensor,
    lens: torch.Tensor,
    model_dirs: dict,
    repeats: int,
    tmp: Path,
    max_batch_seconds: float = MAX_BATCH_SECONDS,
    rounds: int = ROUNDS,
) -> dict:
    """Export teacher and student (ONNX fp32 and int8) and time all six side by side (module docstring).

    Like with like: ``student_speedup`` (PyTorch over PyTorch, ``student_speedup_side`` here),
    ``student_speedup_exported`` (ONNX fp32 teacher over ONNX fp32 student) and
    ``student_speedup_exported_int8`` (int8 over int8): same runtime, format, threads and batch.
    ``student_speedup_onnx`` / ``student_speedup_int8`` (the PyTorch teacher over the exported
    student) mix what export gives with what distillation gives, and are kept only as that.

    Parameters
    ----------
    wavs : torch.Tensor
        ``[B, S]`` padded benchmark batch (16 kHz, on the CPU).
    lens : torch.Tensor
        ``[B]`` relative lengths.
    model_dirs : dict
        ``{"teacher": model folder, "student": model folder}``.
    repeats : int
        Timed repetitions (median kept).
    tmp : Path
        Scratch folder for the exported folders and the batch's audio files.
    max_batch_seconds : float
        Padded audio per run of the exported models (0: the whole batch in one run, as the PyTorch models).
    rounds : int
        Interleaved rounds of the six timings (median round kept).
    """
    import soundfile as sf

    wavs, lens = wavs.cpu(), lens.cpu()
    seconds = float((lens * wavs.shape[1]).sum()) / 16000
    threads = torch.get_num_threads()
    folders = {
        "teacher": Path(model_dirs["teacher"]),
        "student": Path(model_dirs["student"]),
        "student_onnx": tmp / "student_onnx",
        "student_int8": tmp / "student_int8",
        "teacher_onnx": tmp / "teacher_onnx",
        "teacher_int8": tmp / "teacher_int8",
    }
    hf_teacher = detect_kind(folders["teacher"]) == "huggingface"
    export_asr(folders["student"], folders["student_onnx"], "onnx")
    export_asr(folders["student"], folders["student_int8"], "onnx", quantize="int8")
    if hf_teacher:
        export_hf_onnx(folders["teacher"], folders["teacher_onnx"])
        export_hf_onnx(folders["teacher"], folders["teacher_int8"], quantize="int8")
    else:
        export_asr(folders["teacher"], folders["teacher_onnx"], "onnx")
        export_asr(folders["teacher"], folders["teacher_int8"], "onnx", quantize="int8")
    exported = HFOnnxCTC if hf_teacher else DeployedASR
    runs = {
        "teacher": _HFTeacherRun(folders["teacher"]) if hf_teacher else load_asr(folders["teacher"]),
        "student": load_asr(folders["student"]),
        "student_onnx": DeployedASR(folders["student_onnx"], threads=threads, max_batch_seconds=max_batch_seconds),
        "student_int8": DeployedASR(folders["student_int8"], threads=threads, max_batch_seconds=max_batch_seconds),
        "teacher_onnx": exported(folders["teacher_onnx"], threads=threads, max_batch_seconds=max_batch_seconds),
        "teacher_int8": exported(folders["teacher_int8"], threads=threads, max_batch_seconds=max_batch_seconds),
    }
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):  # interleaved, so that a drift of the machine's speed hits all alike
        for name, asr in runs.items():
            samples[name].append(median_time(lambda asr=asr: asr.transcribe_batch(wavs, lens), repeats) / seconds)
    out: dict = {f"rtf_side_{name}": statistics.median(values) for name, values in samples.items()}
    for name in ("student", "student_onnx", "student_int8"):
        key = "student_speedup_side" if name == "student" else f"student_speedup_{name.split('_')[1]}"
        out[key] = out["rtf_side_teacher"] / out[f"rtf_side_{name}"]
    out["student_speedup_exported"] = out["rtf_side_teacher_onnx"] / out["rtf_side_student_onnx"]
    out["student_speedup_exported_int8"] = out["rtf_side_teacher_int8"] / out["rtf_side_student_int8"]

    audio = tmp / "bench_audio"
    audio.mkdir(exist_ok=True)
    files = []
    for i, n in enumerate(torch.round(lens * wavs.shape[1]).long().tolist()):
        files.append(str(audio / f"{i}.wav"))
        sf.write(files[-1], wavs[i, :n].numpy(), 16000)
    for name, folder in folders.items():
        out[f"peak_rss_mb_{name}"] = peak_rss_mb(folder, files, threads, max_batch_seconds)
        out[f"disk_mb_{name}"] = _disk_mb(folder)
    return out
