"""One figure style for every notebook, and one way to save a figure (png + pdf, atomically)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import seaborn as sns

from .report import figures_dir

PALETTE = {
    "baseline": "#4d4d4d",
    "UIDL": "#d95f02",
    "ReplaceMe LS": "#1b9e77",
    "ReplaceMe cosine (converged)": "#3f007d",  # before "ReplaceMe cosine": colours go by the first matching prefix
    "ReplaceMe cosine (LS init)": "#9e9ac8",
    "ReplaceMe cosine": "#7570b3",
    "ReplaceMe multi-LT": "#e7298a",
}


def style() -> None:
    sns.set_theme(context="notebook", style="whitegrid", font_scale=0.95)
    plt.rcParams.update({"figure.dpi": 110, "savefig.dpi": 160, "savefig.bbox": "tight", "axes.titleweight": "bold"})


def color(label: str) -> str | None:
    for key, c in PALETTE.items():
        if label.startswith(key):
            return c
    return None


def save(fig, name: str, out_dir: str | Path | None = None) -> list[Path]:
    """Save `fig` as name.png and name.pdf under figures/ (temp file, then rename)."""
    out = figures_dir(out_dir)
    paths = []
    for ext in ("png", "pdf"):
        target = out / f"{name}.{ext}"
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=f".{ext}", dir=out)
        os.close(fd)
        try:
            fig.savefig(tmp, format=ext)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        paths.append(target)
    return paths


def distance_heatmap(matrix, title: str, ax=None, label: str = "angular distance"):
    """Layer-by-layer distance matrix (paper Fig. 7)."""
    ax = ax or plt.subplots(figsize=(6.2, 5.2))[1]
    sns.heatmap(matrix, ax=ax, cmap="viridis", square=True, cbar_kws={"label": label}, xticklabels=5, yticklabels=5)
    ax.set_xlabel("block output j")
    ax.set_ylabel("block output i")
    ax.set_title(title)
    return ax
