"""CTC training Brain: the forward chain, the CTC objective and the Brain hooks.

The model is whatever the yaml's ``encoder_chain`` lists, run in order, e.g.
``[compute_features, normalize, CNN, enc, ctc_lin, log_softmax]``. The same
chain becomes the exported model's ``LengthsCapableSequential`` encoder, so
training and inference cannot drift apart. Augmentations are inserted at
fixed points: waveform augmentation before the chain, SpecAugment after
``normalize``. With ``cr_ctc_weight > 0`` (CR-CTC, :mod:`speech_kd.kd.consistency`)
each training batch of ``B`` utterances leaves ``normalize`` as ``2B`` rows, two
independently SpecAugmented views of each utterance, and the loss adds
``cr_ctc_weight`` times their consistency; dev, test and the exported model
see one row per utterance, as without it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import speechbrain as sb
import torch
from speechbrain.decoders.ctc import ctc_greedy_decode

from speech_kd.kd.consistency import (
    ConsistencySetupError,
    CRConfig,
    check_ctc_reduction,
    consistency_loss,
    two_views,
    view_rows,
)
from speech_kd.kd.term import untranscribed_rows
from speech_kd.nnet.chain import run_chain
from speech_kd.nnet.features import SharedFeatures, fbank_signature
from speech_kd.scoring.metrics import error_rates
from speech_kd.training.checkpoints import add_random_states, make_atomic
from speech_kd.training.distributed import gather_objects, is_distributed, rank, weighted_mean_across, world_size
from speech_kd.training.epoch_sums import EpochSums
from speech_kd.training.history import write_history_line

__all__ = ["CTCBrain", "NonFiniteLossError", "run_chain"]

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Training stopped: the loss kept being NaN/inf (the message lists the likely causes)."""


def _grads_finite(parameters) -> bool:
    """Whether every gradient is finite (one host sync for all of them)."""
    grads = [p.grad.detach() for p in parameters if p.grad is not None]
    if not grads:
        return True
    foreach_norm = getattr(torch, "_foreach_norm", None)
    norms = foreach_norm(grads) if foreach_norm is not None else [torch.linalg.vector_norm(g) for g in grads]
    return bool(torch.isfinite(torch.stack([n.float() for n in norms])).all())


class CTCBrain(sb.Brain):
    """Character CTC ASR: greedy decoding, WER/CER on dev and test.

    Expects in ``hparams``: ``encoder_chain``, the modules it names (trainable
    ones in ``modules``), ``ctc_cost``, ``blank_index``, ``lr_scheduler``,
    ``epoch_counter``, ``train_logger``, and optionally ``wav_augment`` /
    ``speed_perturb``, ``spec_augment_time`` / ``spec_augment_freq`` /
    ``spec_augment``, ``cr_ctc_weight`` (CR-CTC, :class:`~speech_kd.kd.consistency.CRConfig`).
    ``self.tokenizer`` must be set before fitting.

    Under DDP (``torchrun``) the numbers it logs cover all processes: the
    training loss and the KD statistics are combined over the processes'
    batches, and WER/CER are computed from the hypotheses of all processes
    (de-duplicated by utterance ID: SpeechBrain 1.1.2 gives every process the
    whole dev and test sets). A batch with a non-finite loss or non-finite
    gradients updates nothing; more than ``--nonfinite_patience`` such
    batches in an epoch stop the run with :class:`NonFiniteLossError`.
    """

    tokenizer = None
    #: long ``[2B]``: for each row of the training batch's outputs, the row of the ``B`` it is a view of (CR-CTC
    #: makes two rows of each: the utterances', or the rows an ``Augmenter`` made of them before the forward);
    #: ``None``: one row per utterance. Set by ``compute_forward``.
    output_rows: torch.Tensor | None = None
    #: ``cr_ctc_weight * CR`` of the current training batch, attached (part of ``compute_objectives``'s
    #: loss; ``KDMixin`` reads it to keep it out of the KD mixing); ``None`` without two views
    consistency_term: torch.Tensor | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        make_atomic(self.checkpointer)  # a kill during a save cannot leave a checkpoint that fails to load
        add_random_states(self.checkpointer)  # a resumed run draws what the interrupted one would have
        self._cr_sums = EpochSums(("cr_loss",))
        if self.cr_config.enabled and self.checkpointer is not None:
            # the resumed epoch's cr_loss covers its batches before the kill too (optional: older checkpoints load)
            self.checkpointer.add_recoverable("cr_epoch_sums", self._cr_sums, optional_load=True)

    @property
    def cr_config(self) -> CRConfig:
        """The CR-CTC options of the hparams (:class:`~speech_kd.kd.consistency.CRConfig`: one default for each)."""
        return CRConfig.from_hparams(self.hparams)

    def check_consistency_setup(self) -> None:
        """Refuse CR-CTC that cannot work as set up (called before the first batch).

        Its two views need SpecAugment, and its consistency term has the
        scale of a ``batchmean`` CTC (:func:`~speech_kd.kd.consistency.check_ctc_reduction`).

        Raises
        ------
        speech_kd.kd.consistency.ConsistencySetupError
            ``cr_ctc_weight > 0`` without ``spec_augment: True``, with an
            ``encoder_chain`` that has no ``normalize`` (SpecAugment's place),
            or with a ``ctc_cost`` whose ``reduction`` is not ``batchmean``.
        """
        weight = self.cr_config.cr_ctc_weight
        if weight <= 0.0:
            return
        if not getattr(self.hparams, "spec_augment", False):
            raise ConsistencySetupError(
                f"cr_ctc_weight={weight:g} needs feature augmentation to make the two views of each utterance "
                "differ: set spec_augment: True (--spec_augment=True); without it the views differ by dropout "
                "alone (not at all at dropout 0) and the consistency term is about 0"
            )
        if "normalize" not in self.hparams.encoder_chain:
            raise ConsistencySetupError(
                f"cr_ctc_weight={weight:g}: the two views are made where SpecAugment runs, after the chain's "
                f"normalize module, and encoder_chain {list(self.hparams.encoder_chain)} has none"
            )
        check_ctc_reduction(weight, getattr(self.hparams, "ctc_cost", None))

    # ------------------------------------------------------------------ forward
    def _module_table(self) -> dict:
        table = {}
        for name in self.hparams.encoder_chain:
            table[name] = self.modules[name] if name in self.modules else getattr(self.hparams, name)
        return table

    def _augment_hooks(self, stage) -> dict:
        if stage != sb.Stage.TRAIN or not getattr(self.hparams, "spec_augment", False):
            return {}

        def spec_augment(feats):
            feats = self.hparams.spec_augment_time(feats)
            return self.hparams.spec_augment_freq(feats)

        return {"normalize": spec_augment}

    def compute_forward(self, batch, stage):
        """Waveforms -> frame log-probs ``[B, T, V]``; returns ``(log_probs, wav_lens)``.

        On clean (not speed-perturbed) training batches the fbank output is
        kept in ``self.shared_features`` for a teacher with the same fbank.
        Speed-perturbed training waveforms are kept in ``self.perturbed_wavs``
        (``(wavs [B, S'], wav_lens [B])``), so that a live teacher hears the
        same perturbed audio as the student and their frames line up.

        CR-CTC (``cr_ctc_weight > 0``): a training batch with a transcript
        leaves ``normalize`` as two SpecAugmented views of each utterance, so
        the outputs are ``[2B, T, V]`` and ``[2B]`` (view *a*, then view *b*)
        and ``self.output_rows`` names each row's utterance. The fbank, the
        normalisation statistics, the speed perturbation and the features kept
        for the teacher are those of the ``B`` utterances, computed once.
        """
        batch = batch.to(self.device)
        wavs, wav_lens = batch.sig
        perturbed = stage == sb.Stage.TRAIN and getattr(self.hparams, "speed_perturb", False)
        self.perturbed_wavs = None
        self.output_rows, self.consistency_term = None, None
        if perturbed:
            wavs = self.hparams.wav_augment(wavs)
            self.perturbed_wavs = (wavs, wav_lens)
        hooks = self._augment_hooks(stage)
        out_lens = wav_lens
        if self._makes_views(batch, stage):
            augment, out_lens = hooks["normalize"], wav_lens.repeat(2)
            hooks["normalize"] = lambda feats: (two_views(feats, augment), out_lens)
            self.output_rows = view_rows(wav_lens.shape[0], device=wav_lens.device)
        self.shared_features = None
        first = self.hparams.encoder_chain[0]
        signature = self._feature_signature()
        if stage == sb.Stage.TRAIN and not perturbed and signature is not None and first not in hooks:
            hooks[first] = self._keep_features(wav_lens, signature)
        log_probs = run_chain(
            self._module_table(),
            self.hparams.encoder_chain,
            wavs,
            wav_lens,
            after=hooks,
            epoch=self.hparams.epoch_counter.current,
        )
        return log_probs, out_lens

    def _makes_views(self, batch, stage) -> bool:
        """Whether this batch is trained as two views (CR-CTC): training batches with a transcript.

        A batch of untranscribed utterances only (KD-only batches of
        ``speech-kd distill --unlabeled_splits``) keeps one view: CR-CTC
        regularises the CTC of transcribed batches (``docs/design.md``).
        """
        if stage != sb.Stage.TRAIN or not self.cr_config.enabled:
            return False
        self.check_consistency_setup()
        untranscribed = untranscribed_rows(batch)
        return not (untranscribed and all(untranscribed))

    def _feature_signature(self) -> tuple | None:
        """``fbank_signature`` of the chain's first module (computed once)."""
        if not hasattr(self, "_fbank_signature"):
            self._fbank_signature = fbank_signature(self._module_table()[self.hparams.encoder_chain[0]])
        return self._fbank_signature

    def _keep_features(self, wav_lens: torch.Tensor, signature: tuple):
        def keep(feats: torch.Tensor) -> torch.Tensor:
            self.shared_features = SharedFeatures(feats.detach(), wav_lens, signature)
            return feats

        return keep

    def ctc_objective(self, predictions, batch) -> torch.Tensor:
        """CTC loss of the student outputs against the transcripts.

        Utterances without a transcript (empty ``wrd``, untranscribed audio)
        are left out, per utterance; a batch of them only has a CTC loss of 0
        (still attached to the graph). ``speech_kd``'s training batches are
        never mixed (:mod:`speech_kd.training.unlabeled`); this keeps any other loader safe.
        """
        log_probs, wav_lens = predictions
        tokens, token_lens = batch.tokens
        rows = getattr(self, "output_rows", None)
        if rows is not None:  # two views (CR-CTC): each view is trained on its utterance's transcript
            tokens, token_lens = tokens[rows.to(tokens.device)], token_lens[rows.to(token_lens.device)]
        words = getattr(batch, "wrd", None)
        if words is not None and not isinstance(words, torch.Tensor) and any(not str(w).strip() for w in words):
            keep = torch.tensor([bool(str(w).strip()) for w in words], device=log_probs.device)
            if rows is not None:
                keep = keep[rows.to(keep.device)]
            if not keep.any():
                return log_probs.sum() * 0.0
            log_probs, wav_lens = log_probs[keep], wav_lens[keep]
            # relative token lengths stay relative to the same padded width
            tokens, token_lens = tokens[keep.to(tokens.device)], token_lens[keep.to(token_lens.device)]
        return self.hparams.ctc_cost(log_probs, tokens, wav_lens, token_lens)

    def compute_objectives(self, predictions, batch, stage):
        """CTC loss (CR-CTC: of both views, plus the consistency term); on dev/test also decode and keep hypotheses.

        With two views the CTC is SpeechBrain's ``batchmean`` over the ``2B``
        rows, the mean of the two views' CTC: the scale of a run without CR.
        """
        loss = self.ctc_objective(predictions, batch)
        if stage == sb.Stage.TRAIN:
            consistency = self.consistency_objective(predictions)
            if consistency is not None:
                loss = loss + consistency
        else:
            self._collect_hypotheses(predictions, batch)
        return loss

    def consistency_objective(self, predictions: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor | None:
        """``cr_ctc_weight * CR`` of a training batch made of two views; ``None`` when it has one.

        CR is :func:`~speech_kd.kd.consistency.consistency_loss` of the outputs
        ``[2B, T, V]``; it is added to the epoch's ``cr_loss`` (unweighted) and
        kept, weighted and attached, in ``self.consistency_term``.
        """
        if self.output_rows is None:
            return None
        log_probs, lens = predictions
        consistency = consistency_loss(log_probs, lens)
        self._cr_sums.add({"cr_loss": consistency})
        self.consistency_term = self.cr_config.cr_ctc_weight * consistency
        return self.consistency_term

    def _collect_hypotheses(self, predictions, batch) -> None:
        log_probs, wav_lens = predictions
        sequences = ctc_greedy_decode(log_probs, wav_lens, blank_id=self.hparams.blank_index)
        for uid, seq, ref in zip(batch.id, sequences, batch.wrd):
            self._ids.append(uid)
            self._hyps.append("".join(self.tokenizer.decode_ndim(seq)))
            self._refs.append(ref)

    # ------------------------------------------------------------------- hooks
    def make_dataloader(self, dataset, stage, ckpt_prefix="dataloader-", **loader_kwargs):
        """Remember the number of training batches (this process's share) for the LR schedule.

        A ``batch_sampler`` with ``set_epoch`` (``DynamicBatchSampler``) is
        made the Brain's ``train_sampler`` in a single process too, so every
        epoch draws new batches from ``seed + epoch``: SpeechBrain only does
        this for the DDP wrapper, and without it each epoch would repeat the
        first epoch's batches in the same order.
        """
        loader = super().make_dataloader(dataset, stage, ckpt_prefix, **loader_kwargs)
        if stage == sb.Stage.TRAIN:
            self._train_batches = len(loader)
            batch_sampler = loader_kwargs.get("batch_sampler")
            if self.train_sampler is None and hasattr(batch_sampler, "set_epoch"):
                self.train_sampler = batch_sampler
        return loader

    def on_fit_start(self):
        """Refuse a CR-CTC setup that cannot work, recover checkpoints, then size the LR schedule to the whole run."""
        self.check_consistency_setup()
        super().on_fit_start()
        batches = getattr(self, "_train_batches", None)
        if batches and hasattr(self.hparams, "lr_scheduler"):
            steps = batches * self.hparams.number_of_epochs // max(1, self.grad_accumulation_factor)
            self.hparams.lr_scheduler.set_total_steps(steps)

    def on_fit_batch_start(self, batch, should_step):
        """Remember the batch's utterance IDs (named if its loss is not finite)."""
        self._batch_ids = list(getattr(batch, "id", []))

    def on_fit_batch_end(self, batch, outputs, loss, should_step):
        """Advance the per-step learning-rate schedule."""
        if should_step:
            self.hparams.lr_scheduler(self.optimizer)

    # ------------------------------------------------------ non-finite losses
    def check_loss_isfinite(self, loss):
        """Count a non-finite loss, name its batch, and stop once ``--nonfinite_patience`` is exceeded.

        Called by ``Brain.fit_batch`` before ``backward``. The batch's update
        is then skipped by :meth:`optimizers_step` (its gradients are not
        finite). The count restarts every epoch, as in SpeechBrain.
        """
        if torch.isfinite(loss):
            return
        self.nonfinite_count = getattr(self, "nonfinite_count", 0) + 1
        ids = getattr(self, "_batch_ids", [])
        self._nonfinite_ids = (getattr(self, "_nonfinite_ids", []) + [ids[:5]])[-3:]
        logger.warning(
            "non-finite training loss (%s) on batch %d of epoch %s (%s%s): update skipped; %d of "
            "--nonfinite_patience=%d this epoch",
            float(loss.detach()),
            self.step,
            self.hparams.epoch_counter.current,
            ", ".join(ids[:5]),
            ", ..." if len(ids) > 5 else "",
            self.nonfinite_count,
            self.nonfinite_patience,
        )
        if self.nonfinite_count > self.nonfinite_patience:
            raise NonFiniteLossError(self._nonfinite_message())

    def _nonfinite_message(self) -> str:
        hp = self.hparams
        lr = self.optimizer.param_groups[0]["lr"] if getattr(self, "optimizer", None) else None
        teacher = getattr(hp, "teacher_precision", None)
        batches = "; ".join(", ".join(ids) for ids in getattr(self, "_nonfinite_ids", []))
        return (
            f"training stopped: the loss was NaN/inf on {self.nonfinite_count} batches of epoch "
            f"{hp.epoch_counter.current}, more than --nonfinite_patience={self.nonfinite_patience} "
            "(those batches updated nothing). Likely causes, most common first:\n"
            f"  - learning rate too high (lr now {lr}, peak lr={getattr(hp, 'lr', '?')}, "
            f"warmup_steps={getattr(hp, 'warmup_steps', '?')}): lower --lr or raise --warmup_steps;\n"
            f"  - fp16 overflow (--precision={self.precision}): use --precision=bf16 or fp32;\n"
            "  - utterances shorter than their transcripts (no CTC path: infinite unless the CTC loss uses "
            f"zero_infinity=True, as ctc_cost here does): check that frame_shift={getattr(hp, 'frame_shift', '?')} "
            "is the model's real output frame shift (such utterances are skipped at loading only if it is);\n"
            "  - non-finite teacher outputs or KD terms"
            + (f" (teacher_precision={teacher}; an fp16 teacher can overflow)" if teacher else "")
            + f".\nLast non-finite batches (utterance IDs): {batches or '?'}"
        )

    def optimizers_step(self):
        """Skip the update when a gradient is NaN/inf; otherwise SpeechBrain's step.

        Under DDP the gradients are already averaged over the processes, so
        every process sees the same verdict and skips the same steps (one
        process's non-finite batch poisons the average for all). With fp16
        the gradient scaler does this check itself.
        """
        if not self.scaler.is_enabled() and not _grads_finite(self.modules.parameters()):
            self.skipped_steps = getattr(self, "skipped_steps", 0) + 1
            logger.warning("non-finite gradients: optimizer step skipped (%d so far)", self.skipped_steps)
            self.zero_grad(set_to_none=True)
            return
        super().optimizers_step()

    # ------------------------------------------------------------ statistics
    def on_stage_start(self, stage, epoch=None):
        """Reset the hypothesis buffers; start the training stage's clock and its sums.

        A training stage that starts at a step past 0 was resumed from an
        intra-epoch checkpoint: it keeps the sums that checkpoint restored.
        """
        self._ids, self._hyps, self._refs = [], [], []
        if stage == sb.Stage.TRAIN:
            self._train_started = time.monotonic()
            if not getattr(self, "step", 0):
                self._cr_sums.reset()

    def _gather_hypotheses(self) -> None:
        """Merge every process's ``(id, ref, hyp)`` rows, one per utterance ID (no-op in one process)."""
        if not is_distributed():
            return
        merged: dict = {}
        for ids, refs, hyps in gather_objects((self._ids, self._refs, self._hyps)):
            for row in zip(ids, refs, hyps):
                merged.setdefault(row[0], row)
        self._ids = [row[0] for row in merged.values()]
        self._refs = [row[1] for row in merged.values()]
        self._hyps = [row[2] for row in merged.values()]

    def stage_stats(self, stage, stage_loss) -> dict:
        """Numbers to log at the end of a stage, over all processes (subclasses add theirs).

        Must run on every process under DDP (it is called from
        ``on_stage_end``, which SpeechBrain runs on all of them).
        """
        batches = max(self.step, 1)
        stats = {"loss": weighted_mean_across(float(stage_loss), batches)}
        if stage == sb.Stage.TRAIN:
            if self.cr_config.enabled:  # the epoch's mean consistency term, unweighted (a collective: all processes)
                stats.update(self._cr_sums.means())
            self.batches_per_rank = [int(n) for n in gather_objects(self.step)]
            if is_distributed() and rank() == 0:
                logger.info(
                    "epoch %s: training batches per process %s (world size %d)",
                    self.hparams.epoch_counter.current,
                    self.batches_per_rank,
                    world_size(),
                )
        else:
            self._gather_hypotheses()
            if self._refs:
                rates = error_rates(self._refs, self._hyps)
                stats.update(WER=rates.wer, CER=rates.cer)
        return stats

    def _append_history(self, epoch, lr, valid_stats) -> None:
        """One JSON line per epoch in ``<output_folder>/history.jsonl`` (read by the report).

        Written before the epoch's checkpoint, so a run killed in between
        repeats the epoch on resume instead of skipping a checkpointed epoch
        that has no line; the repeated epoch's line replaces the earlier one
        (:func:`write_history_line`), so each epoch has one line.
        ``train_seconds`` is the wall time of the epoch's training stage (of
        its resumed part, after an interruption inside the epoch).
        """
        folder = getattr(self.hparams, "output_folder", None)
        if folder is None or not sb.utils.distributed.if_main_process():
            return
        step = getattr(getattr(self.hparams, "lr_scheduler", None), "current_step", self.optimizer_step)
        record = {
            "epoch": epoch,
            "step": step,
            "lr": lr,
            "train": getattr(self, "train_stats", {}),
            "valid": valid_stats,
            "batches_per_rank": getattr(self, "batches_per_rank", None),
            "train_seconds": round(getattr(self, "train_seconds", float("nan")), 3),
        }
        write_history_line(Path(folder) / "history.jsonl", record)

    def _train_loggers(self) -> list:
        """The yaml's ``train_logger``, plus SpeechBrain's ``TensorboardLogger`` when ``use_tensorboard``.

        TensorBoard events go to ``tensorboard_logs`` (default
        ``OUTPUT/tensorboard``), written by the main process only; the same
        per-epoch numbers as the log file (CTC and KD losses, blank share,
        agreement, dev WER/CER, learning rate).
        """
        loggers = [self.hparams.train_logger]
        if getattr(self.hparams, "use_tensorboard", False) and sb.utils.distributed.if_main_process():
            if getattr(self, "_tensorboard", None) is None:
                from speechbrain.utils.train_logger import TensorboardLogger

                folder = getattr(self.hparams, "tensorboard_logs", None) or str(
                    Path(self.hparams.output_folder) / "tensorboard"
                )
                self._tensorboard = TensorboardLogger(folder)
            loggers.append(self._tensorboard)
        return loggers

    def on_stage_end(self, stage, stage_loss, epoch=None):
        """Log, checkpoint on dev CER, write test hypotheses."""
        stats = self.stage_stats(stage, stage_loss)
        if stage == sb.Stage.TRAIN:
            self.train_stats = stats
            self.train_seconds = time.monotonic() - getattr(self, "_train_started", time.monotonic())
            return
        if stage == sb.Stage.VALID:
            lr = self.optimizer.param_groups[0]["lr"]
            for logger_ in self._train_loggers():
                logger_.log_stats(
                    stats_meta={"epoch": epoch, "lr": lr},
                    train_stats=getattr(self, "train_stats", None),
                    valid_stats=stats,
                )
            # history first: a kill between the two then repeats the epoch (and its line, the last one wins)
            # instead of resuming past an epoch whose line was never written
            self._append_history(epoch, lr, stats)
            self.checkpointer.save_and_keep_only(
                meta={"CER": stats["CER"], "WER": stats["WER"], "epoch": epoch},
                min_keys=["CER"],
                num_to_keep=getattr(self.hparams, "keep_checkpoints", 1),
            )
        elif stage == sb.Stage.TEST:
            self.hparams.train_logger.log_stats(
                stats_meta={"Epoch loaded": self.hparams.epoch_counter.current}, test_stats=stats
            )
            self.test_stats = stats
            self.test_hypotheses = list(zip(self._ids, self._refs, self._hyps))
