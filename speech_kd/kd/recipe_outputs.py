"""Find the CTC log-probabilities and relative lengths in what a recipe's ``compute_forward`` returns.

SpeechBrain's recipes return tuples of different shapes:

- CTC recipes: ``(p_ctc, wav_lens)`` (TIMIT) or ``(p_ctc, wav_lens, p_tokens)`` (LibriSpeech);
- joint CTC/attention recipes: ``(p_ctc, p_seq, wav_lens, hyps)``.

:func:`find_ctc_outputs` takes the *first* ``[B, T, V]`` tensor whose rows are
log-probabilities (``p_ctc`` comes first in all of them; ``p_seq`` after) and
the first ``[B]`` floating tensor with values in ``(0, 1]`` (relative
lengths). ``kd_outputs: [i, j]`` in the yaml (or keys, for a dict) names them
instead. What is picked is checked: logits, or lengths that are not relative,
are refused with a message naming the position.
"""

from __future__ import annotations

import torch

__all__ = ["find_ctc_outputs", "OutputLayoutError"]


class OutputLayoutError(ValueError):
    """``compute_forward``'s outputs hold no usable CTC log-probabilities and relative lengths."""


_HINT = (
    "set kd_outputs: [INDEX_OF_CTC_LOG_PROBS, INDEX_OF_RELATIVE_LENGTHS] in the yaml, or override "
    "kd_student_outputs(predictions) in your Brain"
)


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor {tuple(value.shape)} {str(value.dtype).replace('torch.', '')}"
    return type(value).__name__


def _is_log_probs(x: torch.Tensor) -> bool:
    if not (isinstance(x, torch.Tensor) and x.dim() == 3 and x.is_floating_point() and x.numel()):
        return False
    total = torch.logsumexp(x[:, :1].detach().float(), dim=-1)
    tolerance = 1e-3 if x.dtype == torch.float32 or x.dtype == torch.float64 else 3e-2
    return bool(torch.all(total.abs() < tolerance))


def _is_relative_lengths(x, rows: int) -> bool:
    if not (isinstance(x, torch.Tensor) and x.dim() == 1 and x.is_floating_point() and x.shape[0] == rows):
        return False
    return bool(torch.all((x > 0) & (x <= 1.0 + 1e-4)))


def find_ctc_outputs(predictions, spec=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log_probs [B, T, V], relative lengths [B])`` from ``predictions`` (see the module docstring).

    Parameters
    ----------
    predictions : tuple, list or dict
        What ``compute_forward`` returned.
    spec : sequence of two ints or keys, optional
        Where the two are (``kd_outputs``); ``None`` = find them.

    Raises
    ------
    OutputLayoutError
        Nothing fits, or what ``spec`` names is not log-probabilities and relative lengths.

    Examples
    --------
    >>> lp = torch.log_softmax(torch.randn(2, 5, 4), -1)
    >>> out = find_ctc_outputs((lp, torch.log_softmax(torch.randn(2, 3, 4), -1), torch.tensor([1.0, 0.6]), None))
    >>> out[0] is lp, out[1].tolist()
    (True, [1.0, 0.6000000238418579])
    """
    if isinstance(predictions, torch.Tensor):
        raise OutputLayoutError(
            f"compute_forward returned one {_describe(predictions)}; KD needs the CTC log-probabilities AND the "
            "relative lengths: return (log_probs, wav_lens) as SpeechBrain's CTC recipes do"
        )
    if isinstance(predictions, dict):
        items = list(predictions.items())
    elif isinstance(predictions, (tuple, list)):
        items = list(enumerate(predictions))
    else:
        raise OutputLayoutError(f"compute_forward returned a {type(predictions).__name__}; {_HINT}")
    layout = ", ".join(f"[{k!r}] {_describe(v)}" for k, v in items)
    if spec is not None:
        lp_key, len_key = spec
        values = dict(items)
        if lp_key not in values or len_key not in values:
            raise OutputLayoutError(f"kd_outputs {list(spec)} names outputs that do not exist ({layout})")
        log_probs, lengths = values[lp_key], values[len_key]
        if not _is_log_probs(log_probs):
            raise OutputLayoutError(
                f"kd_outputs: compute_forward's output [{lp_key!r}] ({_describe(log_probs)}) is not frame "
                "log-probabilities [batch, frames, tokens] (exp does not sum to 1 over the tokens): apply "
                "log_softmax, or point kd_outputs at the CTC log-probabilities"
            )
        if not _is_relative_lengths(lengths, log_probs.shape[0]):
            raise OutputLayoutError(
                f"kd_outputs: compute_forward's output [{len_key!r}] ({_describe(lengths)}) is not relative lengths "
                f"(one value in (0, 1] per row of the {log_probs.shape[0]} rows)"
            )
        return log_probs, lengths
    log_probs = next((v for _, v in items if _is_log_probs(v)), None)
    if log_probs is None:
        raise OutputLayoutError(
            f"none of compute_forward's outputs is CTC log-probabilities [batch, frames, tokens] ({layout}): return "
            f"log_softmax outputs (logits are not accepted), or {_HINT}"
        )
    lengths = next((v for _, v in items if _is_relative_lengths(v, log_probs.shape[0])), None)
    if lengths is None:
        raise OutputLayoutError(
            f"none of compute_forward's outputs is relative lengths (a float tensor of {log_probs.shape[0]} values "
            f"in (0, 1], one per row of the log-probabilities) ({layout}): return wav_lens too, or {_HINT}"
        )
    return log_probs, lengths
