"""CTC training Brain: the forward chain, the CTC objective and the Brain hooks.

The model is whatever the yaml's ``encoder_chain`` lists, run in order, e.g.
``[compute_features, normalize, CNN, enc, ctc_lin, log_softmax]``. The same
chain becomes the exported model's ``LengthsCapableSequential`` encoder, so
training and inference cannot drift apart. Augmentations are inserted at
fixed points: waveform augmentation before the chain, SpecAugment after
``normalize``.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
from pathlib import Path

import speechbrain as sb
import torch
from speechbrain.decoders.ctc import ctc_greedy_decode

from speech_kd.features import SharedFeatures, fbank_signature
from speech_kd.metrics import error_rates

__all__ = ["CTCBrain", "run_chain"]

logger = logging.getLogger(__name__)


@functools.cache
def _parameter_names(func) -> frozenset:
    try:
        return frozenset(inspect.signature(func).parameters)
    except (TypeError, ValueError):
        return frozenset()


def _accepts(module: torch.nn.Module, name: str) -> bool:
    """Whether ``module.forward`` takes ``name`` (memoised per class: this runs for every module of every batch)."""
    forward = getattr(type(module), "forward", None) or getattr(module, "forward", module)
    return name in _parameter_names(forward)


def run_chain(
    modules: dict,
    chain: list[str],
    wavs: torch.Tensor,
    wav_lens: torch.Tensor,
    after: dict | None = None,
    epoch: int | None = None,
) -> torch.Tensor:
    """Run ``wavs [B, S]`` through the named modules; return frame log-probs ``[B, T, V]``.

    Each module receives the relative lengths when its ``forward`` takes
    ``lengths`` or ``wav_lens`` (as ``LengthsCapableSequential`` does), and
    the epoch when it takes ``epoch`` (``InputNormalization``). ``after`` maps
    a module name to a callable applied to its output (augmentation hooks).
    """
    x = wavs
    for name in chain:
        module = modules[name]
        kwargs = {}
        if _accepts(module, "lengths"):
            kwargs["lengths"] = wav_lens
        elif _accepts(module, "wav_lens"):
            kwargs["wav_lens"] = wav_lens
        if epoch is not None and _accepts(module, "epoch"):
            kwargs["epoch"] = epoch
        x = module(x, **kwargs)
        if after and name in after:
            x = after[name](x)
    return x


class CTCBrain(sb.Brain):
    """Character CTC ASR: greedy decoding, WER/CER on dev and test.

    Expects in ``hparams``: ``encoder_chain``, the modules it names (trainable
    ones in ``modules``), ``ctc_cost``, ``blank_index``, ``lr_scheduler``,
    ``epoch_counter``, ``train_logger``, and optionally ``wav_augment`` /
    ``speed_perturb``, ``spec_augment_time`` / ``spec_augment_freq`` /
    ``spec_augment``. ``self.tokenizer`` must be set before fitting.
    """

    tokenizer = None

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
        """
        batch = batch.to(self.device)
        wavs, wav_lens = batch.sig
        perturbed = stage == sb.Stage.TRAIN and getattr(self.hparams, "speed_perturb", False)
        if perturbed:
            wavs = self.hparams.wav_augment(wavs)
        hooks = self._augment_hooks(stage)
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
        return log_probs, wav_lens

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
        """CTC loss of the student outputs against the transcripts."""
        log_probs, wav_lens = predictions
        tokens, token_lens = batch.tokens
        return self.hparams.ctc_cost(log_probs, tokens, wav_lens, token_lens)

    def compute_objectives(self, predictions, batch, stage):
        """CTC loss; on dev/test also decode greedily and keep hypotheses."""
        loss = self.ctc_objective(predictions, batch)
        if stage != sb.Stage.TRAIN:
            self._collect_hypotheses(predictions, batch)
        return loss

    def _collect_hypotheses(self, predictions, batch) -> None:
        log_probs, wav_lens = predictions
        sequences = ctc_greedy_decode(log_probs, wav_lens, blank_id=self.hparams.blank_index)
        for uid, seq, ref in zip(batch.id, sequences, batch.wrd):
            self._ids.append(uid)
            self._hyps.append("".join(self.tokenizer.decode_ndim(seq)))
            self._refs.append(ref)

    # ------------------------------------------------------------------- hooks
    def make_dataloader(self, dataset, stage, ckpt_prefix="dataloader-", **loader_kwargs):
        """Remember the number of training batches for the LR schedule."""
        loader = super().make_dataloader(dataset, stage, ckpt_prefix, **loader_kwargs)
        if stage == sb.Stage.TRAIN:
            self._train_batches = len(loader)
        return loader

    def on_fit_start(self):
        """Recover checkpoints, then size the LR schedule to the whole run."""
        super().on_fit_start()
        batches = getattr(self, "_train_batches", None)
        if batches and hasattr(self.hparams, "lr_scheduler"):
            steps = batches * self.hparams.number_of_epochs // max(1, self.grad_accumulation_factor)
            self.hparams.lr_scheduler.set_total_steps(steps)

    def on_fit_batch_end(self, batch, outputs, loss, should_step):
        """Advance the per-step learning-rate schedule."""
        if should_step:
            self.hparams.lr_scheduler(self.optimizer)

    def on_stage_start(self, stage, epoch=None):
        """Reset the hypothesis buffers."""
        self._ids, self._hyps, self._refs = [], [], []

    def stage_stats(self, stage, stage_loss) -> dict:
        """Numbers to log at the end of a stage (subclasses add theirs)."""
        stats = {"loss": stage_loss}
        if stage != sb.Stage.TRAIN and self._refs:
            rates = error_rates(self._refs, self._hyps)
            stats.update(WER=rates.wer, CER=rates.cer)
        return stats

    def _append_history(self, epoch, lr, valid_stats) -> None:
        """One JSON line per epoch in ``<output_folder>/history.jsonl`` (read by the report).

        Written after the epoch's checkpoint, so a run killed in between
        repeats the line on resume: readers keep the last line per epoch.
        """
        folder = getattr(self.hparams, "output_folder", None)
        if folder is None or not sb.utils.distributed.if_main_process():
            return
        step = getattr(getattr(self.hparams, "lr_scheduler", None), "current_step", self.optimizer_step)
        record = {"epoch": epoch, "step": step, "lr": lr, "train": getattr(self, "train_stats", {}),
                  "valid": valid_stats}  # fmt: skip
        with open(Path(folder) / "history.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, default=float) + "\n")

    def on_stage_end(self, stage, stage_loss, epoch=None):
        """Log, checkpoint on dev CER, write test hypotheses."""
        stats = self.stage_stats(stage, stage_loss)
        if stage == sb.Stage.TRAIN:
            self.train_stats = stats
            return
        if stage == sb.Stage.VALID:
            lr = self.optimizer.param_groups[0]["lr"]
            self.hparams.train_logger.log_stats(
                stats_meta={"epoch": epoch, "lr": lr},
                train_stats=getattr(self, "train_stats", None),
                valid_stats=stats,
            )
            self.checkpointer.save_and_keep_only(
                meta={"CER": stats["CER"], "WER": stats["WER"], "epoch": epoch},
                min_keys=["CER"],
                num_to_keep=getattr(self.hparams, "keep_checkpoints", 1),
            )
            self._append_history(epoch, lr, stats)
        elif stage == sb.Stage.TEST:
            self.hparams.train_logger.log_stats(
                stats_meta={"Epoch loaded": self.hparams.epoch_counter.current}, test_stats=stats
            )
            self.test_stats = stats
            self.test_hypotheses = list(zip(self._ids, self._refs, self._hyps))
