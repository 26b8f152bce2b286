"""Where the train step's forward + backward spends its time, op by op, in both stacks.

`python benchmarks/bench.py profile --image_size=64`: the seed's loss and gradients (the
`forward + backward` part of `bench.py parts`), profiled in one process:

- cars_jax: `jax.profiler` traces a few jitted calls; XLA:CPU records one event per executed
  thunk (a fusion, a convolution, a YNNPACK fusion), which the compiled HLO maps to the op it
  came from (its `op_name` metadata: the module path and the JAX primitive; `transpose(...)`
  marks the backward pass).
- PyTorch: `torch.profiler` over the same number of eager calls, self CPU time per aten op.

Both are grouped into the same categories. The XLA column is thread time: XLA:CPU runs
independent thunks concurrently on its threads, so the sum can exceed the wall time; shares of
the total are what compares.
"""
from __future__ import annotations

import collections
import glob
import re
import tempfile
from typing import Any, Callable

CATEGORIES = ('convolutions and matmuls', 'BatchNorm', 'max-pool', 'layout copies',
              'ReLU, shortcut adds, loss, other')

_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?\b([a-z][\w\-]*)\(')
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def hlo_instructions(hlo_text: str) -> dict[str, tuple[str, str]]:
    """Instruction name -> (opcode, op_name metadata or '') for every instruction of an HLO
    module's text (`compiled.as_text()`)."""
    out = {}
    for line in hlo_text.splitlines():
        m = _INSTRUCTION.match(line)
        if m:
            op = _OP_NAME.search(line)
            out[m.group(1)] = (m.group(2), op.group(1) if op else '')
    return out


def xla_category(name: str, op_name: str) -> str:
    """The category of one executed XLA:CPU thunk, from its instruction name and op_name."""
    path = op_name.split('/')
    primitive = path[-1] if op_name else ''
    if ('max_pool' in op_name or 'reduce_window' in primitive or 'select_and_scatter' in op_name
            or any(k in name for k in ('reduce-window', 'scatter', 'iota'))):
        return 'max-pool'       # XLA lowers select_and_scatter to iotas + reduce-window + scatter
    if (primitive in ('conv_general_dilated', 'dot_general')
            or name.startswith(('conv', 'dot', 'convolution'))
            or (primitive == 'concatenate' and any('conv' in p for p in path[:-1]))):
        return 'convolutions and matmuls'      # the matmul form's im2col (a concatenate) too
    if name.startswith(('transpose', 'copy')) or primitive in ('transpose', 'copy'):
        return 'layout copies'
    if any(p.startswith('bn') or p == 'down_bn' for p in path[:-1]):
        return 'BatchNorm'
    return 'ReLU, shortcut adds, loss, other'


def xla_backend(name: str, opcode: str) -> str:
    """Which kernels ran a thunk: YNNPACK (its fusions), Eigen (XLA's own convolutions and
    dots), or XLA's generated loops (every other fusion and op)."""
    if 'ynn_fusion' in name:
        return 'YNNPACK'
    if opcode in ('convolution', 'dot') or name.startswith(('conv_general_dilated', 'dot')):
        return 'Eigen'
    return 'XLA loops'


def torch_category(op: str) -> str | None:
    """The category of one aten op's self time; None for autograd and profiler wrappers."""
    if op.startswith(('autograd::', 'ProfilerStep', '[')) or 'Backward0' in op:
        return None
    if any(k in op for k in ('convolution', 'conv2d', 'addmm', 'aten::mm', 'linear')):
        return 'convolutions and matmuls'
    if 'batch_norm' in op:
        return 'BatchNorm'
    if 'max_pool' in op:
        return 'max-pool'
    if any(k in op for k in ('copy_', 'contiguous', 'clone', 'permute', 'to_dense')):
        return 'layout copies'
    return 'ReLU, shortcut adds, loss, other'


def xla_thunk_ms(fn: Callable, args: tuple, steps: int) -> dict[str, float]:
    """Thread-ms per call of each thunk of the jitted `fn`, traced over `steps` calls after a
    warm-up; keyed by the thunk's HLO instruction name."""
    import jax
    from jax.profiler import ProfileData

    for _ in range(2):
        jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        try:
            for _ in range(steps):
                jax.block_until_ready(fn(*args))
        finally:
            jax.profiler.stop_trace()
        profile = ProfileData.from_file(
            sorted(glob.glob(f'{trace_dir}/**/*.xplane.pb', recursive=True))[-1])
    total: dict[str, float] = collections.Counter()
    for plane in profile.planes:
        for line in plane.lines:
            if 'XLA' not in line.name:      # the executor's threads, not Python's
                continue
            for event in line.events:
                if not event.name.startswith(('ThunkExecutor', 'SlinkyThreadPool')):
                    total[event.name] += event.duration_ns / 1e6 / steps
    return dict(total)


def torch_op_ms(torch: Any, fn: Callable, steps: int) -> dict[str, float]:
    """Self CPU ms per call of each aten op run by `fn`, over `steps` calls after a warm-up."""
    for _ in range(2):
        fn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    return {e.key: e.self_cpu_time_total / 1e3 / steps for e in prof.key_averages()}


def group(times: dict[str, float], category: Callable[[str], str | None]) -> dict[str, float]:
    """ms per category (CATEGORIES order; None-category entries dropped)."""
    out = dict.fromkeys(CATEGORIES, 0.0)
    for key, ms in times.items():
        c = category(key)
        if c is not None:
            out[c] += ms
    return out


def jax_forward_backward_profile(image_size: int, batch_size: int, steps: int,
                                 num_classes: int = 196, stage_sizes=None,
                                 widths=None) -> dict:
    """cars_jax's seed loss + gradients (no MixUp), profiled: ms per category and per
    backend, and the top thunks."""
    from benchmarks.cpu_settings import seed_grad_setup

    setup = seed_grad_setup(image_size, batch_size, num_classes, stage_sizes, widths)
    state, grad_fn = setup['state'], setup['grad_fn']
    args = (state.params, state.batch_stats)
    hlo = hlo_instructions(grad_fn.lower(*args).compile().as_text())
    thunks = xla_thunk_ms(grad_fn, args, steps)
    info = {n: hlo.get(n, ('', '')) for n in thunks}
    by = {'category': collections.Counter(), 'backend': collections.Counter()}
    for n, ms in thunks.items():
        opcode, op_name = info[n]
        by['category'][xla_category(n, op_name)] += ms
        by['backend'][xla_backend(n, opcode)] += ms
    top = sorted(thunks.items(), key=lambda kv: -kv[1])[:12]
    return {'total_ms': sum(thunks.values()),
            'category_ms': {c: by['category'][c] for c in CATEGORIES},
            'backend_ms': dict(by['backend']),
            'top': [{'thunk': n, 'ms': ms, 'category': xla_category(n, info[n][1]),
                     'op_name': info[n][1]} for n, ms in top]}


def torch_forward_backward_profile(torch: Any, image_size: int, batch_size: int, steps: int,
                                   num_classes: int = 196, stage_sizes=None,
                                   widths=None) -> dict:
    """The seed's eager loss + backward (as `seed_torch.torch_step_parts`), profiled: self ms
    per category and the top aten ops."""
    from benchmarks.seed_torch import SEED_STAGES, SEED_WIDTHS, seed_model_and_batch

    model, criterion, x, y = seed_model_and_batch(torch, image_size, batch_size, num_classes,
                                                  stage_sizes or SEED_STAGES,
                                                  widths or SEED_WIDTHS)
    model.train()

    def forward_backward():
        model.zero_grad()
        criterion(model(x), y).backward()

    ops = torch_op_ms(torch, forward_backward, steps)
    kept = {k: v for k, v in ops.items() if torch_category(k) is not None}
    top = sorted(kept.items(), key=lambda kv: -kv[1])[:12]
    return {'total_ms': sum(kept.values()), 'category_ms': group(ops, torch_category),
            'top': [{'op': k, 'ms': v, 'category': torch_category(k)} for k, v in top]}


def max_pool_grad_ms(image_size: int, batch_size: int, repeats: int,
                     torch: Any | None = None) -> dict[str, float]:
    """Median ms of the stem's max-pool, forward and backward, alone (the seed's 64 channels
    after its stride-2 stem, ReLU'd input): XLA's own gradient (`select_and_scatter`), the
    model's `max_pool_3x3_s2`, and PyTorch's `max_pool2d` when `torch` is given."""
    import statistics

    import jax
    import numpy as np
    from flax import linen as nn

    from benchmarks.cpu_settings import call_times_ms
    from benchmarks.seed_torch import eager_times_ms
    from cars_jax.model import max_pool_3x3_s2, stem_output_size

    side = stem_output_size(image_size, stem_pool=False)   # the pool's input
    x = np.maximum(np.random.default_rng(0).normal(size=(batch_size, side, side, 64)), 0)
    x = x.astype(np.float32)

    def jax_ms(pool) -> float:
        grad = jax.jit(jax.grad(lambda v: (pool(v) ** 2).sum()))
        return statistics.median(call_times_ms(grad, (jax.numpy.asarray(x),), repeats))

    out = {'XLA select_and_scatter': jax_ms(
               lambda v: nn.max_pool(v, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))),
           'cars_jax max_pool_3x3_s2': jax_ms(max_pool_3x3_s2)}
    if torch is not None:
        xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_(True)

        def torch_step():
            xt.grad = None
            (torch.nn.functional.max_pool2d(xt, 3, 2, 1) ** 2).sum().backward()
        out['PyTorch max_pool2d'] = statistics.median(eager_times_ms(torch_step, repeats))
    return out
