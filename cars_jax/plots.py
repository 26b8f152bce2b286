"""Training curves, redrawn from metrics.jsonl each epoch (the side-effecting edge)."""
from __future__ import annotations

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

from cars_jax.fileio import save_figure_atomic  # noqa: E402


def plot_curves(history: list[dict], path: str) -> None:
    """Loss, accuracy and learning rate per epoch; written atomically (tmp + rename)."""
    if not history:
        return
    ep = [h['epoch'] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(ep, [h['train_loss'] for h in history], label='train (MixUp batches incl.)')
    axes[0].plot(ep, [h['val_loss'] for h in history], label='validation')
    axes[0].set_title('loss (label-smoothed CE)')
    axes[1].plot(ep, [h['train_accuracy'] for h in history], label='train (vs original labels)')
    axes[1].plot(ep, [h['val_accuracy'] for h in history], label='validation top-1')
    axes[1].plot(ep, [h['val_top5'] for h in history], label='validation top-5', ls='--')
    axes[1].set_title('accuracy')
    axes[1].set_ylim(0, 1)
    axes[2].plot(ep, [h['lr'] for h in history])
    axes[2].set_yscale('log')
    axes[2].set_title('learning rate (end of epoch)')
    best = [h['epoch'] for h in history if h.get('improved')]
    for ax in axes[:2]:
        for b in best[-1:]:
            ax.axvline(b, color='gray', ls=':', lw=1, label=f'best checkpoint (epoch {b})')
        ax.legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel('epoch')
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=80, fmt='png')
