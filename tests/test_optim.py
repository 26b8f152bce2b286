"""make_optimizer against numpy re-implementations of torch.optim.AdamW and SGDW, and the decay mask."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cars_jax.optim import make_optimizer, weight_decay_mask
from cars_jax.schedules import onecycle_schedule

from configs import base


def flax_like_params():
    r = np.random.default_rng(0)
    f = lambda *s: jnp.asarray(r.normal(size=s), jnp.float32)  # noqa: E731
    return {'Conv_0': {'kernel': f(3, 3, 2, 4)},
            'BatchNorm_0': {'scale': f(4), 'bias': f(4)},
            'layer1': {'block0': {'Conv_0': {'kernel': f(3, 3, 4, 4)},
                                  'BatchNorm_0': {'scale': f(4), 'bias': f(4)}}},
            'Dense_0': {'kernel': f(4, 5), 'bias': f(5)}}


def config(**kw):
    c = base.get_config()
    for k, v in kw.items():
        setattr(c, k, v)
    return c


class TorchAdamW:
    """torch.optim.AdamW (amsgrad=False) in float64: the change it makes to p in one step.

    `p <- p * (1 - lr * wd)` (if decayed), then `p <- p - lr / bc1 * m / (sqrt(v) / sqrt(bc2)
    + eps)`. Fed the current parameters each step, so the comparison with optax is
    per step and free of float32 accumulation in the parameters themselves.
    """

    def __init__(self, b1, b2, eps, wd):
        self.b1, self.b2, self.eps, self.wd = b1, b2, eps, wd
        self.m, self.v, self.t = {}, {}, 0

    def delta(self, params, grads, lr, decay):
        self.t += 1
        out = {}
        for k, p in params.items():
            p = np.asarray(p, np.float64)
            g = np.asarray(grads[k], np.float64)
            self.m[k] = self.b1 * self.m.get(k, 0.0) + (1 - self.b1) * g
            self.v[k] = self.b2 * self.v.get(k, 0.0) + (1 - self.b2) * g * g
            bc1, bc2 = 1 - self.b1 ** self.t, 1 - self.b2 ** self.t
            new = p * (1 - lr * self.wd) if decay[k] else p
            denom = np.sqrt(self.v[k]) / np.sqrt(bc2) + self.eps
            new = new - (lr / bc1) * self.m[k] / denom
            out[k] = new - p
        return out


def _flat(tree):
    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def _run(tx, params, grads_seq):
    """Apply tx to grads_seq; returns the final params and the per-step (params, updates)."""
    state = tx.init(params)
    update = jax.jit(tx.update)
    history = []
    for g in grads_seq:
        u, state = update(g, state, params)
        history.append((params, u))
        params = optax.apply_updates(params, u)
    return params, history


def _grads(params, n, seed=1):
    r = np.random.default_rng(seed)
    return [jax.tree.map(lambda x: jnp.asarray(r.normal(size=x.shape) * 0.1, jnp.float32),
                         params) for _ in range(n)]


@pytest.mark.parametrize('exclude', [False, True])
def test_adamw_matches_torch_formula(exclude):
    # Large wd so the decoupled decay term is visible at float32 precision.
    cfg = config(weight_decay=0.5, wd_exclude_bn_bias=exclude, num_epochs=4)
    tx, sched = make_optimizer(cfg, 5)
    params = flax_like_params()
    grads = _grads(params, 4)
    for g in grads:       # grads ~ eps on one leaf: tells eps + sqrt(v_hat) from sqrt(v_hat + eps)
        g['BatchNorm_0']['scale'] = g['BatchNorm_0']['scale'] * 1e-7
    lrs = [float(sched(t)) for t in range(4)]
    np.testing.assert_allclose(lrs, [float(onecycle_schedule(20, 1e-3)(t)) for t in range(4)])
    decay = {k: bool(v) or not exclude for k, v in _flat(weight_decay_mask(params)).items()}
    assert exclude == (not all(decay.values()))
    ref = TorchAdamW(0.9, 0.999, 1e-8, 0.5)
    _, history = _run(tx, params, grads)
    for t, ((p, u), g) in enumerate(zip(history, grads)):
        want = ref.delta(_flat(p), _flat(g), lrs[t], decay)
        for k, uk in _flat(u).items():
            # optax's float32 bias correction 1 - b2**t is off by ~1e-5 relative, so the
            # step is good to ~7e-6 * lr; the decay term can cancel it, hence the atol.
            np.testing.assert_allclose(np.asarray(uk), want[k], rtol=1e-5, atol=2e-5 * lrs[t],
                                       err_msg=f'step {t} {k}')


def test_adamw_seed_values_single_step():
    """One step with the seed's own config (wd 1e-4 on everything, lr 4e-5 at step 0)."""
    tx, sched = make_optimizer(base.get_config(), 255)
    np.testing.assert_allclose(float(sched(0)), 4e-5, rtol=1e-6)
    params = {'w': jnp.array([1.0, -2.0, 3.0]), 'bias': jnp.array([0.5])}
    grads = {'w': jnp.array([0.1, 0.0, -0.3]), 'bias': jnp.array([2.0])}
    _, [(_, u)] = _run(tx, params, [grads])
    want = TorchAdamW(0.9, 0.999, 1e-8, 1e-4).delta(params, grads, float(sched(0)),
                                                    {'w': True, 'bias': True})
    for k in want:
        np.testing.assert_allclose(np.asarray(u[k]), want[k], rtol=2e-5, err_msg=k)
    # First Adam step is lr * g / (|g| + eps): -lr*sign(g) - lr*wd*p, 0 grad -> decay only.
    np.testing.assert_allclose(np.asarray(u['w']),
                               -4e-5 * (np.sign([0.1, 0.0, -0.3]) + 1e-4 * np.array([1, -2, 3.])),
                               rtol=1e-5)


def test_weight_decay_mask_flax_like_dict():
    mask = weight_decay_mask(flax_like_params())
    assert mask == {'Conv_0': {'kernel': True},
                    'BatchNorm_0': {'scale': False, 'bias': False},
                    'layer1': {'block0': {'Conv_0': {'kernel': True},
                                          'BatchNorm_0': {'scale': False, 'bias': False}}},
                    'Dense_0': {'kernel': True, 'bias': False}}


def test_weight_decay_mask_real_flax_params():
    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            x = nn.Conv(4, (3, 3), use_bias=False)(x)
            x = nn.BatchNorm(use_running_average=not train)(x)
            return nn.Dense(3)(x.mean((1, 2)))

    variables = Tiny().init(jax.random.key(0), jnp.zeros((1, 8, 8, 2)))
    mask = _flat(weight_decay_mask(variables['params']))
    assert mask == {"['Conv_0']['kernel']": True, "['BatchNorm_0']['scale']": False,
                    "['BatchNorm_0']['bias']": False, "['Dense_0']['kernel']": True,
                    "['Dense_0']['bias']": False}


def test_mask_only_decays_kernels_with_zero_grads():
    """Zero grads: Adam's step is 0, so only the decay moves parameters (update = -lr*wd*p)."""
    params = flax_like_params()
    zeros = jax.tree.map(jnp.zeros_like, params)
    for exclude in (False, True):
        tx, sched = make_optimizer(config(weight_decay=0.1, wd_exclude_bn_bias=exclude), 10)
        _, [(_, u)] = _run(tx, params, [zeros])
        lr = float(sched(0))
        for (k, uk), old, dec in zip(_flat(u).items(), _flat(params).values(),
                                     _flat(weight_decay_mask(params)).values()):
            want = -lr * 0.1 * np.asarray(old) if (dec or not exclude) else 0 * np.asarray(old)
            np.testing.assert_allclose(np.asarray(uk), want, rtol=1e-6, atol=0, err_msg=k)


def test_sgd_nesterov_decoupled_decay():
    cfg = config(optimizer='sgd', momentum=0.9, weight_decay=0.05, wd_exclude_bn_bias=True,
                 num_epochs=1)
    tx, sched = make_optimizer(cfg, 10)
    params = flax_like_params()
    grads = _grads(params, 3, seed=2)
    _, history = _run(tx, params, grads)
    decay = _flat(weight_decay_mask(params))
    buf = {}
    for t, ((p, u), g) in enumerate(zip(history, grads)):
        lr = float(sched(t))
        for k, uk in _flat(u).items():
            gk = np.asarray(_flat(g)[k], np.float64)
            pk = np.asarray(_flat(p)[k], np.float64)
            buf[k] = 0.9 * buf.get(k, 0.0) + gk          # torch SGD buffer (dampening 0)
            want = -lr * (gk + 0.9 * buf[k])             # nesterov step
            if decay[k]:
                want = want - lr * 0.05 * pk             # decoupled: outside the buffer
            np.testing.assert_allclose(np.asarray(uk), want, rtol=1e-5, atol=1e-12,
                                       err_msg=f'step {t} {k}')


def test_rejects_unknown_optimizer_and_bad_steps():
    with pytest.raises(ValueError):
        make_optimizer(config(optimizer='lamb'), 10)
    with pytest.raises(ValueError):
        make_optimizer(base.get_config(), 0)
