"""Figures of the evaluation report: a confusion matrix readable at 196 classes, per-class accuracy.

The seed drew the raw 196x196 count matrix on a linear scale, which shows a diagonal and nothing
else. Here rows are normalised (fraction of each true class), the colour is logarithmic so single
confusions are visible next to a strong diagonal, and a second panel zooms on the classes with the
lowest recall, with names.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402

from cars_jax.fileio import save_figure_atomic  # noqa: E402
from cars_jax.metrics import shorten_name  # noqa: E402

ANNOTATE_MAX = 15   # annotate cell values in the zoom panel up to this many classes
NAME_WIDTH = 30


def row_normalise(cm: np.ndarray) -> np.ndarray:
    """Each row as fractions of its true class; rows of absent classes stay 0 (no NaN)."""
    cm = np.asarray(cm, np.float64)
    support = cm.sum(axis=1, keepdims=True)
    return np.divide(cm, support, out=np.zeros_like(cm), where=support > 0)


def _tick_step(k: int, max_ticks: int = 20) -> int:
    """A 1/2/5 x 10^n step giving at most max_ticks ticks over k classes."""
    raw = max(1, math.ceil(k / max_ticks))
    mag = 10 ** int(math.floor(math.log10(raw)))
    return next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)


def _short(name: str, width: int = NAME_WIDTH) -> str:
    return shorten_name(name, width)


def worst_recall_classes(cm: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n present classes with the lowest recall (ties: lower index first)."""
    cm = np.asarray(cm)
    support = cm.sum(axis=1)
    present = np.flatnonzero(support > 0)
    recall = np.diag(cm)[present] / support[present]
    order = np.lexsort((present, recall))
    return present[order[:n]]


def plot_confusion_matrix(cm: np.ndarray, class_names: Sequence[str], path: str, *,
                          worst: int = 30) -> None:
    """Two panels: the full row-normalised matrix (log colour), and the `worst` recall classes.

    The zoom keeps the fractions of the full row (so its rows need not sum to 1) and adds an
    'other' column with the share predicted as a class outside the zoom.
    """
    cm = np.asarray(cm)
    k = cm.shape[0]
    if cm.shape != (k, k) or len(class_names) != k:
        raise ValueError(f'confusion matrix {cm.shape} and {len(class_names)} class names.')
    norm_cm = row_normalise(cm)
    positive = norm_cm[norm_cm > 0]
    floor = 10.0 ** math.floor(math.log10(positive.min())) if positive.size else 1e-2
    floor = min(max(floor, 1e-4), 0.1)
    norm = LogNorm(vmin=floor, vmax=1.0)
    base = plt.get_cmap('viridis')
    # exact zeros are masked: white background, not the darkest colour
    cmap = base.with_extremes(bad='white', under=base(0.0))

    sel = worst_recall_classes(cm, worst)
    n = len(sel)
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(16, 7.6), layout='constrained',
                                   gridspec_kw={'width_ratios': [1, 1.05]})
    im = ax0.imshow(np.ma.masked_equal(norm_cm, 0.0), cmap=cmap, norm=norm,
                    interpolation='nearest')
    step = _tick_step(k)
    ticks = np.arange(0, k, step)
    ax0.set_xticks(ticks)
    ax0.set_yticks(ticks)
    ax0.tick_params(labelsize=7)
    ax0.set_xlabel('predicted class (index)')
    ax0.set_ylabel('true class (index)')
    acc = np.trace(cm) / max(cm.sum(), 1)
    ax0.set_title(f'confusion matrix, {k} classes, row-normalised (top-1 {acc:.3f})\n'
                  'log colour, white = 0', fontsize=10)
    cbar = fig.colorbar(im, ax=ax0, fraction=0.046, pad=0.02)
    cbar.set_label('fraction of the true class', fontsize=8)
    cbar.ax.tick_params(labelsize=7)

    if n:
        grid = norm_cm[np.ix_(sel, sel)]
        with_other = n < k   # the zoom hides some classes: show their share as one column
        if with_other:
            other = np.clip(norm_cm[sel].sum(axis=1) - grid.sum(axis=1), 0.0, 1.0)
            grid = np.concatenate([grid, other[:, None]], axis=1)
        ax1.imshow(np.ma.masked_equal(grid, 0.0), cmap=cmap, norm=norm,
                   interpolation='nearest', aspect='auto')
        fs = 7 if n <= 15 else 6 if n <= 30 else 4.5
        ax1.set_yticks(np.arange(n))
        ax1.set_yticklabels([f'{c} {_short(class_names[c])}' for c in sel], fontsize=fs)
        ax1.set_xticks(np.arange(grid.shape[1]))
        ax1.set_xticklabels([str(c) for c in sel] + (['other'] if with_other else []),
                            fontsize=fs, rotation=90)
        if with_other:
            ax1.axvline(n - 0.5, color='black', lw=0.8)
        ax1.set_xlabel('predicted class (index; same order as the rows)', fontsize=8)
        ax1.set_ylabel('true class (lowest recall first)', fontsize=8)
        if n <= ANNOTATE_MAX:
            for (i, j), v in np.ndenumerate(grid):
                if v > 0:
                    ax1.text(j, i, f'{v:.2f}', ha='center', va='center', fontsize=fs,
                             color='white' if norm(v) < 0.6 else 'black')
        ax1.set_title(f'the {n} classes with the lowest recall: fractions of the true class'
                      + ('\n"other" = predicted as a class outside this set' if with_other
                         else ''), fontsize=10)
    else:
        ax1.set_axis_off()
        ax1.set_title('no class has samples', fontsize=10)
    save_figure_atomic(fig, path, dpi=90)


def plot_per_class_accuracy(report: dict[str, Any], path: str) -> None:
    """Per-class accuracy (recall), sorted, with the mean; classes without samples left out."""
    rows = sorted((r for r in report['per_class'] if r['support'] > 0),
                  key=lambda r: (r['accuracy'], r['class']))
    acc = np.array([r['accuracy'] for r in rows])
    k = len(rows)
    fig, ax = plt.subplots(figsize=(12, 4.5))
    x = np.arange(k)
    ax.bar(x, acc, width=0.85 if k < 60 else 1.0, color='tab:blue', edgecolor='none')
    if k:
        mean = float(acc.mean())
        ax.axhline(mean, color='tab:red', ls='--', lw=1.2,
                   label=f'mean per-class accuracy {mean:.3f}')
        ax.axhline(report['top1'], color='gray', ls=':', lw=1.2,
                   label=f'overall top-1 {report["top1"]:.3f}')
        ax.legend(fontsize=8, loc='upper left')
    if 0 < k <= 40:
        ax.set_xticks(x)
        ax.set_xticklabels([f'{r["class"]} {_short(r["name"], 20)}' for r in rows],
                           rotation=90, fontsize=7)
    else:
        ax.set_xticks([])
    title = 'per-class accuracy'
    if k > 40:   # no room for names under the bars: name the extremes in the title
        def names(chunk: list[dict[str, Any]]) -> str:
            return '; '.join(f'{r["class"]} {_short(r["name"], 28)} ({r["accuracy"]:.2f})'
                             for r in chunk)
        title += f'\nworst: {names(rows[:3])}\nbest: {names(rows[-3:][::-1])}'
    missing = len(report['per_class']) - k
    ax.set_xlim(-0.5, max(k, 1) - 0.5)
    ax.set_ylim(0, 1.0)
    ax.set_xlabel(f'{k} classes, sorted by accuracy'
                  + (f' ({missing} without samples not shown)' if missing else ''))
    ax.set_ylabel('accuracy (recall)')
    ax.set_title(title, fontsize=9)
    ax.grid(axis='y', alpha=0.3)
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=90)
