"""Run reports: what distillation did, as pictures (``speech-kd report RUN_DIR``).

:func:`build_report` reads a run folder written by ``speech-kd train`` or
``speech-kd distill`` (``history.jsonl``, ``hyperparams.yaml``,
``kd_run.json``, ``model/``, ``dev.csv``/``test.csv``, ``kd_setup.txt``) and
writes

- ``RUN_DIR/report.html``: self-contained (PNG images inlined as data URIs,
  no script or style from the network);
- ``RUN_DIR/report.md`` with its images in ``RUN_DIR/report_files/``.

Both contain the learning curves, teacher/student posteriorgrams of a few
dev utterances (the teacher mapped onto the student's tokens and frame rate
as in training), a WER/CER table and chart (teacher, this student, any
``compare`` models such as the scratch student, with parameters and RTF),
and the run's configuration. :func:`evaluation_page` renders the
per-utterance view of ``speech-kd evaluate --html``.

Data flow: run folder (:mod:`~speech_kd.report.run`) -> models and posteriors
(:mod:`~speech_kd.report.posteriors`: student, teacher via ``speech_kd.targets.strategies``)
-> numbers (:mod:`~speech_kd.report.scores`) -> :mod:`~speech_kd.report.plots`
(PNG bytes) -> :class:`~speech_kd.report.html.Page` (HTML + Markdown), put
together by :mod:`~speech_kd.report.build`; :mod:`~speech_kd.report.evaluation`
is the ``evaluate --html`` page.
"""

from speech_kd.report.build import build_report
from speech_kd.report.evaluation import evaluation_page
from speech_kd.report.posteriors import greedy_text, spike_offsets
from speech_kd.report.run import load_history
from speech_kd.report.scores import reached_teacher_epoch

__all__ = ["build_report", "evaluation_page", "load_history", "greedy_text", "spike_offsets", "reached_teacher_epoch"]
