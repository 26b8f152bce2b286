"""cars_jax.model: the seed's ResNet-18 + Dropout in Flax, with PyTorch's numerics."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from cars_jax import model as M

# one block per stage keeps compiles short; at 32 px the last two stages are 2x2 and 1x1
NARROW = dict(stage_sizes=(1, 1, 1, 1), widths=(8, 16, 16, 32))
NET = M.ResNet(num_classes=5, **NARROW)


def _init(net, size=32, seed=0):
    return M.init_variables(net, jax.random.key(seed), size)


@pytest.fixture(scope='module')
def narrow_vars():
    """Variables of NET (shared: an init is a compile)."""
    return _init(NET)


@functools.partial(jax.jit, static_argnums=0, static_argnames=('train', 'mutable'))
def _apply(net, variables, x, train=False, rng=None, mutable=False):
    """Jitted `net.apply` (eager flax is slow on CPU); `rng` feeds 'dropout'."""
    rngs = None if rng is None else {'dropout': rng}
    return net.apply(variables, x, train=train, rngs=rngs, mutable=mutable)


def _normal(shape, seed):
    """Test data from numpy: every new shape of jax.random costs a compile."""
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _images(n=4, size=32, seed=1):
    return _normal((n, size, size, 3), seed)


def _kernels(params):
    """(path, kernel) of every conv kernel."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return [(jax.tree_util.keystr(p), np.asarray(v)) for p, v in flat
            if p[-1].key == 'kernel' and v.ndim == 4]


# ---- topology -----------------------------------------------------------------------------

def test_default_net_has_the_seeds_11277060_parameters():
    net = M.ResNet(num_classes=196)
    shapes = jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    assert M.count_params(shapes['params']) == 11_277_060
    stats = shapes['batch_stats']
    assert set(stats['bn1']) == {'mean', 'var'}
    assert shapes['params']['fc']['kernel'].shape == (512, 196)
    assert shapes['params']['conv1']['kernel'].shape == (7, 7, 3, 64)


def test_spatial_trace_at_224():
    net = M.ResNet(num_classes=196)
    variables = jax.eval_shape(lambda key: M.init_variables(net, key, 224), jax.random.key(0))
    assert set(variables) == {'params', 'batch_stats'}
    logits, state = jax.eval_shape(
        lambda v, x: net.apply(v, x, mutable=['intermediates']),
        variables, jnp.zeros((2, 224, 224, 3)))
    inter = {k: v[0].shape for k, v in state['intermediates'].items()}
    assert inter == {'stem': (2, 112, 112, 64), 'pool': (2, 56, 56, 64),
                     'stage1': (2, 56, 56, 64), 'stage2': (2, 28, 28, 128),
                     'stage3': (2, 14, 14, 256), 'stage4': (2, 7, 7, 512)}
    assert logits.shape == (2, 196) and logits.dtype == jnp.float32


def test_without_the_stem_pool_every_stage_keeps_twice_the_resolution():
    pooled = M.ResNet(num_classes=5, **NARROW)
    unpooled = pooled.clone(stem_pool=False)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 64, 64, 3)), jnp.float32)
    variables = M.init_variables(pooled, jax.random.key(0), 64)
    # no parameter belongs to the pool: one set of weights serves both nets
    assert (jax.tree_util.tree_structure(variables) ==
            jax.tree_util.tree_structure(M.init_variables(unpooled, jax.random.key(0), 64)))
    shapes = {}
    for name, net in (('pooled', pooled), ('unpooled', unpooled)):
        _, state = net.apply(variables, x, mutable=['intermediates'])
        shapes[name] = {k: v[0].shape[1:3] for k, v in state['intermediates'].items()}
    assert shapes['pooled']['stage4'] == (2, 2) and shapes['unpooled']['stage4'] == (4, 4)
    assert shapes['unpooled']['pool'] == shapes['unpooled']['stem'] == (32, 32)
    # stage 1 of the unpooled net sees the stem's output itself: feed the pooled net's
    # stage 1 the 2x2 max of it by hand (-inf padding: a 3x3/2 window) and compare
    _, state = unpooled.apply(variables, x, mutable=['intermediates'])
    stem = np.asarray(state['intermediates']['stem'][0])
    padded = np.pad(stem, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    by_hand = np.stack([np.stack([padded[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3].max(axis=(1, 2))
                                  for j in range(16)], 1) for i in range(16)], 1)
    _, state = pooled.apply(variables, x, mutable=['intermediates'])
    np.testing.assert_allclose(np.asarray(state['intermediates']['pool'][0]), by_hand, rtol=1e-6)


def test_projection_shortcuts_exactly_where_shape_changes():
    net = M.ResNet(num_classes=196)
    params = jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))['params']
    blocks = sorted(k for k in params if k.startswith('l'))
    assert blocks == ['l1_0', 'l1_1', 'l2_0', 'l2_1', 'l3_0', 'l3_1', 'l4_0', 'l4_1']
    assert sorted(b for b in blocks if 'down_conv' in params[b]) == ['l2_0', 'l3_0', 'l4_0']
    assert all(('down_bn' in params[b]) == ('down_conv' in params[b]) for b in blocks)
    assert params['l2_0']['down_conv']['kernel'].shape == (1, 1, 64, 128)
    assert set(params['l1_0']) == {'conv1', 'bn1', 'conv2', 'bn2'}
    # a stride of 2 alone (no change of width) needs a projection too
    narrow = M.ResNet(num_classes=3, **NARROW)
    p = jax.eval_shape(narrow.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params']
    assert [b for b in sorted(p) if 'down_conv' in p.get(b, {})] == ['l2_0', 'l3_0', 'l4_0']
    assert p['l3_0']['down_conv']['kernel'].shape == (1, 1, 16, 16)


# ---- PyTorch padding ----------------------------------------------------------------------

def _numpy_conv_ones(x, k, stride, pad):
    """Sum over k x k windows of the zero-padded single-channel image: PyTorch's output."""
    xp = np.pad(x, pad)
    out = (xp.shape[0] - k) // stride + 1
    return np.array([[xp[i * stride:i * stride + k, j * stride:j * stride + k].sum()
                      for j in range(out)] for i in range(out)])


@pytest.mark.parametrize('size,out', [(8, 4), (9, 5)])
@pytest.mark.parametrize('impl', ['xla', 'matmul'])
def test_stem_conv_pads_like_pytorch(size, out, impl):
    x = np.random.default_rng(size).uniform(0.5, 1.5, (size, size)).astype(np.float32)
    conv = M.Conv(1, 7, strides=2, padding=3, impl=impl)
    y = jax.jit(conv.apply)({'params': {'kernel': jnp.ones((7, 7, 1, 1))}}, x[None, :, :, None])
    assert y.shape == (1, out, out, 1)
    np.testing.assert_allclose(np.asarray(y)[0, :, :, 0], _numpy_conv_ones(x, 7, 2, 3),
                               rtol=1e-5)
    if size == 8:   # 'SAME' would pad (2, 3) here and differ
        same = np.pad(x, ((2, 3), (2, 3)))
        assert not np.isclose(np.asarray(y)[0, 0, 0, 0], same[:7, :7].sum())


def test_max_pool_pads_with_minus_infinity():
    x = -1.0 - np.random.default_rng(0).uniform(size=(2, 7, 6, 3)).astype(np.float32)
    y = np.asarray(M.max_pool_3x3_s2(jnp.asarray(x)))
    assert y.shape == (2, 4, 3, 3) and (y < -1.0).all()
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    want = np.array([[xp[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3].max(axis=(1, 2))
                      for j in range(3)] for i in range(4)]).transpose(2, 0, 1, 3)
    np.testing.assert_array_equal(y, want)


def _numpy_max_pool_grad(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """A hand loop: each output's gradient to the first maximum of its 3x3/2 window (row-major
    within the window, padding never chosen), summed where windows overlap."""
    n, h, w, c = x.shape
    dx = np.zeros_like(x)
    for b in range(n):
        for ch in range(c):
            for i in range(g.shape[1]):
                for j in range(g.shape[2]):
                    best, at = -np.inf, None
                    for di in range(3):
                        for dj in range(3):
                            r, q = 2 * i - 1 + di, 2 * j - 1 + dj
                            if 0 <= r < h and 0 <= q < w and x[b, r, q, ch] > best:
                                best, at = x[b, r, q, ch], (r, q)
                    dx[b, at[0], at[1], ch] += g[b, i, j, ch]
    return dx


@pytest.mark.parametrize('shape', [(2, 7, 6, 3), (1, 9, 11, 2), (2, 2, 2, 3), (1, 1, 1, 2)])
def test_max_pool_gradient_goes_to_the_first_maximum(shape):
    # Post-ReLU-like input with many ties (zeros, repeated integers): the routing of ties is
    # what differs between possible gradients; integer gradients make the sums exact.
    rng = np.random.default_rng(sum(shape))
    x = np.maximum(rng.integers(-2, 3, size=shape), 0).astype(np.float32)
    y, vjp = jax.vjp(M.max_pool_3x3_s2, jnp.asarray(x))
    g = rng.integers(-5, 6, size=y.shape).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(vjp(jnp.asarray(g))[0]), _numpy_max_pool_grad(x, g))
    # ... and XLA's own select_and_scatter gradient routes ties the same way.
    ref = jax.vjp(lambda v: nn.max_pool(v, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1))),
                  jnp.asarray(x))[1](jnp.asarray(g))[0]
    np.testing.assert_array_equal(np.asarray(vjp(jnp.asarray(g))[0]), np.asarray(ref))


def test_max_pool_forward_mode_and_second_order():
    # Forward mode (a JVP rule, not only a VJP): the tangent at each output is the tangent at
    # its window's first maximum; and a Hessian-vector product (forward over reverse) runs.
    rng = np.random.default_rng(3)
    x = np.maximum(rng.integers(-2, 3, size=(2, 7, 6, 3)), 0).astype(np.float32)
    t = rng.integers(-5, 6, size=x.shape).astype(np.float32)
    y, ty = jax.jvp(M.max_pool_3x3_s2, (jnp.asarray(x),), (jnp.asarray(t),))
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    tp = np.pad(t, ((0, 0), (1, 1), (1, 1), (0, 0)))
    want = np.zeros(y.shape, np.float32)
    for b, i, j, ch in np.ndindex(*y.shape):
        window = xp[b, 2 * i:2 * i + 3, 2 * j:2 * j + 3, ch].ravel()
        k = int(np.argmax(window))                       # numpy's argmax: the first maximum
        want[b, i, j, ch] = tp[b, 2 * i + k // 3, 2 * j + k % 3, ch]
    np.testing.assert_array_equal(np.asarray(ty), want)

    def f(v):
        return (M.max_pool_3x3_s2(v) ** 2).sum()
    hvp = jax.jvp(jax.grad(f), (jnp.asarray(x),), (jnp.asarray(t),))[1]
    # f is quadratic in the selected inputs: H t = 2 x the VJP of (the tangent at the maxima).
    np.testing.assert_array_equal(np.asarray(hvp), 2 * _numpy_max_pool_grad(x, want))


def test_max_pool_gradient_under_jit_in_bfloat16():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 4)), jnp.bfloat16)
    grad = jax.jit(jax.grad(lambda v: M.max_pool_3x3_s2(v).astype(jnp.float32).sum()))(x)
    assert grad.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(grad, np.float32),
        _numpy_max_pool_grad(np.asarray(x, np.float32), np.ones((2, 4, 4, 4), np.float32)))


# ---- BatchNorm, dropout, train / eval -----------------------------------------------------

def test_batchnorm_matches_pytorch_train_and_eval():
    rng = np.random.default_rng(0)
    x = (3.0 + 2.0 * rng.normal(size=(4, 5, 5, 6))).astype(np.float32)
    bn = M.BatchNorm(use_running_average=False)
    v = bn.init(jax.random.key(0), x)
    assert float(v['batch_stats']['mean'].sum()) == 0 and float(v['batch_stats']['var'].sum()) == 6
    y, upd = bn.apply(v, x, mutable=['batch_stats'])
    n = 4 * 5 * 5
    mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
    np.testing.assert_allclose(upd['batch_stats']['mean'], 0.9 * 0 + 0.1 * mean, rtol=1e-5)
    np.testing.assert_allclose(upd['batch_stats']['var'], 0.9 * 1 + 0.1 * var * n / (n - 1),
                               rtol=1e-5)
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5), atol=1e-4)
    # eval: running statistics, no update
    ev = M.BatchNorm(use_running_average=True)
    y2 = ev.apply({**v, 'batch_stats': upd['batch_stats']}, x)
    rm, rv = np.asarray(upd['batch_stats']['mean']), np.asarray(upd['batch_stats']['var'])
    np.testing.assert_allclose(y2, (x - rm) / np.sqrt(rv + 1e-5), rtol=1e-5, atol=1e-5)


def _numpy_bn_loss(x, scale, bias, weights):
    """sum(weights * BatchNorm(x)) with the batch's own statistics, in float64 numpy."""
    mean = x.mean((0, 1, 2))
    var = ((x - mean) ** 2).mean((0, 1, 2))
    return float(np.sum(weights * ((x - mean) / np.sqrt(var + 1e-5) * scale + bias)))


def test_batchnorm_train_gradient_matches_finite_differences():
    # d loss / d (x, scale, bias) of the training-mode BatchNorm (the batch's own statistics,
    # which move with x) against central differences of the plain formula in float64 numpy.
    rng = np.random.default_rng(1)
    x = (1.0 + 2.0 * rng.normal(size=(3, 2, 2, 4))).astype(np.float32)
    scale = rng.uniform(0.5, 1.5, size=4).astype(np.float32)
    bias = rng.normal(size=4).astype(np.float32)
    weights = rng.normal(size=x.shape).astype(np.float32)
    bn = M.BatchNorm(use_running_average=False)
    stats = bn.init(jax.random.key(0), x)['batch_stats']

    def loss(x, scale, bias):
        y, _ = bn.apply({'params': {'scale': scale, 'bias': bias}, 'batch_stats': stats}, x,
                        mutable=['batch_stats'])
        return jnp.sum(weights * y)

    grads = jax.grad(loss, (0, 1, 2))(x, scale, bias)
    args = [a.astype(np.float64) for a in (x, scale, bias)]
    for which, grad in enumerate(grads):
        numeric = np.zeros(args[which].shape)
        for idx in np.ndindex(args[which].shape):
            plus = [a.copy() for a in args]
            minus = [a.copy() for a in args]
            plus[which][idx] += 1e-5
            minus[which][idx] -= 1e-5
            numeric[idx] = (_numpy_bn_loss(*plus, weights) -
                            _numpy_bn_loss(*minus, weights)) / 2e-5
        np.testing.assert_allclose(grad, numeric, rtol=1e-3, atol=1e-3)
    # Shifting a channel changes nothing after the normalisation: the input gradient sums to
    # zero over each channel.
    np.testing.assert_allclose(np.asarray(grads[0]).sum((0, 1, 2)), 0, atol=1e-4)


def test_train_mode_updates_stem_bn_running_mean_with_momentum_0p1(narrow_vars):
    v, x = narrow_vars, _images()
    _, upd = _apply(NET, v, x, train=True, rng=jax.random.key(0), mutable=('batch_stats',))
    stem = np.asarray(M.conv_xla(x, v['params']['conv1']['kernel'], 2, 3))
    want = 0.9 * np.asarray(v['batch_stats']['bn1']['mean']) + 0.1 * stem.mean((0, 1, 2))
    np.testing.assert_allclose(upd['batch_stats']['bn1']['mean'], want, rtol=1e-4, atol=1e-6)
    changed = jax.tree_util.tree_map(lambda a, b: bool((a != b).any()),
                                     v['batch_stats'], upd['batch_stats'])
    assert all(jax.tree_util.tree_leaves(changed))


def test_eval_is_deterministic_and_dropout_only_in_train(narrow_vars):
    v, x = narrow_vars, _images()
    assert NET.dropout_rate == 0.5
    e1 = _apply(NET, v, x)
    e2 = _apply(NET, v, x, rng=jax.random.key(7))     # a dropout rng changes nothing in eval
    np.testing.assert_array_equal(e1, e2)

    def train(net, seed):
        return _apply(net, v, x, train=True, rng=jax.random.key(seed),
                      mutable=('batch_stats',))[0]
    t1, t1b, t2 = train(NET, 1), train(NET, 1), train(NET, 2)
    np.testing.assert_array_equal(t1, t1b)
    assert not np.allclose(t1, t2)
    no_drop = NET.clone(dropout_rate=0.0)
    np.testing.assert_array_equal(train(no_drop, 1), train(no_drop, 2))


# ---- initialisation -----------------------------------------------------------------------

def test_pytorch_init_bounds_and_std(narrow_vars):
    params = narrow_vars['params']
    kernels = _kernels(params) + [('fc', np.asarray(params['fc']['kernel']))]
    assert len(kernels) == 1 + 4 * 2 + 3 + 1
    pooled = []
    for path, w in kernels:
        bound = 1 / math.sqrt(int(np.prod(w.shape[:-1])))     # 1/sqrt(fan_in)
        assert np.abs(w).max() <= bound, path
        assert abs(w.std() / (bound / math.sqrt(3)) - 1) < 0.15, path
        pooled.append(w.ravel() / bound)
    pooled = np.concatenate(pooled)                           # ~U(-1, 1), 28k numbers
    assert abs(pooled.std() * math.sqrt(3) - 1) < 0.02 and abs(pooled.mean()) < 0.02
    b = np.asarray(params['fc']['bias'])
    assert np.abs(b).max() <= 1 / math.sqrt(32) and b.std() > 0.3 / math.sqrt(32)
    bn = params['l1_0']['bn2']
    assert (np.asarray(bn['scale']) == 1).all() and (np.asarray(bn['bias']) == 0).all()


def test_he_normal_init_and_zero_init_last_bn():
    net = NET.clone(init_scheme='he_normal', zero_init_last_bn=True)
    params = _init(net)['params']
    pooled = []
    for path, w in _kernels(params):
        std = math.sqrt(2 / (w.shape[0] * w.shape[1] * w.shape[3]))   # sqrt(2 / fan_out)
        assert abs(w.std() / std - 1) < 0.15, path
        pooled.append(w.ravel() / std)
    pooled = np.concatenate(pooled)                           # ~N(0, 1), 27k numbers
    assert abs(pooled.std() - 1) < 0.02 and abs(pooled.mean()) < 0.02
    assert np.abs(pooled).max() > 3.5                         # not truncated
    assert (np.asarray(params['fc']['bias']) == 0).all()
    for b in ('l1_0', 'l2_0', 'l3_0', 'l4_0'):
        assert (np.asarray(params[b]['bn2']['scale']) == 0).all()
        assert (np.asarray(params[b]['bn1']['scale']) == 1).all()
        assert (np.asarray(params[b].get('down_bn', params[b]['bn1'])['scale']) == 1).all()
    assert (np.asarray(params['bn1']['scale']) == 1).all()


# ---- conv implementations -----------------------------------------------------------------

@pytest.mark.parametrize('k,stride,pad,size', [
    (1, 1, 0, 5), (1, 2, 0, 5), (3, 1, 1, 4), (3, 2, 1, 7), (3, 1, 1, 2), (7, 2, 3, 8)])
def test_conv_matmul_equals_xla_values_and_grads(k, stride, pad, size):
    x = _normal((3, size, size, 5), seed=1)
    w = _normal((k, k, 5, 6), seed=2) / k
    out = M.conv_output_size(size, k, stride, pad)
    probe = _normal((3, out, out, 6), seed=3)

    def value_and_grads(impl):
        conv = M.Conv(6, k, stride, pad, impl=impl)

        def f(x, w):
            y = conv.apply({'params': {'kernel': w}}, x)
            return jnp.sum(y * probe), y
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(x, w)

    (_, yx), gx = value_and_grads('xla')
    (_, ym), gm = value_and_grads('matmul')
    assert yx.shape == ym.shape == (3, out, out, 6)
    np.testing.assert_allclose(ym, yx, rtol=1e-5, atol=1e-5)
    for a, b in zip(gm, gx):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_auto_conv_impl_choice():
    on_cpu = jax.default_backend() == 'cpu'
    assert M.resolve_conv_impl('auto', 4, 4) == ('matmul' if on_cpu else 'xla')
    assert M.resolve_conv_impl('auto', 2, 2) == ('matmul' if on_cpu else 'xla')
    assert M.resolve_conv_impl('auto', 5, 4) == 'xla'
    # larger maps keep lax.conv (XLA's own convolution; see cars_jax.runtime)
    assert M.resolve_conv_impl('auto', 112, 112) == 'xla'
    assert M.resolve_conv_impl('auto', 16, 16) == 'xla'
    assert M.resolve_conv_impl('xla', 1, 1) == 'xla'
    assert M.resolve_conv_impl('matmul', 56, 56) == 'matmul'
    with pytest.raises(ValueError):
        M.resolve_conv_impl('cudnn', 1, 1)


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='the auto rule differs off CPU')
def test_auto_convs_on_cpu_are_lax_conv_above_4x4_in_train_and_eval():
    # at 64 px: stem 32x32 | stage 1 16x16 (2 convs) | stage 2 8x8 (3) | stages 3-4 <= 4x4
    variables = M.init_variables(NET, jax.random.key(0), 64)
    x = jnp.zeros((2, 64, 64, 3))

    def conv_ops(train):
        fn = lambda v, x: NET.apply(v, x, train=train, mutable=['batch_stats'],
                                    rngs={'dropout': jax.random.key(0)})
        return str(jax.make_jaxpr(fn)(variables, x)).count('conv_general_dilated')

    on_cpu = jax.default_backend() == 'cpu'
    assert on_cpu and conv_ops(train=False) == conv_ops(train=True) == 6


def test_whole_net_same_logits_for_auto_and_xla_convs(narrow_vars):
    x = _images()
    assert NET.conv_impl == 'auto'    # on CPU: matmul in stages 3-4 (2x2, 1x1), xla elsewhere
    np.testing.assert_allclose(_apply(NET, narrow_vars, x),
                               _apply(NET.clone(conv_impl='xla'), narrow_vars, x),
                               rtol=1e-4, atol=1e-5)


# ---- Grad-CAM hooks -----------------------------------------------------------------------

def test_perturb_gradients_wrt_stage_activations(narrow_vars):
    v, x = narrow_vars, _images()
    _, state = _apply(NET, v, x, mutable=('intermediates',))
    inter = {k: a[0] for k, a in state['intermediates'].items()}
    assert inter['stage4'].shape == (4, 1, 1, 32)
    cls = 3

    @jax.jit
    def logit(pert):
        return NET.apply({**v, 'perturbations': pert}, x)[:, cls].sum()

    grad_logit = jax.jit(jax.grad(logit))
    zeros = {k: jnp.zeros_like(inter[k]) for k in ('stage3', 'stage4')}
    g = grad_logit(zeros)
    # logits = mean_hw(stage4) @ W + b  =>  d logit_c / d stage4 = W[:, c] / (h w)
    h, w = inter['stage4'].shape[1:3]
    want = np.asarray(v['params']['fc']['kernel'])[:, cls] / (h * w)
    np.testing.assert_allclose(g['stage4'], np.broadcast_to(want, (4, h, w, 32)), rtol=1e-6)
    # stage3: the gradient of a hand-built rest of the net (block l4_0, pool, fc) ...
    block = M.BasicBlock(32, strides=2, norm=functools.partial(M.BatchNorm,
                                                               use_running_average=True))

    def rest(a3):
        a4 = block.apply({'params': v['params']['l4_0'],
                          'batch_stats': v['batch_stats']['l4_0']}, a3)
        return (a4.mean((1, 2)) @ v['params']['fc']['kernel'] + v['params']['fc']['bias'])[
            :, cls].sum()
    np.testing.assert_allclose(g['stage3'], jax.jit(jax.grad(rest))(inter['stage3']),
                               rtol=1e-5, atol=1e-7)
    # ... and a central finite difference along a random direction
    d = _normal(zeros['stage3'].shape, seed=5)
    eps = 1e-4
    fd = (logit({**zeros, 'stage3': eps * d}) - logit({**zeros, 'stage3': -eps * d})) / (2 * eps)
    np.testing.assert_allclose(float(jnp.vdot(g['stage3'], d)), float(fd), rtol=1e-2)
    # zero perturbations change nothing, and none need be given (perturb is then a no-op)
    np.testing.assert_allclose(logit(zeros), _apply(NET, v, x)[:, cls].sum(), rtol=1e-6)
    # a partial collection (stage4 only) is fine too
    np.testing.assert_allclose(grad_logit({'stage4': zeros['stage4']})['stage4'],
                               g['stage4'], rtol=1e-6)


# ---- dtype, config ------------------------------------------------------------------------

def test_bfloat16_compute_keeps_float32_params_stats_and_logits(narrow_vars):
    v, x = narrow_vars, _images()
    net16 = NET.clone(dtype=jnp.bfloat16)
    params16 = jax.eval_shape(lambda k: M.init_variables(net16, k, 32), jax.random.key(0))
    assert {a.dtype for a in jax.tree_util.tree_leaves(params16)} == {jnp.dtype(jnp.float32)}
    logits, upd = _apply(net16, v, x, train=True, rng=jax.random.key(0),
                         mutable=('batch_stats', 'intermediates'))
    assert logits.dtype == jnp.float32 and bool(jnp.isfinite(logits).all())
    assert upd['intermediates']['stage2'][0].dtype == jnp.bfloat16
    assert {a.dtype for a in jax.tree_util.tree_leaves(upd['batch_stats'])} == {
        jnp.dtype(jnp.float32)}
    ref = _apply(NET, v, x, train=True, rng=jax.random.key(0), mutable=('batch_stats',))[0]
    np.testing.assert_allclose(logits, ref, atol=0.05 * float(jnp.abs(ref).max()))


def test_build_model_from_config():
    from configs import base
    assert M.build_model(base.get_config(), 196) == M.ResNet(num_classes=196)
    c = base.get_config()
    c.dtype, c.init, c.widths, c.dropout = 'bfloat16', 'he_normal', (8, 16, 32, 64), 0.2
    c.zero_init_last_bn, c.stem_pool = True, False
    net = M.build_model(c, 7)
    assert (net.num_classes, net.dtype, net.init_scheme, net.widths, net.zero_init_last_bn,
            net.dropout_rate, net.stem_pool) == (7, jnp.bfloat16, 'he_normal', (8, 16, 32, 64),
                                                 True, 0.2, False)
    for field, bad in (('dtype', 'float16'), ('init', 'xavier'), ('conv_impl', 'cudnn')):
        bad_cfg = base.get_config()
        bad_cfg[field] = bad
        with pytest.raises(ValueError, match=field):
            M.build_model(bad_cfg, 3)


def test_blur_is_the_binomial_filter_with_zero_padding():
    """Against a hand loop of the 3x3 kernel [1,2,1]^T [1,2,1] / 16 over a zero-padded input
    (FFCV's BlurPoolConv2d filter: F.conv2d(..., padding=1, groups=C))."""
    from cars_jax.model import blur_3x3
    x = np.random.default_rng(0).normal(size=(2, 5, 7, 3)).astype(np.float32)
    k = np.outer([1, 2, 1], [1, 2, 1]) / 16
    p = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    want = np.zeros_like(x)
    for i in range(5):
        for j in range(7):
            want[:, i, j] = np.einsum('nabc,ab->nc', p[:, i:i + 3, j:j + 3], k)
    np.testing.assert_allclose(np.asarray(blur_3x3(jnp.asarray(x))), want, rtol=1e-5, atol=1e-6)
    flat = np.ones((1, 4, 4, 1), np.float32)                       # interior of a constant: kept
    np.testing.assert_allclose(np.asarray(blur_3x3(jnp.asarray(flat)))[0, 1:3, 1:3, 0], 1.0)


def test_blur_pool_changes_only_the_strided_blocks_and_adds_no_parameters():
    """Same parameters as the seed's net; the output differs, and a block of stride 1 sees the
    same input either way (stage 1's intermediate is unchanged)."""
    from cars_jax.model import ResNet
    plain = ResNet(10, stage_sizes=(1, 1), widths=(4, 8))
    blurred = ResNet(10, stage_sizes=(1, 1), widths=(4, 8), blur_pool=True)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 32, 32, 3)), jnp.float32)
    v = plain.init(jax.random.PRNGKey(0), x)
    assert jax.tree.structure(v) == jax.tree.structure(blurred.init(jax.random.PRNGKey(0), x))
    out_a, st_a = plain.apply(v, x, mutable=['intermediates'])
    out_b, st_b = blurred.apply(v, x, mutable=['intermediates'])
    np.testing.assert_array_equal(np.asarray(st_a['intermediates']['stage1'][0]),
                                  np.asarray(st_b['intermediates']['stage1'][0]))
    assert not np.allclose(np.asarray(out_a), np.asarray(out_b))


def test_space_to_depth_moves_each_pixel_block_into_channels():
    """Against a hand loop: out[n, i, j, (a b + c') C + ch] = x[n, i b + a, j b + c', ch]
    (tf.nn.space_to_depth's order)."""
    x = np.random.default_rng(2).normal(size=(2, 8, 12, 3)).astype(np.float32)
    for b in (2, 4):
        want = np.zeros((2, 8 // b, 12 // b, b * b * 3), np.float32)
        for i in range(8 // b):
            for j in range(12 // b):
                for a in range(b):
                    for c in range(b):
                        want[:, i, j, (a * b + c) * 3:(a * b + c + 1) * 3] = x[:, i * b + a,
                                                                               j * b + c]
        np.testing.assert_array_equal(np.asarray(M.space_to_depth(jnp.asarray(x), b)), want)
    with pytest.raises(ValueError, match='divisible by 4'):
        M.space_to_depth(jnp.asarray(x[:, :6]), 4)


@pytest.mark.parametrize('stem_pool,block', [(True, 4), (False, 2)])
def test_the_space_to_depth_stem_is_a_3x3_conv_over_pixel_blocks(stem_pool, block):
    """Its stages see the maps the seed's stem gives (stage_map_sizes), and its 'stem' output
    is ReLU(BN(conv3x3(space_to_depth(x)))) recomputed here with lax.conv from its own kernel
    (BN at init in eval mode: the identity up to eps)."""
    net = M.ResNet(num_classes=5, stem='space_to_depth', stem_pool=stem_pool, **NARROW)
    seed_net = M.ResNet(num_classes=5, stem_pool=stem_pool, **NARROW)
    x = _images(2, 64)
    v = M.init_variables(net, jax.random.key(0), 64)
    assert v['params']['conv1']['kernel'].shape == (3, 3, 3 * block * block, 8)
    _, state = net.apply(v, x, mutable=['intermediates'])
    sides = [state['intermediates'][f'stage{i}'][0].shape[1] for i in range(1, 5)]
    assert sides == M.stage_map_sizes(64, 4, stem_pool, 'space_to_depth')
    _, seed_state = seed_net.apply(M.init_variables(seed_net, jax.random.key(0), 64), x,
                                   mutable=['intermediates'])
    assert sides == [seed_state['intermediates'][f'stage{i}'][0].shape[1] for i in range(1, 5)]
    blocks = np.asarray(x).reshape(2, 64 // block, block, 64 // block, block, 3)
    blocks = blocks.transpose(0, 1, 3, 2, 4, 5).reshape(2, 64 // block, 64 // block, -1)
    conv = jax.lax.conv_general_dilated(jnp.asarray(blocks), v['params']['conv1']['kernel'],
                                        (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    want = np.maximum(np.asarray(conv) / np.sqrt(1 + 1e-5), 0)
    np.testing.assert_allclose(np.asarray(state['intermediates']['stem'][0]), want,
                               rtol=1e-4, atol=1e-5)
    assert M.min_image_size(4, stem_pool, 'space_to_depth') % block == 0
