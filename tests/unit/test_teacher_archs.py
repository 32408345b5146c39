"""Teachers of real sizes for speech-kd bench: published shapes, random weights, one-line refusal of unknown names."""

from __future__ import annotations

import pytest

from speech_kd.bench.teacher_archs import TEACHER_ARCHS, UnknownTeacherArch, teacher_arch
from speech_kd.cli import run


def test_wav2vec2_base_has_the_published_size():
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    arch = teacher_arch("wav2vec2-base")
    model = Wav2Vec2ForCTC(Wav2Vec2Config(vocab_size=32, **arch.config))
    params = sum(p.numel() for p in model.parameters())
    assert 94e6 < params < 95e6  # facebook/wav2vec2-base-960h: 94.4M


def test_unknown_teacher_arch_is_one_line_before_any_work(capsys):
    with pytest.raises(UnknownTeacherArch):
        teacher_arch("whisper")
    assert run(["bench", "--teacher_arch", "whisper", "--repeats", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "whisper" in err[0] and all(name in err[0] for name in TEACHER_ARCHS)
