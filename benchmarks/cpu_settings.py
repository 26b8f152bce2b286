"""XLA:CPU settings for the seed's train and eval step: library backends, code generation,
conv form, bf16.

`python benchmarks/bench.py cpu` runs each setting of `SETTINGS` in a fresh process (XLA reads
XLA_FLAGS once, when JAX initialises), at each image size, and the seed's PyTorch step in the
parent, in the same run. Each child also trains a tiny net for `CHECK_STEPS` steps on fixed
data and runs the device augmentation on fixed images; the parent compares both with the first
setting's, which says which settings keep the numerics within float tolerance.

A child is this file run as a script: `python benchmarks/cpu_settings.py '<json job>'`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence

from cars_jax import runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (XLA_FLAGS, config overrides). The first is the baseline of the numerics check.
YNN_ALL = 'individual_convolution,individual_dot,dot,eltwise,reduce'
OPT_PRESET_FLAG = '--xla_cpu_opt_preset'
NO_YNN_CONV = f'{runtime.YNN_FUSION_FLAG}={runtime.YNN_FUSION_TYPES}'   # main.py's CPU flag
SETTINGS: dict[str, tuple[str, dict]] = {
    'xla': ('', {'conv_impl': 'xla'}),
    'auto': ('', {'conv_impl': 'auto'}),
    'auto+no_ynn_conv': (NO_YNN_CONV, {'conv_impl': 'auto'}),   # main.py's default, by construction
    'auto+ynn_all': (f'--xla_cpu_experimental_ynn_fusion_type={YNN_ALL}', {'conv_impl': 'auto'}),
    'auto+xnn_greedy': ('--xla_cpu_experimental_xnn_graph_fusion_mode='
                        'XNN_GRAPH_FUSION_MODE_GREEDY', {'conv_impl': 'auto'}),
    'auto+onednn': ('--xla_cpu_use_onednn=true', {'conv_impl': 'auto'}),
    'auto+xnnpack': ('--xla_cpu_use_xnnpack=true', {'conv_impl': 'auto'}),
    # XLA:CPU's code generation on top of auto+no_ynn_conv: 512-bit vectors in its own loops
    # (256 by default), its optimisation presets, its concurrency-optimised thunk scheduler.
    'auto+vec512': (f'{NO_YNN_CONV} --xla_cpu_prefer_vector_width=512', {'conv_impl': 'auto'}),
    'auto+fast_runtime': (f'{NO_YNN_CONV} {OPT_PRESET_FLAG}=CPU_OPT_PRESET_FAST_RUNTIME',
                          {'conv_impl': 'auto'}),
    'auto+fast_compile': (f'{NO_YNN_CONV} {OPT_PRESET_FLAG}=CPU_OPT_PRESET_FAST_COMPILE',
                          {'conv_impl': 'auto'}),
    'auto+concurrency': (f'{NO_YNN_CONV} '
                         '--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED',
                         {'conv_impl': 'auto'}),
    'matmul': ('', {'conv_impl': 'matmul'}),
    'auto+bf16': ('', {'conv_impl': 'auto', 'dtype': 'bfloat16'}),
    # bf16 matmul convolutions: the dots (backward ones included, their cotangents are bf16
    # too) are where AMX/AVX512-BF16 could pay; with oneDNN for the dots as well.
    'matmul+bf16': (NO_YNN_CONV, {'conv_impl': 'matmul', 'dtype': 'bfloat16'}),
    'matmul+bf16+onednn': ('--xla_cpu_use_onednn=true',
                           {'conv_impl': 'matmul', 'dtype': 'bfloat16'}),
    'matmul+bf16+ynn_dot': ('--xla_cpu_experimental_ynn_fusion_type=individual_dot,dot',
                            {'conv_impl': 'matmul', 'dtype': 'bfloat16'}),
}
CHECK_STEPS = 20
# Losses of a float32 setting within this of the baseline's after CHECK_STEPS steps: the same
# numerics up to summation order. bf16 rounds every activation and is reported, not judged.
LOSS_ATOL = 1e-3
# The device augmentation's output within this of the baseline's (normalised units; float32
# rounding moves it by ~1e-6).
AUGMENT_ATOL = 1e-4


def child_command(job: dict) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), json.dumps(job)]


def run_child(name: str, image_size: int, batch_size: int, steps: int, repeats: int,
              widths: Sequence[int], stage_sizes: Sequence[int], num_classes: int,
              timeout: float = 1800) -> dict:
    """One setting at one size in a fresh process: its bench.run_step row (JAX only) and the
    tiny net's losses; {'error': ...} when the process fails (e.g. a flag this jaxlib lacks)."""
    xla_flags, overrides = SETTINGS[name]
    job = dict(image_size=image_size, batch_size=batch_size, steps=steps, repeats=repeats,
               widths=list(widths), stage_sizes=list(stage_sizes), num_classes=num_classes,
               overrides=overrides)
    env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
    env['XLA_FLAGS'] = ' '.join(_inherited_flags() + xla_flags.split())
    env.pop('JAX_COMPILATION_CACHE_DIR', None)       # compile times measured, not loaded
    try:
        proc = subprocess.run(child_command(job), capture_output=True, text=True, env=env,
                              cwd=ROOT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {'error': f'timed out after {timeout:.0f} s'}
    lines = [l for l in proc.stdout.splitlines() if l.startswith('{')]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {'error': ' | '.join(tail) or f'exit {proc.returncode}'}
    return json.loads(lines[-1])


def _inherited_flags() -> list[str]:
    """This process's XLA_FLAGS without the flags the settings choose (main.py and the tests
    add the YNNPACK one), so each child runs exactly its setting on top of the user's rest."""
    chosen = {f.split('=')[0] for flags_, _ in SETTINGS.values() for f in flags_.split()}
    return [f for f in os.environ.get('XLA_FLAGS', '').split() if f.split('=')[0] not in chosen]


def check_losses(overrides: dict, steps: int = CHECK_STEPS) -> list[float]:
    """Losses of `steps` train steps of a tiny net (16 px, widths 4, 8) on fixed data, with
    MixUp and dropout keyed by the step index: the same program for every setting."""
    import jax
    import numpy as np

    from benchmarks.bench import seed_config
    from cars_jax.steps import create_train_state, make_steps, replicated_sharding
    c = seed_config(image_size=16, batch_size=8, widths=(4, 8), stage_sizes=(1, 1),
                    learning_rate=1e-2, **overrides)
    rng = np.random.default_rng(0)
    batch = {'image': rng.normal(size=(8, 16, 16, 3)).astype(np.float32),
             'label': (np.arange(8) % 3).astype(np.int32)}
    state = jax.device_put(create_train_state(c, jax.random.PRNGKey(0), 3, steps),
                           replicated_sharding())
    train, _ = make_steps(c)
    losses = []
    for i in range(steps):
        state, m = train(state, batch, jax.random.PRNGKey(i))
        losses.append(float(m['loss']))
    return losses


def check_augment(image_size: int = 16) -> list[float]:
    """The device augmentation (every op on, as a train step draws and applies it in one jitted
    program) of 4 fixed smooth images: a large program of elementwise code that XLA generates
    itself (no library kernels), where a setting that compiles such code wrongly shows (the
    fast-compile preset did: BENCHMARKS.md). Rounded to 1e-6, flattened."""
    import jax
    import numpy as np

    from cars_jax.data import augment, device_augment
    h, w = 48, 64                                        # the originals' size; the cache is 40
    y, x = np.mgrid[0:40, 0:40] / 40.0
    img = np.stack([128 + 90 * np.sin(2 * np.pi * (0.8 * x + 0.3 * y)),
                    128 + 80 * np.cos(2 * np.pi * (0.5 * x - 0.7 * y) + 1),
                    128 + 70 * np.sin(2 * np.pi * 1.1 * y + 0.5) * np.cos(np.pi * x)], -1)
    images = np.stack([np.clip(img, 0, 255).round().astype(np.uint8)] * 4)
    cfg = augment.AugmentConfig(image_size=image_size)

    @jax.jit
    def draw_and_augment(key, images, hw):
        params = device_augment.sample_device_params(key, hw, cfg)
        return device_augment.augment_batch(images, params, cfg)

    out = draw_and_augment(jax.random.key(0), images, np.tile([[h, w]], (4, 1)))
    return np.round(np.asarray(out, np.float64), 6).ravel().tolist()


def _child(job: dict) -> None:
    sys.path.insert(0, ROOT)
    import benchmarks.bench as bench
    overrides = dict(job['overrides'])
    impl = overrides.pop('conv_impl', 'auto')
    result = bench.run_step(job['image_size'], job['batch_size'], job['steps'], job['repeats'],
                            [impl], widths=job['widths'], stage_sizes=job['stage_sizes'],
                            num_classes=job['num_classes'], use_torch=False,
                            config_overrides=overrides)
    row = result['rows'][0]
    row['check_losses'] = check_losses(job['overrides'])
    row['check_augment'] = check_augment()
    row['xla_flags'] = os.environ.get('XLA_FLAGS', '')
    print(json.dumps(row))


def seed_conv_layers(image_size: int) -> list[tuple[str, int, int, int, int, int, int]]:
    """(name, input side, cin, cout, kernel, stride, padding) of each distinct 3x3/7x7 conv of
    the seed's ResNet-18 at `image_size` (the stem, then each stage's first and repeated conv)."""
    from cars_jax.model import conv_output_size, stem_output_size
    s = stem_output_size(image_size)                                     # stem, max-pool
    layers = [('stem 7x7/2', image_size, 3, 64, 7, 2, 3), ('stage1 3x3', s, 64, 64, 3, 1, 1)]
    cin = 64
    for i, cout in enumerate((128, 256, 512), start=2):
        layers.append((f'stage{i} 3x3/2', s, cin, cout, 3, 2, 1))
        s = conv_output_size(s, 3, 2, 1)
        layers.append((f'stage{i} 3x3', s, cout, cout, 3, 1, 1))
        cin = cout
    return layers


def call_times_ms(fn, args: tuple, repeats: int) -> list[float]:
    """Milliseconds of `repeats` calls of a jitted `fn(*args)`, after one call that compiles
    (each call waited for: JAX dispatches asynchronously)."""
    import time

    import jax
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(1e3 * (time.perf_counter() - t))
    return times


def seed_conv_counts(stage_sizes=(2, 2, 2, 2)) -> list[int]:
    """How often each `seed_conv_layers` conv occurs in the net: the stem and each strided
    conv once, stage 1's 3x3 2 x blocks times, the other stages' unstrided 3x3 2 x blocks - 1."""
    return [1, 2 * stage_sizes[0]] + [n for b in stage_sizes[1:] for n in (1, 2 * b - 1)]


def conv_pass_times(image_size: int, batch_size: int = 32, repeats: int = 5) -> list[dict]:
    """Milliseconds (best of `repeats`) of the forward, input-gradient and weight-gradient pass
    of each seed conv (`seed_conv_layers`, with its `count` in the net), as `lax.conv` ('xla')
    and as im2col + matmul ('matmul'), each pass jitted alone, float32, with the forward's
    GFLOP."""
    import jax
    import jax.numpy as jnp

    from cars_jax.model import conv_matmul, conv_output_size, conv_xla

    def best_ms(fn, *args) -> float:
        return min(call_times_ms(jax.jit(fn), args, repeats))

    rows = []
    for (name, side, cin, cout, k, stride, pad), count in zip(seed_conv_layers(image_size),
                                                              seed_conv_counts()):
        out = conv_output_size(side, k, stride, pad)
        x = jnp.ones((batch_size, side, side, cin), jnp.float32)
        w = jnp.full((k, k, cin, cout), 0.01, jnp.float32)
        g = jnp.ones((batch_size, out, out, cout), jnp.float32)
        row = {'layer': name, 'input': side, 'output': out, 'cin': cin, 'cout': cout,
               'count': count, 'gflop': 2 * batch_size * out * out * k * k * cin * cout / 1e9}
        for form, conv in (('xla', conv_xla), ('matmul', conv_matmul)):
            f = lambda x, w, conv=conv: conv(x, w, stride, pad)     # noqa: E731
            row[f'{form}_forward_ms'] = best_ms(f, x, w)
            row[f'{form}_input_grad_ms'] = best_ms(
                lambda x, w, g, f=f: jax.vjp(lambda x: f(x, w), x)[1](g)[0], x, w, g)
            row[f'{form}_weight_grad_ms'] = best_ms(
                lambda x, w, g, f=f: jax.vjp(lambda w: f(x, w), w)[1](g)[0], x, w, g)
        rows.append(row)
    return rows


def seed_grad_setup(image_size: int, batch_size: int = 32, num_classes: int = 196,
                    stage_sizes=None, widths=None) -> dict:
    """The seed's train state at `image_size` (seed config; optional architecture), one
    synthetic batch, and the jitted loss + gradients of its train-mode forward (no MixUp): what
    `step_part_times` and `op_profile` time. Keys: state, x, y, key, grad_fn."""
    import jax
    import numpy as np

    from configs import base
    from cars_jax.losses import mixed_loss
    from cars_jax.steps import create_train_state

    c = base.get_config()
    c.image_size = image_size
    if stage_sizes:
        c.stage_sizes, c.widths = tuple(stage_sizes), tuple(widths)
    state = create_train_state(c, jax.random.PRNGKey(0), num_classes, 255)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch_size, image_size, image_size, 3)).astype(np.float32)
    y = rng.integers(0, num_classes, batch_size).astype(np.int32)
    key = jax.random.PRNGKey(1)

    def loss(params, batch_stats):
        logits, new = state.apply_fn({'params': params, 'batch_stats': batch_stats}, x,
                                     train=True, mutable=['batch_stats'], rngs={'dropout': key})
        return mixed_loss(logits, y, y, 1.0, 0.05).mean(), new

    return {'state': state, 'x': x, 'y': y, 'key': key,
            'grad_fn': jax.jit(jax.value_and_grad(loss, has_aux=True))}


def step_part_times(image_size: int, batch_size: int = 32, repeats: int = 10,
                    num_classes: int = 196, stage_sizes=None, widths=None) -> dict[str, float]:
    """Median ms of the parts of the seed's jitted train step (no MixUp), each jitted alone with
    the process's XLA_FLAGS: forward in eval and train mode, forward + backward (the loss's
    value and gradients), the AdamW update, and the whole step; the same parts as
    `seed_torch.torch_step_parts`."""
    import statistics

    import jax

    from cars_jax.steps import train_step

    setup = seed_grad_setup(image_size, batch_size, num_classes, stage_sizes, widths)
    state, x, y, key, grad_fn = (setup[k] for k in ('state', 'x', 'y', 'key', 'grad_fn'))
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    grads = grad_fn(state.params, state.batch_stats)[1]

    def median_ms(fn, *args) -> float:
        return statistics.median(call_times_ms(fn, args, repeats))

    return {
        'forward (eval)': median_ms(jax.jit(lambda v: state.apply_fn(v, x, train=False)),
                                    variables),
        'forward (train)': median_ms(jax.jit(lambda v: state.apply_fn(
            v, x, train=True, mutable=['batch_stats'], rngs={'dropout': key})), variables),
        'forward + backward': median_ms(grad_fn, state.params, state.batch_stats),
        'optimizer (AdamW)': median_ms(jax.jit(lambda s, g: s.apply_gradients(grads=g)),
                                       state, grads),
        'whole train step': median_ms(jax.jit(lambda s: train_step(
            s, {'image': x, 'label': y}, key, mixup_prob=0.0)), state),
    }


if __name__ == '__main__':
    _child(json.loads(sys.argv[1]))
