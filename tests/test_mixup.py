"""MixUp: the mixing formula, the no-mix paths, the statistics of the coin and of lam, one compile."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from cars_jax.mixup import mixup

N = 8
IMAGES = np.random.default_rng(0).normal(size=(N, 4, 4, 3)).astype(np.float32)
LABELS = np.arange(N, dtype=np.int32) * 7 + 3    # distinct, so labels_b reveals the permutation


def _perm_from(labels_b):
    pos = {int(l): i for i, l in enumerate(LABELS)}
    return np.array([pos[int(l)] for l in np.asarray(labels_b)])


@pytest.mark.parametrize('seed', range(5))
def test_prob_one_always_mixes_with_the_formula(seed):
    out, la, lb, lam = jax.jit(mixup, static_argnums=(3, 4))(
        jax.random.key(seed), jnp.asarray(IMAGES), jnp.asarray(LABELS), 0.4, 1.0)
    lam_ = float(lam)
    assert lam.shape == () and lam.dtype == jnp.float32 and 0.0 <= lam_ <= 1.0
    assert out.dtype == jnp.float32 and out.shape == IMAGES.shape
    np.testing.assert_array_equal(np.asarray(la), LABELS)
    perm = _perm_from(lb)
    assert sorted(perm) == list(range(N)) and not np.array_equal(perm, np.arange(N))
    ref = np.float32(lam_) * IMAGES + (np.float32(1) - np.float32(lam_)) * IMAGES[perm]
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('alpha,prob', [(0.4, 0.0), (0.0, 1.0), (-1.0, 0.5)])
def test_never_mix_is_identity(alpha, prob):
    for seed in range(3):
        out, la, lb, lam = mixup(jax.random.key(seed), jnp.asarray(IMAGES),
                                 jnp.asarray(LABELS), alpha, prob)
        np.testing.assert_array_equal(np.asarray(out), IMAGES)
        np.testing.assert_array_equal(np.asarray(la), LABELS)
        np.testing.assert_array_equal(np.asarray(lb), LABELS)
        assert float(lam) == 1.0 and jnp.asarray(lam).dtype == jnp.float32


def test_keeps_dtype():
    for dtype in (jnp.bfloat16, jnp.uint8):
        x = jnp.asarray(np.random.default_rng(1).integers(0, 255, (N, 2, 2, 3)), dtype)
        out, _, lb, lam = mixup(jax.random.key(3), x, jnp.asarray(LABELS), 0.4, 1.0)
        assert out.dtype == dtype and out.shape == x.shape
        ref = float(lam) * np.asarray(x, np.float32) + (1 - float(lam)) * np.asarray(
            x, np.float32)[_perm_from(lb)]
        np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=1e-2, atol=1.0)


def test_statistics_over_many_keys():
    """Share of mixed batches ~ prob; lam among mixed ones ~ Beta(alpha, alpha)."""
    alpha, prob, n_keys = 0.4, 0.5, 4000
    keys = jax.random.split(jax.random.key(42), n_keys)
    run = jax.jit(jax.vmap(lambda k: mixup(k, jnp.asarray(IMAGES), jnp.asarray(LABELS),
                                           alpha, prob)))
    out, la, lb, lam = jax.tree.map(np.asarray, run(keys))
    mixed = (lb != LABELS[None]).any(axis=1)       # a non-identity permutation was applied
    unmixed = ~mixed
    # Unmixed batches: exact identity, lam == 1.
    assert np.all(lam[unmixed] == 1.0)
    np.testing.assert_array_equal(out[unmixed], np.broadcast_to(IMAGES, out[unmixed].shape))
    # Coin: binomial(4000, 0.5) has sd 0.0079; allow 4 sd.
    assert abs(mixed.mean() - prob) < 0.032, mixed.mean()
    lm = lam[mixed].astype(np.float64)
    beta_var = 1.0 / (4 * (2 * alpha + 1))          # Var Beta(a, a) = 1 / (4 (2a + 1))
    assert abs(lm.mean() - 0.5) < 0.03, lm.mean()   # sd of the mean ~ 0.0075
    assert abs(lm.var() - beta_var) < 0.012, (lm.var(), beta_var)
    assert lm.min() >= 0.0 and lm.max() <= 1.0
    assert stats.kstest(lm, stats.beta(alpha, alpha).cdf).pvalue > 1e-3


def test_other_prob():
    keys = jax.random.split(jax.random.key(7), 2000)
    _, _, lb, _ = jax.jit(jax.vmap(lambda k: mixup(
        k, jnp.asarray(IMAGES), jnp.asarray(LABELS), 0.4, 0.2)))(keys)
    share = (np.asarray(lb) != LABELS[None]).any(axis=1).mean()
    assert abs(share - 0.2) < 0.036, share       # sd 0.0089


def test_compiles_once_for_different_keys():
    traces = []

    @jax.jit
    def step(key, x, y):
        traces.append(1)
        return mixup(key, x, y, 0.4, 0.5)

    x, y = jnp.asarray(IMAGES), jnp.asarray(LABELS)
    lams = [float(step(jax.random.key(s), x, y)[3]) for s in range(20)]
    assert len(traces) == 1
    assert any(l == 1.0 for l in lams) and any(l < 1.0 for l in lams)
