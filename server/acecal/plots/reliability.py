"""Reliability figures as PNG (matplotlib, Agg; no pyplot global state, so safe in a server thread).

* :func:`plot_reliability_diagram`: one case (or a pooled dataset), one panel per class. Blue bars at the bin centres
  show the observed frequency (the fraction of voxels in that confidence bin that truly belong to the class); red
  hatched bars show the gap between the average predicted probability in the bin and that frequency; the dashed
  diagonal is perfect calibration; ECE / ACE / MCE are printed in the panel and an arrow marks the worst bin (MCE).
  Below each panel, the number of voxels per bin (log scale when the counts span more than a factor 100).
* :func:`plot_dataset_reliability_histogram`: per class, a heat map whose column m is the distribution, over images,
  of the observed frequency in confidence bin m (each column sums to 1; the dataset reliability histogram of Barfoot
  et al., MICCAI 2024). Mass on the diagonal = calibrated across the dataset; mass below it = over-confident.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence, Union

import numpy as np

if TYPE_CHECKING:  # the figures take tensors too, without importing torch
    import torch
    from matplotlib.figure import Figure

__all__ = ["plot_reliability_diagram", "plot_dataset_reliability_histogram"]

ArrayLike = Union[np.ndarray, "torch.Tensor", Sequence[float]]

_BLUE = "#3a6ea5"
_RED = "#d62728"
_X_LABEL = "Predicted probability (confidence)"
_Y_LABEL = "Observed frequency"


def _np(x: ArrayLike, name: str) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _as_2d(x: ArrayLike, name: str) -> np.ndarray:
    a = _np(x, name)
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2:
        raise ValueError(f"{name} must have shape (C, M) (or (M,) for one class), got {a.shape}")
    return a


def _names(class_names: Optional[Sequence[str]], c: int) -> list:
    if class_names is None:
        return [f"class {i}" for i in range(c)]
    names = [str(n) for n in class_names]
    if len(names) != c:
        raise ValueError(f"{len(names)} class names for {c} classes")
    return names


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure  # imported lazily: importing acecal.plots stays cheap
    from matplotlib.layout_engine import ConstrainedLayoutEngine

    engine = ConstrainedLayoutEngine(h_pad=0.06, w_pad=0.06, hspace=0.04, wspace=0.04)
    return Figure(figsize=(width, height), dpi=110, layout=engine)


def _save(fig: Figure, path: Union[str, os.PathLike[str]]) -> Path:
    out = Path(path)
    if out.suffix.lower() != ".png":
        raise ValueError(f"path must end in .png, got {out.name!r}")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=110)
    return out


def _grid(c: int, max_cols: int = 4) -> tuple:
    cols = c if c <= 3 else min(max_cols, math.ceil(math.sqrt(c)))
    return cols, math.ceil(c / cols)


def plot_reliability_diagram(
    mean_p: ArrayLike,
    mean_y: ArrayLike,
    counts: ArrayLike,
    class_names: Optional[Sequence[str]],
    path: Union[str, os.PathLike],
    title: Optional[str] = None,
) -> Path:
    """Per-class reliability diagrams of one case (or of pooled bins) written to a PNG.

    Args:
        mean_p: (C, M) average predicted probability per bin (NaN where empty), e.g. from
            :meth:`acecal.metrics.CalibrationAccumulator.case_bins` or :func:`acecal.metrics.bin_means`.
        mean_y: (C, M) observed frequency per bin (NaN where empty).
        counts: (C, M) voxels per bin.
        class_names: C names (None: "class 0", ...).
        path: output ``.png`` path (parent folders are created).
        title: figure title (e.g. the case id).

    Returns:
        The path written.
    """
    mp, my, n = _as_2d(mean_p, "mean_p"), _as_2d(mean_y, "mean_y"), _as_2d(counts, "counts")
    if not (mp.shape == my.shape == n.shape):
        raise ValueError(f"mean_p, mean_y and counts must have the same shape, got {mp.shape}, {my.shape}, {n.shape}")
    c, m = mp.shape
    if c == 0 or m == 0:
        raise ValueError("nothing to plot: no classes or no bins")
    names = _names(class_names, c)
    empty = ~(n > 0)
    mp = np.where(empty, np.nan, mp)
    my = np.where(empty, np.nan, my)

    cols, rows = _grid(c)
    narrow = cols < 3
    h_head, h_foot, h_body = (1.15, 0.6, 4.6 * rows) if narrow else (0.75, 0.35, 4.6 * rows)
    fig = _figure(max(3.9 * cols, 4.6), h_head + h_body + h_foot)
    head, body, foot = fig.subfigures(3, 1, squeeze=False, height_ratios=[h_head, h_body, h_foot])[:, 0]
    cells = np.atleast_2d(body.subfigures(rows, cols, squeeze=False))
    centres = (np.arange(m) + 0.5) / m
    width = 1.0 / m
    handles = None
    for k in range(c):
        ax, axh = cells[k // cols, k % cols].subplots(2, 1, sharex=True, height_ratios=[3, 1])
        occ = ~empty[k]
        gap = np.abs(mp[k] - my[k])
        total = n[k].sum()
        if occ.any():
            ece = float(np.nansum(gap * n[k]) / total)
            ace = float(np.nanmean(gap[occ]))
            mce_bin = int(np.nanargmax(np.where(occ, gap, -1.0)))
            mce = float(gap[mce_bin])
        else:
            ece = ace = mce = float("nan")
            mce_bin = -1
        present = bool(np.nansum(my[k] * n[k]) > 0)

        b1 = ax.bar(
            centres[occ],
            my[k][occ],
            width=width,
            color=_BLUE,
            edgecolor="white",
            linewidth=0.6,
            label="Observed frequency in the bin",
            zorder=2,
        )
        lo = np.minimum(mp[k], my[k])
        b2 = ax.bar(
            centres[occ],
            gap[occ],
            bottom=lo[occ],
            width=width,
            color=_RED,
            alpha=0.35,
            edgecolor=_RED,
            linewidth=0.8,
            hatch="///",
            label="Gap to the average predicted probability",
            zorder=3,
        )
        ax.hlines(
            my[k][occ], centres[occ] - width / 2, centres[occ] + width / 2, colors="black", linewidth=1.2, zorder=4
        )
        (diag,) = ax.plot(
            [0, 1], [0, 1], linestyle="--", color="0.35", linewidth=1.0, label="Perfect calibration", zorder=5
        )
        if mce_bin >= 0 and mce > 0:
            xm = centres[mce_bin]
            ym = (mp[k, mce_bin] + my[k, mce_bin]) / 2
            xt = xm - 0.28 if xm > 0.5 else xm + 0.28
            ax.annotate(
                "worst bin",
                xy=(xm, ym),
                xytext=(xt, min(max(ym, 0.12), 0.88)),
                fontsize=8,
                ha="center",
                va="center",
                color=_RED,
                bbox=dict(boxstyle="round,pad=0.2", facecolor="white", edgecolor="none", alpha=0.85),
                arrowprops=dict(arrowstyle="->", color=_RED, linewidth=1.0),
                zorder=6,
            )
        if occ.any():
            txt = f"ECE {ece:.3f}\nACE {ace:.3f}\nMCE {mce:.3f}"
        else:
            txt = "no voxels"
        ax.text(
            0.03,
            0.97,
            txt,
            transform=ax.transAxes,
            va="top",
            ha="left",
            fontsize=8.5,
            family="monospace",
            bbox=dict(boxstyle="round,pad=0.3", facecolor="white", edgecolor="0.7", alpha=0.9),
            zorder=7,
        )
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("auto")
        ax.grid(True, linestyle=":", linewidth=0.5, alpha=0.6, zorder=0)
        ax.set_ylabel(_Y_LABEL, fontsize=9)
        ax.tick_params(labelbottom=False, labelsize=8)
        panel_title = names[k] if present else f"{names[k]} (not in reference)"
        ax.set_title(panel_title, fontsize=10, fontweight="bold")

        axh.bar(centres, n[k], width=width, color="0.55", edgecolor="white", linewidth=0.5)
        nz = n[k][n[k] > 0]
        if nz.size and nz.max() / nz.min() > 100:
            axh.set_yscale("log")
            axh.set_ylim(bottom=max(0.5, nz.min() / 2), top=nz.max() * 3)
        axh.set_ylabel("Voxels", fontsize=9)
        axh.set_xlabel(_X_LABEL, fontsize=9)
        axh.tick_params(labelsize=7.5)
        axh.set_xlim(0, 1)
        if handles is None:
            handles = [b1, b2, diag]
    head.text(
        0.5, 0.97, title if title else "Reliability diagram", ha="center", va="top", fontsize=12, fontweight="bold"
    )
    head.legend(handles=handles, loc="lower center", ncol=1 if narrow else 3, frameon=False, fontsize=8.5)
    if narrow:
        note = (
            "Blue below the diagonal: over-confident.\nECE weights bins by voxels; ACE weights every occupied\n"
            "bin equally; MCE is the worst bin."
        )
    else:
        note = (
            "Blue below the diagonal: over-confident (predicted probability higher than observed). "
            "ECE weights bins by voxels; ACE weights every occupied bin equally; MCE is the worst bin."
        )
    foot.text(0.5, 0.5, note, ha="center", va="center", fontsize=7.5, color="0.3")
    return _save(fig, path)


def plot_dataset_reliability_histogram(
    hist: ArrayLike,
    class_names: Optional[Sequence[str]],
    path: Union[str, os.PathLike],
    title: Optional[str] = None,
) -> Path:
    """Dataset reliability histogram per class (plus an "all classes" panel when C > 1) written to a PNG.

    Args:
        hist: (C, M, M) counts, ``hist[c, k, m]`` = images whose observed frequency in confidence bin m falls in
            frequency bin k (k = 0 lowest), as :attr:`acecal.metrics.CalibrationReport.histogram`.
        class_names: C names (None: "class 0", ...).
        path: output ``.png`` path.
        title: figure title.

    Each column is normalised to sum 1 (empty columns are left grey) and shown with the YlOrRd colour map under a
    power norm (gamma 0.35) so that small fractions stay visible.

    Returns:
        The path written.
    """
    # imported lazily: importing acecal.plots stays cheap
    from matplotlib import colormaps
    from matplotlib.colors import PowerNorm

    h = _np(hist, "hist")
    if h.ndim == 2:
        h = h[None]
    if h.ndim != 3 or h.shape[1] != h.shape[2] or h.shape[1] == 0:
        raise ValueError(f"hist must have shape (C, M, M), got {h.shape}")
    if not np.isfinite(h).all() or (h < 0).any():
        raise ValueError("hist must hold non-negative finite counts")
    c, m, _ = h.shape
    names = _names(class_names, c)
    panels = [(names[i], h[i]) for i in range(c)]
    if c > 1:
        panels.append(("All classes", h.sum(0)))

    cols, rows = _grid(len(panels))
    fig = _figure(4.8 * cols + 0.8, 3.6 * rows + 1.0)
    gs = fig.add_gridspec(rows, cols)
    axes = []
    cmap = colormaps["YlOrRd"].with_extremes(bad="0.88")
    norm = PowerNorm(gamma=0.35, vmin=0.0, vmax=1.0)
    image = None
    for i, (name, counts) in enumerate(panels):
        ax = fig.add_subplot(gs[i // cols, i % cols])
        axes.append(ax)
        col_sum = counts.sum(0, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = np.where(col_sum > 0, counts / np.where(col_sum > 0, col_sum, 1), np.nan)
        image = ax.imshow(
            np.ma.masked_invalid(frac),
            origin="lower",
            extent=(0, 1, 0, 1),
            cmap=cmap,
            norm=norm,
            aspect="auto",
            interpolation="nearest",
        )
        ax.plot([0, 1], [0, 1], linestyle="--", color="0.2", linewidth=1.0)
        n_img = int(col_sum.max()) if col_sum.size else 0
        label = "images" if name != "All classes" else "images x classes"
        ax.set_title(f"{name} ({n_img} {label})", fontsize=10, fontweight="bold")
        ax.set_xlabel(_X_LABEL, fontsize=9)
        ax.set_ylabel(_Y_LABEL, fontsize=9)
        ax.tick_params(labelsize=8)
    assert image is not None
    cb = fig.colorbar(image, ax=axes, shrink=0.8, aspect=30)
    cb.set_label("Fraction of images in the column", fontsize=9)
    cb.ax.tick_params(labelsize=8)
    fig.suptitle(title or "Dataset reliability histogram", fontsize=12, fontweight="bold")
    note = (
        "Each column: across images, how often voxels predicted with that probability truly were the class.\n"
        "Calibrated: colour on the dashed diagonal; below it: over-confident; grey: no voxels in that bin."
    )
    fig.supxlabel(note, fontsize=8, color="0.3")
    return _save(fig, path)
