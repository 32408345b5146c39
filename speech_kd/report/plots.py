"""Report figures: pure functions from numbers to PNG bytes (matplotlib, Agg backend, no display).

Every figure has labelled axes with units, a legend where there is more than
one series, and ``constrained_layout`` so text does not overlap.
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

__all__ = ["learning_curves", "posteriorgram", "wer_bars", "size_vs_wer", "spike_frames"]

DPI = 110


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    return buf.getvalue()


def learning_curves(history: list[dict]) -> bytes:
    """Per-epoch losses (total, CTC, KD), dev WER/CER and learning rate, from ``history.jsonl`` rows."""
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), constrained_layout=True)

    def series(stage: str, key: str) -> list[float]:
        return [h.get(stage, {}).get(key, np.nan) for h in history]

    ax = axes[0]
    ax.plot(epochs, series("train", "loss"), "o-", label="train total")
    if any(np.isfinite(series("train", "ctc_loss"))):
        ax.plot(epochs, series("train", "ctc_loss"), "s--", label="train CTC")
    ax.plot(epochs, series("valid", "loss"), "^-", label="dev CTC")
    ax.set(xlabel="epoch", ylabel="loss (per utterance)", title="Losses")
    if any(np.isfinite(series("train", "kd_loss"))):
        kd_ax = ax.twinx()
        kd_ax.plot(epochs, series("train", "kd_loss"), "d:", color="tab:red", label="train KD (right axis)")
        kd_ax.set_ylabel("KD loss (per frame)")
        lines = ax.get_legend_handles_labels()
        kd_lines = kd_ax.get_legend_handles_labels()
        ax.legend(lines[0] + kd_lines[0], lines[1] + kd_lines[1], fontsize=8)
    else:
        ax.legend(fontsize=8)

    ax = axes[1]
    ax.plot(epochs, series("valid", "WER"), "o-", label="dev WER")
    ax.plot(epochs, series("valid", "CER"), "s-", label="dev CER")
    ax.set(xlabel="epoch", ylabel="error rate (%)", title="Dev error rates")
    ax.legend(fontsize=8)

    ax = axes[2]
    ax.plot(epochs, [h.get("lr", np.nan) for h in history], "o-", color="tab:gray")
    ax.set(xlabel="epoch", ylabel="learning rate (end of epoch)", title="Learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _png(fig)


def spike_frames(log_probs: np.ndarray, blank: int) -> np.ndarray:
    """Frames ``[N]`` whose argmax is a non-blank token (CTC spikes) of ``log_probs [T, V]``."""
    best = log_probs.argmax(-1)
    return np.flatnonzero(best != blank)


def posteriorgram(
    teacher: np.ndarray | None,
    student: np.ndarray,
    tokens: list[str],
    frame_shift: float,
    blank: int,
    title: str,
) -> bytes:
    """Teacher (top) and student (bottom) posteriors ``[T, V]`` on one colour scale, spikes marked.

    Both are in the student's token space and frame rate. Tokens are on y
    (blank first row), time in seconds on x; the colour is the probability.
    Dots mark each model's spikes (non-blank argmax frames): dots of one row
    over the other's show timing shifts.
    """
    panels = [("teacher", teacher), ("student", student)] if teacher is not None else [("student", student)]
    labels = [("<b>" if i == blank else ("␣" if t == " " else t)) for i, t in enumerate(tokens)]
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, 2.8 * len(panels) + 0.4), constrained_layout=True,
                             squeeze=False)  # fmt: skip
    axes = axes[:, 0]
    image = None
    for ax, (name, lp) in zip(axes, panels):
        probs = np.exp(lp).T  # [V, T]
        t_max = lp.shape[0] * frame_shift
        image = ax.imshow(probs, aspect="auto", origin="lower", vmin=0.0, vmax=1.0, cmap="magma",
                          extent=(0, t_max, -0.5, len(tokens) - 0.5), interpolation="nearest")  # fmt: skip
        for other, marker, colour in (("teacher", "o", "cyan"), ("student", "x", "lime")):
            src = teacher if other == "teacher" else student
            if src is None:
                continue
            frames = spike_frames(src, blank)
            ax.scatter((frames + 0.5) * frame_shift, src[frames].argmax(-1), s=14, marker=marker, c=colour,
                       linewidths=1.0, label=f"{other} spikes")  # fmt: skip
        ax.set_yticks(range(len(tokens)), labels, fontsize=6)
        ax.set(ylabel=f"{name}\ntoken", xlim=(0, t_max))
        ax.legend(loc="upper right", fontsize=7, framealpha=0.8)
    axes[-1].set_xlabel("time (s)")
    axes[0].set_title(title, fontsize=9, loc="left")
    fig.colorbar(image, ax=list(axes), label="posterior probability", fraction=0.02, pad=0.01)
    return _png(fig)


def wer_bars(rows: list[dict]) -> bytes:
    """WER and CER bars per model (``rows``: dicts with ``name``, ``wer``, ``cer``)."""
    names = [r["name"] for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(rows) + 2), 3.6), constrained_layout=True)
    wer = ax.bar(x - 0.2, [r["wer"] for r in rows], 0.4, label="WER")
    cer = ax.bar(x + 0.2, [r["cer"] for r in rows], 0.4, label="CER")
    ax.bar_label(wer, fmt="%.1f", fontsize=8)
    ax.bar_label(cer, fmt="%.1f", fontsize=8)
    ax.set_xticks(x, names)
    ax.set(ylabel="error rate (%)", title="Test error rates (greedy CTC decoding)")
    ax.set_ylim(0, max([r["wer"] for r in rows] + [1.0]) * 1.15)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def size_vs_wer(rows: list[dict]) -> bytes:
    """Parameters (log x) against WER, one labelled point per model."""
    fig, ax = plt.subplots(figsize=(6, 3.8), constrained_layout=True)
    for r in rows:
        ax.scatter(r["params"], r["wer"], s=40)
        ax.annotate(r["name"], (r["params"], r["wer"]), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set(xlabel="parameters (log scale)", ylabel="test WER (%)", title="Size against accuracy")
    ax.grid(alpha=0.3, which="both")
    return _png(fig)
