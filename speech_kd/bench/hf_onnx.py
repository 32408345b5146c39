"""A Hugging Face CTC teacher exported to ONNX and run by onnxruntime (``speech-kd bench``'s like with like).

``speech-kd export`` takes this package's conformer and SpeechBrain recipes; a Hugging Face
wav2vec2/HuBERT/WavLM teacher is exported here only to time it as a deployment would run it,
against the exported student in the same runtime, format, threads and batch. The graph is the
model's own forward from normalised samples to logits (``torch.onnx.export``, TorchScript-based,
dynamic batch and length); :class:`HFOnnxCTC` does what its feature extractor and a greedy decoder
would around it: per-utterance zero-mean unit-variance normalisation over the valid samples, an
attention mask, the argmax. It imports no torch, so the peak memory of a process running it is the
runtime's and the model's alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from speech_kd.deploy.runtime import greedy_decode, run_groups

__all__ = ["CONFIG_NAME", "HFOnnxCTC", "export_hf_onnx"]

#: the file beside ``model.onnx`` that says how to run it
CONFIG_NAME = "hf_onnx.json"


def export_hf_onnx(source: str | Path, out: str | Path, quantize: str | None = None) -> Path:
    """Export the Hugging Face CTC model folder ``source`` to ``out/model.onnx`` (``quantize``: None or int8).

    ``out`` must not exist (a scratch folder of the benchmark). Returns ``out``.
    """
    import torch

    from speech_kd.deploy.onnx_export import OPSET, quantize_onnx_int8
    from speech_kd.targets.teachers.hf import HFCTCTeacher

    teacher = HFCTCTeacher(source)
    out = Path(out)
    out.mkdir(parents=True)

    class Logits(torch.nn.Module):
        """``(input_values [B, S], attention_mask [B, S]) -> logits [B, T, V]``."""

        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.model(input_values, attention_mask=attention_mask).logits

    samples = torch.tensor([32000, 24000])
    example = (torch.randn(2, 32000), (torch.arange(32000)[None] < samples[:, None]).long())
    plain = out / ("fp32.onnx" if quantize else "model.onnx")
    with torch.no_grad():
        torch.onnx.export(
            Logits(teacher.model).eval(),
            example,
            str(plain),
            input_names=["input_values", "attention_mask"],
            output_names=["logits"],
            dynamic_axes={
                "input_values": {0: "batch", 1: "samples"},
                "attention_mask": {0: "batch", 1: "samples"},
                "logits": {0: "batch", 1: "frames"},
            },
            opset_version=OPSET,
            dynamo=False,
        )
    if quantize:
        quantize_onnx_int8(plain, out / "model.onnx")
        plain.unlink()
    config = {
        "model_file": "model.onnx",
        "blank": teacher.blank_index,
        "tokens": teacher.tokens,
        "do_normalize": teacher.do_normalize,
        "sample_rate": teacher.sample_rate,
        "conv_kernel": list(teacher.model.config.conv_kernel),
        "conv_stride": list(teacher.model.config.conv_stride),
        "quantize": quantize,
    }
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=1) + "\n")
    return out


class HFOnnxCTC:
    """An exported Hugging Face CTC model run by onnxruntime, greedy decoding.

    Utterances run longest first in groups of at most ``max_batch_seconds`` of padded audio (0: the
    whole batch in one run), as the exported students' ``transcribe.py`` runs them; ``threads`` are
    onnxruntime's intra-op threads (a large network uses them within each run).
    """

    def __init__(self, folder: str | Path, threads: int = 1, max_batch_seconds: float = 0.0) -> None:
        import onnxruntime as ort

        folder = Path(folder)
        self.config = json.loads((folder / CONFIG_NAME).read_text())
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(folder / self.config["model_file"]), options, providers=["CPUExecutionProvider"]
        )
        self.budget = int(max_batch_seconds * self.config["sample_rate"])

    def frames(self, samples: int) -> int:
        """Output frames of an utterance of ``samples`` samples (the convolutional encoder's arithmetic)."""
        for kernel, stride in zip(self.config["conv_kernel"], self.config["conv_stride"], strict=True):
            samples = (samples - kernel) // stride + 1
        return max(samples, 1)

    def _run(self, utterances: list[np.ndarray]) -> list[np.ndarray]:
        """Logits ``[T', V]`` of each utterance over its own frames, run as one padded batch."""
        lengths = [len(u) for u in utterances]
        batch = np.zeros((len(utterances), max(lengths)), dtype=np.float32)
        mask = np.zeros(batch.shape, dtype=np.int64)
        for i, wav in enumerate(utterances):
            if self.config["do_normalize"]:
                wav = (wav - wav.mean()) / np.sqrt(wav.var() + 1e-7)
            batch[i, : len(wav)] = wav
            mask[i, : len(wav)] = 1
        (logits,) = self.session.run(None, {"input_values": batch, "attention_mask": mask})
        return [logits[i, : self.frames(n)] for i, n in enumerate(lengths)]

    def transcribe_batch(self, wavs, lens) -> list[str]:
        """Greedy transcripts of ``wavs [B, S]`` (numpy or torch, 16 kHz) with relative lengths ``lens [B]``."""
        wavs, lens = np.asarray(wavs, dtype=np.float32), np.asarray(lens, dtype=np.float64)
        utterances = [wavs[i, : int(round(lens[i] * wavs.shape[1]))] for i in range(len(wavs))]
        lengths = [len(u) for u in utterances]
        groups = run_groups(lengths, self.budget) if self.budget else [list(range(len(utterances)))]
        texts = [""] * len(utterances)
        blank, tokens = self.config["blank"], self.config["tokens"]
        for group in groups:
            for i, logits in zip(group, self._run([utterances[i] for i in group]), strict=True):
                texts[i] = "".join(tokens[t] for t in greedy_decode(logits, blank)).replace("|", " ").strip()
        return texts
