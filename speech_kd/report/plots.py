"""Report figures: pure functions from numbers to PNG bytes (matplotlib, Agg backend, no display).

Every figure has labelled axes with units, a legend where there is more than
one series, and ``constrained_layout`` so text does not overlap. Legends that
could cover data sit outside the axes.

Dimension symbols: ``T`` frames of one utterance (the student's frame rate),
``V`` tokens of the student's vocabulary, ``N`` selected frames.
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter  # noqa: E402

__all__ = ["learning_curves", "posteriorgram", "wer_bars", "size_vs_wer", "spike_frames", "shown_tokens", "seed_curves"]

DPI = 110
#: KD diagnostics of ``history.jsonl`` drawn on the 0..1 axis of the learning curves
KD_FRACTIONS = ("agreement", "blank_share", "lost_mass", "kd_weight")
#: vocabularies larger than this show only the tokens the models use (BPE vocabularies have thousands)
MAX_TOKEN_ROWS = 48


#: a legend under the x label of its axes (never over the data; constrained_layout makes room)
_BELOW = {"fontsize": 8, "loc": "upper center", "bbox_to_anchor": (0.5, -0.2), "ncol": 4, "frameon": False}


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    return buf.getvalue()


def _series(history: list[dict], stage: str, key: str) -> np.ndarray:
    return np.array([h.get(stage, {}).get(key, np.nan) for h in history], dtype=float)


def _has(values: np.ndarray) -> bool:
    return bool(np.isfinite(values).any())


def learning_curves(history: list[dict], kd_reduction: str = "utterance", teacher_wer: float | None = None) -> bytes:
    """Per-epoch losses (total, CTC, KD, CR-CTC's consistency), dev WER/CER, learning rate and KD diagnostics.

    Parameters
    ----------
    history : list of dict
        Rows of ``history.jsonl``: ``{"epoch", "lr", "train": {"loss", ...}, "valid": {"loss", "WER", "CER"}}``;
        KD runs add ``ctc_loss``, ``kd_loss``, ``agreement``, ``blank_share``, ``lost_mass``, ``kd_weight``
        and ``temperature`` to ``train`` (``layer_loss`` with ``kd_layers``); CR-CTC runs
        (``cr_ctc_weight > 0``) add ``cr_loss``.
    kd_reduction : str
        ``utterance`` or ``frame``: the unit of the KD loss axis.
    teacher_wer : float, optional
        The teacher's dev WER (``teacher_dev.json``), drawn as a dashed line on the dev panel.

    Returns
    -------
    bytes
        A PNG: three panels (losses, dev error rates, learning rate), plus a
        fourth with the KD diagnostics for KD runs.

    Examples
    --------
    >>> rows = [{"epoch": e, "lr": 1e-3, "train": {"loss": 9.0 / e},
    ...          "valid": {"loss": 8.0 / e, "WER": 90.0, "CER": 40.0}} for e in (1, 2)]
    >>> learning_curves(rows)[1:4]
    b'PNG'
    """
    epochs = [h["epoch"] for h in history]
    kd = _has(_series(history, "train", "kd_loss"))
    if kd:
        fig, grid = plt.subplots(2, 2, figsize=(12, 7), constrained_layout=True)
        axes = list(grid.flat)
    else:
        fig, grid = plt.subplots(1, 3, figsize=(13, 3.8), constrained_layout=True)
        axes = list(grid)

    ax = axes[0]
    ax.plot(epochs, _series(history, "train", "loss"), "o-", label="train total")
    if _has(_series(history, "train", "ctc_loss")):
        ax.plot(epochs, _series(history, "train", "ctc_loss"), "s--", label="train CTC")
    if _has(_series(history, "train", "cr_loss")):  # CR-CTC's consistency term (unweighted), per utterance as CTC
        ax.plot(epochs, _series(history, "train", "cr_loss"), "v-.", label="train consistency (CR-CTC)")
    ax.plot(epochs, _series(history, "valid", "loss"), "^-", label="dev CTC")
    ax.set(xlabel="epoch", ylabel="CTC / total loss (per utterance)", title="Losses")
    handles, labels = ax.get_legend_handles_labels()
    if kd:
        kd_ax = ax.twinx()
        kd_ax.plot(epochs, _series(history, "train", "kd_loss"), "d:", color="tab:red", label="train KD (right axis)")
        if _has(_series(history, "train", "layer_loss")):  # kd_layers: the layer term (before kd_layer_weight)
            layers = _series(history, "train", "layer_loss")
            kd_ax.plot(epochs, layers, "v:", color="tab:purple", label="train layer KD (right axis)")
        kd_ax.set_ylabel(f"KD loss (per {'frame' if kd_reduction == 'frame' else 'utterance'})", color="tab:red")
        more = kd_ax.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels, **_BELOW)

    ax = axes[1]
    ax.plot(epochs, _series(history, "valid", "WER"), "o-", markersize=8, label="dev WER")
    ax.plot(epochs, _series(history, "valid", "CER"), "s--", markersize=5, label="dev CER")  # visible on equal values
    if teacher_wer is not None:
        ax.axhline(teacher_wer, color="black", linestyle="--", linewidth=1, label=f"teacher dev WER {teacher_wer:.1f}")
    ax.set(xlabel="epoch", ylabel="error rate (%)", title="Dev error rates (greedy decoding)")
    ax.legend(**_BELOW)

    ax = axes[2]
    ax.plot(epochs, [h.get("lr", np.nan) for h in history], "o-", color="tab:gray")
    ax.set(xlabel="epoch", ylabel="learning rate (end of epoch)", title="Learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))

    if kd:
        ax = axes[3]
        for key in KD_FRACTIONS:
            values = _series(history, "train", key)
            if _has(values):
                ax.plot(epochs, values, "o-", label=key.replace("_", " "))
        ax.set(xlabel="epoch", ylabel="fraction of frames / mass", title="KD diagnostics (training)")
        ax.set_ylim(-0.03, 1.03)
        temperature = _series(history, "train", "temperature")
        if _has(temperature):
            finite = temperature[np.isfinite(temperature)]
            if np.ptp(finite) > 0:
                t_ax = ax.twinx()
                t_ax.plot(epochs, temperature, "x--", color="tab:brown", label="temperature (right axis)")
                t_ax.set_ylabel("temperature")
                more = t_ax.get_legend_handles_labels()
                handles, labels = ax.get_legend_handles_labels()
                ax.legend(handles + more[0], labels + more[1], **_BELOW)
            else:
                ax.set_title(f"KD diagnostics (training, temperature {finite[0]:g})")
                ax.legend(**_BELOW)
        else:
            ax.legend(**_BELOW)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _png(fig)


def spike_frames(log_probs: np.ndarray, blank: int) -> np.ndarray:
    """Frames ``[N]`` whose argmax is a non-blank token (CTC spikes) of ``log_probs [T, V]``.

    Examples
    --------
    >>> lp = np.log(np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]))
    >>> spike_frames(lp, blank=0).tolist()
    [1]
    """
    best = log_probs.argmax(-1)
    return np.flatnonzero(best != blank)


def shown_tokens(panels: list[np.ndarray], blank: int, limit: int = MAX_TOKEN_ROWS) -> np.ndarray:
    """Token indices ``[<= limit]`` to draw as rows: all of a small vocabulary, else blank + the most used.

    ``panels`` are log-posteriors ``[T, V]``. Tokens are ranked by their
    highest probability in any panel; the result is sorted by index.

    Examples
    --------
    >>> lp = np.log(np.full((4, 3), 1 / 3))
    >>> shown_tokens([lp], blank=0).tolist()
    [0, 1, 2]
    """
    vocab = panels[0].shape[-1]
    if vocab <= limit:
        return np.arange(vocab)
    peak = np.max([np.exp(p).max(0) for p in panels], axis=0)  # [V]
    peak[blank] = np.inf
    return np.sort(np.argsort(-peak, kind="stable")[:limit])


def _token_label(token: str, index: int, blank: int) -> str:
    if index == blank:
        return "<b>"
    if token == " ":
        return "␣"
    return token.replace("▁", "␣")


def posteriorgram(
    teacher: np.ndarray | None,
    student: np.ndarray,
    tokens: list[str],
    frame_shift: float,
    blank: int,
    title: str,
    student_name: str = "student",
) -> bytes:
    """Teacher (top) and student (bottom) posteriors on one colour scale, spikes marked.

    Parameters
    ----------
    teacher : numpy.ndarray or None
        ``[T, V]`` teacher log-posteriors on the student's tokens and frame
        rate; ``None`` draws the student alone.
    student : numpy.ndarray
        ``[T, V]`` student log-posteriors.
    tokens : list of str
        ``V`` token strings (y axis; blank drawn as ``<b>``, space as ``␣``).
    frame_shift : float
        Seconds per frame (x axis in seconds).
    blank : int
        Index of the CTC blank.
    title : str
        Figure title (the utterance ID).
    student_name : str
        Name of the lower panel's model (``model`` on the evaluation page).

    Returns
    -------
    bytes
        A PNG. Hollow circles mark the teacher's spikes (non-blank argmax
        frames), crosses the student's, in both panels: a cross beside a
        circle is a timing shift, a lone marker a token only one model emits.

    Examples
    --------
    >>> lp = np.log(np.full((10, 3), 1 / 3))
    >>> posteriorgram(lp, lp, ["<blank>", "A", "B"], 0.04, 0, "utt")[1:4]
    b'PNG'
    """
    panels = [("teacher", teacher), (student_name, student)] if teacher is not None else [(student_name, student)]
    rows = shown_tokens([p for _, p in panels], blank)
    row_of = {int(t): i for i, t in enumerate(rows)}
    labels = [_token_label(tokens[t], int(t), blank) for t in rows]
    height = max(2.6, 0.11 * len(rows) + 0.6)
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(12, height * len(panels) + 0.7), constrained_layout=True, squeeze=False, sharex=True
    )
    axes = axes[:, 0]
    image = None
    t_max = student.shape[0] * frame_shift
    for ax, (name, lp) in zip(axes, panels):
        probs = np.exp(lp[:, rows]).T  # [rows, T]
        extent = (0, lp.shape[0] * frame_shift, -0.5, len(rows) - 0.5)
        image = ax.imshow(
            probs,
            aspect="auto",
            origin="lower",
            vmin=0.0,
            vmax=1.0,
            cmap="magma",
            extent=extent,
            interpolation="nearest",
        )
        for other, src in (("teacher", teacher), ("student", student)):
            if src is None:
                continue
            frames = spike_frames(src, blank)
            best = src[frames].argmax(-1)
            keep = np.array([int(b) in row_of for b in best], dtype=bool)
            x = (frames[keep] + 0.5) * frame_shift
            y = [row_of[int(b)] for b in best[keep]]
            if other == "teacher":
                ax.scatter(
                    x, y, s=30, marker="o", facecolors="none", edgecolors="cyan", linewidths=1.1, label="teacher spikes"
                )
            else:
                ax.scatter(x, y, s=22, marker="x", c="lime", linewidths=1.1, label=f"{student_name} spikes")
        ax.set_yticks(range(len(rows)), labels, fontsize=7 if len(rows) <= 32 else 5)
        ax.set(ylabel=f"{name}: token", xlim=(0, t_max))
    axes[-1].set_xlabel("time (s)")
    axes[0].set_title(title, fontsize=10, loc="left")
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside upper right", ncol=len(handles), fontsize=8)
    fig.colorbar(image, ax=list(axes), label="posterior probability", fraction=0.025, pad=0.01)
    return _png(fig)


def wer_bars(rows: list[dict]) -> bytes:
    """WER and CER bars per model (``rows``: dicts with ``name``, ``wer``, ``cer`` in percent).

    Examples
    --------
    >>> wer_bars([{"name": "teacher", "wer": 20.0, "cer": 8.0}, {"name": "student", "wer": 40.0, "cer": 15.0}])[1:4]
    b'PNG'
    """
    names = [r["name"] for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(5.5, 1.5 * len(rows) + 3), 3.8), constrained_layout=True)
    wer = ax.bar(x - 0.2, [r["wer"] for r in rows], 0.4, label="WER")
    cer = ax.bar(x + 0.2, [r["cer"] for r in rows], 0.4, label="CER")
    ax.bar_label(wer, fmt="%.1f", fontsize=8, padding=2)
    ax.bar_label(cer, fmt="%.1f", fontsize=8, padding=2)
    ax.set_xticks(x, names, rotation=0 if max(len(n) for n in names) < 12 else 20, ha="center")
    ax.set(ylabel="error rate (%)", xlabel="model", title="Test error rates (greedy CTC decoding)")
    ax.set_ylim(0, max([r["wer"] for r in rows] + [r["cer"] for r in rows] + [1.0]) * 1.12)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def _human(count: float) -> str:
    """``1500000`` -> ``1.5M`` (tick labels of parameter counts)."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if count >= scale:
            return f"{count / scale:g}{unit}"
    return f"{count:g}"


def size_vs_wer(rows: list[dict]) -> bytes:
    """Parameters (log x) against WER, one point per model, named in the legend (labels never collide).

    Examples
    --------
    >>> size_vs_wer([{"name": "a", "params": 10_000, "wer": 50.0}, {"name": "b", "params": 1e6, "wer": 20.0}])[1:4]
    b'PNG'
    """
    fig, ax = plt.subplots(figsize=(7.5, 3.8), constrained_layout=True)
    markers = "osD^vP*X"
    for i, r in enumerate(rows):
        ax.scatter(
            r["params"],
            r["wer"],
            s=55,
            marker=markers[i % len(markers)],
            alpha=0.85,
            zorder=3,
            label=f"{r['name']}: {r['params'] / 1e6:.2f} M, {r['wer']:.1f} %",
        )
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _human(v)))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.margins(x=0.15, y=0.15)
    ax.set(xlabel="parameters (log scale)", ylabel="test WER (%)", title="Size against accuracy")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="model: size, WER", title_fontsize=8)
    return _png(fig)


def seed_curves(groups: dict[str, list[list[dict]]], teacher: float | None = None, metric: str = "WER") -> bytes:
    """Dev ``metric`` per epoch of several models, each trained with several seeds: mean line, min-max band.

    Parameters
    ----------
    groups : dict
        Model name -> one ``history.jsonl`` row list per seed (see :func:`learning_curves`).
    teacher : float, optional
        The teacher's dev ``metric`` (%), drawn as a horizontal line.
    metric : str
        ``WER`` or ``CER`` (a key of each row's ``valid``).

    Examples
    --------
    >>> h = lambda *w: [{"epoch": i + 1, "valid": {"WER": x}} for i, x in enumerate(w)]
    >>> seed_curves({"scratch": [h(90, 60), h(80, 50)], "kd": [h(70, 45), h(60, 44)]}, teacher=40.0)[1:4]
    b'PNG'
    """
    fig, ax = plt.subplots(figsize=(7.5, 4.0), constrained_layout=True)
    top = 0.0
    for name, runs in groups.items():
        epochs = min(len(run) for run in runs)
        if epochs == 0:
            continue
        values = np.array([_series(run[:epochs], "valid", metric) for run in runs])  # [seeds, epochs]
        x = np.arange(1, epochs + 1)
        mean = np.nanmean(values, axis=0)
        (line,) = ax.plot(x, mean, lw=1.8, label=f"{name} (mean of {len(runs)}; last {mean[-1]:.1f} %)")
        if len(runs) > 1:
            ax.fill_between(
                x, np.nanmin(values, axis=0), np.nanmax(values, axis=0), color=line.get_color(), alpha=0.18, lw=0
            )
        top = max(top, float(np.nanmax(values[:, min(2, epochs - 1) :])))
    if teacher is not None:
        ax.axhline(teacher, color="0.3", ls="--", lw=1.2, label=f"teacher ({teacher:.1f} %)")
    ax.set_ylim(0, min(100.0, top * 1.08) if top else 100.0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="epoch", ylabel=f"dev {metric} (%)", title=f"Dev {metric} per epoch (band: min-max over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(**{**_BELOW, "ncol": 2})
    return _png(fig)
