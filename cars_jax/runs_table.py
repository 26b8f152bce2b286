"""Ablation rows from finished runs: mean and spread over seeds, one row per configuration.

    python -m cars_jax.runs_table runs/fast30_s0 runs/fast30_s1 runs/cosine_s0 ...

Runs whose config.json differ only in `seed` (and `workdir`-like fields that do not change
the training) are one configuration; each row gives the fields that differ from the first
configuration (the baseline), the seeds, best validation top-1 and top-5 as mean +- sample
standard deviation [min-max] in %, the best epochs, and the training time per run. A
change counts only when its mean lies outside the baseline's spread.
"""
from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

from cars_jax.config import read_run_config

# Fields that do not change what a run computes (paths, logging, loader threads).
_NOT_THE_RECIPE = ('seed', 'log_every_steps', 'tensorboard', 'num_workers', 'prefetch_batches',
                   'cache_dir', 'checkpoint_every_steps')


def run_summary(workdir: str) -> dict[str, Any]:
    """One finished run: its config, best top-1/top-5 (validation, %), best epoch, epochs run
    and training seconds (the sum of the epochs' train time, validation excluded)."""
    report_path = os.path.join(workdir, 'final_report.json')
    if not os.path.isfile(report_path):
        raise FileNotFoundError(f'{report_path} not found: {workdir} is not a finished run.')
    with open(report_path) as f:
        report = json.load(f)
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    config = read_run_config(os.path.join(workdir, 'config.json'))
    return {'workdir': workdir, 'config': json.loads(config.to_json()), 'seed': config.seed,
            'top1': 100 * report['val']['accuracy'], 'top5': 100 * report['val']['top5'],
            'best_epoch': report['best_epoch'], 'epochs': len(rows),
            'train_s': sum(r['epoch_time_s'] for r in rows)}


def spread(values: Sequence[float]) -> dict[str, float]:
    """mean, sample standard deviation (n - 1; 0 for one value), min and max."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {'mean': mean, 'sd': sd, 'min': min(values), 'max': max(values), 'n': n}


def _recipe(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in _NOT_THE_RECIPE}


def group_runs(summaries: Sequence[dict]) -> list[list[dict]]:
    """Runs grouped by recipe (config without seed and bookkeeping), in first-seen order."""
    groups: list[list[dict]] = []
    for s in summaries:
        for g in groups:
            if _recipe(g[0]['config']) == _recipe(s['config']):
                g.append(s)
                break
        else:
            groups.append([s])
    return groups


def _fmt(st: dict) -> str:
    if st['n'] == 1:
        return f'{st["mean"]:.1f}'
    return f'{st["mean"]:.1f} ± {st["sd"]:.1f} [{st["min"]:.1f}-{st["max"]:.1f}]'


def table(summaries: Sequence[dict]) -> str:
    """The markdown table: one row per recipe, the first one the baseline."""
    groups = group_runs(summaries)
    base = _recipe(groups[0][0]['config'])
    lines = ['| change vs the first row | seeds | top-1 % | top-5 % | best epochs | train min/run |',
             '|---|---|---|---|---|---|']
    for g in groups:
        recipe = _recipe(g[0]['config'])
        diff = ', '.join(f'{k}={recipe.get(k)!r}' for k in sorted(set(base) | set(recipe))
                         if recipe.get(k) != base.get(k)) or '(baseline)'
        train_min = spread([s['train_s'] / 60 for s in g])
        lines.append(f'| {diff} | {", ".join(str(s["seed"]) for s in g)} | '
                     f'{_fmt(spread([s["top1"] for s in g]))} | '
                     f'{_fmt(spread([s["top5"] for s in g]))} | '
                     f'{", ".join(str(s["best_epoch"]) for s in g)} | {train_min["mean"]:.0f} |')
    return '\n'.join(lines)


def main(argv: Sequence[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        summaries = [run_summary(w) for w in argv]
    except FileNotFoundError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    print(table(summaries))
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
