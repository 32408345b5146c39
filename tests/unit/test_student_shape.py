"""The default student of hparams/distill.yaml keeps the shape docs/deploy.md measured: a tenth of the teacher."""

from __future__ import annotations

from hyperpyyaml import load_hyperpyyaml

from tests.conftest import REPO


def _params(yaml_name: str) -> int:
    hparams = load_hyperpyyaml((REPO / "hparams" / yaml_name).read_text(), {"data_folder": "/nonexistent"})
    return sum(p.numel() for key in ("CNN", "enc", "ctc_lin") for p in hparams[key].parameters())


def test_default_student_has_at_most_a_tenth_of_the_teachers_parameters():
    """309,869 against 3,146,301 (docs/deploy.md's speed and WER tables were measured on this shape)."""
    student, teacher = _params("distill.yaml"), _params("teacher.yaml")
    assert student == 309_869 and teacher == 3_146_301
    assert student <= teacher / 10
