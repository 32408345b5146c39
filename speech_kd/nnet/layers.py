"""A model's stack of encoder layers: finding it, tapping its outputs, pairing student and teacher layers.

Layer-to-layer distillation (``kd_layers``) compares the hidden states of a student's encoder layers
with a teacher's. Both are torch modules (SpeechBrain's, or a Hugging Face teacher's), so the layers
are found and tapped the same way on either side:

* :func:`find_layer_stack`: the encoder's layers as a list, under a dotted path
  (``kd_student_layers: enc.transformer.encoder.layers``) or found by their known shapes
  (the ``layers`` ``ModuleList`` of a SpeechBrain Conformer / Transformer / Branchformer encoder,
  or of a Hugging Face wav2vec2 / HuBERT / WavLM encoder; the ``DNN`` blocks of a ``CRDNN``);
* :class:`LayerTaps`: forward hooks that keep chosen layers' outputs ``[B, T, D]`` while on;
* :func:`output_width`: a layer's output width ``D``, read from its last sizing submodule, so a
  projection can be built before the first batch (checked against the real output then);
* :func:`auto_layer_map` / :func:`teacher_layers_spec`: ``kd_layers: auto`` and the layers a cache stores.

Imports nothing else of speech_kd.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch

__all__ = [
    "LayerStackError",
    "LayerTaps",
    "auto_layer_map",
    "find_layer_stack",
    "output_width",
    "teacher_layers_spec",
]


class LayerStackError(ValueError):
    """A layer list that cannot be found or used (one line saying what was looked for)."""


#: what automatic detection looks for, as said in its error
AUTO_DESCRIPTION = (
    "a ModuleList named 'layers' of an encoder (SpeechBrain Conformer/Transformer/Branchformer, Hugging Face "
    "wav2vec2/HuBERT/WavLM) or the DNN blocks of a CRDNN"
)


def _children(container: torch.nn.Module) -> list[torch.nn.Module]:
    """The layers of a ``ModuleList`` or of a ``Sequential``/``ModuleDict`` (SpeechBrain's ``Sequential``), in order."""
    if isinstance(container, torch.nn.ModuleDict):
        return list(container.values())
    return list(container.children())


def _is_stack(parent: torch.nn.Module, name: str, module: torch.nn.Module) -> bool:
    """Whether ``parent.name`` is one of the layer lists :func:`find_layer_stack` knows."""
    kind = type(parent).__name__
    if name == "layers" and isinstance(module, torch.nn.ModuleList) and "Encoder" in kind and "Decoder" not in kind:
        return len(module) > 0
    return name == "DNN" and kind == "CRDNN" and isinstance(module, torch.nn.ModuleDict) and len(module) > 0


def _resolve(roots: Mapping[str, object], path: str):
    """The object at dotted ``path``, its first part a key of ``roots``; ``None`` when a part is missing."""
    head, *rest = path.split(".")
    node = roots.get(head)
    for part in rest:
        if node is None:
            return None
        if isinstance(node, torch.nn.ModuleDict) and part in node:
            node = node[part]
        elif isinstance(node, (torch.nn.ModuleList, torch.nn.Sequential)) and part.isdigit():
            node = node[int(part)] if int(part) < len(node) else None
        else:
            node = getattr(node, part, None)
    return node


def find_layer_stack(
    roots: Mapping[str, object], path: str | None = None, what: str = "the student"
) -> tuple[str, list[torch.nn.Module]]:
    """The encoder layers of a model as ``(dotted name, [layer, ...])``, 0-based as ``kd_layers`` counts them.

    Parameters
    ----------
    roots : mapping of str to module (or other objects)
        Where the search starts: a Brain's ``modules`` (and its hparams), a teacher's ``mods``.
    path : str, optional
        Dotted path from a key of ``roots`` to a ``ModuleList`` (or ``Sequential``) of layers,
        e.g. ``enc.transformer.encoder.layers``. ``None``: found automatically (:data:`AUTO_DESCRIPTION`);
        exactly one such list (counted once however many paths reach it) must exist.
    what : str
        The model, for the error message.

    Raises
    ------
    LayerStackError
        Nothing at ``path``, not a list of layers, or no (or several) lists found automatically.

    Examples
    --------
    >>> from speechbrain.lobes.models.CRDNN import CRDNN
    >>> model = CRDNN(input_shape=[None, None, 20], cnn_blocks=1, rnn_layers=1, dnn_blocks=2, dnn_neurons=8)
    >>> name, layers = find_layer_stack({"model": model})
    >>> name, len(layers)
    ('model.DNN', 2)
    """
    if path:
        node = _resolve(roots, path)
        if node is None:
            raise LayerStackError(
                f"kd layers of {what}: nothing at {path!r} (its first part must be one of: {', '.join(sorted(roots))})"
            )
        if not isinstance(node, (torch.nn.ModuleList, torch.nn.ModuleDict, torch.nn.Sequential)) or not len(node):
            raise LayerStackError(
                f"kd layers of {what}: {path!r} is a {type(node).__name__}, not a ModuleList (or Sequential) of layers"
            )
        return path, _children(node)
    found: dict[int, tuple[str, torch.nn.Module]] = {}
    for key, root in roots.items():
        if not isinstance(root, torch.nn.Module):
            continue
        for parent_name, parent in root.named_modules(prefix=key, remove_duplicate=False):
            for name, child in parent.named_children():
                if _is_stack(parent, name, child):
                    found.setdefault(id(child), (f"{parent_name}.{name}", child))
    if not found:
        raise LayerStackError(
            f"kd layers of {what}: found no layer list (looked for {AUTO_DESCRIPTION}); name one with its "
            "dotted path (kd_student_layers / kd_teacher_layers: e.g. encoder.layers)"
        )
    if len(found) > 1:
        names = sorted(name for name, _ in found.values())
        raise LayerStackError(f"kd layers of {what}: several layer lists ({', '.join(names)}); name one by its path")
    name, stack = next(iter(found.values()))
    return name, _children(stack)


_BATCH_NORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm)


def output_width(layer: torch.nn.Module) -> int | None:
    """Width ``D`` of a layer's output, from its last submodule that fixes one; ``None`` when none does.

    Encoder layers end in a normalisation or a linear map of the model width (a conformer layer's
    ``norm2``, a DNN block's batch norm), so the last ``LayerNorm``, ``BatchNorm``, ``Linear``,
    ``Conv1d`` or RNN in registration order gives it. Callers check it on the first batch.

    Examples
    --------
    >>> output_width(torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.LayerNorm(6)))
    6
    >>> output_width(torch.nn.LSTM(4, 5, bidirectional=True)), output_width(torch.nn.ReLU())
    (10, None)
    """
    for module in reversed(list(layer.modules())):
        if isinstance(module, torch.nn.LayerNorm):
            return int(module.normalized_shape[-1])
        if isinstance(module, _BATCH_NORMS):
            return int(module.num_features)
        if isinstance(module, torch.nn.Linear):
            return int(module.out_features)
        if isinstance(module, torch.nn.Conv1d):
            return int(module.out_channels)
        if isinstance(module, torch.nn.RNNBase):
            width = module.proj_size or module.hidden_size
            return int(width * (2 if module.bidirectional else 1))
    return None


def _first_tensor(output) -> torch.Tensor:
    """A layer's hidden state: its output, or the first element of a tuple (conformer layers add attention)."""
    while isinstance(output, (tuple, list)):
        output = output[0]
    return output


class LayerTaps:
    """Forward hooks keeping the outputs ``[B, T, D]`` of chosen layers while :attr:`active`.

    Every layer of the stack is hooked, so :attr:`ran` also tells whether the forward pass went
    through the stack at all: a chosen layer without an output was skipped (LayerDrop) when others
    ran, and none running means the hooks sit on modules the model does not use.

    Parameters
    ----------
    layers : sequence of torch.nn.Module
        The model's layer stack (:func:`find_layer_stack`).
    indices : iterable of int
        The layers to keep (0-based in ``layers``).

    Examples
    --------
    >>> stack = [torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)]
    >>> taps = LayerTaps(stack, [1])
    >>> taps.active = True
    >>> _ = stack[1](stack[0](torch.zeros(1, 5, 3)))
    >>> taps.ran, {k: tuple(v.shape) for k, v in taps.take().items()}
    (True, {1: (1, 5, 2)})
    """

    def __init__(self, layers: Sequence[torch.nn.Module], indices: Iterable[int]) -> None:
        self.active = False
        self.outputs: dict[int, torch.Tensor] = {}
        #: whether any layer of the stack ran while active since the last :meth:`take`
        self.ran = False
        kept = set(indices)
        self._handles = [layer.register_forward_hook(self._keeper(i, i in kept)) for i, layer in enumerate(layers)]

    def _keeper(self, index: int, keep_output: bool):
        def keep(module, inputs, output) -> None:
            if self.active:
                self.ran = True
                if keep_output:
                    self.outputs[index] = _first_tensor(output)

        return keep

    def take(self) -> dict[int, torch.Tensor]:
        """The outputs kept since the last call (layer index -> ``[B, T, D]``), forgotten here (and :attr:`ran`)."""
        outputs, self.outputs, self.ran = self.outputs, {}, False
        return outputs

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def auto_layer_map(student_layers: int, teacher_layers: int) -> dict[int, int]:
    """``kd_layers: auto``: student layer ``i`` of ``n`` to teacher layer ``round((i + 1) * m / n) - 1``.

    Evenly spaced, the last student layer on the teacher's last; halves round up.

    Examples
    --------
    >>> auto_layer_map(3, 6)
    {0: 1, 1: 3, 2: 5}
    >>> auto_layer_map(4, 6), auto_layer_map(2, 12)
    ({0: 1, 1: 2, 2: 4, 3: 5}, {0: 5, 1: 11})
    """
    if student_layers < 1 or teacher_layers < 1:
        raise LayerStackError(f"auto layer map needs layers on both sides, got {student_layers} and {teacher_layers}")
    return {
        i: max(0, int(math.floor((i + 1) * teacher_layers / student_layers + 0.5)) - 1) for i in range(student_layers)
    }


def teacher_layers_spec(spec: str, depth: int) -> list[int]:
    """The teacher layers a cache stores: ``1,3,5``, ``all`` or ``auto:N`` (those ``auto`` maps N student layers to).

    Raises :class:`LayerStackError` (one line) for a bad spec or a layer past ``depth``.

    Examples
    --------
    >>> teacher_layers_spec("5,1,3", 6), teacher_layers_spec("auto:3", 6), teacher_layers_spec("all", 3)
    ([1, 3, 5], [1, 3, 5], [0, 1, 2])
    """
    text = str(spec).strip().lower()
    try:
        if text == "all":
            layers = list(range(depth))
        elif text.startswith("auto:"):
            layers = sorted(set(auto_layer_map(int(text[5:]), depth).values()))
        else:
            layers = sorted({int(part) for part in text.replace(" ", ",").split(",") if part})
    except ValueError:
        raise LayerStackError(
            f"hidden layers {spec!r}: give layer numbers (1,3,5), all, or auto:N (the teacher layers kd_layers: "
            "auto maps a student of N layers to)"
        ) from None
    bad = [layer for layer in layers if not 0 <= layer < depth]
    if not layers or bad:
        raise LayerStackError(
            f"hidden layers {spec!r}: the teacher has {depth} layers (0..{depth - 1}); {bad or 'none'} asked for"
        )
    return layers
