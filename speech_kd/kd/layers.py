"""Layer-to-layer distillation, student side: the tapped student layers and their learned projections.

``kd_layers`` pairs student encoder layers with teacher layers. For each pair the student layer's
output ``[B, T, D_s]`` goes through a learned linear map to the teacher's width ``D_t`` (DistilHuBERT's
prediction heads; the adapters of NeMo's layer distillation), and :func:`speech_kd.kd.term.layer_term_loss`
compares it with the teacher layer at the student's frames. The projections train with the student
(``KDMixin`` puts them in the Brain's ``modules``, so its optimiser and checkpoints hold them) but are
not part of the model a run exports: the model folder writes the yaml's ``model`` only.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from speech_kd.kd.config import KDSetupError
from speech_kd.nnet.layers import LayerStackError, LayerTaps, find_layer_stack, output_width

__all__ = ["LayerProjections", "StudentLayers"]


class LayerProjections(torch.nn.Module):
    """One ``Linear(D_s, D_t)`` per mapped student layer, applied to a dict of hidden states.

    Parameters
    ----------
    widths : mapping of int to (int, int)
        Student layer -> ``(student width, teacher width)``.

    Examples
    --------
    >>> proj = LayerProjections({2: (4, 6)})
    >>> {k: tuple(v.shape) for k, v in proj({2: torch.zeros(1, 3, 4)}).items()}
    {2: (1, 3, 6)}
    """

    def __init__(self, widths: Mapping[int, tuple[int, int]]) -> None:
        super().__init__()
        #: student layer -> ``(student width, teacher width)`` (whether a re-attach can keep these heads)
        self.widths = dict(sorted(widths.items()))
        self.heads = torch.nn.ModuleDict(
            {str(layer): torch.nn.Linear(d_in, d_out) for layer, (d_in, d_out) in sorted(widths.items())}
        )

    def forward(self, hiddens: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Student layer -> its hidden states ``[B, T, D_s]`` projected to ``[B, T, D_t]``.

        A forward (rather than reaching into ``heads``) so that a DDP-wrapped copy syncs their gradients.
        """
        return {layer: self.heads[str(layer)](hidden) for layer, hidden in hiddens.items()}


class StudentLayers:
    """The student's encoder layers that ``kd_layers`` maps, tapped by forward hooks.

    Parameters
    ----------
    modules : mapping of str to torch.nn.Module
        The Brain's ``modules`` (automatic search looks here).
    hparams : mapping
        The Brain's hparams (a ``kd_student_layers`` path may also start at one of their keys).
    path : str, optional
        ``kd_student_layers``: dotted path to the layer list; ``None``: found
        (:func:`~speech_kd.nnet.layers.find_layer_stack`).
    """

    def __init__(self, modules: Mapping[str, torch.nn.Module], hparams: Mapping, path: str | None = None) -> None:
        roots = {**(hparams or {}), **dict(modules)} if path else dict(modules)
        try:
            self.name, self.stack = find_layer_stack(roots, path, "the student")
        except LayerStackError as err:
            raise KDSetupError(str(err)) from None
        self.taps: LayerTaps | None = None
        self.widths: dict[int, int] = {}
        #: whether a training batch's outputs were checked (:meth:`take`: did the forward pass use these layers?)
        self.checked = False

    @property
    def depth(self) -> int:
        """Number of layers in the student's layer list."""
        return len(self.stack)

    def output_widths(self, layers: list[int]) -> dict[int, int]:
        """Each of ``layers``' (0-based) output width, read from its modules (checked on use)."""
        widths = {}
        for layer in layers:
            width = output_width(self.stack[layer])
            if width is None:
                raise KDSetupError(
                    f"kd_layers: cannot tell the output width of student layer {layer} ({self.name}.{layer}, a "
                    f"{type(self.stack[layer]).__name__}: no Linear, LayerNorm, BatchNorm or RNN in it)"
                )
            widths[layer] = width
        return widths

    def tap(self, layers: list[int]) -> dict[int, int]:
        """Hook ``layers`` (0-based); return each one's output width (:meth:`output_widths`)."""
        widths = self.output_widths(layers)
        if self.taps is not None:
            self.taps.remove()
        self.taps, self.widths, self.checked = LayerTaps(self.stack, layers), widths, False
        return widths

    def take(self, frames: int) -> dict[int, torch.Tensor]:
        """The tapped layers' outputs ``[B, T, D_s]`` of the last forward pass, checked: ``T = frames``, widths.

        A layer skipped by LayerDrop has no output (its pair sits this batch out). On the first
        batch taken, no layer of the list having run is a :class:`KDSetupError`: the hooks are on
        modules the forward pass does not use, and the layer loss would be 0 on every batch.
        """
        ran = self.taps is not None and self.taps.ran
        hiddens = self.taps.take() if self.taps is not None else {}
        if not self.checked:
            self.checked = True
            if not hiddens and not ran:
                raise KDSetupError(
                    f"kd_layers: no layer of the student's {self.name} ran in the first training batch's forward "
                    "pass (their hooks never fired), so the layer loss would be 0: the model trained is not the one "
                    "those layers belong to; name its layer list with kd_student_layers"
                )
        for layer, hidden in hiddens.items():
            if hidden.dim() != 3 or hidden.shape[1] != frames or hidden.shape[-1] != self.widths[layer]:
                raise KDSetupError(
                    f"kd_layers: student layer {layer} ({self.name}.{layer}) outputs shape {tuple(hidden.shape)}; "
                    f"expected [B, {frames}, {self.widths[layer]}] (the CTC output's frames, the width read from "
                    "its modules): only layers at the output frame rate can be distilled"
                )
        return hiddens
