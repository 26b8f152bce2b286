"""The seed's network (its `VehicleResNet` = ResNet-18 topology + Dropout(0.5)) in Flax linen.

Layer for layer the PyTorch model of the seed notebook (its §3), in NHWC:

    stem   conv1 7x7/2 pad 3 (no bias) -> bn1 -> ReLU -> max-pool 3x3/2 pad 1 (-inf padding)
    stages l1..l4: `stage_sizes` BasicBlocks at `widths`; stride 2 on the first block of
           stages 2..n; BasicBlock = conv3x3(stride)-BN-ReLU-conv3x3-BN, + shortcut, ReLU;
           projection shortcut (1x1 conv stride s, no bias, + BN) only where the stride or the
           channel count changes (3 places for the defaults)
    head   global average pool -> Dropout(rate) -> fc (Dense with bias)

All paddings are explicit PyTorch ones: 'SAME' would pad (2, 3) instead of (3, 3) for an
even-sized input to a stride-2 7x7 conv and give different numbers.

Parameter names, and how they map onto the seed's `state_dict` keys (block `l{i}_{j}` is
PyTorch's `l{i}.{j}`; `down_conv` / `down_bn` are `down.0` / `down.1`):

    flax (params / batch_stats)                       PyTorch state_dict
    conv1/kernel            (7,7,3,64)    HWIO   <-  conv1.weight        (64,3,7,7) OIHW
    bn1/scale, bn1/bias                          <-  bn1.weight, bn1.bias
    bn1/mean, bn1/var       (batch_stats)        <-  bn1.running_mean, bn1.running_var
    l{i}_{j}/conv1/kernel, l{i}_{j}/bn1/...      <-  l{i}.{j}.conv1.weight, l{i}.{j}.bn1.*
    l{i}_{j}/conv2/kernel, l{i}_{j}/bn2/...      <-  l{i}.{j}.conv2.weight, l{i}.{j}.bn2.*
    l{i}_0/down_conv/kernel (1,1,Ci,Co)          <-  l{i}.0.down.0.weight (Co,Ci,1,1)
    l{i}_0/down_bn/...                           <-  l{i}.0.down.1.*
    fc/kernel               (512,196)            <-  fc.weight (196,512), transposed
    fc/bias                                      <-  fc.bias

Conv weights go OIHW -> HWIO with `w.transpose(2, 3, 1, 0)`; `num_batches_tracked` has no
counterpart (momentum is fixed). Blocks are numbered from 1 (l1..l4) like the seed.

BatchNorm follows PyTorch exactly: momentum 0.1 in the PyTorch sense (new = 0.9 old + 0.1
batch), eps 1e-5, the batch's biased variance to normalise but the unbiased one (n/(n-1)) in
the running variance, statistics in float32 whatever the computation dtype.

Grad-CAM: the output of each stage passes through `self.perturb('stage{i}', ...)` and is
sown into 'intermediates' under the same name, so `model.l4` of the seed is 'stage4'. To get
d(logit)/d(activation), pass zeros of the activation's shape as
`variables['perturbations'] = {'stage4': zeros}` and take `jax.grad` with respect to them;
without a 'perturbations' collection `perturb` is a no-op. 'stem' (after the stem's ReLU) and
'pool' (after the max-pool) are sown too.

Small inputs: `stem_pool=False` (not the seed) drops the stem's max-pool, so every stage works
at twice the resolution (4x the FLOPs of the same widths): at 64 px the last stage sees 4x4
maps instead of 2x2, the low-resolution stem of CIFAR/Tiny-ImageNet ResNets. It adds no
parameter, so the weights still map onto the seed's `state_dict`, but the seed's PyTorch model
would pool them: a different function. 'pool' is then the stem's output unchanged.

Space-to-depth stem (`stem='space_to_depth'`, not the seed; TResNet, Ridnik et al. 2021): the
input's b x b pixel blocks become channels (b = 4 with stem_pool, the seed's total stem stride;
2 without), then conv1 3x3/1 pad 1 -> bn1 -> ReLU. Each stage sees the maps of the seed's stem
at the same cost, but no pixel is skipped by a strided 7x7 window or dropped by the max-pool:
small inputs keep all their detail. conv1 is then (3, 3, 3 b^2, widths[0]): no seed
counterpart. The input side must be a multiple of b.

CPU speed: XLA:CPU's convolution is ~100x slower than the equivalent matmul on 2x2 maps
(BENCHMARKS.md, `python benchmarks/bench.py convs`), which the last stages reach at 32-64 px
input. `Conv(impl='auto')` on CPU uses the im2col + one matmul form on <=4x4 maps; GPU/TPU keep
`lax.conv`. Both forms share the same `kernel` parameter and agree to float rounding.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn


Initializer = Callable[..., jax.Array]

CONV_IMPLS = ('xla', 'matmul', 'auto')
INITS = ('pytorch', 'he_normal')
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def compute_dtype(name: str, backend: str) -> Any:
    """The computation dtype a config's `dtype` means on `backend` (jax.default_backend()).

    'auto' is bfloat16 on accelerators (their matrix units run bf16 at 2-16x the fp32 rate,
    and params, BN statistics and the loss stay float32) and float32 on CPU, where bf16 has
    no fast path and would only add rounding.
    """
    if name == 'auto':
        name = 'float32' if backend == 'cpu' else 'bfloat16'
    if name not in DTYPES:
        raise ValueError(f'dtype must be auto or one of {tuple(DTYPES)}, got {name!r}')
    return DTYPES[name]


AUTO_MATMUL_MAX_HW = 4          # 'auto' on CPU: the matmul form for outputs of at most 4x4


# ---- initialisers -------------------------------------------------------------------------

# PyTorch's default for Conv2d / Linear weights: kaiming_uniform_(a=sqrt(5)),
# i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)); variance 1/(3 fan_in).
pytorch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')
# torchvision ResNet's conv init: kaiming_normal_(mode='fan_out', nonlinearity='relu').
he_normal_fan_out = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def pytorch_bias_init(fan_in: int) -> Initializer:
    """PyTorch Linear's default bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


# ---- layers -------------------------------------------------------------------------------

def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """PyTorch's floor((size + 2 pad - kernel) / stride) + 1."""
    return (size + 2 * padding - kernel) // stride + 1


STEMS = ('conv7', 'space_to_depth')


def stem_block(stem: str, stem_pool: bool) -> int:
    """The space-to-depth stem's block side (the stem's total stride); 1 for the seed's stem."""
    return (4 if stem_pool else 2) if stem == 'space_to_depth' else 1


def stem_output_size(image_size: int, stem_pool: bool = True, stem: str = 'conv7') -> int:
    """Side of the stem's output ('pool'): the seed's conv 7x7/2 pad 3 and max-pool 3x3/2 pad 1
    (stem_pool) by PyTorch's size formula, or the space-to-depth stem's size / block."""
    if stem == 'space_to_depth':
        return image_size // stem_block(stem, stem_pool)
    s = conv_output_size(image_size, 7, 2, 3)
    return conv_output_size(s, 3, 2, 1) if stem_pool else s


def stage_map_sizes(image_size: int, num_stages: int, stem_pool: bool = True,
                    stem: str = 'conv7') -> list[int]:
    """Side of each stage's output map ('stage1'..'stageN') for a square input: the stem
    (`stem_output_size`), then the stride-2 first block (3x3/2 pad 1; its 1x1/2 shortcut gives
    the same size) of stages 2..N."""
    s = stem_output_size(image_size, stem_pool, stem)
    sizes = []
    for i in range(num_stages):
        if i > 0:
            s = conv_output_size(s, 3, 2, 1)
        sizes.append(s)
    return sizes


def min_image_size(num_stages: int, stem_pool: bool = True, stem: str = 'conv7') -> int:
    """The smallest square input whose last stage still sees a map of at least 2x2 (a
    multiple of the space-to-depth stem's block).

    Below it the last stage's input is one pixel framed by zero padding: the stage has no
    spatial extent left (the size formula never reaches 0, so such a net trains, on
    nothing but that pixel)."""
    def last_input(size: int) -> int:
        before = stage_map_sizes(size, num_stages - 1, stem_pool, stem) if num_stages > 1 else []
        return before[-1] if before else stem_output_size(size, stem_pool, stem)
    block = stem_block(stem, stem_pool)
    size = block
    while last_input(size) < 2:
        size += block
    return size


def resolve_conv_impl(impl: str, out_h: int, out_w: int) -> str:
    """'xla' or 'matmul' for a conv with a static output size (trace-time decision).

    'auto' on GPU/TPU is `lax.conv`. On CPU it is the matmul form on maps of at most
    AUTO_MATMUL_MAX_HW, where XLA:CPU's conv is ~100x slower (a 2x2 map with padding 1 takes
    it 0.3 s at batch 32), and `lax.conv` elsewhere. (An earlier rule also took the matmul
    form for >=32x32 maps in the train pass, measured faster on an AMD EPYC under jaxlib's
    default flags; with XLA's own convolutions (cars_jax.runtime) it cost 1.35x at 128 px on
    an Intel Xeon. AMD is not re-measured.) BENCHMARKS.md has the numbers.
    """
    if impl not in CONV_IMPLS:
        raise ValueError(f'conv_impl must be one of {CONV_IMPLS}, got {impl!r}')
    if impl != 'auto':
        return impl
    if jax.default_backend() != 'cpu':
        return 'xla'
    small = out_h <= AUTO_MATMUL_MAX_HW and out_w <= AUTO_MATMUL_MAX_HW
    return 'matmul' if small else 'xla'


def conv_matmul(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """im2col convolution: pad, kh*kw strided shifted slices on the channel axis, one matmul.

    x: (N, H, W, Cin), kernel: (kh, kw, Cin, Cout) HWIO. Same result as `lax.conv` with
    padding ((p, p), (p, p)); the patch order (i, j, cin) is the row-major order of the HWIO
    kernel, so the kernel is just reshaped to (kh*kw*Cin, Cout).
    """
    kh, kw, cin, cout = kernel.shape
    n, h, w, _ = x.shape
    oh = conv_output_size(h, kh, stride, padding)
    ow = conv_output_size(w, kw, stride, padding)
    if padding:
        x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    patches = [x[:, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride, :]
               for i in range(kh) for j in range(kw)]
    cols = patches[0] if len(patches) == 1 else jnp.concatenate(patches, axis=-1)
    return jnp.dot(cols, kernel.reshape(kh * kw * cin, cout))


def conv_xla(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


class Conv(nn.Module):
    """Square conv without bias, PyTorch padding, kernel `kernel` (kh, kw, Cin, Cout)."""
    features: int
    kernel_size: int
    strides: int = 1
    padding: int = 0
    impl: str = 'auto'
    kernel_init: Initializer = pytorch_kernel_init
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = self.param('kernel', self.kernel_init, (k, k, x.shape[-1], self.features),
                            self.param_dtype)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        oh = conv_output_size(x.shape[1], k, self.strides, self.padding)
        ow = conv_output_size(x.shape[2], k, self.strides, self.padding)
        fn = conv_matmul if resolve_conv_impl(self.impl, oh, ow) == 'matmul' else conv_xla
        return fn(x, kernel, self.strides, self.padding)


class BatchNorm(nn.Module):
    """PyTorch's BatchNorm2d over the last axis (params scale/bias, batch_stats mean/var).

    `momentum` is PyTorch's (running = (1 - m) running + m batch); the running variance takes
    the unbiased batch variance, normalisation the biased one, as torch does. Statistics and
    the normalisation run in float32; the output is cast to `dtype`.
    """
    use_running_average: bool
    momentum: float = 0.1
    epsilon: float = 1e-5
    scale_init: Initializer = nn.initializers.ones
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((c,), jnp.float32))
        scale = self.param('scale', self.scale_init, (c,), self.param_dtype)
        bias = self.param('bias', nn.initializers.zeros, (c,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        if self.use_running_average:
            mean, var = ra_mean.value, ra_var.value
        else:
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(x32, axes)
            var = jnp.mean(jnp.square(x32 - mean), axes)
            if not self.is_initializing():
                n = x.size // c
                m = self.momentum
                ra_mean.value = (1 - m) * ra_mean.value + m * mean
                ra_var.value = (1 - m) * ra_var.value + m * var * (n / max(n - 1, 1))
        mul = scale.astype(jnp.float32) * jax.lax.rsqrt(var + self.epsilon)
        y = (x32 - mean) * mul + bias.astype(jnp.float32)
        return y.astype(self.dtype)


def _window_views(x: jax.Array, fill: float) -> list[jax.Array]:
    """The nine offsets of the 3x3/2 windows over the `fill`-padded input, row-major: view k
    holds, at each output position, the input element at offset k of that position's window."""
    n, h, w, c = x.shape
    ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=fill)
    return [jax.lax.slice(xp, (0, di, dj, 0), (n, di + 2 * ho - 1, dj + 2 * wo - 1, c),
                          (1, 2, 2, 1))
            for di in range(3) for dj in range(3)]


@jax.custom_jvp
def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """PyTorch MaxPool2d(3, 2, 1) over NHWC: padding with -inf, so padding never wins the max;
    differentiated through strided compares and selects that XLA fuses.

    Why: JAX's own derivative of a max-pool is `select_and_scatter`, which XLA:CPU expands into
    a reduce-window over four input-sized int32 index arrays and a scatter: ~35 ms forward +
    backward at 32x32x64 maps, batch 32, on two cores, against ~6 ms for this one and ~10 ms for
    PyTorch's (BENCHMARKS.md, `bench.py profile`). The derivative is the same: each output
    follows the first maximum of its window in row-major order, the way `select_and_scatter`
    and PyTorch's CPU kernel route ties. A JVP rule, so forward mode works too; JAX transposes
    it into the backward pass (strided pads).
    """
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


@max_pool_3x3_s2.defjvp
def _max_pool_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    with jax.named_scope('max_pool_grad'):    # a name profiles (bench.py profile) can find
        # The compares take the maximum of the very views they compare: the pool's own
        # output (reduce_window), as XLA compiled the two-device data-parallel step, did not
        # always equal an element of its window as the views read it, and a window with no
        # match drops its gradient (tests/test_parallel.py caught it).
        views = _window_views(x, -jnp.inf)
        top = functools.reduce(jnp.maximum, views)
        taken = jnp.zeros(top.shape, bool)
        out = jnp.zeros(top.shape, t.dtype)
        for view, tangent in zip(views, _window_views(t, 0.0)):
            hit = (view == top) & ~taken         # the first maximum of each window wins
            taken = taken | hit
            out = out + jnp.where(hit, tangent, jnp.zeros((), t.dtype))
    # The primal output through this function, so that a second derivative uses this rule
    # too (jnp.maximum's own rule splits ties).
    return max_pool_3x3_s2(x), out


def space_to_depth(x: jax.Array, block: int) -> jax.Array:
    """(N, H, W, C) -> (N, H/b, W/b, b*b*C): each b x b pixel block becomes one position's
    channels, ordered (row in block, column in block, channel) as tf.nn.space_to_depth."""
    n, h, w, c = x.shape
    if h % block or w % block:
        raise ValueError(f'the space-to-depth stem needs an input side divisible by {block}, '
                         f'got {h}x{w}')
    x = x.reshape(n, h // block, block, w // block, block, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, h // block, w // block, block * block * c)


def blur_3x3(x: jax.Array) -> jax.Array:
    """The binomial [1, 2, 1] x [1, 2, 1] / 16 low-pass filter per channel, stride 1, zero
    padding 1 (FFCV's BlurPoolConv2d, before a strided conv): anti-aliasing (Zhang, "Making
    Convolutional Networks Shift-Invariant Again", ICML 2019). Written as shifted adds (it is
    separable) rather than a depthwise convolution, which XLA:CPU runs slowly."""
    p = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    h, w = x.shape[1], x.shape[2]
    rows = (p[:, 0:h] + 2 * p[:, 1:h + 1] + p[:, 2:h + 2]) / 4
    return (rows[:, :, 0:w] + 2 * rows[:, :, 1:w + 1] + rows[:, :, 2:w + 2]) / 4


class BasicBlock(nn.Module):
    """torchvision's BasicBlock (post-activation) = the seed's ResidualBlock. `blur_pool`
    (not the seed): a strided block blurs its input before its strided convolutions."""
    features: int
    strides: int = 1
    conv: Callable[..., nn.Module] = Conv
    norm: Callable[..., nn.Module] = BatchNorm
    zero_init_last_bn: bool = False
    blur_pool: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.blur_pool and self.strides != 1:
            x = blur_3x3(x)
        residual = x
        y = self.conv(self.features, 3, self.strides, 1, name='conv1')(x)
        y = nn.relu(self.norm(name='bn1')(y))
        y = self.conv(self.features, 3, 1, 1, name='conv2')(y)
        last_scale = nn.initializers.zeros if self.zero_init_last_bn else nn.initializers.ones
        y = self.norm(scale_init=last_scale, name='bn2')(y)
        if self.strides != 1 or x.shape[-1] != self.features:
            residual = self.conv(self.features, 1, self.strides, 0, name='down_conv')(x)
            residual = self.norm(name='down_bn')(residual)
        return nn.relu(y + residual)


class ResNet(nn.Module):
    """The seed's VehicleResNet; see the module docstring for layout and parameter names.

    init_scheme: 'pytorch' (the seed: PyTorch's defaults, conv and fc weights and the fc bias
    U(-1/sqrt(fan_in), 1/sqrt(fan_in))) or 'he_normal' (torchvision's ResNet init: convs
    kaiming-normal fan_out, fc weight left at PyTorch's default, fc bias 0). BN scale 1 and
    bias 0 in both, or scale 0 for each block's bn2 with `zero_init_last_bn`.
    `dtype` is the computation dtype; params and BN statistics stay float32 and the logits
    (N, num_classes) are float32. Dropout draws from the 'dropout' rng when `train`.
    """
    num_classes: int
    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    widths: Sequence[int] = (64, 128, 256, 512)
    dropout_rate: float = 0.5
    init_scheme: str = 'pytorch'  # not `init`: that would shadow nn.Module.init
    zero_init_last_bn: bool = False
    stem_pool: bool = True        # the seed's 3x3/2 max-pool after the stem
    stem: str = 'conv7'           # the seed's 7x7/2 conv | space_to_depth (see module doc)
    blur_pool: bool = False       # anti-aliased strided blocks (FFCV's BlurPool); no params
    bn_momentum: float = 0.1      # PyTorch convention
    bn_eps: float = 1e-5
    conv_impl: str = 'auto'
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False,
                 features_only: bool = False) -> jax.Array:
        """Logits (N, num_classes); `features_only`: the pooled features (N, widths[-1])
        before dropout and the classifier (self-supervised pretraining; no `fc` params)."""
        if self.init_scheme not in INITS:
            raise ValueError(f'init_scheme must be one of {INITS}, got {self.init_scheme!r}')
        if len(self.stage_sizes) != len(self.widths):
            raise ValueError(f'stage_sizes {tuple(self.stage_sizes)} and widths '
                             f'{tuple(self.widths)} differ in length')
        pytorch_init = self.init_scheme == 'pytorch'
        kernel_init = pytorch_kernel_init if pytorch_init else he_normal_fan_out
        conv = functools.partial(Conv, impl=self.conv_impl, kernel_init=kernel_init,
                                 dtype=self.dtype)
        norm = functools.partial(BatchNorm, use_running_average=not train,
                                 momentum=self.bn_momentum, epsilon=self.bn_eps,
                                 dtype=self.dtype)

        if self.stem not in STEMS:
            raise ValueError(f'stem must be one of {STEMS}, got {self.stem!r}')

        x = x.astype(self.dtype)
        s2d = self.stem == 'space_to_depth'
        if s2d:
            x = space_to_depth(x, stem_block(self.stem, self.stem_pool))
            x = conv(self.widths[0], 3, 1, 1, name='conv1')(x)
        else:
            x = conv(self.widths[0], 7, 2, 3, name='conv1')(x)
        x = nn.relu(norm(name='bn1')(x))
        self.sow('intermediates', 'stem', x)
        if self.stem_pool and not s2d:
            x = max_pool_3x3_s2(x)
        self.sow('intermediates', 'pool', x)

        for i, (blocks, width) in enumerate(zip(self.stage_sizes, self.widths), start=1):
            for j in range(blocks):
                strides = 2 if i > 1 and j == 0 else 1
                x = BasicBlock(width, strides, conv=conv, norm=norm,
                               zero_init_last_bn=self.zero_init_last_bn,
                               blur_pool=self.blur_pool, name=f'l{i}_{j}')(x)
            name = f'stage{i}'
            if self.is_mutable_collection('perturbations') or self.has_variable(
                    'perturbations', name):   # so a partial collection, e.g. stage4 only, works
                x = self.perturb(name, x)
            self.sow('intermediates', name, x)

        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        if features_only:
            return x
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        bias_init = pytorch_bias_init(x.shape[-1]) if pytorch_init else nn.initializers.zeros
        x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                     kernel_init=pytorch_kernel_init, bias_init=bias_init, name='fc')(x)
        return x.astype(jnp.float32)


class ContrastiveNet(nn.Module):
    """SimCLR's network: the ResNet's pooled features, then a projection head (Linear, ReLU,
    Linear) whose output the contrastive loss compares. The head is thrown away after
    pretraining; `params['backbone']` has the classifier's parameter names without `fc`."""
    backbone: ResNet
    hidden_dim: int = 512
    projection_dim: int = 128

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        h = self.backbone(x, train=train, features_only=True)
        h = nn.relu(nn.Dense(self.hidden_dim, name='proj1')(h))
        return nn.Dense(self.projection_dim, name='proj2')(h)


# ---- construction helpers -----------------------------------------------------------------

def build_model(config, num_classes: int) -> ResNet:
    """The ResNet described by a configs/base.py-style config."""
    dtype = compute_dtype(config.dtype, jax.default_backend())
    if config.init not in INITS:
        raise ValueError(f'init must be one of {INITS}, got {config.init!r}')
    if config.conv_impl not in CONV_IMPLS:
        raise ValueError(f'conv_impl must be one of {CONV_IMPLS}, got {config.conv_impl!r}')
    return ResNet(
        num_classes=num_classes,
        stage_sizes=tuple(config.stage_sizes),
        widths=tuple(config.widths),
        dropout_rate=config.dropout,
        init_scheme=config.init,
        zero_init_last_bn=config.zero_init_last_bn,
        stem_pool=config.stem_pool,
        stem=config.stem,
        blur_pool=config.blur_pool,
        bn_momentum=config.bn_momentum,
        bn_eps=config.bn_eps,
        conv_impl=config.conv_impl,
        dtype=dtype,
    )


def init_variables(model: nn.Module, rng: jax.Array, image_size: int) -> dict:
    """{'params', 'batch_stats'} from a jit'd init on a (1, S, S, 3) dummy batch.

    On CPU the init is compiled with XLA's backend optimisation off: flax derives one key per
    parameter with threefry hashes, which XLA:CPU otherwise spends ~8 s optimising for a
    program that runs once (compile + run: 2.6 s instead of 8.3 s for the default net at
    224 px). The numbers differ from the optimised build by float rounding (~1e-9) only.
    """
    dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    # (under a trace, e.g. eval_shape, even this dummy is a tracer: no options on nested jits)
    fast_compile = jax.default_backend() == 'cpu' and not isinstance(dummy, jax.core.Tracer)
    options = {'xla_backend_optimization_level': 0} if fast_compile else None  # top-level only
    init = jax.jit(functools.partial(model.init, train=False), compiler_options=options)
    variables = init(rng, dummy)
    return {'params': variables['params'], 'batch_stats': variables['batch_stats']}


def count_params(params) -> int:
    """Number of scalars in a pytree of arrays (or of jax.ShapeDtypeStruct)."""
    return sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
