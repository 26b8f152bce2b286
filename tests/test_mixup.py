"""MixUp: the mixing formula, the no-mix paths, the statistics of the coin and of lam, one compile."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from cars_jax.mixup import mixup, symmetric_beta

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


@pytest.mark.parametrize('alpha', [0.05, 0.2, 0.4, 0.5, 0.6, 1.0, 2.0, 5.0])
def test_symmetric_beta_follows_scipys_beta_distribution(alpha):
    """Both of its methods (Jöhnk's at alpha <= 1/2, Ulrich's above) against scipy's Beta(a, a)
    CDF: 4000 draws, the largest CDF gap on a grid of 999 points within the Kolmogorov-Smirnov
    bound at p = 1e-3 (1.95 / sqrt(n); the grid leaves out the last 1e-3 at each end, which at
    small alpha float32 rounds to exactly 0 or 1); moments against the closed forms."""
    keys = jax.random.split(jax.random.key(3), 4000)
    lam = np.asarray(jax.jit(jax.vmap(lambda k: symmetric_beta(k, alpha)))(keys), np.float64)
    assert lam.min() >= 0.0 and lam.max() <= 1.0
    q = np.linspace(0.001, 0.999, 999)
    gap = np.abs((lam[None, :] <= q[:, None]).mean(axis=1) - stats.beta(alpha, alpha).cdf(q))
    assert gap.max() < 1.95 / np.sqrt(len(lam)), (gap.max(), q[gap.argmax()])
    assert abs(lam.mean() - 0.5) < 4 * np.sqrt(1 / (4 * (2 * alpha + 1)) / len(lam))
    assert abs(lam.var() - 1 / (4 * (2 * alpha + 1))) < 0.01


def test_symmetric_beta_rejects_a_bad_alpha():
    for bad in (0.0, -1.0, float('nan'), float('inf')):
        with pytest.raises(ValueError, match='alpha > 0'):
            symmetric_beta(jax.random.key(0), bad)


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
