"""The optimizer: AdamW (the seed) or Nesterov SGD, on the one-cycle schedule, with a decay mask.

`optax.adamw` is `scale_by_adam -> add_decayed_weights(wd, mask) -> scale_by_learning_rate`,
i.e. `p -= lr_t * (m_hat / (sqrt(v_hat) + eps) + wd * p)`: the decoupled decay is multiplied
by the scheduled lr, exactly as `torch.optim.AdamW` does (`p *= 1 - lr * wd`, then the Adam
step, which does not depend on p). The seed decays every parameter (one param group);
`config.wd_exclude_bn_bias = True` leaves BatchNorm scale/bias and Dense/Conv biases alone.
"""
import jax
import optax

from cars_jax.schedules import onecycle_schedule

NO_DECAY_NAMES = ('bias', 'scale')


def _leaf_name(path) -> str | None:
    if not path:
        return None
    key = path[-1]
    for attr in ('key', 'name', 'idx'):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def weight_decay_mask(params):
    """True for every leaf that gets weight decay: all but those named 'bias' or 'scale'.

    Works on flax linen `params` dicts (`{'Conv_0': {'kernel': ...}, 'BatchNorm_0':
    {'scale': ..., 'bias': ...}, ...}`), FrozenDicts and other pytrees keyed by name.
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, _: _leaf_name(path) not in NO_DECAY_NAMES, params)


def make_optimizer(config, steps_per_epoch: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optimizer, lr schedule) from the config's optimisation fields.

    The schedule spans `config.num_epochs * steps_per_epoch` optimizer steps (one-cycle,
    stepped per batch). `config.optimizer`:
      * 'adamw': `optax.adamw(schedule, adam_b1, adam_b2, adam_eps, weight_decay, mask)`.
      * 'sgd': Nesterov momentum (`config.momentum`) with decoupled weight
        decay: `trace(momentum, nesterov) -> add_decayed_weights(wd, mask) ->
        scale_by_learning_rate(schedule)`, i.e. `optax.sgd(schedule, momentum, nesterov=True)`
        with `lr_t * wd * p` added after the momentum (SGDW; the decay does not enter the
        momentum buffer, unlike torch.optim.SGD's weight_decay).
    The mask is `weight_decay_mask` when `config.wd_exclude_bn_bias`, else None (decay all).
    """
    steps_per_epoch = int(steps_per_epoch)
    if steps_per_epoch < 1:
        raise ValueError(f'steps_per_epoch must be >= 1, got {steps_per_epoch}')
    schedule = onecycle_schedule(
        total_steps=int(config.num_epochs) * steps_per_epoch,
        max_lr=float(config.learning_rate),
        pct_start=float(config.pct_start),
        div_factor=float(config.div_factor),
        final_div_factor=float(config.final_div_factor))
    mask = weight_decay_mask if config.wd_exclude_bn_bias else None
    name = config.optimizer
    wd = float(config.weight_decay)
    if name == 'adamw':
        tx = optax.adamw(schedule, b1=float(config.adam_b1), b2=float(config.adam_b2),
                         eps=float(config.adam_eps), weight_decay=wd, mask=mask)
    elif name == 'sgd':
        tx = optax.chain(
            optax.trace(decay=float(config.momentum), nesterov=True),
            optax.add_decayed_weights(wd, mask),
            optax.scale_by_learning_rate(schedule))
    else:
        raise ValueError(f"config.optimizer must be 'adamw' or 'sgd', got {name!r}")
    return tx, schedule
