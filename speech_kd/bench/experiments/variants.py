"""The named KD settings an experiment compares (``--variants``), and how their overrides combine."""

from __future__ import annotations

#: the SpecAugment of CR-CTC as icefall's recipes run it (2.5x the time masks of their SpecAugment): on,
#: with 2.5x hparams/distill.yaml's 4 time masks (that yaml's SpecAugment is off)
CR_AUGMENT = ["--spec_augment=True", "--n_time_masks=10"]
#: CR-CTC (speech_kd.kd.consistency) at icefall's weight (``--cr-loss-scale 0.2``), with that SpecAugment
CR_CTC = ["--cr_ctc_weight=0.2", *CR_AUGMENT]

#: named KD settings (overrides of hparams/distill.yaml). Any name may end in ``_online`` (the
#: live teacher instead of the cache) or ``_sp`` (speed perturbation 0.9/1.0/1.1x, for both the
#: student and the live teacher, which then hears the perturbed audio): see :func:`variant_args`.
#: Variants with ``--kd_weight=0`` train without a teacher (no cache, no live teacher).
VARIANTS: dict[str, list[str]] = {
    # the student without KD, at its own best learning rate (0.001 / 0.002 / 0.004 measured; the yaml's
    # 0.004 is the KD student's best): each student is compared at the rate that suits it (docs/results.md)
    "scratch": ["--kd_weight=0", "--lr=0.002"],
    "kd": [],  # the KD settings of the student yaml itself (hparams/distill.yaml's defaults)
    # CR-CTC (speech_kd.kd.consistency): the strongest baseline without a teacher, at scratch's learning rate,
    # and stacked with kd; *_sa: their SpecAugment alone (controls: what the consistency term adds)
    "scratch_cr": ["--kd_weight=0", "--lr=0.002", *CR_CTC],
    "kd_cr": list(CR_CTC),
    "scratch_sa": ["--kd_weight=0", "--lr=0.002", *CR_AUGMENT],
    "kd_sa": list(CR_AUGMENT),
    "kd_anneal": ["--kd_anneal=True"],  # kd with teacher annealing on (KD fades as the student reaches the teacher)
    "kd_plain": ["--kd_anneal=False"],  # kd with teacher annealing off (the KD weight as configured, all run long)
    # untranscribed audio (needs --transcribed_fraction or --unlabeled): KD on the split named untranscribed too
    "kd_unlabeled": ["--unlabeled_splits=[untranscribed]"],
    "kd_unlabeled_filter": ["--unlabeled_splits=[untranscribed]"],  # + --unlabeled_min_confidence=--min_confidence
    "kd_unlabeled_pl": ["--unlabeled_splits=[untranscribed]", "--unlabeled_kd_loss=ctc"],  # pseudo-labels there
    "kd_blankdown": ["--blank_mode=downweight"],  # kd with blank-dominated teacher frames weighted 0.1
    "kd_top4": ["--kd_topk=4"],  # kd with the teacher restricted to its top 4 tokens per frame
    "kl_t1": ["--kd_weight=0.5", "--temperature=1"],
    "kl_t2": ["--kd_weight=0.5", "--temperature=2"],
    "kl_t4": ["--kd_weight=0.5", "--temperature=4"],
    "kl_t2_w09": ["--kd_weight=0.9", "--temperature=2"],
    "kl_t1_w09": ["--kd_weight=0.9", "--temperature=1"],
    "kl_t1_w1": ["--kd_weight=1.0", "--temperature=1"],
    "kl_t2_top4": ["--kd_weight=0.5", "--temperature=2", "--kd_topk=4"],
    "kl_t2_blankdown": ["--kd_weight=0.5", "--temperature=2", "--blank_mode=downweight"],
    "ce_hard": ["--kd_weight=0.5", "--kd_loss=ce"],
    "ctc_teacher_path": ["--kd_weight=0.5", "--kd_loss=ctc"],
    "mse": ["--kd_weight=0.5", "--kd_loss=mse"],
    # layer-to-layer distillation (kd_layers: auto, each student layer to an evenly spaced teacher layer, l1_cos):
    # on top of kd's output KD, and alone (kd_loss none). Alone, kd_weight 0.5 rather than kd's 0.9: the layer
    # loss does not train the CTC output layer, and at 0.9 the CTC that does would get a tenth of the loss
    "kd_out_layer": ["--kd_layers=auto"],
    "kd_layer": ["--kd_layers=auto", "--kd_loss=none", "--kd_weight=0.5"],
}


def variant_args(name: str) -> tuple[list[str], bool]:
    """Overrides of a variant name and whether it reads the cache (else the live teacher, or none).

    Examples
    --------
    >>> variant_args("kl_t2")
    (['--kd_weight=0.5', '--temperature=2'], True)
    >>> variant_args("kl_t2_online")
    (['--kd_weight=0.5', '--temperature=2'], False)
    >>> variant_args("scratch_sp")
    (['--kd_weight=0', '--lr=0.002', '--speed_perturb=True'], False)
    >>> variant_args("kd_cr_online")
    (['--cr_ctc_weight=0.2', '--spec_augment=True', '--n_time_masks=10'], False)
    >>> variant_args("scratch_cr")[1]
    False
    """
    base, extra, cached = name, [], True
    for suffix, args in (("_sp", ["--speed_perturb=True"]), ("_online", [])):
        if base.endswith(suffix):
            base, extra, cached = base[: -len(suffix)], args + extra, False
    if base not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}: one of {sorted(VARIANTS)}, optionally + _online or _sp")
    return VARIANTS[base] + extra, cached and "--kd_weight=0" not in VARIANTS[base]


def merge_overrides(variant: list[str], extra: list[str]) -> list[str]:
    """A variant's ``--key=value`` overrides followed by ``extra``; a key given in ``extra`` wins.

    (SpeechBrain refuses a key given twice.)

    Examples
    --------
    >>> merge_overrides(["--kd_weight=0", "--lr=0.002"], ["--lr=0.001"])
    ['--kd_weight=0', '--lr=0.001']
    """
    given = {arg.split("=", 1)[0] for arg in extra}
    return [arg for arg in variant if arg.split("=", 1)[0] not in given] + list(extra)
