"""Mixed precision: the student's autocast does not reach the teacher or the KD loss; fp16 on CPU is refused early.

The CUDA tests run a real fp16/bf16 distillation and skip cleanly without a GPU.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from speech_kd.cli import main
from speech_kd.data.dataio import make_tokenizer, token_strings
from speech_kd.targets.strategies import OnlineTargets, TargetAligner
from speech_kd.targets.teachers.base import load_teacher
from speech_kd.testing import make_tiny_sb_model, whitenoise
from tests.conftest import REPO, TINY_MODEL

DISTILL = str(REPO / "hparams/distill.yaml")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=[CUDA, pytest.mark.cuda])]


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory):
    return make_tiny_sb_model(tmp_path_factory.mktemp("teacher") / "model")


def _online(folder, device: str, precision: str) -> tuple[OnlineTargets, list]:
    teacher = load_teacher(folder, device=device)
    seen = []
    posteriors = teacher.posteriors

    def spy(wavs, wav_lens):  # records the autocast state the teacher actually runs under
        seen.append(torch.is_autocast_enabled(wavs.device.type))
        return posteriors(wavs, wav_lens)

    teacher.posteriors = spy
    tokens = token_strings(make_tokenizer(" 'ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    aligner = TargetAligner(teacher.tokens, teacher.blank_index, teacher.frame_shift, tokens, 0, 0.04)
    return OnlineTargets(teacher, aligner, 16000, precision).to(device), seen


@pytest.mark.parametrize("device", DEVICES)
def test_teacher_keeps_its_precision_under_the_students_autocast(teacher_folder, device):
    wavs = torch.stack([whitenoise(1.5, seed=1), torch.cat([whitenoise(1.0, seed=2), torch.zeros(8000)])])
    batch = SimpleNamespace(sig=(wavs.to(device), torch.tensor([1.0, 2 / 3], device=device)))
    lengths, frames = torch.tensor([37, 25], device=device), 37
    fp32, seen = _online(teacher_folder, device, "fp32")
    reference = fp32(batch, lengths, frames)
    student_dtype = torch.float16 if device == "cuda" else torch.bfloat16
    with torch.autocast(device, dtype=student_dtype):
        inside = fp32(batch, lengths, frames)
    assert seen == [False, False]  # autocast off inside the teacher, also under the student's autocast
    assert inside.log_probs.dtype == torch.float32
    if device == "cpu":  # bit for bit: the teacher ran exactly as without the student's autocast
        assert torch.equal(inside.log_probs, reference.log_probs)
    else:  # (GPU kernels may pick another algorithm between calls)
        assert torch.allclose(inside.log_probs, reference.log_probs, atol=1e-5)

    bf16, seen = _online(teacher_folder, device, "bf16")
    with torch.autocast(device, dtype=student_dtype):
        low = bf16(batch, lengths, frames)
    assert seen == [True]  # teacher_precision=bf16 does switch it on
    assert low.log_probs.dtype == torch.float32 and not torch.equal(low.log_probs, reference.log_probs)
    assert torch.allclose(low.log_probs.exp(), reference.log_probs.exp(), atol=0.05)


def test_fp16_refused_on_cpu_before_any_work(tiny_corpus, tmp_path, teacher_folder):
    out = tmp_path / "fp16"
    with pytest.raises(ValueError, match="--precision=fp16 needs a CUDA device.*bf16"):
        main(
            [
                "distill",
                DISTILL,
                f"--data_folder={tiny_corpus}",
                f"--output_folder={out}",
                f"--teacher_source={teacher_folder}",
                "--precision=fp16",
                "--device=cpu",
            ]
        )
    assert not (out / "data").exists()  # refused before data preparation
    with pytest.raises(ValueError, match="teacher_precision=fp16 needs a CUDA device"):
        OnlineTargets(load_teacher(teacher_folder), None, 16000, "fp16")


def _distill_with_precision(corpus, out, teacher, device: str, precision: str) -> dict:
    assert (
        main(
            [
                "distill",
                DISTILL,
                f"--data_folder={corpus}",
                f"--output_folder={out}",
                "--number_of_epochs=1",
                f"--teacher_source={teacher}",
                f"--device={device}",
                f"--precision={precision}",
                "--report_after_run=False",
                "--noprogressbar",
                *TINY_MODEL,
            ]
        )
        == 0
    )
    record = json.loads((out / "history.jsonl").read_text().splitlines()[-1])
    for key in ("loss", "ctc_loss", "kd_loss"):
        assert math.isfinite(record["train"][key]), key
    assert record["train"]["kd_loss"] > 0 and math.isfinite(record["valid"]["loss"])
    return record


def test_bf16_student_on_cpu_distils(tiny_corpus, tmp_path, teacher_folder):
    _distill_with_precision(tiny_corpus, tmp_path / "bf16", teacher_folder, "cpu", "bf16")


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_student_on_cuda_distils(tiny_corpus, tmp_path, teacher_folder, precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    _distill_with_precision(tiny_corpus, tmp_path / precision, teacher_folder, "cuda", precision)
