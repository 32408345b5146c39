"""A tiny page builder writing the same content as self-contained HTML and as Markdown.

HTML inlines every image as a ``data:image/png;base64`` URI and escapes all
text; Markdown links the PNGs written to a ``*_files`` folder. No network,
no template engine. The only script is an inline load check that sets
``data-broken-images`` on ``<body>`` (the number of images that failed to
decode), which the tests read back from headless Chromium.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

__all__ = ["Page"]

_STYLE = """
html { background: #fff; }
body { font-family: system-ui, sans-serif; max-width: 1400px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ccc; }
img { max-width: 100%; height: auto; display: block; margin: 0.5em 0; }
figure { margin: 1em 0 2em 0; } figcaption pre { margin-top: 0; }
table { border-collapse: collapse; margin: 0.5em 0; } td, th { border: 1px solid #ccc; padding: 3px 8px; }
th { background: #f3f3f3; } td { text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f7f7f7; padding: 0.5em; overflow-x: auto; font-size: 0.85em; }
details { margin: 0.4em 0; } summary { cursor: pointer; }
"""

# sets data-broken-images on <body> once loaded: the number of images that failed to decode
_CHECK = (
    "<script>window.addEventListener('load',function(){var n=0;"
    "document.querySelectorAll('img').forEach(function(i){if(!i.complete||i.naturalWidth===0)n++;});"
    "document.body.setAttribute('data-broken-images',String(n));});</script>"
)

_NUMBER = re.compile(r"^[-+]?[\d,]*\.?\d+(e[-+]?\d+)?\s*%?$", re.IGNORECASE)


def _cell(value, numeric: bool) -> str:
    text = str(value)
    cls = ' class="num"' if numeric and _NUMBER.match(text.strip()) else ""
    return f"<td{cls}>{html.escape(text)}</td>"


#: in the ``<head>`` of every page this package writes: how a rerun knows the file is its own
GENERATOR = '<meta name="generator" content="speech_kd">'
#: title prefixes of the pages written before ``GENERATOR`` existed
_OWN_TITLES = ("<title>speech_kd report:", "<title>speech_kd evaluation:")


def _is_own(path: Path, markers: tuple[str, ...]) -> bool:
    """Whether the first 4 KB of the file ``path`` hold one of ``markers``."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            head = fh.read(4096)
    except OSError:
        return False
    return any(marker in head for marker in markers)


def check_own_page(html_path: str | Path, md_path: str | Path, files_dir: str | Path | None = None) -> None:
    """Refuse to replace a page's files unless this package wrote them (``FileExistsError`` naming the path).

    ``html_path`` may exist when it is a page of ours (:data:`GENERATOR`, or an
    older page's title), ``md_path`` when it starts with ``# speech_kd ``, and
    ``files_dir`` (the Markdown's PNGs; ``None``: not checked) when it is empty
    or the HTML page beside it is ours. Anything else is the user's: nothing is written.
    """
    html_path, md_path = Path(html_path), Path(md_path)
    advice = "not overwritten: move it away (or choose another name)"
    if html_path.is_dir() or md_path.is_dir():
        raise IsADirectoryError(f"{html_path if html_path.is_dir() else md_path}: a folder; {advice}")
    html_ours = html_path.is_file() and _is_own(html_path, (GENERATOR, *_OWN_TITLES))
    if html_path.exists() and not html_ours:
        raise FileExistsError(f"{html_path}: exists and was not written by speech_kd; {advice}")
    if md_path.exists() and not _is_own(md_path, ("# speech_kd ",)):
        raise FileExistsError(f"{md_path}: exists and was not written by speech_kd; {advice}")
    if files_dir is None:
        return
    files_dir = Path(files_dir)
    if files_dir.exists() and not html_ours and (not files_dir.is_dir() or any(files_dir.iterdir())):
        raise FileExistsError(f"{files_dir}: exists beside no page of speech_kd's; {advice}")


def _md_cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


class Page:
    """Accumulates blocks, then writes an HTML and a Markdown file (images into ``files_dir``).

    Parameters
    ----------
    title : str
        The page's ``<h1>`` and ``<title>``.
    files_dir : path-like
        Where the PNGs linked by the Markdown file go (created on the first image).
    """

    def __init__(self, title: str, files_dir: str | Path) -> None:
        self.title = title
        self.files_dir = Path(files_dir)
        self._html: list[str] = [f"<h1>{html.escape(title)}</h1>"]
        self._md: list[str] = [f"# {title}", ""]

    def heading(self, text: str) -> None:
        """A section title."""
        self._html.append(f"<h2>{html.escape(text)}</h2>")
        self._md += [f"## {text}", ""]

    def paragraph(self, text: str) -> None:
        """A paragraph of plain text."""
        self._html.append(f"<p>{html.escape(text)}</p>")
        self._md += [text, ""]

    def preformatted(self, text: str) -> None:
        """Monospaced text (alignments, transcripts, yaml)."""
        self._html.append(f"<pre>{html.escape(text)}</pre>")
        self._md += ["```", text.rstrip("\n"), "```", ""]

    def details(self, summary: str, text: str, lang: str = "") -> None:
        """Collapsed monospaced text (``lang``: the Markdown code-fence language)."""
        self._html.append(f"<details><summary>{html.escape(summary)}</summary><pre>{html.escape(text)}</pre></details>")
        self._md += [f"<details><summary>{html.escape(summary)}</summary>", "", f"```{lang}", text.rstrip("\n"), "```"]
        self._md += ["</details>", ""]

    def table(self, header: list[str], rows: list[list], numeric: bool = True) -> None:
        """A table of strings/numbers (``numeric``: right-align the cells that are numbers)."""
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        body = "".join("<tr>" + "".join(_cell(c, numeric) for c in row) + "</tr>" for row in rows)
        self._html.append(f"<table><tr>{head}</tr>{body}</table>")
        self._md += ["| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
        self._md += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
        self._md.append("")

    def _store(self, name: str, png: bytes) -> str:
        self.files_dir.mkdir(parents=True, exist_ok=True)
        (self.files_dir / name).write_bytes(png)
        return base64.b64encode(png).decode("ascii")

    def image(self, name: str, png: bytes, alt: str) -> None:
        """A PNG: inlined in the HTML, written to ``files_dir/name`` for the Markdown."""
        data = self._store(name, png)
        self._html.append(f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">')
        self._md += [f"![{alt}]({self.files_dir.name}/{name})", ""]

    def figure(self, name: str, png: bytes, alt: str, caption: str) -> None:
        """A PNG with a monospaced caption under it (transcripts), kept together."""
        data = self._store(name, png)
        self._html.append(
            f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'
            f"<figcaption><pre>{html.escape(caption)}</pre></figcaption></figure>"
        )
        self._md += [f"![{alt}]({self.files_dir.name}/{name})", "", "```", caption.rstrip("\n"), "```", ""]

    def write(self, html_path: str | Path, md_path: str | Path) -> Path:
        """Write both files; return the HTML path (files speech_kd did not write: refused, :func:`check_own_page`)."""
        check_own_page(html_path, md_path)  # the images' folder: checked by the caller before the first image
        doc = (
            f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">{GENERATOR}'
            f"<title>{html.escape(self.title)}</title><style>{_STYLE}</style>{_CHECK}</head><body>\n"
            + "\n".join(self._html)
            + "\n</body></html>\n"
        )
        Path(html_path).parent.mkdir(parents=True, exist_ok=True)
        Path(html_path).write_text(doc, encoding="utf-8")
        Path(md_path).write_text("\n".join(self._md) + "\n", encoding="utf-8")
        return Path(html_path)
