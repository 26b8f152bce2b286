"""Classification report of a finished classifier, in plain numpy (no sklearn dependency).

Conventions follow sklearn's `classification_report(labels=range(K), zero_division=0)`: a class
never predicted has precision 0, a class never present has recall 0, and every one of the K
classes counts in the macro averages (a class missing from the evaluation split is not silently
dropped). Weighted averages weight by support. Everything returned is a plain Python value, so
the report can be dumped to JSON as is.
"""
from __future__ import annotations

import csv
from typing import Any, Sequence

import numpy as np

from cars_jax.fileio import atomic_write_text

CSV_COLUMNS = ('class', 'name', 'support', 'precision', 'recall', 'f1', 'accuracy')
MOST_CONFUSED = 20


def _check_labels(x: np.ndarray, num_classes: int, what: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 1:
        raise ValueError(f'{what} must be 1-D, got shape {x.shape}.')
    if x.size and not np.issubdtype(x.dtype, np.integer):
        raise ValueError(f'{what} must be integer class indices, got dtype {x.dtype}.')
    x = x.astype(np.int64)
    if x.size and (x.min() < 0 or x.max() >= num_classes):
        raise ValueError(f'{what} must lie in [0, {num_classes}), got range '
                         f'[{x.min()}, {x.max()}].')
    return x


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, K) int64 counts, rows = true class, columns = predicted class."""
    labels = _check_labels(labels, num_classes, 'labels')
    preds = _check_labels(preds, num_classes, 'preds')
    if labels.shape != preds.shape:
        raise ValueError(f'labels {labels.shape} and preds {preds.shape} differ in length.')
    flat = np.bincount(labels * num_classes + preds, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes).astype(np.int64)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with 0 where den == 0 (sklearn's zero_division=0), without warnings."""
    num = np.asarray(num, np.float64)
    den = np.asarray(den, np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den != 0)


def per_class_scores(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Support, precision, recall and F1 per class from a confusion matrix."""
    cm = np.asarray(cm)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    return {'support': support.astype(np.int64), 'precision': precision, 'recall': recall,
            'f1': f1}


def topk_accuracy(labels: np.ndarray, probs: np.ndarray, k: int) -> float:
    """Fraction of rows whose label is among the k highest scores.

    Ties are broken towards the lower class index (a stable sort), the same rule as argmax, so
    top-1 equals the accuracy of argmax predictions even for a constant (untrained) model.
    """
    order = np.argsort(-np.asarray(probs), axis=1, kind='stable')[:, :k]
    return float(np.mean(np.any(order == np.asarray(labels)[:, None], axis=1)))


def most_confused_pairs(cm: np.ndarray, class_names: Sequence[str],
                        n: int = MOST_CONFUSED) -> list[dict[str, Any]]:
    """The n largest off-diagonal cells, by count desc, then (true, pred) asc; zeros omitted."""
    off = np.array(cm, dtype=np.int64, copy=True)
    np.fill_diagonal(off, 0)
    true, pred = np.nonzero(off)
    counts = off[true, pred]
    order = np.lexsort((pred, true, -counts))[:n]  # last key is the primary one
    return [{'true': int(true[i]), 'pred': int(pred[i]), 'count': int(counts[i]),
             'true_name': class_names[true[i]], 'pred_name': class_names[pred[i]]}
            for i in order]


def classification_report(labels: np.ndarray, probs_or_preds: np.ndarray, num_classes: int,
                          class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Overall, averaged and per-class scores of a classifier on one split.

    `probs_or_preds` is either (N, K) scores (probabilities or logits: only their order is used)
    or (N,) predicted indices; top-k (k = min(5, K)) needs scores and is None otherwise.
    """
    labels = np.asarray(labels)
    if labels.size == 0:
        raise ValueError('classification_report needs at least one sample.')
    if class_names is None:
        class_names = [str(i) for i in range(num_classes)]
    class_names = [str(c) for c in class_names]
    if len(class_names) != num_classes:
        raise ValueError(f'{len(class_names)} class names for {num_classes} classes.')
    scores = np.asarray(probs_or_preds)
    k = min(5, num_classes)
    if scores.ndim == 2:
        if scores.shape != (labels.shape[0], num_classes):
            raise ValueError(f'scores of shape {scores.shape}, expected '
                             f'({labels.shape[0]}, {num_classes}).')
        preds = np.argmax(scores, axis=1)
    elif scores.ndim == 1:
        preds = scores
    else:
        raise ValueError(f'probs_or_preds must be (N, K) scores or (N,) predictions, '
                         f'got shape {scores.shape}.')
    cm = confusion_matrix(labels, preds, num_classes)
    labels = labels.astype(np.int64)
    s = per_class_scores(cm)
    n = int(cm.sum())
    weights = s['support'] / n
    report: dict[str, Any] = {
        'num_samples': n,
        'num_classes': int(num_classes),
        'top1': float(np.trace(cm) / n),
        'top_k': k,
        'top5': topk_accuracy(labels, scores, k) if scores.ndim == 2 else None,
    }
    for key in ('precision', 'recall', 'f1'):
        report[f'macro_{key}'] = float(np.mean(s[key]))
        report[f'weighted_{key}'] = float(np.sum(weights * s[key]))
    report['per_class'] = [
        {'class': c, 'name': class_names[c], 'support': int(s['support'][c]),
         'precision': float(s['precision'][c]), 'recall': float(s['recall'][c]),
         'f1': float(s['f1'][c]), 'accuracy': float(s['recall'][c])}
        for c in range(num_classes)]
    report['most_confused'] = most_confused_pairs(cm, class_names)
    return report


def write_per_class_csv(report: dict[str, Any], path: str) -> None:
    """One row per class, by class index; written atomically."""
    rows = sorted(report['per_class'], key=lambda r: r['class'])

    def write(f) -> None:
        writer = csv.writer(f, quoting=csv.QUOTE_MINIMAL)
        writer.writerow(CSV_COLUMNS)
        for r in rows:
            writer.writerow([r['class'], r['name'], r['support']] +
                            [f'{r[c]:.6f}' for c in CSV_COLUMNS[3:]])
    atomic_write_text(path, write, newline='', encoding='utf-8')


def read_per_class_csv(path: str) -> list[dict[str, Any]]:
    """The rows of `write_per_class_csv`, typed back (for tests and later analysis)."""
    with open(path, newline='', encoding='utf-8') as f:
        return [{'class': int(r['class']), 'name': r['name'], 'support': int(r['support']),
                 **{c: float(r[c]) for c in CSV_COLUMNS[3:]}} for r in csv.DictReader(f)]


def shorten_name(name: str, width: int = 40) -> str:
    """A class name cut to `width` characters from the middle: Stanford Cars names differ at
    the end ('Chevrolet Silverado 2500HD Regular Cab 2012' vs '... 2007'), so the make (first
    word) and the last word are always kept, then the model (second word), then words from
    the end and then from the start while they fit; ' …' marks the one gap. A name whose
    first and last words alone do not fit keeps both ends of its characters."""
    name = ' '.join(str(name).split())
    if len(name) <= width:
        return name
    words = name.split(' ')
    n = len(words)

    def text(keep: set[int]) -> str:
        out, last = [], -1
        for i in sorted(keep):
            if out and i != last + 1:
                out.append('…')
            out.append(words[i])
            last = i
        return ' '.join(out)

    keep = {0, n - 1}
    if n > 1 and len(text(keep)) <= width:
        if len(text(keep | {1})) <= width:
            keep.add(1)
        for order in (range(n - 2, 0, -1), range(1, n - 1)):   # from the end, then the start
            for i in order:
                if i in keep:
                    continue
                if len(text(keep | {i})) > width:
                    break
                keep.add(i)
        return text(keep)
    tail = (width - 1) // 2
    return name[:width - 1 - tail].rstrip() + '…' + name[len(name) - tail:].lstrip()


def format_report(report: dict[str, Any], max_rows: int = 10) -> str:
    """Human-readable summary: overall scores, the worst classes by F1, the most confused pairs."""
    k = report['top_k']
    top5 = 'n/a (no scores)' if report['top5'] is None else f'{report["top5"]:.4f}'
    lines = [
        f'{report["num_samples"]} samples, {report["num_classes"]} classes',
        f'top-1 accuracy {report["top1"]:.4f}   top-{k} accuracy {top5}',
        f'{"":10s}{"precision":>10s}{"recall":>10s}{"f1":>10s}',
    ]
    for avg in ('macro', 'weighted'):
        lines.append(f'{avg:10s}' + ''.join(f'{report[f"{avg}_{m}"]:10.4f}'
                                            for m in ('precision', 'recall', 'f1')))
    present = [r for r in report['per_class'] if r['support'] > 0]
    missing = len(report['per_class']) - len(present)
    if missing:
        lines.append(f'({missing} classes have no samples in this split: recall 0, '
                     'counted in the macro averages)')
    worst = sorted(present, key=lambda r: (r['f1'], r['class']))[:max_rows]
    if worst:
        lines += ['', f'worst {len(worst)} classes by F1:',
                  f'{"class":>6s}  {"name":40s}{"support":>8s}{"prec":>8s}{"recall":>8s}'
                  f'{"f1":>8s}']
        lines += [f'{r["class"]:6d}  {shorten_name(r["name"]):40s}{r["support"]:8d}'
                  f'{r["precision"]:8.3f}{r["recall"]:8.3f}{r["f1"]:8.3f}' for r in worst]
    pairs = report['most_confused'][:max_rows]
    if pairs:
        lines += ['', f'most confused pairs (true -> predicted), top {len(pairs)}:']
        lines += [f'{p["count"]:6d}  {p["true"]:4d} {shorten_name(p["true_name"], 34)}  ->  '
                  f'{p["pred"]:4d} {shorten_name(p["pred_name"], 34)}' for p in pairs]
    return '\n'.join(lines)
