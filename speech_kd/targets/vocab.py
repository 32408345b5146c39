"""Map a teacher's tokens onto a student's: blank to blank, word delimiters to the space, case folding.

:class:`VocabMap` carries teacher probabilities into the student's vocabulary
and measures the mass that has no student token; :func:`unit_kind` tells
character vocabularies from sub-word ones, whose frame-by-frame mapping is
refused. Shapes: ``B`` batch, ``T`` frames, ``Vt``/``Vs`` teacher/student tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["VocabMappingError", "unit_kind", "VocabMap", "WORD_DELIMITERS"]

#: teacher tokens that separate words; they map onto the student's space token
WORD_DELIMITERS = ("|", "\u2581", " ")

#: probability given to student tokens that receive no teacher mass (before renormalisation)
_FLOOR_PROB = 1e-8

#: how many token names error messages show before abbreviating
_NAMES_SHOWN = 12


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
        renamed = [
            f"{self.teacher_tokens[i]!r} -> {self.student_tokens[j]!r}"
            for i, j in pairs
            if self.teacher_tokens[i] != self.student_tokens[j]
        ]
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
