"""Evaluation report: numpy metrics against hand counts and a loop reference; CSV; report plots."""
from __future__ import annotations

import csv
import os
import warnings
from fractions import Fraction as F

import numpy as np
import pytest

from cars_jax import metrics, report_plots

# 3 classes, 7 samples. Confusion matrix by hand (rows true, cols predicted):
#   true 0: [2, 1, 0]   true 1: [0, 2, 0]   true 2: [1, 0, 1]
LABELS = np.array([0, 0, 0, 1, 1, 2, 2])
PREDS = np.array([0, 0, 1, 1, 1, 2, 0])
NAMES = ['alpha', 'beta', 'gamma']


def _close(x: float, frac: F) -> bool:
    return abs(x - float(frac)) < 1e-12


def _loop_reference(labels, preds, k):
    """sklearn's definitions written out with python loops (an independent path)."""
    out = []
    for c in range(k):
        tp = sum(1 for y, p in zip(labels, preds) if y == c and p == c)
        pred_c = sum(1 for p in preds if p == c)
        true_c = sum(1 for y in labels if y == c)
        prec = tp / pred_c if pred_c else 0.0
        rec = tp / true_c if true_c else 0.0
        f1 = 2 * tp / (pred_c + true_c) if (pred_c + true_c) else 0.0
        out.append((true_c, prec, rec, f1))
    return out


def test_confusion_matrix_hand_counts():
    cm = metrics.confusion_matrix(LABELS, PREDS, 3)
    assert cm.dtype == np.int64 and cm.shape == (3, 3)
    np.testing.assert_array_equal(cm, [[2, 1, 0], [0, 2, 0], [1, 0, 1]])
    # rows are the true class: transposing the roles transposes the matrix
    np.testing.assert_array_equal(metrics.confusion_matrix(PREDS, LABELS, 3), cm.T)


def test_confusion_matrix_rejects_bad_input():
    with pytest.raises(ValueError, match='range'):
        metrics.confusion_matrix(np.array([0, 3]), np.array([0, 1]), 3)
    with pytest.raises(ValueError, match='length'):
        metrics.confusion_matrix(np.array([0, 1]), np.array([0]), 3)
    with pytest.raises(ValueError, match='integer'):
        metrics.confusion_matrix(np.array([0.0, 1.0]), np.array([0, 1]), 3)


def test_report_hand_computed():
    r = metrics.classification_report(LABELS, PREDS, 3, NAMES)
    # precision = tp / column sum, recall = tp / row sum, f1 = harmonic mean
    want = {0: (3, F(2, 3), F(2, 3), F(2, 3)),
            1: (2, F(2, 3), F(1, 1), F(4, 5)),
            2: (2, F(1, 1), F(1, 2), F(2, 3))}
    assert [row['class'] for row in r['per_class']] == [0, 1, 2]
    for row in r['per_class']:
        support, p, rec, f1 = want[row['class']]
        assert row['name'] == NAMES[row['class']]
        assert row['support'] == support
        assert _close(row['precision'], p) and _close(row['recall'], rec)
        assert _close(row['f1'], f1) and row['accuracy'] == row['recall']
    assert _close(r['top1'], F(5, 7))
    assert r['top5'] is None and r['num_samples'] == 7
    assert _close(r['macro_precision'], F(7, 9))
    assert _close(r['macro_recall'], F(13, 18))
    assert _close(r['macro_f1'], F(32, 45))
    assert _close(r['weighted_precision'], F(16, 21))
    assert _close(r['weighted_recall'], F(5, 7))     # == accuracy, as in sklearn
    assert _close(r['weighted_f1'], F(74, 105))


def test_report_matches_loop_reference_random():
    rng = np.random.default_rng(1)
    k, n = 9, 300
    labels = rng.integers(0, k - 1, n)          # class 8 never true
    preds = np.where(rng.uniform(size=n) < 0.5, labels, rng.integers(0, k, n))
    preds[preds == 3] = 4                       # class 3 never predicted
    r = metrics.classification_report(labels, preds, k)
    ref = _loop_reference(labels.tolist(), preds.tolist(), k)
    got = [(row['support'], row['precision'], row['recall'], row['f1']) for row in r['per_class']]
    np.testing.assert_allclose(np.array(got), np.array(ref), rtol=0, atol=1e-12)
    ref = np.array(ref)
    np.testing.assert_allclose(r['macro_f1'], ref[:, 3].mean(), atol=1e-12)
    np.testing.assert_allclose(r['weighted_f1'], (ref[:, 0] * ref[:, 3]).sum() / n, atol=1e-12)
    np.testing.assert_allclose(r['top1'], np.mean(labels == preds), atol=1e-12)


def test_never_predicted_class_precision_zero_without_warnings():
    labels = np.array([0, 1, 3, 3])
    preds = np.array([0, 1, 0, 1])
    with warnings.catch_warnings(), np.errstate(all='raise'):
        warnings.simplefilter('error')
        r = metrics.classification_report(labels, preds, 4, list('abcd'))
    c3 = r['per_class'][3]
    assert c3['support'] == 2 and c3['precision'] == 0.0 and c3['recall'] == 0.0
    assert c3['f1'] == 0.0
    # class 2: neither true nor predicted: all zeros, still counted in the macro mean
    c2 = r['per_class'][2]
    assert (c2['support'], c2['precision'], c2['recall'], c2['f1']) == (0, 0.0, 0.0, 0.0)
    values = [v for row in r['per_class'] for v in row.values() if isinstance(v, float)]
    values += [v for key, v in r.items() if isinstance(v, float)]
    assert np.all(np.isfinite(values))
    # c0: P=1/2 R=1 F1=2/3; c1: same; c2, c3: 0
    assert _close(r['macro_precision'], F(1, 4))
    assert _close(r['macro_f1'], F(1, 3))


def test_zero_support_class_counts_in_macro_not_in_weighted():
    labels = np.array([0, 0, 1, 1])
    preds = np.array([0, 2, 1, 1])                 # class 2 predicted once, never true
    with warnings.catch_warnings(), np.errstate(all='raise'):
        warnings.simplefilter('error')
        r = metrics.classification_report(labels, preds, 3, NAMES)
    c2 = r['per_class'][2]
    assert c2['support'] == 0 and c2['recall'] == 0.0 and c2['precision'] == 0.0
    assert c2['accuracy'] == 0.0
    # c0: P=1 R=1/2 F1=2/3; c1: P=R=F1=1; c2: 0
    assert _close(r['macro_f1'], F(5, 9))
    assert _close(r['macro_recall'], F(1, 2))
    assert _close(r['weighted_f1'], F(5, 6))       # support weights: c2 has weight 0
    assert _close(r['weighted_recall'], F(3, 4))


def test_top5_against_argsort():
    rng = np.random.default_rng(2)
    n, k = 64, 12
    logits = rng.normal(size=(n, k))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = rng.integers(0, k, n)
    r = metrics.classification_report(labels, probs, k)
    top5 = np.argsort(probs, axis=1)[:, -5:]
    assert r['top_k'] == 5
    want = np.mean([labels[i] in top5[i] for i in range(n)])
    assert 0 < want < 1 and r['top5'] == pytest.approx(want)
    assert r['top1'] == pytest.approx(np.mean(np.argmax(probs, axis=1) == labels))
    # logits give the same ranking as their softmax
    assert metrics.classification_report(labels, logits, k)['top5'] == r['top5']
    # fewer than 5 classes: top-k with k = K, hence 1.0
    r3 = metrics.classification_report(labels % 3, probs[:, :3], 3)
    assert r3['top_k'] == 3 and r3['top5'] == 1.0


def test_topk_ties_follow_argmax_rule():
    # a constant model: argmax picks class 0, so top-1 is the share of class 0 and top-2 of {0,1}
    labels = np.array([0, 1, 2, 3])
    probs = np.full((4, 4), 0.25)
    assert metrics.topk_accuracy(labels, probs, 1) == 0.25
    assert metrics.topk_accuracy(labels, probs, 2) == 0.5
    assert metrics.classification_report(labels, probs, 4)['top1'] == 0.25


def test_most_confused_order_and_tie_break():
    pairs = [(2, 1)] * 3 + [(1, 0)] * 2 + [(0, 2)] * 2 + [(0, 1)] * 2 + [(2, 0)] + [(1, 1)] * 9
    labels = np.array([t for t, _ in pairs])
    preds = np.array([p for _, p in pairs])
    r = metrics.classification_report(labels, preds, 3, NAMES)
    got = [(m['true'], m['pred'], m['count']) for m in r['most_confused']]
    assert got == [(2, 1, 3), (0, 1, 2), (0, 2, 2), (1, 0, 2), (2, 0, 1)]   # diagonal excluded
    assert r['most_confused'][0]['true_name'] == 'gamma'
    assert r['most_confused'][0]['pred_name'] == 'beta'


def test_most_confused_top20_against_brute_force():
    rng = np.random.default_rng(3)
    k = 10
    labels, preds = rng.integers(0, k, 400), rng.integers(0, k, 400)
    cm = metrics.confusion_matrix(labels, preds, k)
    brute = sorted(((-int(cm[t, p]), t, p) for t in range(k) for p in range(k)
                    if t != p and cm[t, p] > 0))[:20]
    got = metrics.classification_report(labels, preds, k)['most_confused']
    assert len(got) == 20
    assert [(-m['count'], m['true'], m['pred']) for m in got] == brute


def test_csv_round_trip_with_commas_and_quotes(tmp_path):
    names = ['plain', 'Audi S4 Sedan, 2012', 'the "quoted", model', 'Škoda Octavia']
    labels = np.array([0, 1, 1, 2, 3, 3, 3])
    preds = np.array([0, 1, 2, 2, 3, 0, 3])
    r = metrics.classification_report(labels, preds, 4, names)
    r['per_class'] = r['per_class'][::-1]        # the writer sorts by class index itself
    path = str(tmp_path / 'per_class.csv')
    metrics.write_per_class_csv(r, path)
    assert os.listdir(tmp_path) == ['per_class.csv']  # no temporary file left behind
    with open(path, newline='', encoding='utf-8') as f:
        rows = list(csv.reader(f))
    assert rows[0] == ['class', 'name', 'support', 'precision', 'recall', 'f1', 'accuracy']
    assert [row[1] for row in rows[1:]] == names and all(len(row) == 7 for row in rows)
    back = metrics.read_per_class_csv(path)
    for got, want in zip(back, sorted(r['per_class'], key=lambda x: x['class'])):
        assert got['class'] == want['class'] and got['name'] == want['name']
        assert got['support'] == want['support']
        for key in ('precision', 'recall', 'f1', 'accuracy'):
            assert got[key] == pytest.approx(want[key], abs=1e-6)


def test_format_report_mentions_worst_and_confused():
    r = metrics.classification_report(LABELS, PREDS, 3, NAMES)
    text = metrics.format_report(r, max_rows=2)
    assert 'top-1 accuracy 0.7143' in text and 'n/a' in text
    worst = text.split('worst 2 classes by F1:')[1].split('most confused')[0]
    assert 'alpha' in worst and 'gamma' in worst and 'beta' not in worst  # F1 2/3, 2/3 < 4/5
    assert 'alpha' in text.split('most confused')[1]


def _png_ok(path: str, max_kb: int = 400) -> int:
    with open(path, 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    size = os.path.getsize(path)
    assert 0 < size < max_kb * 1024, f'{path}: {size / 1024:.0f} KB'
    return size


def test_plots_196_classes_under_400kb(tmp_path):
    rng = np.random.default_rng(4)
    k, n = 196, 8041
    labels = rng.integers(0, k, n)
    preds = np.where(rng.uniform(size=n) < rng.uniform(0.2, 0.95, k)[labels], labels,
                     rng.integers(0, k, n))
    names = [f'Make {i % 49} Model {i}, Sedan "X" {2000 + i % 13}' for i in range(k)]
    cm = metrics.confusion_matrix(labels, preds, k)
    r = metrics.classification_report(labels, preds, k, names)
    report_plots.plot_confusion_matrix(cm, names, str(tmp_path / 'cm.png'))
    report_plots.plot_per_class_accuracy(r, str(tmp_path / 'acc.png'))
    _png_ok(str(tmp_path / 'cm.png'))
    _png_ok(str(tmp_path / 'acc.png'))
    # worst case for compression: a dense random matrix
    report_plots.plot_confusion_matrix(rng.integers(0, 40, (k, k)), names,
                                       str(tmp_path / 'dense.png'))
    _png_ok(str(tmp_path / 'dense.png'))
    assert sorted(os.listdir(tmp_path)) == ['acc.png', 'cm.png', 'dense.png']


def test_plots_3_classes_and_absent_class(tmp_path):
    cm = metrics.confusion_matrix(LABELS, PREDS, 3)
    r = metrics.classification_report(LABELS, PREDS, 3, NAMES)
    report_plots.plot_confusion_matrix(cm, NAMES, str(tmp_path / 'cm.png'))
    report_plots.plot_per_class_accuracy(r, str(tmp_path / 'acc.png'))
    _png_ok(str(tmp_path / 'cm.png'))
    _png_ok(str(tmp_path / 'acc.png'))
    # a class with no samples: its row stays empty (no NaN), and the zoom skips it
    cm4 = np.zeros((4, 4), np.int64)
    cm4[:3, :3] = cm
    np.testing.assert_array_equal(report_plots.row_normalise(cm4)[3], 0.0)
    assert list(report_plots.worst_recall_classes(cm4, 30)) == [2, 0, 1]   # recall 1/2, 2/3, 1
    report_plots.plot_confusion_matrix(cm4, NAMES + ['empty'], str(tmp_path / 'cm4.png'),
                                       worst=2)
    _png_ok(str(tmp_path / 'cm4.png'))


SILVERADO = ['Chevrolet Silverado 2500HD Regular Cab 2012',
             'Chevrolet Silverado 2500HD Regular Cab 2007', 'Audi A4']


@pytest.mark.parametrize('name,width,short', [
    # by hand: the make and the last word always; then the model (2nd word); then words
    # from the right end, then from the left, while the result (with ' …' at the gap) fits
    (SILVERADO[0], 30, 'Chevrolet Silverado … Cab 2012'),
    (SILVERADO[1], 30, 'Chevrolet Silverado … Cab 2007'),
    (SILVERADO[0], 20, 'Chevrolet … Cab 2012'),
    (SILVERADO[0], 43, SILVERADO[0]),
    ('Mercedes-Benz Sprinter Van 2012', 26, 'Mercedes-Benz … Van 2012'),
    ('Audi A4', 30, 'Audi A4'),
    ('x' * 40, 11, 'xxxxx…xxxxx'),                     # one long word: both of its ends
])
def test_shorten_name_keeps_the_make_and_the_distinguishing_end(name, width, short):
    assert metrics.shorten_name(name, width) == short
    assert len(short) <= width


def _tick_labels(monkeypatch):
    from matplotlib.figure import Figure
    seen = []
    real = Figure.savefig

    def savefig(fig, *a, **kw):
        for ax in fig.axes:
            seen.extend(t.get_text() for t in ax.get_xticklabels() + ax.get_yticklabels())
        return real(fig, *a, **kw)
    monkeypatch.setattr(Figure, 'savefig', savefig)
    return seen


def test_chart_labels_keep_what_tells_classes_apart(tmp_path, monkeypatch):
    labels, preds = np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 0, 2])
    report = metrics.classification_report(labels, preds, 3, SILVERADO)
    seen = _tick_labels(monkeypatch)
    report_plots.plot_per_class_accuracy(report, str(tmp_path / 'acc.png'))
    assert {'0 Chevrolet … Cab 2012', '1 Chevrolet … Cab 2007'} <= set(seen), seen
    seen.clear()
    report_plots.plot_confusion_matrix(metrics.confusion_matrix(labels, preds, 3), SILVERADO,
                                       str(tmp_path / 'cm.png'))
    assert {'0 Chevrolet Silverado … Cab 2012', '1 Chevrolet Silverado … Cab 2007'} <= set(seen)
