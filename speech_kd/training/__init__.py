"""Training: the Brains, the recipes as functions, and the infrastructure runs stand on.

The Brains (:mod:`~speech_kd.training.ctc_brain`: plain CTC; :mod:`~speech_kd.training.distill_brain`:
``KDMixin`` and teacher annealing on it), the recipes (:mod:`~speech_kd.training.train`,
:mod:`~speech_kd.training.distill`) and their command line and settings
(:mod:`~speech_kd.training.settings`), untranscribed batches (:mod:`~speech_kd.training.unlabeled`), and
the infrastructure: crash-safe checkpoints and folder locks (:mod:`~speech_kd.training.checkpoints`),
DDP helpers (:mod:`~speech_kd.training.distributed`), mixed precision
(:mod:`~speech_kd.training.precision`), the per-epoch history (:mod:`~speech_kd.training.history`) and
an epoch's checkpointed running sums (:mod:`~speech_kd.training.epoch_sums`).
The infrastructure imports nothing else of speech_kd, so ``targets`` and ``kd`` may use it; the
Brains and recipes may import everything below ``cli``. This ``__init__`` imports none of its modules
(importing ``training.checkpoints`` must not load the Brains): the Brains and recipes are re-exported
by :mod:`speech_kd` itself.
"""

__all__: list[str] = []
