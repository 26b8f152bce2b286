"""CutMix and the MixUp/CutMix switch: pasted rectangle, area-corrected lam, the paper's box
formula, the no-mix paths, the coin statistics, and MixUp unchanged when CutMix is off."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cars_jax.mixup import cutmix, mix_batch, mixup, symmetric_beta

N, H, W = 6, 12, 16
# each image a distinct constant plus a ramp: a pixel tells which image it came from
IMAGES = (np.arange(N, dtype=np.float32)[:, None, None, None] * 1000
          + np.arange(H * W * 3, dtype=np.float32).reshape(1, H, W, 3))
LABELS = np.arange(N, dtype=np.int32) * 5 + 2


def _perm_from(labels_b):
    pos = {int(l): i for i, l in enumerate(LABELS)}
    return np.array([pos[int(l)] for l in np.asarray(labels_b)])


def _paper_box(lam, cx, cy):
    """rand_bbox of the CutMix paper's code (clovaai/CutMix-PyTorch train.py), in numpy."""
    cut_rat = np.sqrt(1.0 - lam)
    cut_w, cut_h = int(W * cut_rat), int(H * cut_rat)
    bbx1, bby1 = np.clip(cx - cut_w // 2, 0, W), np.clip(cy - cut_h // 2, 0, H)
    bbx2, bby2 = np.clip(cx + cut_w // 2, 0, W), np.clip(cy + cut_h // 2, 0, H)
    return bby1, bby2, bbx1, bbx2


@pytest.mark.parametrize('seed', range(6))
def test_pastes_one_rectangle_from_the_partner_and_lam_is_the_kept_area(seed):
    out, la, lb, lam = jax.jit(cutmix, static_argnums=(3, 4))(
        jax.random.key(seed), jnp.asarray(IMAGES), jnp.asarray(LABELS), 1.0, 1.0)
    out = np.asarray(out)
    np.testing.assert_array_equal(np.asarray(la), LABELS)
    perm = _perm_from(lb)
    assert sorted(perm) == list(range(N))
    from_partner = out == IMAGES[perm]
    from_self = out == IMAGES
    assert np.all(from_partner | from_self)            # pixels are copied, never blended
    moved = [i for i in range(N) if perm[i] != i]
    assert moved
    box = ~from_self[moved[0], :, :, 0]
    for i in moved:                                     # one box for the whole batch
        np.testing.assert_array_equal(~from_self[i, :, :, 0], box)
    rows, cols = np.flatnonzero(box.any(1)), np.flatnonzero(box.any(0))
    if box.any():                                       # a filled axis-aligned rectangle
        assert np.all(box[rows.min():rows.max() + 1, cols.min():cols.max() + 1])
        assert box.sum() == len(rows) * len(cols)
    np.testing.assert_allclose(float(lam), 1.0 - box.sum() / (H * W), rtol=0, atol=1e-6)


def test_box_follows_the_papers_formula_for_its_draws():
    """Recover lam_raw and the centre the function drew (its documented key split) and rebuild
    the box with the paper's rand_bbox."""
    for seed in range(20):
        key = jax.random.key(seed)
        _, k_lam, _, k_box = jax.random.split(key, 4)
        lam_raw = float(symmetric_beta(k_lam, 1.0))
        cy = int(jax.random.randint(k_box, (), 0, H))
        cx = int(jax.random.randint(jax.random.fold_in(k_box, 1), (), 0, W))
        y0, y1, x0, x1 = _paper_box(np.float32(lam_raw), cx, cy)
        out, _, lb, lam = cutmix(key, jnp.asarray(IMAGES), jnp.asarray(LABELS), 1.0, 1.0)
        i = int(np.flatnonzero(_perm_from(lb) != np.arange(N))[0])
        box = np.asarray(out)[i, :, :, 0] != IMAGES[i, :, :, 0]
        expected = np.zeros((H, W), bool)
        expected[y0:y1, x0:x1] = True
        np.testing.assert_array_equal(box, expected)
        assert float(lam) == pytest.approx(1 - (y1 - y0) * (x1 - x0) / (H * W), abs=1e-6)


@pytest.mark.parametrize('alpha,prob', [(1.0, 0.0), (0.0, 1.0)])
def test_never_mix_is_identity(alpha, prob):
    out, la, lb, lam = cutmix(jax.random.key(0), jnp.asarray(IMAGES), jnp.asarray(LABELS),
                              alpha, prob)
    np.testing.assert_array_equal(np.asarray(out), IMAGES)
    np.testing.assert_array_equal(np.asarray(lb), LABELS)
    assert float(lam) == 1.0


def test_keeps_integer_images_exact():
    x = jnp.asarray(np.random.default_rng(0).integers(0, 255, (N, H, W, 3)), jnp.uint8)
    out, _, lb, _ = cutmix(jax.random.key(4), x, jnp.asarray(LABELS), 1.0, 1.0)
    assert out.dtype == jnp.uint8
    xs = np.asarray(x)
    assert np.all((np.asarray(out) == xs) | (np.asarray(out) == xs[_perm_from(lb)]))


def test_coin_share_and_mean_lam():
    """Share of mixed batches ~ prob (binomial, 4 sd); with alpha 1 the raw lam is uniform, and
    clipping at the border only shrinks the box, so the kept share averages above 0.5. The coin
    is read from its documented key: a mixed batch can draw the identity permutation (1 in 6! =
    720), which leaves the labels as they were."""
    keys = jax.random.split(jax.random.key(1), 3000)
    _, _, lb, lam = jax.tree.map(np.asarray, jax.jit(jax.vmap(lambda k: cutmix(
        k, jnp.asarray(IMAGES), jnp.asarray(LABELS), 1.0, 0.3)))(keys))
    mixed = np.asarray(jax.vmap(
        lambda k: jax.random.uniform(jax.random.split(k, 4)[0], (), jnp.float32) < 0.3)(keys))
    assert not ((lb != LABELS[None]).any(axis=1) & ~mixed).any()   # partners only when mixed
    assert abs(mixed.mean() - 0.3) < 4 * np.sqrt(0.3 * 0.7 / 3000), mixed.mean()
    assert np.all(lam[~mixed] == 1.0)
    assert 0.5 < lam[mixed].mean() < 0.85 and lam[mixed].min() >= 0.0


def test_mix_batch_is_mixup_when_cutmix_is_off():
    x, y = jnp.asarray(IMAGES), jnp.asarray(LABELS)
    for seed in range(5):
        for a, b in zip(mix_batch(jax.random.key(seed), x, y, 0.4, 0.5, 0.0, 0.5),
                        mixup(jax.random.key(seed), x, y, 0.4, 0.5)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_mix_batch_switches_between_the_two_by_share():
    """Every batch mixed (prob 1); a CutMix batch copies pixels, a MixUp batch blends them."""
    x, y = jnp.asarray(IMAGES), jnp.asarray(LABELS)
    keys = jax.random.split(jax.random.key(2), 2000)
    out, _, lb, lam = jax.tree.map(np.asarray, jax.jit(jax.vmap(
        lambda k: mix_batch(k, x, y, 0.4, 1.0, 1.0, 0.25)))(keys))
    perms = [_perm_from(b) for b in lb]
    copied = np.array([np.all((o == IMAGES) | (o == IMAGES[p])) for o, p in zip(out, perms)])
    blended = np.array([np.allclose(o, l * IMAGES + (1 - l) * IMAGES[p], atol=1e-2)
                        for o, p, l in zip(out, perms, lam)])
    ambiguous = copied & blended                        # lam == 1 or an empty box
    share = copied[~ambiguous].mean()
    assert np.all(copied | blended)
    assert abs(share - 0.25) < 4 * np.sqrt(0.25 * 0.75 / 2000), share
    only_cutmix = jax.vmap(lambda k: mix_batch(k, x, y, 0.0, 1.0, 1.0, 0.25))(keys[:50])
    o = np.asarray(only_cutmix[0])
    assert all(np.all((oi == IMAGES) | (oi == IMAGES[_perm_from(b)]))
               for oi, b in zip(o, np.asarray(only_cutmix[2])))
