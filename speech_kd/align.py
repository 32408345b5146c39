"""Line teacher posteriors up with the student: length masks, vocabulary and frame rate.

This module is the only place that knows how a teacher's outputs are turned
into the student's terms:

* :func:`lengths_to_mask` and :func:`relative_to_frames` turn lengths into
  frame masks and SpeechBrain's relative lengths into frame counts;
* :class:`VocabMap` maps teacher tokens onto student tokens (blank to blank,
  word delimiters to the student's space, case folding, exact matches) and
  carries teacher probabilities into the student's vocabulary;
* :func:`resample_frames` converts posteriors between frame shifts (e.g. a
  20 ms wav2vec2 teacher to a 40 ms student) and :func:`reconcile_lengths`
  makes the teacher time axis match the student's exactly.

Shape legend used throughout: ``B`` batch, ``T`` frames (``Tt`` teacher /
source, ``Ts`` student / destination), ``V`` tokens (``Vt`` teacher, ``Vs``
student).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = [
    "lengths_to_mask",
    "relative_to_frames",
    "VocabMappingError",
    "unit_kind",
    "VocabMap",
    "FrameRateError",
    "resample_frames",
    "reconcile_lengths",
    "WORD_DELIMITERS",
]

#: teacher tokens that separate words; they map onto the student's space token
WORD_DELIMITERS = ("|", "\u2581", " ")

#: probability given to student tokens that receive no teacher mass (before renormalisation)
_FLOOR_PROB = 1e-8

#: how many token names error messages show before abbreviating
_NAMES_SHOWN = 12


# --------------------------------------------------------------------- lengths
def lengths_to_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """Boolean frame mask from absolute lengths.

    Parameters
    ----------
    lengths : torch.Tensor
        ``[B]`` integer number of valid frames per utterance.
    max_len : int
        ``T``, the padded number of frames.

    Returns
    -------
    torch.Tensor
        ``[B, T]`` bool, True on valid frames.

    Examples
    --------
    >>> lengths_to_mask(torch.tensor([1, 3]), 3)
    tensor([[ True, False, False],
            [ True,  True,  True]])
    """
    frames = torch.arange(max_len, device=lengths.device)
    return frames.unsqueeze(0) < lengths.to(frames.dtype).unsqueeze(1)


def relative_to_frames(rel_lens: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Absolute frame counts from SpeechBrain's relative lengths.

    ``round(rel * num_frames)`` (``torch.round``, as SpeechBrain's CTC loss
    does), clamped to ``[1, num_frames]``.

    Parameters
    ----------
    rel_lens : torch.Tensor
        ``[B]`` float in ``(0, 1]``, length relative to the longest utterance.
    num_frames : int
        ``T``, the padded number of frames.

    Returns
    -------
    torch.Tensor
        ``[B]`` long frame counts.

    Examples
    --------
    >>> relative_to_frames(torch.tensor([1.0, 0.5, 0.01]), 10)
    tensor([10,  5,  1])
    """
    return torch.round(rel_lens.double() * num_frames).long().clamp(1, num_frames)


# ------------------------------------------------------------------ vocabulary
class VocabMappingError(ValueError):
    """Teacher and student vocabularies cannot be lined up (or too much mass is lost)."""


def _names(tokens: list[str], limit: int = _NAMES_SHOWN) -> str:
    """``'a', 'b', ... (+N more)`` for error messages and reports."""
    shown = ", ".join(repr(t) for t in tokens[:limit])
    return shown + (f", ... (+{len(tokens) - limit} more)" if len(tokens) > limit else "")


def _student_delimiter(student_tokens: list[str], student_blank: int) -> int | None:
    """Index of the student's word delimiter: ``' '`` if present, else ``'|'`` or ``'▁'``."""
    for delimiter in (" ", "|", "\u2581"):
        if delimiter in student_tokens and student_tokens.index(delimiter) != student_blank:
            return student_tokens.index(delimiter)
    return None


def _match_token(
    token: str,
    exact: dict[str, int],
    folded: dict[str, int],
    delimiter: int | None,
    case_fold: bool,
) -> int | None:
    """Student index for one non-blank teacher token, or None (unmapped)."""
    if token in WORD_DELIMITERS and delimiter is not None:
        return delimiter
    if token in exact:
        return exact[token]
    if case_fold and token.lower() in folded:
        return folded[token.lower()]
    return None


def unit_kind(tokens: list[str], blank: int) -> str:
    """``"character"`` or ``"subword"``: what a vocabulary's units are.

    Blank, ``<...>``/``[...]`` specials and word markers (``▁``, ``|``) are
    set aside; a vocabulary is sub-word when at least 10 % of the rest (and
    two or more) are longer than one character.

    Examples
    --------
    >>> unit_kind(["<blank>", " ", "A", "B"], 0), unit_kind(["<unk>", "▁THE", "▁A", "ING", "S"], 0)
    ('character', 'subword')
    """
    units = []
    for i, token in enumerate(tokens):
        if i == blank or (len(token) > 2 and token[0] + token[-1] in ("<>", "[]")):
            continue
        units.append(token.replace("▁", "").replace("|", ""))
    long = sum(len(unit) > 1 for unit in units)
    return "subword" if long >= 2 and long >= 0.1 * max(1, len(units)) else "character"


@dataclass
class VocabMap:
    """Teacher-to-student token mapping.

    Build it with :meth:`VocabMap.build`. Each teacher token maps onto at most
    one student token; several teacher tokens may share a student token
    (their probabilities are summed).

    Attributes
    ----------
    matrix : torch.Tensor
        ``[Vt, Vs]`` float 0/1; ``matrix[i, j] == 1`` when teacher token ``i``
        maps onto student token ``j``. Rows of unmapped tokens are zero.
    unmapped : list[str]
        Teacher tokens without a student counterpart.
    teacher_tokens, student_tokens : list[str]
        The two vocabularies (index -> string).
    teacher_blank, student_blank : int
        CTC blank indices.
    max_unmapped_mass : float
        Largest tolerated mean teacher probability per frame on unmapped
        tokens (see :meth:`check_mass`).
    """

    matrix: torch.Tensor
    unmapped: list[str]
    teacher_tokens: list[str] = field(default_factory=list)
    student_tokens: list[str] = field(default_factory=list)
    teacher_blank: int = 0
    student_blank: int = 0
    max_unmapped_mass: float = 0.05

    @classmethod
    def build(
        cls,
        teacher_tokens: list[str],
        teacher_blank: int,
        student_tokens: list[str],
        student_blank: int,
        max_unmapped_mass: float = 0.05,
        case_fold: bool = True,
    ) -> VocabMap:
        """Map teacher tokens onto student tokens.

        Rules, in order: the teacher blank maps onto the student blank; word
        delimiters (``'|'``, ``'▁'``, ``' '``) map onto the student's space
        (``' '``; failing that the student's ``'|'`` or ``'▁'``); then an exact
        string match; then, with ``case_fold``, a case-insensitive match
        (teacher ``'a'`` and ``'A'`` both reach a student ``'A'``). No
        non-blank teacher token maps onto the student blank. Everything else
        (``<s>``, ``</s>``, ``<unk>``, a ``<pad>`` that is not the blank,
        BPE pieces such as ``'▁THE'`` the student lacks) stays unmapped.

        Parameters
        ----------
        teacher_tokens, student_tokens : list[str]
            ``Vt`` and ``Vs`` token strings, index order.
        teacher_blank, student_blank : int
            CTC blank indices.
        max_unmapped_mass : float
            Stored for :meth:`check_mass`.
        case_fold : bool
            Allow case-insensitive matches.

        Returns
        -------
        VocabMap

        Raises
        ------
        VocabMappingError
            A blank index out of range, or no non-blank teacher token maps.

        Examples
        --------
        >>> vmap = VocabMap.build(["<pad>", "|", "a", "<s>"], 0, ["<blank>", " ", "A"], 0)
        >>> vmap.matrix
        tensor([[1., 0., 0.],
                [0., 1., 0.],
                [0., 0., 1.],
                [0., 0., 0.]])
        >>> vmap.unmapped
        ['<s>']
        """
        teacher_tokens, student_tokens = list(teacher_tokens), list(student_tokens)
        for name, tokens, blank in (
            ("teacher", teacher_tokens, teacher_blank),
            ("student", student_tokens, student_blank),
        ):
            if not 0 <= blank < len(tokens):
                raise VocabMappingError(f"{name} blank index {blank} is outside its {len(tokens)} tokens")
        kinds = unit_kind(teacher_tokens, teacher_blank), unit_kind(student_tokens, student_blank)
        if kinds[0] != kinds[1]:
            pieces = teacher_tokens if kinds[0] == "subword" else student_tokens
            examples = [t for t in pieces if len(t.replace("▁", "").replace("|", "")) > 1 and t[:1] not in "<["][:3]
            raise VocabMappingError(
                f"the teacher's units are {kinds[0]}s and the student's are {kinds[1]}s (e.g. {_names(examples)}): "
                "frame-level KD maps units one to one on each frame, so they must be of the same kind; give the "
                "student the teacher's kind of units (e.g. the same tokenizer, token_type), or use another teacher"
            )
        exact: dict[str, int] = {}
        folded: dict[str, int] = {}
        for j, token in enumerate(student_tokens):
            if j == student_blank:
                continue
            exact.setdefault(token, j)
            folded.setdefault(token.lower(), j)
        delimiter = _student_delimiter(student_tokens, student_blank)

        matrix = torch.zeros(len(teacher_tokens), len(student_tokens))
        matrix[teacher_blank, student_blank] = 1.0
        unmapped = []
        for i, token in enumerate(teacher_tokens):
            if i == teacher_blank:
                continue
            j = _match_token(token, exact, folded, delimiter, case_fold)
            if j is None:
                unmapped.append(token)
            else:
                matrix[i, j] = 1.0
        if len(unmapped) == len(teacher_tokens) - 1:
            raise VocabMappingError(
                f"no teacher token maps onto the student vocabulary (teacher tokens: {_names(unmapped)}; student "
                f"tokens: {_names([t for j, t in enumerate(student_tokens) if j != student_blank])}). A teacher with "
                "sub-word (BPE) units cannot teach a character student frame by frame; use a character teacher"
            )
        return cls(matrix, unmapped, teacher_tokens, student_tokens, teacher_blank, student_blank, max_unmapped_mass)

    # ------------------------------------------------------------- properties
    @property
    def is_identity(self) -> bool:
        """True when ``Vt == Vs`` and the matrix is the identity (callers skip the mapping)."""
        vt, vs = self.matrix.shape
        return vt == vs and bool(
            torch.equal(self.matrix, torch.eye(vt, dtype=self.matrix.dtype, device=self.matrix.device))
        )

    def uncovered(self) -> list[str]:
        """Student tokens (blank excluded) that no teacher token reaches."""
        reached = self.matrix.sum(0) > 0
        return [t for j, t in enumerate(self.student_tokens) if j != self.student_blank and not bool(reached[j])]

    def report(self) -> str:
        """Human-readable multi-line summary of the mapping.

        Examples
        --------
        >>> print(VocabMap.build(["<pad>", "|", "a", "<s>"], 0, ["<blank>", " ", "A", "B"], 0).report())
        vocabulary: teacher 4 tokens (blank 0 '<pad>') -> student 4 tokens (blank 0 '<blank>')
        mapped: 2 of 3 non-blank teacher tokens, plus blank -> blank
        renamed: '|' -> ' ', 'a' -> 'A'
        unmapped teacher tokens (1): '<s>'
        student tokens no teacher token reaches (1): 'B'
        tolerated unmapped teacher mass per frame: 5.0%
        """
        rows, cols = self.matrix.nonzero(as_tuple=True)
        pairs = [(int(i), int(j)) for i, j in zip(rows.tolist(), cols.tolist()) if int(i) != self.teacher_blank]
        renamed = [f"{self.teacher_tokens[i]!r} -> {self.student_tokens[j]!r}" for i, j in pairs
                   if self.teacher_tokens[i] != self.student_tokens[j]]  # fmt: skip
        uncovered = self.uncovered()
        lines = [
            f"vocabulary: teacher {len(self.teacher_tokens)} tokens (blank {self.teacher_blank} "
            f"{self.teacher_tokens[self.teacher_blank]!r}) -> student {len(self.student_tokens)} tokens "
            f"(blank {self.student_blank} {self.student_tokens[self.student_blank]!r})",
            f"mapped: {len(pairs)} of {len(self.teacher_tokens) - 1} non-blank teacher tokens, plus blank -> blank",
        ]
        if renamed:
            lines.append(
                "renamed: "
                + ", ".join(renamed[:_NAMES_SHOWN])
                + (f", ... (+{len(renamed) - _NAMES_SHOWN} more)" if len(renamed) > _NAMES_SHOWN else "")
            )
        lines.append(f"unmapped teacher tokens ({len(self.unmapped)}): {_names(self.unmapped) or '-'}")
        lines.append(f"student tokens no teacher token reaches ({len(uncovered)}): {_names(uncovered) or '-'}")
        lines.append(f"tolerated unmapped teacher mass per frame: {100 * self.max_unmapped_mass:.1f}%")
        return "\n".join(lines)

    # ------------------------------------------------------------ conversion
    def map_log_probs(
        self, teacher_log_probs: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Carry teacher log-posteriors into the student's vocabulary.

        Probabilities of teacher tokens sharing a student token are summed;
        student tokens that receive nothing get probability ``1e-8``; each
        frame is then renormalised over the mapped mass. Computed as a
        max-shifted sum of exponentials (a logsumexp), so no ``-inf`` or NaN
        appears. Padded frames (``mask`` False) are ignored: their output is
        finite and their lost mass is 0.

        Parameters
        ----------
        teacher_log_probs : torch.Tensor
            ``[B, T, Vt]`` teacher log-posteriors.
        mask : torch.Tensor, optional
            ``[B, T]`` bool, True on valid frames.

        Returns
        -------
        log_probs : torch.Tensor
            ``[B, T, Vs]`` student-space log-posteriors (same dtype as input).
        lost_mass : torch.Tensor
            ``[B, T]`` teacher probability on unmapped tokens per frame.

        Examples
        --------
        >>> vmap = VocabMap.build(["<pad>", "a", "A", "<s>"], 0, ["<blank>", "A"], 0)
        >>> lp, lost = vmap.map_log_probs(torch.tensor([[[0.1, 0.2, 0.3, 0.4]]]).log())
        >>> lp.exp(), lost
        (tensor([[[0.1667, 0.8333]]]), tensor([[0.4000]]))
        """
        dtype = teacher_log_probs.dtype
        lp = teacher_log_probs.detach().float()
        if mask is not None:
            lp = torch.where(mask.unsqueeze(-1), lp, torch.zeros((), device=lp.device))
        peak = lp.amax(-1, keepdim=True)
        peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
        shifted = torch.exp(lp - peak)  # [B, T, Vt], largest entry 1
        total = shifted.sum(-1)  # [B, T]
        matrix = self.matrix.to(device=lp.device, dtype=lp.dtype)
        mapped = shifted @ matrix  # [B, T, Vs]
        kept = mapped.sum(-1)
        lost_mass = (1.0 - kept / total.clamp_min(1e-30)).clamp(0.0, 1.0)
        probs = (mapped / total.clamp_min(1e-30).unsqueeze(-1)).clamp_min(_FLOOR_PROB)
        log_probs = probs.log()
        log_probs = log_probs - torch.logsumexp(log_probs, dim=-1, keepdim=True)
        if mask is not None:
            lost_mass = lost_mass * mask
        return log_probs.to(dtype), lost_mass

    def check_mass(self, lost_mass: torch.Tensor, mask: torch.Tensor | None = None) -> float:
        """Mean teacher mass lost to unmapped tokens; an error above ``max_unmapped_mass``.

        Parameters
        ----------
        lost_mass : torch.Tensor
            ``[B, T]`` from :meth:`map_log_probs`.
        mask : torch.Tensor, optional
            ``[B, T]`` bool, True on valid frames (all frames when None).

        Returns
        -------
        float
            Mean lost mass over valid frames.

        Raises
        ------
        VocabMappingError
            The mean exceeds ``max_unmapped_mass``; names the unmapped tokens.

        Examples
        --------
        >>> vmap = VocabMap.build(["<pad>", "A", "<s>"], 0, ["<blank>", "A"], 0)
        >>> vmap.check_mass(torch.tensor([[0.02, 0.0, 0.9]]), torch.tensor([[True, True, False]]))
        0.009999999776482582
        """
        lost = lost_mass.detach().float()
        if mask is None:
            share = float(lost.mean()) if lost.numel() else 0.0
        else:
            valid = mask.to(lost.dtype)
            share = float((lost * valid).sum() / valid.sum().clamp_min(1.0))
        if share > self.max_unmapped_mass:
            raise VocabMappingError(
                f"{100 * share:.1f}% of the teacher's probability mass per frame falls on tokens the student does "
                f"not have (tolerated: {100 * self.max_unmapped_mass:.1f}%); unmapped teacher tokens: "
                f"{_names(self.unmapped)}. Use a teacher whose units match the student's, or raise max_unmapped_mass"
            )
        return share


# ------------------------------------------------------------------ frame rate
class FrameRateError(ValueError):
    """Teacher and student time axes cannot be lined up."""


def _frames(lengths: torch.Tensor, ratio: float) -> torch.Tensor:
    """``lengths * ratio`` rounded half up, at least 1."""
    return torch.floor(lengths.double() * ratio + 0.5).long().clamp_min(1)


def _area_average(probs: torch.Tensor, lengths: torch.Tensor, ratio: float, out_len: int) -> torch.Tensor:
    """Coarser frames: each output frame averages the valid source frames it covers, by overlap.

    ``probs`` ``[B, Tt, V]``; output frame ``j`` spans source positions
    ``[j * ratio, (j + 1) * ratio)`` with ``ratio = dst / src > 1``.
    """
    batch, src_len, _ = probs.shape
    device = probs.device
    start = torch.arange(out_len, device=device, dtype=torch.float64) * ratio  # [Ts]
    end = start + ratio
    first = torch.floor(start).long()
    num = torch.zeros(batch, out_len, probs.shape[-1], device=device, dtype=probs.dtype)
    den = torch.zeros(batch, out_len, device=device, dtype=probs.dtype)
    for k in range(math.ceil(ratio) + 1):  # source frames an output frame can touch
        idx = first + k  # [Ts]
        overlap = (torch.minimum(idx + 1.0, end) - torch.maximum(idx.double(), start)).clamp_min(0.0)
        valid = idx.unsqueeze(0) < lengths.unsqueeze(1)  # [B, Ts]
        weight = overlap.to(probs.dtype).unsqueeze(0) * valid  # [B, Ts]
        gathered = probs[:, idx.clamp_max(src_len - 1)]  # [B, Ts, V]
        num = num + weight.unsqueeze(-1) * gathered
        den = den + weight
    return num / den.clamp_min(1e-12).unsqueeze(-1)


def _linear(probs: torch.Tensor, lengths: torch.Tensor, ratio: float, out_len: int) -> torch.Tensor:
    """Finer frames: linear interpolation between frame centres, clamped to each utterance's valid frames."""
    device = probs.device
    centres = (torch.arange(out_len, device=device, dtype=torch.float64) + 0.5) / ratio - 0.5  # source positions
    last = (lengths.to(device) - 1).clamp_min(0).double().unsqueeze(1)  # [B, 1]
    pos = torch.minimum(centres.unsqueeze(0).clamp_min(0.0), last)  # [B, Ts]
    lo = torch.floor(pos).long()
    hi = torch.minimum(lo + 1, last.long())
    frac = (pos - lo.double()).to(probs.dtype).unsqueeze(-1)
    v = probs.shape[-1]
    take = lambda idx: probs.gather(1, idx.unsqueeze(-1).expand(-1, -1, v))  # noqa: E731
    return (1.0 - frac) * take(lo) + frac * take(hi)


def resample_frames(
    log_probs: torch.Tensor, lengths: torch.Tensor, src_shift: float, dst_shift: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert posteriors from frame shift ``src_shift`` to ``dst_shift`` (seconds).

    Method, in probability space: frame ``i`` covers ``[i, i + 1) * shift``.
    When the destination is coarser (``dst > src``) every destination frame
    is the overlap-weighted average of the source probabilities it covers
    (area interpolation; for an integer ratio of 2 this averages frame
    pairs). When it is finer, probabilities are interpolated linearly between
    frame centres. Only each utterance's valid frames contribute (padding
    never leaks in). Each frame is renormalised and returned as log-probs.
    New lengths are ``lengths * src_shift / dst_shift`` rounded half up (at
    least 1). Equal shifts (within 1e-6 s) return the inputs unchanged.

    Parameters
    ----------
    log_probs : torch.Tensor
        ``[B, Tt, V]`` log-posteriors at ``src_shift``.
    lengths : torch.Tensor
        ``[B]`` long valid source frames.
    src_shift, dst_shift : float
        Seconds per frame of the source and the destination.

    Returns
    -------
    log_probs : torch.Tensor
        ``[B, Ts, V]`` log-posteriors at ``dst_shift``, ``Ts = round(Tt * src / dst)``.
    lengths : torch.Tensor
        ``[B]`` long valid destination frames.

    Examples
    --------
    >>> probs = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.5, 0.5]]])
    >>> out, lens = resample_frames(probs.clamp_min(1e-9).log(), torch.tensor([4]), 0.02, 0.04)
    >>> out.exp().round(decimals=3), lens
    (tensor([[[0.5000, 0.5000],
             [0.5000, 0.5000]]]), tensor([2]))
    """
    if src_shift <= 0 or dst_shift <= 0:
        raise FrameRateError(f"frame shifts must be positive, got {src_shift} and {dst_shift}")
    if abs(src_shift - dst_shift) < 1e-6:
        return log_probs, lengths
    ratio = dst_shift / src_shift  # source frames per destination frame
    if abs(ratio - round(ratio)) < 1e-6:
        ratio = float(round(ratio))
    elif abs(1 / ratio - round(1 / ratio)) < 1e-6:
        ratio = 1.0 / round(1 / ratio)
    lengths = lengths.to(log_probs.device).long().clamp(0, log_probs.shape[1])
    new_lengths = _frames(lengths, 1.0 / ratio)
    out_len = max(1, int(math.floor(log_probs.shape[1] / ratio + 0.5)), int(new_lengths.max()) if len(lengths) else 1)
    dtype = log_probs.dtype
    lp = log_probs.detach().float()
    lp = torch.where(torch.isfinite(lp), lp, torch.full((), -1e4, device=lp.device))
    probs = torch.softmax(lp, dim=-1)  # valid log-probs: exp; tolerant of unnormalised inputs
    resample = _area_average if ratio > 1 else _linear
    out = resample(probs, lengths, ratio if ratio > 1 else 1.0 / ratio, out_len)
    out = out.clamp_min(torch.finfo(out.dtype).tiny).log()
    out = out - torch.logsumexp(out, dim=-1, keepdim=True)
    return out.to(dtype), new_lengths


def reconcile_lengths(
    log_probs: torch.Tensor,
    lengths: torch.Tensor,
    target_lengths: torch.Tensor,
    target_max: int,
    tolerance: int = 2,
) -> torch.Tensor:
    """Make the teacher time axis match the student's exactly.

    Per utterance, the first ``min(lengths, target_lengths)`` teacher frames
    are kept; every later frame, up to ``target_max``, repeats the last kept
    frame (so a shorter teacher is padded and a longer one truncated; frames
    beyond ``target_lengths`` are filler that callers mask).

    Parameters
    ----------
    log_probs : torch.Tensor
        ``[B, T, V]`` teacher log-posteriors at the student's frame rate.
    lengths : torch.Tensor
        ``[B]`` long valid teacher frames.
    target_lengths : torch.Tensor
        ``[B]`` long valid student frames.
    target_max : int
        The student's padded number of frames.
    tolerance : int
        Largest accepted ``|lengths - target_lengths|`` (convolution edge effects).

    Returns
    -------
    torch.Tensor
        ``[B, target_max, V]``.

    Raises
    ------
    FrameRateError
        An utterance's lengths differ by more than ``tolerance``.

    Examples
    --------
    >>> lp = torch.arange(4.0).view(1, 4, 1)
    >>> reconcile_lengths(lp, torch.tensor([3]), torch.tensor([4]), 5).flatten()
    tensor([0., 1., 2., 2., 2.])
    """
    if log_probs.shape[0] != lengths.shape[0] or lengths.shape[0] != target_lengths.shape[0]:
        raise ValueError(
            f"batch sizes differ: log_probs {log_probs.shape[0]}, lengths {lengths.shape[0]}, "
            f"target_lengths {target_lengths.shape[0]}"
        )
    device = log_probs.device
    lengths = lengths.to(device).long()
    target_lengths = target_lengths.to(device).long()
    off = ((lengths - target_lengths).abs() > tolerance).nonzero().flatten().tolist()
    if off:
        shown = "; ".join(f"utterance {i}: teacher {int(lengths[i])} frames, student {int(target_lengths[i])}"
                          for i in off[:5])  # fmt: skip
        raise FrameRateError(
            f"teacher and student frame counts differ by more than {tolerance} ({shown}"
            f"{'; ...' if len(off) > 5 else ''}): check both models' frame shifts (frame_shift in the yaml) and the "
            "audio given to each; frame_tolerance raises the limit"
        )
    last = (torch.minimum(lengths, target_lengths).clamp(1, log_probs.shape[1]) - 1).unsqueeze(1)  # [B, 1]
    idx = torch.minimum(torch.arange(target_max, device=device).unsqueeze(0), last)  # [B, target_max]
    return log_probs.gather(1, idx.unsqueeze(-1).expand(-1, -1, log_probs.shape[-1]))
