"""A teacher for distillation: a finished run's best checkpoint (`config.distill_from`).

The train step fits the teacher's softened predictions on the same mixed images
(`steps.train_step`, `losses.distillation_loss`); this loads the teacher once, at the edge,
after checking it can teach this run: the same classes, and the same split (it saw the
labels of its train images, which must not be this run's validation or test images).
"""
from __future__ import annotations

from typing import Any, Callable

import ml_collections

from cars_jax.config import ConfigError, check_same_split
from cars_jax.evaluate import load_class_names, load_run_config, restore_best_state
from cars_jax.steps import inference_variables


def load_teacher(config: ml_collections.ConfigDict, class_names: list[str],
                 holdout: bool) -> tuple[dict, Callable[..., Any]]:
    """(variables, apply_fn) of the teacher in config.distill_from: its inference weights (the
    EMA if it kept one) and its own network, which may differ from the student's (wider, say)."""
    workdir = config.distill_from
    theirs = load_run_config(workdir)
    names = load_class_names(workdir)
    if names != list(class_names):
        raise ConfigError(f'--config.distill_from={workdir!r} was trained on {len(names)} classes '
                          f'({", ".join(names[:3])}, ...), this run has {len(class_names)} '
                          f'({", ".join(class_names[:3])}, ...): a teacher needs the same classes.')
    check_same_split(theirs, config, holdout, 'distill_from')
    state, _ = restore_best_state(workdir, theirs, len(names))
    return inference_variables(state), state.apply_fn
