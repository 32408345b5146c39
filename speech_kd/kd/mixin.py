"""``KDMixin``: add frame-level knowledge distillation to any CTC ``speechbrain.Brain``.

Put the mixin in the bases of an existing CTC Brain, either way::

    class ASR(KDMixin, sb.Brain):    # edit the class in place (was: class ASR(sb.Brain))
        ...                          # its compute_forward / compute_objectives / stage hooks, unchanged

    class KDASR(KDMixin, ASR):       # or wrap it, leaving the recipe's class untouched
        pass

    asr_brain.attach_targets(make_targets(hparams, token_strings(tokenizer)))

At construction the mixin wraps the instance's own ``compute_forward``,
``compute_objectives``, ``on_stage_start``, ``on_stage_end``, ``fit_batch`` and ``on_fit_start``
(whatever class in the MRO defines them), so the recipe's methods run as
written and the KD term is added around them; on training batches the loss
is ``(1 - kd_weight) * recipe_loss + kd_weight * kd``; with ``kd_layers``,
``kd = output KD + kd_layer_weight * layer loss``. What the wrapping does:

- outputs: the CTC log-probabilities and relative lengths are found in what
  ``compute_forward`` returns (:mod:`speech_kd.kd.recipe_outputs`; ``kd_outputs``
  in the yaml names them where that is ambiguous);
- augmentation: every SpeechBrain ``Augmenter`` in the hparams is followed
  (:mod:`speech_kd.kd.augment_rows`): when every augmentation keeps the time
  axis (noise, dropped chunks or frequencies) a live teacher hears each
  row's clean utterance, as the cache does; with one that moves samples in
  time (speed perturbation) it hears exactly the waveform rows the student
  heard, so the frames line up; feature-augmented rows reuse their audio's
  targets, and cached targets are refused with augmentations that move
  samples in time (named by yaml key);
- statistics: the epoch's KD numbers (``kd_loss``, ``ctc_loss``,
  ``agreement``, ``lost_mass``, ``blank_share``, ``kd_weight``) are added to the
  ``train_stats`` the recipe gives its ``train_logger``, so they reach its
  own train log unedited;
- untranscribed utterances (empty ``wrd``): a training batch of them only is
  trained on the KD term alone (``unlabeled_kd_loss``); the recipe's
  ``compute_objectives`` never sees it;
- CR-CTC (``cr_ctc_weight > 0``, :mod:`speech_kd.kd.consistency`): a host Brain
  that trains two views of each utterance (``CTCBrain``) names each output
  row's utterance (the row an ``Augmenter`` made, when one ran first: the two
  row maps are composed) in ``self.output_rows``, so both views get the KD term
  against the same teacher targets (the teacher runs once per utterance), and
  puts its weighted consistency term, already in its loss, in
  ``self.consistency_term``: the mixin keeps that term at its full weight,
  ``(1 - kd_weight) * CTC + kd_weight * KD + cr_ctc_weight * CR``. A host
  without ``consistency_objective`` (a stock recipe) is refused with
  ``cr_ctc_weight > 0``;
- layers (``kd_layers``): the student's encoder layers are found in its
  ``modules`` (``kd_student_layers`` names them otherwise) and tapped by
  forward hooks during training forwards; each mapped layer gets a learned
  projection to the teacher layer's width (:mod:`speech_kd.kd.layers`), put
  in ``modules`` as ``kd_layer_projections`` (so the optimiser trains it and
  checkpoints keep it) but outside the exported ``model``;
- safety: with ``kd_weight > 0`` a training step that computed no KD term
  (e.g. a ``fit_batch`` override that bypasses ``self.compute_objectives``) is
  an error, as is a teacher that was never attached.

The teacher lives in the target strategy, not in ``modules``: it is never
wrapped by DDP, never saved in the student's checkpoints, and runs on the
student's device without gradients. Options are read from the hparams
(``kd_weight``, ``temperature``, ``kd_loss``, ``kd_topk``, ``blank_mode``, ...;
see ``hparams/distill.yaml``).
"""

from __future__ import annotations

import functools
import logging

import speechbrain as sb
import torch

from speech_kd.kd.augment_rows import AugmentationRows, find_augmenters, time_changing_augmentations
from speech_kd.kd.config import HARD_TARGET_LOSSES, KDConfig, KDSetupError
from speech_kd.kd.consistency import ConsistencySetupError, CRConfig
from speech_kd.kd.layers import LayerProjections, StudentLayers
from speech_kd.kd.recipe_outputs import find_ctc_outputs
from speech_kd.kd.schedules import linear_ramp
from speech_kd.kd.stats import KDEpochTotals
from speech_kd.kd.term import kd_term_loss, layer_term_loss, measured_frame_shift, untranscribed_rows
from speech_kd.targets.align import relative_to_frames
from speech_kd.training.checkpoints import add_random_states, make_atomic

__all__ = ["KDMixin"]

logger = logging.getLogger(__name__)

_WRAPPED = ("compute_forward", "compute_objectives", "on_stage_start", "on_stage_end", "fit_batch", "on_fit_start")
#: the name of the layer projections in the Brain's ``modules`` and its checkpointer's recoverables
PROJECTIONS = "kd_layer_projections"


class KDMixin:
    """Mix a KD term into a CTC Brain's training objective (see the module docstring)."""

    kd_targets = None
    #: whether the host Brain's own objective handles batches mixing transcribed and untranscribed
    #: utterances (``CTCBrain`` masks its CTC per utterance); users' recipes do not
    kd_mixed_batches_ok = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        make_atomic(self.checkpointer)  # the host Brain's checkpoints survive a kill during a save
        add_random_states(self.checkpointer)  # a resumed run draws what the interrupted one would have
        self._kd_install()

    # ------------------------------------------------------------ installation
    def _kd_install(self) -> None:
        """Wrap the instance's hooks (see the module docstring) and follow the hparams' augmenters."""
        self._kd_recipe = {name: getattr(self, name) for name in _WRAPPED}
        for name in _WRAPPED:
            setattr(self, name, getattr(self, f"_kd_{name}"))
        self._kd_rows = AugmentationRows(find_augmenters(self.hparams)) if self.hparams is not None else None
        self._kd_time_changing = bool(self.kd_time_changing_augmentations()) if self.hparams is not None else False
        self._kd_epoch = KDEpochTotals()
        if self.checkpointer is not None and "kd_epoch_totals" not in self.checkpointer.recoverables:
            # optional: checkpoints written before the sums were saved still load
            self.checkpointer.add_recoverable("kd_epoch_totals", self._kd_epoch, optional_load=True)
        self.kd_epoch_stats: dict = {}
        self._kd_checked_frames = False
        self._kd_student_layers: StudentLayers | None = None
        #: student layer -> teacher layer (``kd_layers`` resolved when targets are attached)
        self.kd_layer_pairs: dict[int, int] = {}
        self._kd_checked_optimizer = False
        self._wrap_train_logger()
        self._kd_check_consistency_host()

    def _kd_check_consistency_host(self) -> None:
        """CR-CTC needs a host Brain that makes two views of each utterance (``CTCBrain``): refuse it otherwise."""
        weight = CRConfig.from_hparams(self.hparams).cr_ctc_weight
        if weight > 0.0 and not callable(getattr(self, "consistency_objective", None)):
            raise ConsistencySetupError(
                f"cr_ctc_weight={weight:g}: CR-CTC trains two augmented views of each utterance, which "
                f"{type(self).__name__} does not make (speech_kd's CTCBrain and DistillBrain do: speech-kd train / "
                "distill); set cr_ctc_weight: 0"
            )

    def _wrap_train_logger(self) -> None:
        """Add the epoch's KD numbers to the ``train_stats`` the recipe logs (its own log, unedited)."""
        train_logger = getattr(self.hparams, "train_logger", None)
        if train_logger is None or not hasattr(train_logger, "log_stats") or getattr(train_logger, "_kd_wrapped", 0):
            return
        original = train_logger.log_stats
        brain = self

        def log_stats(*args, **kwargs):
            stats = dict(brain.kd_epoch_stats)
            if stats:
                if len(args) >= 2 and isinstance(args[1], dict):
                    args = (args[0], {**args[1], **{k: v for k, v in stats.items() if k not in args[1]}}, *args[2:])
                elif isinstance(kwargs.get("train_stats"), dict):
                    given = kwargs["train_stats"]
                    kwargs["train_stats"] = {**given, **{k: v for k, v in stats.items() if k not in given}}
            return original(*args, **kwargs)

        train_logger.log_stats = log_stats
        train_logger._kd_wrapped = True

    def attach_targets(self, targets) -> None:
        """Use ``targets(batch, student_lengths, student_max) -> Targets`` (online or cached).

        Refuses, before any training, what cannot work: a mixin that is not
        first in the bases (its wrapping never ran), and cached targets with
        augmentation that moves samples in time (named by yaml key).
        """
        if not hasattr(self, "_kd_recipe"):
            raise KDSetupError(
                f"{type(self).__name__}: KDMixin.__init__ never ran, so KD would not be applied; put KDMixin FIRST in "
                f"the bases: class {type(self).__name__}(KDMixin, ...)"
            )
        if getattr(targets, "reads_cache", False):
            self._kd_check_cache_temperature(targets)
            moving = self.kd_time_changing_augmentations()
            if moving:
                raise KDSetupError(
                    "cached teacher targets were computed on the original audio, but these augmentations move "
                    f"samples in time, so the frames would not line up: {', '.join(moving)}. Remove them from the "
                    "yaml (augmentations that keep the time axis, e.g. DropFreq, DropChunk, AddNoise, stay), or "
                    "use the live teacher (no targets_cache)"
                )
        config = self.kd_config  # built from the hparams, hence validated: a bad option is refused before training
        aligner = getattr(targets, "aligner", None)
        if aligner is not None:  # the teacher's best path is carried to the student's frames only when a loss reads it
            aligner.hard_labels = bool({config.kd_loss, config.unlabeled_kd_loss} & HARD_TARGET_LOSSES)
        if hasattr(targets, "to"):
            targets.to(self.device)
        self.kd_targets = targets
        self._kd_checked_frames = False  # new targets: their aligner learns the student's frame shift anew
        if config.uses_layers:
            self._kd_setup_layers(targets)

    def _kd_setup_layers(self, targets) -> None:
        """``kd_layers``: tap the student's layers, ask the targets for the teacher's, build the projections.

        Everything that can be refused is refused here, before the first batch: no layer list found,
        a layer past either model's depth, an ensemble teacher, a cache without those layers, a
        student scripted by ``--jit`` (forward hooks do not survive ``torch.jit.script``). Targets
        attached again (another strategy for the same run) keep the projections when the pairs and
        widths are the same; other ones are refused once the optimiser holding the first exists.
        """
        config = self.kd_config
        if not hasattr(targets, "request_layers"):
            raise KDSetupError(f"kd_layers: these targets ({type(targets).__name__}) hand out no teacher layers")
        student = StudentLayers(self.modules, vars(self.hparams), config.kd_student_layers)
        self._kd_check_jit(student)
        wanted = (  # the cache-targets --hidden_layers that would serve this run (for a cache without them)
            f"auto:{student.depth}"
            if config.kd_layers == "auto"
            else ",".join(str(t) for t in sorted({t for _, t in config.kd_layers}))
        )
        teacher_depth = targets.layer_count(config.kd_teacher_layers, wanted)
        pairs = config.layer_pairs(
            student.depth, teacher_depth, student=f"the student ({student.name})", teacher=targets.teacher_name
        )
        teacher_widths = targets.request_layers(sorted(set(pairs.values())))
        student_widths = student.output_widths(sorted(pairs))
        widths = {s: (student_widths[s], teacher_widths[t]) for s, t in sorted(pairs.items())}
        projections = self._kd_projections(pairs, widths)
        student.tap(sorted(pairs))
        if self._kd_student_layers is not None and self._kd_student_layers.taps is not None:
            self._kd_student_layers.taps.remove()
        self._kd_student_layers, self.kd_layer_pairs = student, pairs
        self.kd_layer_report = (
            f"layers: student {student.name} ({student.depth}) -> {targets.teacher_name} ({teacher_depth}): "
            + ", ".join(f"{s}->{t}" for s, t in sorted(pairs.items()))
            + f"; {config.kd_layer_loss} loss, weight {config.kd_layer_weight:g}; "
            f"{sum(p.numel() for p in projections.parameters())} projection parameters (trained, not exported)"
        )
        logger.info("kd_layers: %s", self.kd_layer_report)

    def _kd_projections(self, pairs: dict[int, int], widths: dict[int, tuple[int, int]]) -> LayerProjections:
        """The layer projections of ``pairs`` (student -> teacher layer) and ``widths`` (student -> ``(D_s, D_t)``).

        Those already in ``modules`` are kept when their pairs and widths are these (targets attached
        again: the optimiser, DDP and a loaded checkpoint hold them); other ones are built, into
        ``modules`` and the checkpointer, only while no optimiser exists, since one built before
        would not train them.
        """
        held = self.modules[PROJECTIONS] if PROJECTIONS in self.modules else None
        held = getattr(held, "module", held)  # under DDP, the wrapped projections
        if held is not None and held.widths == widths and self.kd_layer_pairs == pairs:
            return held
        if held is not None and self._kd_optimizers():
            raise KDSetupError(
                f"kd_layers: the targets attached now map layers {pairs} with widths {widths} (student layer: "
                f"(student width, teacher width)), the optimiser holds projections for {self.kd_layer_pairs} with "
                f"{held.widths}; attach the targets before fit builds the optimiser, or keep kd_layers and the "
                "teacher's layers as they were"
            )
        projections = LayerProjections(widths).to(self.device)
        self.modules[PROJECTIONS] = projections  # the optimiser (built when fit starts) and DDP take it from here
        if self.checkpointer is not None:
            if PROJECTIONS in self.checkpointer.recoverables:
                self.checkpointer.recoverables[PROJECTIONS] = projections
            else:
                self.checkpointer.add_recoverable(PROJECTIONS, projections)
        self._kd_checked_optimizer = False  # new parameters: checked against the optimiser at the next step
        return projections

    def _kd_check_jit(self, student: StudentLayers) -> None:
        """Refuse ``--jit`` scripting a module that holds the student's layers, or the projections.

        Forward hooks do not survive ``torch.jit.script``. The modules scripted are ``jit_module_keys``
        (all of ``modules`` when unset), as SpeechBrain's ``Brain._compile`` picks them.
        """
        if not getattr(self, "jit", False):
            return
        keys = getattr(self, "jit_module_keys", None)
        scripted = set(self.modules) if keys is None else set(keys) & set(self.modules)
        first_layer = student.stack[0]
        hit = sorted(
            name
            for name in scripted
            if name == PROJECTIONS or any(module is first_layer for module in self.modules[name].modules())
        )
        if hit:
            raise KDSetupError(
                f"kd_layers takes the student's layers by forward hooks, which torch.jit.script drops, and --jit "
                f"scripts {', '.join(hit)}: run without --jit, or leave those modules out of jit_module_keys"
            )

    def _kd_optimizers(self) -> dict:
        """The Brain's optimisers by name (``{}`` before ``init_optimizers``)."""
        optimizers = dict(getattr(self, "optimizers_dict", None) or {})
        if not optimizers and getattr(self, "optimizer", None) is not None:
            optimizers = {"optimizer": self.optimizer}
        return optimizers

    def _kd_check_cache_temperature(self, targets) -> None:
        """A cache keeps the tail its ``max_temperature`` needs: a higher KD temperature would read it too flat."""
        ceiling = getattr(targets, "max_temperature", None)
        config = self.kd_config
        if ceiling is None or "kl" not in {config.kd_loss, config.unlabeled_kd_loss or config.kd_loss}:
            return  # only the KL softens the teacher's distribution
        for key in ("temperature", "temperature_final"):
            value = self.kd_option(key)
            if value is not None and float(value) > ceiling + 1e-9:
                raise KDSetupError(
                    f"{key}={value} but the targets cache was built for temperatures up to {ceiling:g}: its frames "
                    "keep only the tokens that matter up to that temperature; rebuild it with speech-kd "
                    f"cache-targets ... --max_temperature {value} (more bytes per frame, docs/cache.md) or lower {key}"
                )

    def kd_time_changing_augmentations(self) -> list[str]:
        """Yaml keys of augmentations that would misalign cached targets (see ``augment_rows``)."""
        return time_changing_augmentations(self.hparams)

    # ---------------------------------------------------------------- options
    @property
    def kd_config(self) -> KDConfig:
        """The KD options of the hparams (:class:`~speech_kd.kd.config.KDConfig`: one default for each).

        Read again when an option changes, so a schedule or a benchmark that
        sets ``hparams.kd_weight`` between steps is followed.
        """
        names = KDConfig.option_names()
        key = tuple(repr(getattr(self.hparams, name, None)) for name in names)
        if getattr(self, "_kd_config_key", None) != key:
            self._kd_config = KDConfig.from_hparams(self.hparams)
            self._kd_config_key = key
        return self._kd_config

    def kd_option(self, name: str):
        """One KD setting (``kd_reduction``'s ``auto`` resolved for the recipe's CTC loss)."""
        value = getattr(self.kd_config, name)
        if name == "kd_reduction" and value == "auto":
            value = self._kd_auto_reduction()
        return value

    def _kd_auto_reduction(self) -> str:
        """``kd_reduction`` matching the scale of the recipe's CTC loss (``auto``, the mixin's default).

        SpeechBrain's ``ctc_loss(reduction="batchmean")`` (the LibriSpeech
        recipes) sums over frames and averages over utterances: KD summed the
        same way (``utterance``) mixes like with like. ``reduction="mean"``
        (its default, e.g. TIMIT) divides by the transcript lengths, the
        scale of a per-frame mean (``frame``). Found in the hparams'
        ``!name:speechbrain.nnet.losses.ctc_loss`` entries; none found:
        ``utterance``.
        """
        if getattr(self, "_kd_reduction_found", None) is None:
            reductions = [
                value.keywords.get("reduction", "mean")
                for value in vars(self.hparams).values()
                if isinstance(value, functools.partial) and getattr(value.func, "__name__", "") == "ctc_loss"
            ]
            found = "frame" if reductions and reductions[0] == "mean" else "utterance"
            logger.info(
                "kd_reduction=%s (auto: the recipe's CTC loss has reduction=%s)",
                found,
                reductions[0] if reductions else "not found: batchmean assumed",
            )
            self._kd_reduction_found = found
        return self._kd_reduction_found

    def kd_schedule(self) -> tuple[float, float]:
        """``(kd_weight, temperature)`` for the current epoch."""
        epoch = (
            max(1, getattr(self.hparams.epoch_counter, "current", 1)) if hasattr(self.hparams, "epoch_counter") else 1
        )
        ramp = self.kd_option("kd_ramp_epochs")
        weight = linear_ramp(self.kd_option("kd_weight"), self.kd_option("kd_weight_final"), epoch, ramp)
        weight *= getattr(self, "kd_weight_scale", 1.0)  # set by a remedy that anneals KD (1.0: none)
        temp = linear_ramp(self.kd_option("temperature"), self.kd_option("temperature_final"), epoch, ramp)
        return weight, temp

    # ------------------------------------------------------------ the KD term

    def kd_student_outputs(self, predictions) -> tuple[torch.Tensor, torch.Tensor]:
        """Student frame log-probs ``[B, T, V]`` and relative lengths ``[B]`` from ``compute_forward``.

        Found by :func:`speech_kd.kd.recipe_outputs.find_ctc_outputs` (the first
        log-probability tensor and the first relative-length vector; the yaml's
        ``kd_outputs: [i, j]`` names them). Override for other layouts.
        """
        return find_ctc_outputs(predictions, self.kd_option("kd_outputs"))

    def _kd_batch_rows(self, batch, student_rows: int) -> dict:
        """What the target strategy needs to give one target row per student row (audio, row maps)."""
        extra = {}
        rows = self._kd_rows
        augmented = rows is not None and rows.calls
        # the live teacher hears the clean utterance whenever the augmentation keeps the time axis (noise,
        # dropped chunks or frequencies), as the cache does: the student learns to map augmented audio to what
        # the teacher says of clean audio, and live and cached runs optimise the same thing
        clean = getattr(self.kd_targets, "reads_cache", False) or not self._kd_time_changing
        if augmented:
            index = rows.utterance_rows if clean else rows.teacher_rows
            views = getattr(self, "output_rows", None)
            if views is not None:  # CR-CTC's two views of the augmented rows: augmenter rows first, then the views
                index = self._kd_compose_views(index, views, rows)
            if index is not None:
                extra["rows"] = index.to(self.device)
            if rows.wavs is not None and not clean:
                extra["wavs"] = rows.wavs
        else:
            if getattr(self, "shared_features", None) is not None:
                extra["features"] = self.shared_features
            if getattr(self, "perturbed_wavs", None) is not None:
                extra["wavs"] = self.perturbed_wavs
            if getattr(self, "output_rows", None) is not None:
                # CR-CTC's two views of each utterance: both read that utterance's targets (the teacher ran
                # once on the B utterances' audio or features, or the cache was read once by ID)
                extra["rows"] = self.output_rows.to(self.device)
        n_utts = len(batch.id)
        expected = n_utts
        if "rows" in extra:
            expected = extra["rows"].shape[0]
        elif "wavs" in extra:
            expected = extra["wavs"][0].shape[0]
        if student_rows != expected:
            raise KDSetupError(
                f"the student's output has {student_rows} rows for {n_utts} utterances and speech_kd cannot tell "
                "which utterance each row is: augment with SpeechBrain's Augmenter kept in the hparams (e.g. "
                "wav_augment), whose rows are followed, or set self.perturbed_wavs = (wavs, wav_lens) in "
                "compute_forward after changing the rows"
            )
        return extra

    def _kd_compose_views(
        self, index: torch.Tensor | None, views: torch.Tensor, rows: AugmentationRows
    ) -> torch.Tensor:
        """Target row of each of CR-CTC's ``2B'`` rows: the Augmenter's row map ``index [B']`` after ``views [2B']``.

        ``views`` (``output_rows``) names, for each output row, the augmented
        row it is a view of; ``index`` the utterance (or teacher audio) row of
        each augmented row, ``None`` when the teacher hears the augmented rows
        themselves. Views made of other rows than the Augmenter's output
        cannot be mapped: refused.
        """
        views = views.to(self.device)
        made = rows.utterance_rows.shape[0]
        if views.shape[0] != 2 * made:
            raise KDSetupError(
                f"CR-CTC (cr_ctc_weight) made {views.shape[0]} rows, two views of {views.shape[0] // 2}, but the "
                f"Augmenter ({', '.join(rows.calls)}) gave {made} rows: speech_kd follows both only when the views "
                "are made of the Augmenter's rows (augment first, then the views)"
            )
        return views if index is None else index.to(self.device)[views]

    def _kd_check_frames(self, log_probs: torch.Tensor, extra: dict, batch) -> None:
        """First training batch: the student's frame count must fit ``frame_shift`` (measured when unset)."""
        if self._kd_checked_frames:
            return
        self._kd_checked_frames = True
        wavs = extra["wavs"][0] if "wavs" in extra else batch.sig[0]
        seconds = wavs.shape[-1] / float(self.kd_option("sample_rate"))
        frames = log_probs.shape[1]
        aligner = getattr(self.kd_targets, "aligner", None)
        declared = getattr(aligner, "student_frame_shift", None) if aligner is not None else None
        if declared is None:
            declared = getattr(self.hparams, "frame_shift", None)
        if declared is None and aligner is not None:
            measured = measured_frame_shift(seconds, frames)
            aligner.set_student_frame_shift(measured)
            logger.info(
                "student frame shift measured on the first batch: %.3f s (%d frames for %.2f s)",
                measured,
                frames,
                seconds,
            )
            return
        if declared is None:
            return
        expected = seconds / declared
        if not 0.8 <= frames / expected <= 1.25:
            raise KDSetupError(
                f"the student's CTC output has {frames} frames for {seconds:.2f} s of audio, about "
                f"{seconds / frames * 1000:.1f} ms per frame, but frame_shift is {declared * 1000:.1f} ms: set "
                "frame_shift to the model's output frame shift (or remove it to have it measured), or, if "
                "that output is not the CTC log-probabilities, set kd_outputs"
            )

    def kd_term(
        self, predictions, batch, temperature: float, loss_name: str | None = None
    ) -> tuple[torch.Tensor, dict]:
        """KD loss between the student's outputs and the teacher targets for ``batch`` (:func:`kd_term_loss`).

        ``loss_name``: the KD loss (default ``kd_loss``; ``unlabeled_kd_loss``
        for untranscribed batches).
        """
        log_probs, wav_lens = self.kd_student_outputs(predictions)
        student_max = log_probs.shape[1]
        extra = self._kd_batch_rows(batch, log_probs.shape[0])
        self._kd_check_frames(log_probs, extra, batch)
        lengths = relative_to_frames(wav_lens, student_max)
        targets = self.kd_targets(batch, lengths, student_max, **extra)
        reduction = self.kd_option("kd_reduction")
        loss, stats = kd_term_loss(log_probs, lengths, targets, self.kd_config, temperature, reduction, loss_name)
        if not self.kd_layer_pairs:
            return loss, stats
        # layer distillation: kd = output KD + kd_layer_weight * layer loss; kd_loss stays the output KD's
        config = self.kd_config
        projected = self.modules[PROJECTIONS](self._kd_student_layers.take(student_max))
        layers = layer_term_loss(
            projected, targets.hiddens or {}, self.kd_layer_pairs, targets.mask, config.kd_layer_loss, reduction
        )
        stats.update(kd_loss=loss.detach(), layer_loss=layers.detach())
        return loss + config.kd_layer_weight * layers, stats

    # ------------------------------------------------------------ the wrappers
    def _kd_compute_forward(self, batch, stage):
        """The recipe's ``compute_forward``, with its training batch's ``Augmenter`` calls followed."""
        training = stage == sb.Stage.TRAIN and self.kd_targets is not None
        rows = self._kd_rows if training else None
        taps = self._kd_student_layers.taps if training and self._kd_student_layers is not None else None
        if rows is None and taps is None:
            return self._kd_recipe["compute_forward"](batch, stage)
        if rows is not None:
            rows.reset(len(batch.id))
            rows.active = True
        if taps is not None:  # the student's mapped layers, kept for this batch's layer loss
            taps.take()
            taps.active = True
        try:
            return self._kd_recipe["compute_forward"](batch, stage)
        finally:
            if rows is not None:
                rows.active = False
            if taps is not None:
                taps.active = False

    def _kd_compute_objectives(self, predictions, batch, stage):
        """The recipe's objective, mixed with KD on training batches."""
        recipe_objectives = self._kd_recipe["compute_objectives"]
        if stage != sb.Stage.TRAIN:
            return recipe_objectives(predictions, batch, stage)
        weight, temperature = self.kd_schedule()
        untranscribed = untranscribed_rows(batch) or []
        all_untranscribed = bool(untranscribed) and all(untranscribed)
        if weight == 0.0 and not all_untranscribed:
            return recipe_objectives(predictions, batch, stage)
        if weight == 0.0 and self.kd_targets is not None:
            # KD faded out (annealing, a schedule to 0): an untranscribed batch teaches nothing now
            log_probs, _ = self.kd_student_outputs(predictions)
            self._kd_step_done = True
            return log_probs.sum() * 0.0
        if self.kd_targets is None:
            raise KDSetupError(
                f"kd_weight={weight:g} but no teacher targets are attached: add "
                "`asr_brain.attach_targets(make_targets(hparams, token_strings(tokenizer)))` after creating the Brain"
                + (" (untranscribed utterances can only be trained with a teacher)" if all_untranscribed else "")
            )
        if all_untranscribed:
            # no transcript: the KD term alone, weighted as in a transcribed batch (kd_weight, its schedule and
            # annealing), so KD's share of the gradient is the same on every batch and fades with it; the
            # recipe's objective never sees these rows
            loss_name = self.kd_option("unlabeled_kd_loss") or self.kd_option("kd_loss")
            kd, stats = self.kd_term(predictions, batch, temperature, loss_name=loss_name)
            self._kd_epoch.add(None, kd, stats)
            self._kd_step_done = True
            return weight * kd
        if any(untranscribed) and not self.kd_mixed_batches_ok:
            n = sum(untranscribed)
            raise KDSetupError(
                f"a training batch mixes {n} untranscribed and {len(untranscribed) - n} transcribed utterances; the "
                "recipe's compute_objectives cannot leave out the CTC of the untranscribed ones. Batch them apart "
                "(speech_kd's training data loader does), or drop the rows with an empty wrd"
            )
        ctc = recipe_objectives(predictions, batch, stage)
        kd, stats = self.kd_term(predictions, batch, temperature)
        consistency = getattr(self, "consistency_term", None)  # CR-CTC's weighted term, inside the recipe's loss
        self._kd_epoch.add(ctc if consistency is None else ctc.detach() - consistency.detach(), kd, stats)
        self._kd_step_done = True
        loss = (1.0 - weight) * ctc + weight * kd
        if consistency is not None:
            # (1 - w) scaled the recipe's consistency term c down with its CTC; give it the rest, so that
            # loss = (1 - w) * CTC + w * KD + c: cr_ctc_weight means the same with or without KD
            loss = loss + weight * consistency
        return loss

    def _kd_on_fit_start(self):
        """The recipe's hook (which recovers the newest checkpoint); a checkpoint that does not fit is told in one line.

        A folder trained with other ``kd_layers`` (or none) holds other layer projections and optimiser
        parameter groups: continuing it needs a new output folder, not ``--allow_changed_settings``.
        """
        try:
            return self._kd_recipe["on_fit_start"]()
        except RuntimeError as err:
            text = str(err)
            if "state_dict" not in text and "load path" not in text and "parameter group" not in text:
                raise
            folder = getattr(self.checkpointer, "checkpoints_dir", "the checkpoint folder")
            raise KDSetupError(
                f"{folder}: its checkpoints do not fit this run's modules ({text.splitlines()[0]}); a run whose "
                "network or kd_layers changed cannot continue them: use a new output_folder"
            ) from err

    def _kd_on_stage_start(self, stage, epoch=None):
        """Reset the per-epoch KD statistics, then the recipe's hook.

        A training stage that starts at a step past 0 was resumed from an
        intra-epoch checkpoint: it keeps the sums that checkpoint restored.
        """
        if stage != sb.Stage.TRAIN or not getattr(self, "step", 0):
            self._kd_epoch.reset()
        if stage == sb.Stage.TRAIN:
            self.kd_epoch_stats = {}
        return self._kd_recipe["on_stage_start"](stage, epoch)

    def _kd_on_stage_end(self, stage, stage_loss, epoch=None):
        """Compute the epoch's KD statistics (all processes), then the recipe's hook (which logs them)."""
        if stage == sb.Stage.TRAIN:
            self.kd_epoch_stats = self.kd_stats()
        return self._kd_recipe["on_stage_end"](stage, stage_loss, epoch)

    def _kd_fit_batch(self, batch):
        """The recipe's ``fit_batch``; with ``kd_weight > 0``, a step without a KD term is an error."""
        self._kd_step_done = False
        if self.kd_layer_pairs and not self._kd_checked_optimizer:
            self._kd_check_optimizer()
        try:
            outputs = self._kd_recipe["fit_batch"](batch)
        finally:
            if self._kd_student_layers is not None and self._kd_student_layers.taps is not None:
                self._kd_student_layers.taps.take()  # a batch without a KD term (weight 0) leaves them unread
        weight, _ = self.kd_schedule()
        if weight > 0.0 and not self._kd_step_done:
            raise KDSetupError(
                f"kd_weight={weight:g} but this training step computed no KD term: the Brain's fit_batch did not "
                "call self.compute_objectives(predictions, batch, sb.Stage.TRAIN) (a fit_batch override that calls "
                "another loss function, or a class method directly, bypasses KD); call self.compute_objectives"
            )
        return outputs

    def _kd_check_optimizer(self) -> None:
        """The layer projections must be in an optimiser (a recipe's own ``init_optimizers`` may leave them out)."""
        self._kd_checked_optimizer = True
        held = {id(p) for opt in self._kd_optimizers().values() for group in opt.param_groups for p in group["params"]}
        if any(id(p) not in held for p in self.modules[PROJECTIONS].parameters()):
            raise KDSetupError(
                "kd_layers: the layer projections are in no optimiser (this Brain's init_optimizers builds its "
                f"optimisers from other parameters): add self.modules.{PROJECTIONS}.parameters() to one of them"
            )

    # ---------------------------------------------------------------- statistics
    def kd_stats(self) -> dict:
        """Per-epoch means of the KD numbers (for the train logger); empty if no KD ran.

        Under DDP the sums and counts of all processes are combined, so the
        means cover every training batch of the epoch; call it on every
        process (as ``on_stage_end`` is). After a resume from an intra-epoch
        checkpoint they cover the batches before it too.
        """
        stats = self._kd_epoch.means()
        if not stats:
            return {}
        weight, temperature = self.kd_schedule()
        stats.update(kd_weight=weight, temperature=temperature)
        return stats
