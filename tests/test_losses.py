"""Label-smoothed CE, mixed CE and top-k against float64 numpy written from PyTorch's definition."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cars_jax.losses import (distillation_loss, mixed_cross_entropy, nt_xent_loss, smoothed_cross_entropy,
                             topk_correct)


def np_ls_ce(logits, labels, eps):
    """PyTorch CrossEntropyLoss(label_smoothing=eps, reduction='none'): the (N, K) target form."""
    x = np.asarray(logits, np.float64)
    n, k = x.shape
    z = x - x.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    target = np.full((n, k), eps / k)
    target[np.arange(n), labels] += 1.0 - eps
    return -(target * logp).sum(axis=1)


RNG = np.random.default_rng(0)
LOGITS = (RNG.normal(size=(16, 196)) * 3).astype(np.float32)
LABELS = RNG.integers(0, 196, size=16).astype(np.int32)


@pytest.mark.parametrize('eps', [0.0, 0.05, 0.1, 0.5, 1.0])
def test_smoothed_ce_matches_numpy(eps):
    got = np.asarray(smoothed_cross_entropy(jnp.asarray(LOGITS), jnp.asarray(LABELS), eps))
    assert got.shape == (16,) and got.dtype == np.float32
    np.testing.assert_allclose(got, np_ls_ce(LOGITS, LABELS, eps), rtol=2e-6, atol=2e-6)


def test_smoothed_ce_known_value():
    # Uniform logits: every class has p = 1/K, so the loss is log K for any eps and label.
    k = 196
    got = smoothed_cross_entropy(jnp.zeros((3, k)), jnp.array([0, 5, 195]), 0.05)
    np.testing.assert_allclose(np.asarray(got), np.log(k), rtol=1e-6)


@pytest.mark.parametrize('eps', [0.0, 0.05])
def test_smoothed_ce_large_logits_finite(eps):
    logits = np.zeros((4, 10), np.float32)
    logits[:, 0] = 1e4
    logits[:, 1] = -1e4
    labels = np.array([0, 1, 2, 9], np.int32)
    fn = jax.jit(smoothed_cross_entropy, static_argnums=2)
    got = np.asarray(fn(jnp.asarray(logits), jnp.asarray(labels), eps))
    grad = np.asarray(jax.grad(lambda l: fn(l, jnp.asarray(labels), eps).mean())(
        jnp.asarray(logits)))
    assert np.all(np.isfinite(got)) and np.all(np.isfinite(grad))
    np.testing.assert_allclose(got, np_ls_ce(logits, labels, eps), rtol=1e-6)


def test_smoothed_ce_bfloat16_logits_computed_in_float32():
    got = smoothed_cross_entropy(jnp.asarray(LOGITS, jnp.bfloat16), jnp.asarray(LABELS), 0.05)
    ref = np_ls_ce(np.asarray(jnp.asarray(LOGITS, jnp.bfloat16).astype(jnp.float32)),
                   LABELS, 0.05)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5)


def test_mixed_ce_lam_one_is_plain_and_general_lam_matches():
    lg, la = jnp.asarray(LOGITS), jnp.asarray(LABELS)
    lb = jnp.asarray(np.roll(LABELS, 3))
    plain = smoothed_cross_entropy(lg, la, 0.05)
    np.testing.assert_allclose(np.asarray(mixed_cross_entropy(lg, la, lb, 1.0, 0.05)),
                               np.asarray(plain), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(mixed_cross_entropy(lg, la, lb, 0.0, 0.05)),
                               np_ls_ce(LOGITS, np.asarray(lb), 0.05), rtol=2e-6)
    lam = np.float32(0.3)
    ref = lam * np_ls_ce(LOGITS, LABELS, 0.05) + (1 - lam) * np_ls_ce(LOGITS, np.asarray(lb), 0.05)
    got = jax.jit(mixed_cross_entropy, static_argnums=4)(lg, la, lb, jnp.float32(lam), 0.05)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=2e-6)
    # Batch mean = the seed's lam * criterion(out, y_a) + (1 - lam) * criterion(out, y_b).
    np.testing.assert_allclose(float(got.mean()), ref.mean(), rtol=2e-6)


@pytest.mark.parametrize('k', [1, 3, 5])
def test_topk_matches_numpy_argsort(k):
    got = np.asarray(jax.jit(topk_correct, static_argnums=2)(
        jnp.asarray(LOGITS), jnp.asarray(LABELS), k))
    top = np.argsort(-LOGITS, axis=1)[:, :k]
    ref = (top == LABELS[:, None]).any(axis=1).astype(np.float32)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, ref)


def test_topk_hits_and_misses_and_ties():
    logits = jnp.array([[0.1, 0.9, 0.5, 0.2],
                        [0.1, 0.9, 0.5, 0.2],
                        [1.0, 1.0, 0.0, 0.0]])
    labels = jnp.array([1, 2, 1])
    np.testing.assert_array_equal(np.asarray(topk_correct(logits, labels, 1)), [1, 0, 0])
    np.testing.assert_array_equal(np.asarray(topk_correct(logits, labels, 2)), [1, 1, 1])
    # k=1 agrees with argmax (ties go to the lower index in both).
    np.testing.assert_array_equal(
        np.asarray(topk_correct(logits, labels, 1)),
        np.asarray(jnp.argmax(logits, -1) == labels).astype(np.float32))
    # k beyond the number of classes: everything counts.
    np.testing.assert_array_equal(np.asarray(topk_correct(logits, labels, 10)), [1, 1, 1])


def np_cosine_loss(logits, labels):
    """Barz & Denzler's L_cos = 1 - <psi(y), f(x) / ||f(x)||> with one-hot psi, float64."""
    x = np.asarray(logits, np.float64)
    onehot = np.eye(x.shape[1])[labels]
    return 1.0 - (onehot * x).sum(1) / np.linalg.norm(x, axis=1)


def test_cosine_loss_matches_the_papers_formula_and_ignores_the_scale():
    from cars_jax.losses import cosine_loss
    got = np.asarray(cosine_loss(jnp.asarray(LOGITS), jnp.asarray(LABELS)))
    np.testing.assert_allclose(got, np_cosine_loss(LOGITS, LABELS), rtol=1e-6, atol=1e-6)
    scaled = np.asarray(cosine_loss(jnp.asarray(LOGITS * 50.0), jnp.asarray(LABELS)))
    np.testing.assert_allclose(scaled, got, atol=1e-6)
    # hand values: along the label 0, opposite 2, orthogonal 1; a zero output stays finite
    f = jnp.asarray([[2.0, 0.0], [-3.0, 0.0], [0.0, 5.0], [0.0, 0.0]])
    np.testing.assert_allclose(np.asarray(cosine_loss(f, jnp.asarray([0, 0, 0, 0]))),
                               [0.0, 2.0, 1.0, 1.0], atol=1e-7)
    g = jax.grad(lambda x: cosine_loss(x, jnp.zeros(4, jnp.int32)).sum())(f)
    assert np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize('ce_weight', [0.0, 0.1])
def test_mixed_cosine_loss_is_the_mixup_weighting_plus_the_weighted_ce(ce_weight):
    from cars_jax.losses import mixed_loss
    b = np.roll(LABELS, 3)
    lam = 0.3
    got = np.asarray(mixed_loss(jnp.asarray(LOGITS), jnp.asarray(LABELS), jnp.asarray(b), lam,
                                0.05, 'cosine', ce_weight))
    want = (lam * np_cosine_loss(LOGITS, LABELS) + (1 - lam) * np_cosine_loss(LOGITS, b)
            + ce_weight * (lam * np_ls_ce(LOGITS, LABELS, 0.05)
                           + (1 - lam) * np_ls_ce(LOGITS, b, 0.05)))
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)
    ce = np.asarray(mixed_loss(jnp.asarray(LOGITS), jnp.asarray(LABELS), jnp.asarray(b), lam,
                               0.05))        # the default is the seed's criterion
    np.testing.assert_allclose(ce, lam * np_ls_ce(LOGITS, LABELS, 0.05)
                               + (1 - lam) * np_ls_ce(LOGITS, b, 0.05), rtol=2e-6, atol=2e-6)
    with pytest.raises(ValueError, match='loss must be one of'):
        mixed_loss(jnp.asarray(LOGITS), jnp.asarray(LABELS), jnp.asarray(b), lam, 0.0, 'l2')


def _simclr_numpy(z1, z2, t):
    """The paper's loss written out (Chen et al. 2020, Algorithm 1), float64, with the views
    interleaved as 2k-1, 2k as in the paper."""
    z = np.empty((2 * len(z1), z1.shape[1]))
    z[0::2], z[1::2] = z1, z2
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    n2 = len(z)

    def l(i, j):
        den = sum(np.exp(z[i] @ z[k] / t) for k in range(n2) if k != i)
        return -np.log(np.exp(z[i] @ z[j] / t) / den)

    return sum(l(2 * k, 2 * k + 1) + l(2 * k + 1, 2 * k) for k in range(n2 // 2)) / n2


@pytest.mark.parametrize('t', [0.1, 0.5, 1.0])
def test_nt_xent_matches_the_papers_formula(t):
    rng = np.random.default_rng(3)
    z1, z2 = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    loss, _ = nt_xent_loss(jnp.asarray(z1, jnp.float32), jnp.asarray(z2, jnp.float32), t)
    np.testing.assert_allclose(float(loss), _simclr_numpy(z1, z2, t), rtol=2e-5)
    # scale-free: each embedding is normalised
    scaled, _ = nt_xent_loss(jnp.asarray(z1 * 7, jnp.float32), jnp.asarray(z2 * 0.1, jnp.float32), t)
    np.testing.assert_allclose(float(scaled), float(loss), rtol=1e-5)


def test_nt_xent_by_hand_and_its_hit_rate():
    """Two images, orthogonal, each view equal to its pair: s = 1 with the positive, 0 with the
    two negatives, so l = -log(e^(1/t) / (e^(1/t) + 2)); every anchor finds its positive."""
    t = 0.5
    z1 = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    loss, hits = nt_xent_loss(z1, z1 * 3, t)
    np.testing.assert_allclose(float(loss), -np.log(np.e ** 2 / (np.e ** 2 + 2)), rtol=1e-6)
    assert float(hits) == 1.0
    # views swapped between the images: every anchor's nearest other is a negative
    _, hits = nt_xent_loss(z1, z1[::-1], t)
    assert float(hits) == 0.0
    grads = jax.grad(lambda a: nt_xent_loss(a, jnp.zeros((2, 2)), t)[0])(z1)
    assert np.all(np.isfinite(np.asarray(grads)))            # a zero embedding stays finite


@pytest.mark.parametrize('t', [1.0, 4.0])
def test_distillation_is_t2_times_the_kl_of_the_softened_distributions(t):
    rng = np.random.default_rng(1)
    s, te = rng.normal(size=(5, 7)) * 3, rng.normal(size=(5, 7)) * 3
    soft = lambda x: np.exp(x / t) / np.exp(x / t).sum(-1, keepdims=True)
    ps, pt = soft(s), soft(te)
    want = t * t * (pt * np.log(pt / ps)).sum(-1)
    got = distillation_loss(jnp.asarray(s, jnp.float32), jnp.asarray(te, jnp.float32), t)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-6)
    same = distillation_loss(jnp.asarray(te, jnp.float32), jnp.asarray(te, jnp.float32), t)
    np.testing.assert_allclose(np.asarray(same), 0.0, atol=1e-5)
    g = jax.grad(lambda a, b: distillation_loss(a, b, t).sum(), argnums=1)(
        jnp.asarray(s, jnp.float32), jnp.asarray(te, jnp.float32))
    assert not np.any(np.asarray(g))                       # the teacher gets no gradient
