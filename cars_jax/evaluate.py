"""Evaluation of a finished (or running) workdir: restore the best checkpoint, report."""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections

from cars_jax.data.dataset import build_data
from cars_jax.steps import create_train_state, make_steps


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config a run wrote to its workdir."""
    path = os.path.join(workdir, 'config.json')
    if not os.path.exists(path):
        raise FileNotFoundError(f'{path} not found: --workdir must be a cars_jax run directory '
                                '(train one with python main.py --config=... --workdir=...).')
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def restore_best_state(workdir: str, config: ml_collections.ConfigDict, num_classes: int):
    """(state, meta) of the best checkpoint of `workdir`."""
    from cars_jax.train import checkpoint_managers, restore_checkpoint
    latest_mgr, best_mgr = checkpoint_managers(workdir)
    try:
        step = best_mgr.best_step()
        if step is None:
            raise FileNotFoundError(f'no best checkpoint in {workdir}/checkpoints/best yet.')
        template = create_train_state(config, jax.random.PRNGKey(0), num_classes,
                                      steps_per_epoch=1)
        return restore_checkpoint(best_mgr, template, step)
    finally:
        latest_mgr.close()
        best_mgr.close()


def evaluate_workdir(workdir: str) -> dict[str, Any]:
    """Top-1/top-5/loss of the best checkpoint on the validation (and test) split."""
    from cars_jax.train import evaluate
    config = load_run_config(workdir)
    data = build_data(config)
    state, meta = restore_best_state(workdir, config, len(data.class_names))
    _, eval_fn = make_steps(config)
    out: dict[str, Any] = {'best_epoch': meta['progress']['best_epoch'] + 1}
    for name, records in (('val', data.val), ('test', data.test)):
        if len(records):
            out[name] = evaluate(eval_fn, state, records, config)
            r = out[name]
            print(f'{name}: top-1 {r["accuracy"]:.4f} top-5 {r["top5"]:.4f} loss {r["loss"]:.4f} '
                  f'({r["count"]} images, best checkpoint of epoch {out["best_epoch"]})', flush=True)
    return out
