"""Word n-gram language models for CTC beam search: build them with KenLM's ``lmplz``, check them before decoding.

:func:`build_lm` estimates a modified Kneser-Ney ARPA (or KenLM binary) from
transcripts normalised as speech_kd scores them (upper case, single spaces:
:func:`speech_kd.scoring.metrics.normalize_text`); :func:`read_texts` reads them from
CSV manifests (``wrd`` column) and text files. :func:`load_lm` reads an ARPA
(plain or gzipped) or KenLM binary file as it is, e.g. LibriSpeech's
``3-gram.pruned.1e-7.arpa`` or ``4-gram.arpa``, and :func:`check_lm_units`
refuses an LM whose words the model's units cannot spell. Every problem is a
one-line :class:`LMError` naming the file. KenLM itself comes from
``scripts/install_kenlm.sh``.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from speech_kd.data.dataio import read_csv_rows
from speech_kd.deploy.lm_runtime import read_lm_words
from speech_kd.scoring.metrics import normalize_text
from speech_kd.targets.vocab import unit_kind

__all__ = ["LMError", "LMInfo", "find_kenlm_tool", "read_texts", "build_lm", "load_lm", "check_lm_units"]

#: how to get KenLM's programs and module
INSTALL_HINT = "run scripts/install_kenlm.sh (builds KenLM's lmplz/build_binary into .venv/bin, installs kenlm)"
#: orders KenLM is built for (scripts/install_kenlm.sh: KENLM_MAX_ORDER=6)
MAX_ORDER = 6
#: least share of the LM's words the model's units must spell
MIN_SPELLABLE = 0.5
_BINARY_MAGIC = b"mmap lm "
_WORD_MARKERS = (" ", "|", "\u2581")


class LMError(ValueError):
    """A language model that cannot be built, read or used with a model's units (one line, naming the file)."""


@dataclass(frozen=True)
class LMInfo:
    """What :func:`load_lm` found in a language model file.

    Attributes
    ----------
    path : pathlib.Path
        The file.
    format : str
        ``"arpa"`` or ``"binary"`` (KenLM's).
    order : int or None
        The n-gram order (None for a binary file: KenLM reports it on loading).
    counts : dict
        n-grams per order from an ARPA header (empty for a binary file).
    words : tuple of str
        The vocabulary, ``<s>``/``</s>``/``<unk>`` left out.
    """

    path: Path
    format: str
    order: int | None
    counts: dict
    words: tuple[str, ...]


def find_kenlm_tool(name: str, explicit: str | os.PathLike | None = None) -> str:
    """Path of KenLM's ``name`` (``lmplz``, ``build_binary``): ``explicit``, else next to Python, else on PATH.

    Raises
    ------
    LMError
        Not found, naming ``scripts/install_kenlm.sh``.
    """
    if explicit is not None:
        path = shutil.which(os.fspath(explicit))
        if path is None:
            raise LMError(f"{explicit}: no such program (KenLM's {name}); {INSTALL_HINT}")
        return path
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    path = shutil.which(name)
    if path is None:
        raise LMError(f"KenLM's {name} is not installed (not in {beside.parent} nor on PATH); {INSTALL_HINT}")
    return path


def read_texts(
    text_files: Iterable[str | os.PathLike] = (), csv_files: Iterable[str | os.PathLike] = ()
) -> Iterator[str]:
    """Lines of text files and the ``wrd`` column of CSV manifests, in order (empty ones left out).

    Raises
    ------
    LMError
        A file that is missing, unreadable or not UTF-8, or a CSV without ``wrd``.
    """
    for path in csv_files:
        try:
            rows = read_csv_rows(path, required=("wrd",))
        except (OSError, ValueError) as err:
            raise LMError(str(err) if isinstance(err, ValueError) else f"{path}: {err.strerror or err}") from err
        for row in rows:
            if (row.get("wrd") or "").strip():
                yield row["wrd"]
    for path in text_files:
        try:
            with open(path, encoding="utf-8") as fh:
                for line in fh:
                    if line.strip():
                        yield line
        except UnicodeDecodeError as err:
            raise LMError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
        except OSError as err:
            raise LMError(f"{path}: {err.strerror or err}") from err


def build_lm(
    texts: Iterable[str],
    order: int,
    out: str | os.PathLike,
    lmplz: str | None = None,
    memory: str = "10%",
    prune: Iterable[int] = (),
) -> Path:
    """Estimate a modified Kneser-Ney word n-gram of ``texts`` with KenLM's ``lmplz`` into ``out``.

    Each text is normalised as transcripts are scored (upper case, single
    spaces); ``<s>``, ``</s>`` and ``<unk>`` in the text are treated as
    spaces. ``--discount_fallback`` lets tiny corpora (whose count-of-counts
    cannot give Kneser-Ney discounts) through. ``out`` ending in ``.bin`` is
    converted to a KenLM binary with ``build_binary`` (loads faster);
    anything else is an ARPA file. The file appears only when complete.

    Parameters
    ----------
    texts : iterable of str
        Sentences (e.g. :func:`read_texts`).
    order : int
        n-gram order, 2 to 6.
    out : path-like
        The ARPA (or ``.bin``) file to write.
    lmplz : str, optional
        The ``lmplz`` program (default: :func:`find_kenlm_tool`).
    memory : str
        lmplz's ``-S`` (its sort memory, e.g. ``"10%"``, ``"1G"``).
    prune : iterable of int
        lmplz's ``--prune`` thresholds per order (empty: keep all n-grams).

    Returns
    -------
    pathlib.Path
        ``out``.

    Raises
    ------
    LMError
        A bad order, no text, lmplz missing or failing.
    """
    out = Path(out)
    if isinstance(order, bool) or not isinstance(order, int) or not 2 <= order <= MAX_ORDER:
        raise LMError(f"{out}: --order must be an integer from 2 to {MAX_ORDER}, got {order!r}")
    program = find_kenlm_tool("lmplz", lmplz)
    binary = out.suffix == ".bin"
    binarizer = (
        find_kenlm_tool("build_binary", Path(program).parent / "build_binary" if lmplz else None) if binary else None
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lmplz-", dir=out.parent) as tmp:
        corpus = Path(tmp) / "corpus.txt"
        lines = 0
        with open(corpus, "w", encoding="utf-8") as fh:
            for text in texts:
                norm = normalize_text(text)
                if norm:
                    fh.write(norm + "\n")
                    lines += 1
        if lines == 0:
            raise LMError(f"{out}: no text to build the language model from")
        arpa = Path(tmp) / "lm.arpa"
        command = [
            program,
            "-o",
            str(order),
            "--discount_fallback",
            "--skip_symbols",
            "-S",
            memory,
            "-T",
            tmp,
            "--text",
            str(corpus),
            "--arpa",
            str(arpa),
        ]
        prune = [str(int(p)) for p in prune]
        if prune:
            command += ["--prune", *prune]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            last = [ln for ln in result.stderr.splitlines() if ln.strip()][-1:] or ["no message"]
            raise LMError(f"{out}: lmplz failed (exit {result.returncode}): {last[0].strip()}")
        if binary:
            made = Path(tmp) / "lm.bin"
            result = subprocess.run([binarizer, str(arpa), str(made)], capture_output=True, text=True)
            if result.returncode != 0:
                last = [ln for ln in result.stderr.splitlines() if ln.strip()][-1:] or ["no message"]
                raise LMError(f"{out}: build_binary failed (exit {result.returncode}): {last[0].strip()}")
            arpa = made
        os.replace(arpa, out)
    return out


def _arpa_header(path: Path) -> tuple[dict, bool]:
    r"""n-gram counts of an ARPA file's ``\data\`` header, and whether it ends with ``\end\``."""
    gz = _is_gzip(path)
    opener = gzip.open if gz else open
    counts: dict = {}
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            in_data = False
            for number, line in enumerate(fh):
                line = line.strip()
                if line == "\\data\\":
                    in_data = True
                elif in_data and line.startswith("ngram "):
                    key, _, value = line[len("ngram ") :].partition("=")
                    counts[int(key)] = int(value)
                elif in_data and line.startswith("\\"):
                    break
                elif not in_data and number > 1000:
                    break
    except (UnicodeDecodeError, ValueError, OSError, EOFError) as err:
        raise LMError(f"{path}: not a readable ARPA file ({type(err).__name__}: {err})") from err
    if gz:
        return counts, True  # the end of a compressed file is checked by KenLM on loading
    size = path.stat().st_size
    with open(path, "rb") as fh:
        fh.seek(max(0, size - 4096))
        ends = fh.read().rstrip().endswith(b"\\end\\")
    return counts, ends


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


def load_lm(path: str | os.PathLike) -> LMInfo:
    r"""Check a language model file and read its vocabulary: an ARPA file (plain or ``.gz``) or a KenLM binary.

    The check is on the file's structure (an ARPA header with its n-gram
    counts, a ``\1-grams:`` section of that size, the ``\end\`` marker; a
    binary file's KenLM signature), so that problems show before a long
    decoding; the decoder's ``kenlm.Model`` reads the rest.

    Parameters
    ----------
    path : path-like
        The file.

    Returns
    -------
    LMInfo

    Raises
    ------
    LMError
        Missing, empty, a directory, neither ARPA nor KenLM binary, or truncated (a binary file
        without the vocabulary KenLM writes at its end).
    """
    path = Path(path)
    if not path.exists():
        raise LMError(f"{path}: no such language model file")
    if path.is_dir():
        raise LMError(f"{path}: is a directory, not a language model file (ARPA or KenLM binary)")
    if path.stat().st_size == 0:
        raise LMError(f"{path}: empty file, not a language model")
    with open(path, "rb") as fh:
        head = fh.read(len(_BINARY_MAGIC))
    if head == _BINARY_MAGIC:
        words = read_lm_words(path)
        if words is None:
            raise LMError(f"{path}: corrupt or truncated KenLM binary (no vocabulary at its end)")
        return LMInfo(path, "binary", None, {}, tuple(words))
    counts, ends = _arpa_header(path)
    if not counts:
        raise LMError(f"{path}: neither an ARPA file (no \\data\\ header with ngram counts) nor a KenLM binary")
    if sorted(counts) != list(range(1, len(counts) + 1)):
        raise LMError(f"{path}: corrupt ARPA header: n-gram orders {sorted(counts)}")
    if not ends:
        raise LMError(f"{path}: truncated ARPA file (no \\end\\ marker at its end)")
    words = read_lm_words(path)
    specials = counts[1] - len(words or ())
    if not 0 <= specials <= 3:
        raise LMError(
            f"{path}: corrupt ARPA file: the header counts {counts[1]} unigrams, "
            f"the \\1-grams: section has {len(words or ()) + 3} or fewer"
        )
    return LMInfo(path, "arpa", max(counts), counts, tuple(words or ()))


def _default_blank(tokens: list[str]) -> int:
    for name in ("<blank>", "<pad>", "<eps>", "-", "_"):
        if name in tokens:
            return tokens.index(name)
    return 0


def check_lm_units(lm: str | os.PathLike | LMInfo, tokens: list[str], blank: int | None = None) -> float:
    """Refuse an LM whose words the model's units cannot spell; the share of its words they spell.

    Word boundaries must be found: a space (or ``|``) unit, or SentencePiece
    ``▁``-prefixed units. Then at least half the LM's words must consist of
    characters of the model's units (``<...>`` specials and the blank set
    aside); a case mismatch (LM words lower case, units upper case or the
    reverse) is named as such.

    Parameters
    ----------
    lm : path-like or LMInfo
        The language model (read with :func:`load_lm`).
    tokens : list of str
        The model's units in index order, blank included.
    blank : int, optional
        The blank's index (default: a ``<blank>``/``<pad>`` unit, else 0).

    Returns
    -------
    float
        Share of the LM's words the units spell.

    Raises
    ------
    LMError
        No word boundary, or too few words spelt.
    """
    info = lm if isinstance(lm, LMInfo) else load_lm(lm)
    tokens = list(tokens)
    blank = _default_blank(tokens) if blank is None else blank
    kind = unit_kind(tokens, blank)
    units = [t for i, t in enumerate(tokens) if i != blank and not (len(t) > 2 and t[0] + t[-1] in ("<>", "[]"))]
    has_delimiter = any(t in (" ", "|") for t in units)
    has_spm = any(t.startswith("\u2581") for t in units)
    if not (has_delimiter or has_spm):
        what = "sub-word" if kind == "subword" else "character"
        raise LMError(
            f"{info.path}: the model's {what} units have no word boundary (no ' ' or '|' unit, no "
            "'\u2581'-prefixed pieces), so the LM's words cannot be found in its output"
        )
    alphabet = {c for t in units for c in t if t not in _WORD_MARKERS} - set(_WORD_MARKERS)
    words = [w for w in info.words if w and not (w[0] + w[-1] == "<>" and len(w) > 2)]
    if not words:
        raise LMError(f"{info.path}: the language model has no words")
    share = sum(set(w) <= alphabet for w in words) / len(words)
    if share >= MIN_SPELLABLE:
        return share
    upper = sum(set(w.upper()) <= alphabet for w in words) / len(words)
    lower = sum(set(w.lower()) <= alphabet for w in words) / len(words)
    hint = ""
    if upper >= MIN_SPELLABLE:
        hint = "; the LM's words are lower case and the model's units upper case: rebuild it with speech-kd lm"
    elif lower >= MIN_SPELLABLE:
        hint = "; the LM's words are upper case and the model's units lower case"
    examples = ", ".join(repr(w) for w in words if not set(w) <= alphabet)[:80]
    raise LMError(
        f"{info.path}: only {100 * share:.0f}% of the LM's {len(words)} words are spelt with the "
        f"model's {len(alphabet)} units (e.g. {examples}){hint}"
    )
