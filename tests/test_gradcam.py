"""cars_jax.gradcam: Grad-CAM against the CAM identity, finite differences and hand-made boxes."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cars_jax import gradcam as G
from cars_jax import model as M
from cars_jax.data import augment

# a tiny 4-stage net; at 96 px stage3 is 6x6x8 and stage4 3x3x16
NET = M.ResNet(num_classes=5, stage_sizes=(1, 1, 1, 1), widths=(4, 8, 8, 16))
SIZE = 96
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _randomise(variables, seed=0):
    """BN scale/bias and running statistics away from identity, so inference BN matters."""
    rng = np.random.default_rng(seed)

    def leaf(path, x):
        name = path[-1].key
        shape = np.shape(x)
        if name == 'scale':
            v = rng.uniform(0.5, 1.5, shape)
        elif name == 'bias' and len(path) > 1 and path[-2].key != 'fc':
            v = rng.normal(0, 0.2, shape)
        elif name == 'mean':
            v = rng.normal(0, 0.2, shape)
        elif name == 'var':
            v = rng.uniform(0.5, 2.0, shape)
        elif name == 'kernel' and path[-2].key == 'fc':
            v = np.asarray(x) * 3.0
        else:
            return x
        return jnp.asarray(v, jnp.float32)
    return jax.tree_util.tree_map_with_path(leaf, variables)


@pytest.fixture(scope='module')
def variables():
    return _randomise(M.init_variables(NET, jax.random.key(0), SIZE))


@pytest.fixture(scope='module')
def images():
    return jnp.asarray(np.random.default_rng(1).normal(size=(4, SIZE, SIZE, 3)), jnp.float32)


@functools.lru_cache(maxsize=None)
def _gc(layer):
    return G.make_gradcam_fn(NET, layer)


@jax.jit
def _forward(variables, x):
    """Logits and the sown stage activations, the plain flax way (no perturbation)."""
    logits, state = NET.apply(variables, x, mutable=['intermediates'])
    return logits, {k: v[0] for k, v in state['intermediates'].items()}


@functools.partial(jax.jit, static_argnames='layer')
def _perturbed_logits(variables, x, delta, layer):
    return NET.apply({**variables, 'perturbations': {layer: delta}}, x)


def _bilinear_np(m, height, width):
    """Half-pixel-centre bilinear upsampling with clamped edges, written out in numpy."""
    h, w = m.shape

    def axis(n_out, n_in):
        pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, pos - lo
    y0, y1, fy = axis(height, h)
    x0, x1, fx = axis(width, w)
    top = m[y0][:, x0] * (1 - fx) + m[y0][:, x1] * fx
    bottom = m[y1][:, x0] * (1 - fx) + m[y1][:, x1] * fx
    return top * (1 - fy)[:, None] + bottom * fy[:, None]


def _minmax_np(m):
    span = m.max() - m.min()
    return (m - m.min()) / span if span > 0 else np.zeros_like(m)


# ---- 1. the CAM identity on the last stage ------------------------------------------------

def test_last_stage_gradcam_is_the_class_activation_map(variables, images):
    targets = jnp.array([0, 1, 2, 3], jnp.int32)
    out = _gc('stage4')(variables, images, targets)
    logits, acts = _forward(variables, images)
    a = np.asarray(acts['stage4'], np.float64)                          # (4, 3, 3, 16)
    kernel = np.asarray(variables['params']['fc']['kernel'], np.float64)  # (16, 5)
    n, h, w, _ = a.shape
    raw = np.einsum('nhwc,nc->nhw', a, kernel[:, np.asarray(targets)].T)
    assert (raw > 0).any() and (raw < 0).any()          # the ReLU has work to do
    expected_low = np.maximum(raw, 0) / (h * w)
    np.testing.assert_allclose(out['cam_lowres'], expected_low, rtol=1e-4, atol=1e-7)

    cam = np.asarray(out['cam'])
    assert cam.shape == (n, SIZE, SIZE) and cam.dtype == np.float32
    for i in range(n):
        ref = _minmax_np(_bilinear_np(np.maximum(raw[i], 0), SIZE, SIZE))
        np.testing.assert_allclose(cam[i], ref, atol=1e-5)
        if raw[i].max() > 0:
            assert cam[i].max() == pytest.approx(1.0) and cam[i].min() == 0.0

    np.testing.assert_allclose(out['logits'], logits, rtol=1e-5, atol=1e-6)
    p = np.exp(np.asarray(logits, np.float64))
    np.testing.assert_allclose(out['probs'], p / p.sum(1, keepdims=True), rtol=1e-5)
    assert out['targets'].dtype == jnp.int32
    np.testing.assert_array_equal(out['targets'], targets)


# ---- 2. an all-negative map ---------------------------------------------------------------

def test_map_negative_everywhere_is_zero_without_nan(variables, images):
    # stage4 is post-ReLU (A >= 0): a non-positive fc column makes sum_k W[k,c] A_k <= 0
    kernel = variables['params']['fc']['kernel']
    flipped = kernel.at[:, 2].set(-jnp.abs(kernel[:, 2]) - 0.01)
    params = {**variables['params'], 'fc': {**variables['params']['fc'], 'kernel': flipped}}
    v = {'params': params, 'batch_stats': variables['batch_stats']}
    out = _gc('stage4')(v, images, jnp.full((4,), 2, jnp.int32))
    assert np.isfinite(np.asarray(out['cam'])).all()
    np.testing.assert_array_equal(out['cam_lowres'], 0.0)
    np.testing.assert_array_equal(out['cam'], 0.0)


def test_normalize_maps_guards_constant_maps():
    maps = jnp.stack([jnp.zeros((3, 3)), jnp.full((3, 3), 2.0), jnp.arange(9.0).reshape(3, 3)])
    out = np.asarray(G.normalize_maps(maps))
    np.testing.assert_array_equal(out[0], 0.0)
    np.testing.assert_array_equal(out[1], 0.0)
    np.testing.assert_allclose(out[2], np.arange(9.0).reshape(3, 3) / 8)


# ---- 3. batch vs single images ------------------------------------------------------------

def test_batch_equals_each_image_alone(variables, images):
    batch = _gc('stage4')(variables, images)
    for i in range(images.shape[0]):
        one = _gc('stage4')(variables, images[i:i + 1])
        for key in ('cam', 'cam_lowres', 'logits', 'probs'):
            np.testing.assert_allclose(one[key][0], batch[key][i], rtol=1e-4, atol=1e-5)
        assert int(one['targets'][0]) == int(batch['targets'][i])


# ---- 4. targets ---------------------------------------------------------------------------

def test_default_target_is_the_prediction_and_targets_matter(variables, images):
    auto = _gc('stage4')(variables, images)
    pred = jnp.argmax(auto['logits'], axis=-1).astype(jnp.int32)
    np.testing.assert_array_equal(auto['targets'], pred)
    explicit = _gc('stage4')(variables, images, pred)
    np.testing.assert_allclose(explicit['cam'], auto['cam'], atol=1e-6)
    other = _gc('stage4')(variables, images, (pred + 1) % NET.num_classes)
    assert np.abs(np.asarray(other['cam_lowres']) - np.asarray(auto['cam_lowres'])).max() > 1e-4


def test_public_gradcam_is_jittable_with_static_model(variables, images):
    fn = jax.jit(G.gradcam, static_argnums=0, static_argnames='layer')
    out = fn(NET, variables, images[:1], layer='stage4')
    ref = _gc('stage4')(variables, images[:1])
    np.testing.assert_allclose(out['cam'], ref['cam'], atol=1e-6)
    with pytest.raises(ValueError):
        G.gradcam(NET, variables, images[:1], layer='fc')


# ---- 5. an earlier stage against finite differences ---------------------------------------

def test_stage3_gradient_and_cam_match_finite_differences(variables, images):
    layer, img = 'stage3', images[1:2]
    target = 3
    out = jax.jit(functools.partial(G.activation_and_grad, NET, layer=layer))(
        variables, img, jnp.array([target], jnp.int32))
    a = np.asarray(out['activation'])                                   # (1, 6, 6, 8)
    _, h, w, c = a.shape
    assert (h, w, c) == (6, 6, 8)

    # one batch of +/- perturbations: 4 single entries, then each whole channel (for w_k)
    entries = [(0, 0, 0), (2, 3, 5), (5, 1, 7), (3, 3, 2)]
    eps = 1e-2
    deltas = []
    for y, x, k in entries:
        d = np.zeros((h, w, c), np.float32)
        d[y, x, k] = eps
        deltas.append(d)
    for k in range(c):
        d = np.zeros((h, w, c), np.float32)
        d[..., k] = eps
        deltas.append(d)
    deltas = np.stack(deltas)
    both = np.concatenate([deltas, -deltas])
    reps = jnp.repeat(img, len(both), axis=0)
    logits = np.asarray(_perturbed_logits(variables, reps, jnp.asarray(both), layer), np.float64)
    fd = (logits[:len(deltas), target] - logits[len(deltas):, target]) / (2 * eps)

    g = np.asarray(out['grad'])[0]
    analytic = np.array([g[y, x, k] for y, x, k in entries])
    assert np.abs(analytic).max() > 1e-3
    np.testing.assert_allclose(analytic, fd[:len(entries)], rtol=5e-3, atol=1e-5)

    # the channel weights w_k = mean dlogit/dA_k = d logit / d(uniform shift of channel k) / hw
    w_fd = fd[len(entries):] / (h * w)
    cam = _gc(layer)(variables, img, jnp.array([target], jnp.int32))
    expected = np.maximum(np.einsum('hwc,c->hw', a[0].astype(np.float64), w_fd), 0)
    assert expected.max() > 0
    np.testing.assert_allclose(cam['cam_lowres'][0], expected, rtol=5e-3,
                               atol=5e-3 * expected.max())
    assert cam['cam'].shape == (1, SIZE, SIZE)


# ---- 6. box scores ------------------------------------------------------------------------

def test_pointing_game():
    cams = np.zeros((4, 8, 10), np.float32)
    cams[0, 2, 3] = 1.0          # inside [3, 2, 5, 4)
    cams[1, 4, 3] = 1.0          # row 4 == y2: outside (exclusive)
    cams[2, 2, 5] = 1.0          # col 5 == x2: outside
    boxes = np.array([[3, 2, 5, 4]] * 4)
    np.testing.assert_array_equal(G.pointing_game(cams, boxes), [True, False, False, False])
    # map 3 is all zero: a miss even though the box does not matter
    assert not G.pointing_game(cams[3:], np.array([[0, 0, 10, 8]]))[0]
    # edges: box starting at the max pixel counts
    cams2 = np.zeros((1, 8, 10))
    cams2[0, 7, 9] = 5.0
    assert G.pointing_game(cams2, np.array([[9, 7, 10, 8]]))[0]
    assert G.pointing_game(cams2, np.array([[9, 7, 50, 50]]))[0]      # clipped to the map


def test_mass_inside_and_area_share():
    cam = np.zeros((2, 4, 4))
    cam[0] = np.arange(16).reshape(4, 4)
    boxes = np.array([[1, 0, 3, 2], [0, 0, 4, 4]])
    expected0 = (1 + 2 + 5 + 6) / 120                    # rows 0:2, cols 1:3
    np.testing.assert_allclose(G.mass_inside(cam, boxes), [expected0, 0.0])
    np.testing.assert_allclose(G.mass_inside(np.ones((1, 4, 4)), boxes[:1]), [4 / 16])
    np.testing.assert_allclose(G.box_area_share(boxes, 4, 4), [4 / 16, 1.0])
    # a box past the edge is clipped; an empty box has no area
    np.testing.assert_allclose(G.box_area_share(np.array([[-5, 2, 9, 9], [3, 3, 3, 9]]), 4, 8),
                               [16 / 32, 0.0])
    # uniform map: mass inside equals the area share (the chance baseline)
    b = np.array([[2, 1, 7, 5]])
    np.testing.assert_allclose(G.mass_inside(np.ones((1, 6, 9)), b), G.box_area_share(b, 6, 9))


def test_scale_box_squash():
    # a 400x200 (W x H) image squashed to 100x100: x / 4, y / 2
    np.testing.assert_allclose(G.scale_box([40, 20, 400, 200], (400, 200), (100, 100)),
                               [10, 10, 100, 100])
    many = G.scale_box(np.array([[0, 0, 200, 100], [100, 50, 300, 150]]), (400, 200), (224, 224))
    np.testing.assert_allclose(many, [[0, 0, 112, 112], [56, 56, 168, 168]])


# ---- 7. drawing ---------------------------------------------------------------------------

def test_overlay_formula_shape_and_range():
    rng = np.random.default_rng(0)
    img = rng.uniform(0, 1, (6, 7, 3)).astype(np.float32)
    cam = rng.uniform(0, 1, (6, 7)).astype(np.float32)
    cam[0, 0], cam[5, 6] = 0.0, 1.0
    out = G.overlay(img, cam, alpha=0.5)
    assert out.shape == (6, 7, 3) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() == pytest.approx(1.0)
    # jet(0) = (0, 0, 0.5), jet(1) = (0.5, 0, 0) (matplotlib's segment data); blend, / max
    blended_max = (0.5 * np.asarray(G._jet(cam)) + 0.5 * img).max()
    for (y, x), jet in (((0, 0), (0, 0, 0.5)), ((5, 6), (0.5, 0, 0))):
        ref = (0.5 * np.array(jet) + 0.5 * img[y, x]) / blended_max
        np.testing.assert_allclose(out[y, x], ref, atol=1e-6)
    with pytest.raises(ValueError):
        G.overlay(img * 3 - 1, cam)


def test_plot_gradcam_grid_writes_png(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.uniform(0, 1, (3, 16, 16, 3)).astype(np.float32)
    cams = rng.uniform(0, 1, (3, 16, 16)).astype(np.float32)
    path = str(tmp_path / 'sub' / 'gradcam.png')
    G.plot_gradcam_grid(imgs, cams, ['Audi A4', 'BMW M3 Coupe 2012', 'x' * 80],
                        ['Audi A4', 'Audi S4', 'x' * 80], [0.93, 0.4, 0.07], path, ncols=2)
    with open(path, 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    assert os.listdir(tmp_path / 'sub') == ['gradcam.png']
    assert G.shorten('x' * 80) == 'x' * 13 + '\u2026' + 'x' * 12     # both ends kept
    assert G.shorten('Chevrolet Silverado 2500HD Regular Cab 2012') == 'Chevrolet Silverado … 2012'
    assert G.shorten('Audi A4') == 'Audi A4'


def test_denormalize_inverts_normalize_for_imagenet_stats():
    x = np.random.default_rng(0).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    normed = augment.normalize(x, IMAGENET_MEAN, IMAGENET_STD)
    back = augment.denormalize(normed, IMAGENET_MEAN, IMAGENET_STD)
    np.testing.assert_allclose(back, x.astype(np.float32) / 255, atol=1e-6)
    # the seed's mean/std 0.5 display transform does not invert it (tinted pictures)
    wrong = augment.denormalize(normed, (0.5,) * 3, (0.5,) * 3)
    assert np.abs(wrong - x / 255).max() > 0.1


# ---- the layer explained by default, and the figure's titles ------------------------------

def _tiny_run(image_size, stem_pool=True):
    from fixtures import tiny_config
    from cars_jax.model import build_model
    from cars_jax.steps import create_train_state
    config = tiny_config(image_size=image_size, stage_sizes=(1, 1, 1, 1), widths=(4, 4, 4, 4),
                         stem_pool=stem_pool)
    state = create_train_state(config, jax.random.PRNGKey(0), 3, 1)
    images = np.random.default_rng(0).normal(size=(2, image_size, image_size, 3))
    return config, state, build_model(config, 3), images.astype(np.float32)


def _figure_titles(monkeypatch):
    """Captures (title, colour) of every titled axis of the figures saved."""
    from matplotlib.figure import Figure
    seen = []
    real = Figure.savefig

    def savefig(fig, *a, **kw):
        seen.extend((ax.get_title(), ax.title.get_color()) for ax in fig.axes if ax.get_title())
        return real(fig, *a, **kw)
    monkeypatch.setattr(Figure, 'savefig', savefig)
    return seen


@pytest.mark.parametrize('size,stem_pool,layer', [
    # stage sides by hand (each stride-2 layer: ceil(s / 2)): 32 px -> 16 (conv) -> 8 (pool)
    # -> stage1 8, stage2 4, stage3 2, stage4 1; without the pool stage4 is 2; at 64 px 2.
    (32, True, 'stage3'), (32, False, 'stage4'), (64, True, 'stage4'), (17, True, 'stage3'),
])
def test_default_layer_is_the_deepest_with_at_least_2x2_maps(size, stem_pool, layer, tmp_path):
    from cars_jax import evaluate as E
    config, state, model, x = _tiny_run(size, stem_pool)
    lines = []
    out = E.gradcam_figure(state, model, x, [0, 1], ['a', 'b', 'c'], config,
                           str(tmp_path / 'cam.png'), log=lines.append)
    assert out['layer'] == layer
    assert np.asarray(out['cam_lowres']).shape[1:] == (2, 2)
    assert not any('Warning' in l for l in lines), lines


def test_a_1x1_layer_named_with_layer_warns(tmp_path):
    from cars_jax import evaluate as E
    config, state, model, x = _tiny_run(32)
    lines = []
    out = E.gradcam_figure(state, model, x, [0, 1], ['a', 'b', 'c'], config,
                           str(tmp_path / 'cam.png'), layer='stage4', log=lines.append)
    assert out['layer'] == 'stage4'
    assert [l for l in lines if '--layer=stage4' in l and '1x1' in l and 'stage3' in l], lines


def test_unlabelled_images_are_titled_by_file_name_in_a_neutral_colour(tmp_path, monkeypatch):
    from cars_jax import evaluate as E
    config, state, model, x = _tiny_run(32)
    seen = _figure_titles(monkeypatch)
    out = E.gradcam_figure(state, model, x, None, ['a', 'b', 'c'], config,
                           str(tmp_path / 'cam.png'), titles=['car0.jpg', 'car1.jpg'])
    cells = [(t, c) for t, c in seen if not t.startswith('Grad-CAM')]
    names = ['abc'[int(p)] for p in out['preds']]
    assert [t.split('\n')[0] for t, _ in cells] == ['car0.jpg', 'car1.jpg']
    assert all('true' not in t for t, _ in cells)
    assert all(t.split('\n')[1].startswith('pred (') and t.endswith(n)
               for (t, _), n in zip(cells, names))
    assert {c for _, c in cells} == {'black'}
    seen.clear()
    E.gradcam_figure(state, model, x, [int(out['preds'][0]), (int(out['preds'][1]) + 1) % 3],
                     ['a', 'b', 'c'], config, str(tmp_path / 'cam.png'))
    assert [c for t, c in seen if not t.startswith('Grad-CAM')] == ['green', 'red']
