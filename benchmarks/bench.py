"""Benchmarks, each figure a median over repeats, with the machine named.

  python benchmarks/bench.py loader [--data_dir=data/demo] [--image_size=224] [--batches=20]
  python benchmarks/bench.py step [--image_size=64] [--batch_size=32] [--conv_impls=xla,auto]
  python benchmarks/bench.py fused [--num_images=8144] [--image_size=224] [--epochs=70]
  python benchmarks/bench.py cpu [--sizes=64,128,224] [--settings=xla,auto,...] [--repeats=5]
  python benchmarks/bench.py convs [--image_size=64] [--batch_size=32] [--repeats=5]
  python benchmarks/bench.py parts [--image_size=64] [--batch_size=32] [--repeats=10]
  python benchmarks/bench.py profile [--image_size=64] [--batch_size=32] [--steps=5]
  python benchmarks/bench.py resume [--steps=5]
  python benchmarks/bench.py suite [--pytest_args='-n 0 tests/test_train.py']

(from the repository root; `python -m benchmarks.bench ...` is the same).

`loader`: images/s of the train pipeline (decode + the seed's augmentation + batching) with
grain `num_workers` 0, 1 and 2, against a plain single-threaded Python loop over the same
records measured in the same run (the ratio column); the decode-once cache path (host gather of
cached uint8 batches; the cache build is timed separately) and the jitted on-device
augmentation of those batches (on whatever backend is present: on a CPU-only machine, the
CPU); and, when torch imports, the seed's loader (torch DataLoader over per-image PIL decode +
the seed's transforms, workers 0/1/2) as a second baseline ('vs torch'). Every row also gives
images/s per core it uses.
`step`: images/s of the jitted train / eval step of the seed's network per conv
implementation (the first one is the baseline of the ratio column), and the SAME network and
train step in eager PyTorch when torch imports ('vs PyTorch').
`fused`: the moonshot path: a Stanford-Cars-shaped uint8 dataset resident on the device and
whole epochs as `lax.scan` chunks (`benchmarks/fused.py`); compile time, steady images/s,
on-device eval images/s, and the wall time of the seed's recipe, projected from the measured
rate (and measured when every epoch ran).
`cpu`: the train and eval step per XLA:CPU setting (`benchmarks/cpu_settings.py`: library
backends through XLA_FLAGS, the conv form, bf16), each in a fresh process, at each size, with
the seed's PyTorch step measured in the same run ('vs PyTorch'), and whether the setting keeps
the numerics (a tiny net's losses over 20 steps, and the device augmentation of fixed images,
against the first setting's).
`convs`: where the train step's time goes: each of the seed's convolutions at one input size,
its forward, input-gradient and weight-gradient pass jitted alone, as `lax.conv` and as the
im2col + matmul form, in ms and GFLOP/s (with the process's XLA_FLAGS).
`parts`: the seed's train step in parts (forward in eval / train mode, forward + backward, the
AdamW update, the whole step; no MixUp), jitted, against the same parts of the seed's eager
PyTorch step measured in the same run.
`profile`: the forward + backward op by op (`benchmarks/op_profile.py`): XLA:CPU's executed
thunks (from `jax.profiler`) and PyTorch's aten ops (from `torch.profiler`), grouped into the
same categories (convolutions, BatchNorm, max-pool, layout copies, the rest).
`resume`: what a resumed run compiles (`benchmarks/resume.py`).
`suite`: where the test suite's time goes (`benchmarks/suite.py`): the README's test command
with a cold compilation cache, each test's duration and in-process compiles.
Each mode writes a JSON.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:   # run as a file: the repository root holds `benchmarks` and `configs`
    sys.path.insert(0, ROOT)

from absl import app, flags  # noqa: E402

from benchmarks import seed_torch  # noqa: E402
from benchmarks.seed_torch import SEED_STAGES, SEED_WIDTHS  # noqa: E402

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags, defined by `main`'s caller only: importing this module (the tests
    do) defines none."""
    flags.DEFINE_string('data_dir', 'data/demo',
                        'Image-folder data (generated demo data if absent).')
    flags.DEFINE_integer('image_size', 224, 'Output size of the train transform.')
    flags.DEFINE_integer('batch_size', 32, 'Batch size.')
    flags.DEFINE_integer('batches', 20, 'Batches timed per repeat (from iterator creation).')
    flags.DEFINE_integer('repeats', 3, 'Repeats; the median is reported.')
    flags.DEFINE_string('workers', '0,1,2', 'loader: comma-separated grain num_workers values.')
    flags.DEFINE_string('torch_workers', '0,1,2',
                        'loader: torch DataLoader num_workers values (the first is the baseline '
                        "of the 'vs torch' column); empty: no torch rows.")
    flags.DEFINE_string('out', 'runs/bench.json', 'Where to write the JSON results.')
    flags.DEFINE_integer('steps', 5, 'step: timed steps per repeat (after one compile step); '
                         'profile: profiled calls; resume: train steps per phase.')
    flags.DEFINE_string('conv_impls', 'xla,auto', 'step: conv implementations to compare.')
    flags.DEFINE_bool('torch', True, 'step/loader: add the PyTorch rows when torch imports.')
    flags.DEFINE_string('widths', '', 'step/fused: network widths, e.g. 16,32,64,128 (empty: '
                        "the seed's 64,128,256,512).")
    flags.DEFINE_string('stage_sizes', '',
                        "step/fused: blocks per stage (empty: the seed's 2,2,2,2).")
    flags.DEFINE_integer('cache_size', 0,
                         'loader/fused: decode-once cache side (0: round(S*8/7)).')
    flags.DEFINE_integer('num_images', 8144, 'fused: train images (Stanford Cars train: 8144).')
    flags.DEFINE_integer('eval_images', 8041, 'fused: eval images (Stanford Cars test: 8041).')
    flags.DEFINE_integer('num_classes', 196, 'fused/step: classes.')
    flags.DEFINE_integer('epochs', 70, "fused: epochs of the recipe (the seed's 70).")
    flags.DEFINE_integer('run_epochs', 0, 'fused: epochs actually run (0: all --epochs); the '
                         'rest is projected from the measured rate.')
    flags.DEFINE_integer('chunk_steps', 0, 'fused: train steps per scan chunk (0: one epoch).')
    flags.DEFINE_string('sizes', '64,128,224', 'cpu: image sizes.')
    flags.DEFINE_string('settings', '', 'cpu: names from benchmarks/cpu_settings.py SETTINGS '
                        '(empty: all).')
    flags.DEFINE_string('pytest_args', '', 'suite: arguments added to `python -m pytest -q` '
                        '(shell syntax), e.g. "-n 0" or a test file.')


def machine() -> str:
    """The CPU model (from /proc/cpuinfo where there is one), core count and OS."""
    model = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            model = next(line.split(':', 1)[1].strip() for line in f
                         if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    return f'{model}, {os.cpu_count()} cores, {platform.system()}'


def _ints(text: str, default: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(',') if v.strip()) if text.strip() else tuple(default)


def _cores(n: int) -> int:
    """Cores a row can use: n threads or processes, at most the machine's."""
    return max(1, min(int(n), os.cpu_count() or 1))


def _loader_row(name: str, ips: float, cores: int, base: float) -> dict:
    return {'pipeline': name, 'images_per_s': ips, 'ratio': ips / base, 'cores': cores,
            'images_per_s_per_core': ips / cores}


def run_loader(data_dir: str, image_size: int, batch_size: int, batches: int, repeats: int,
               workers: Sequence[int], *, torch_workers: Sequence[int] = (0, 1, 2),
               cache_size: int = 0, records=None, use_torch: bool = True) -> dict:
    """Loader rows (see the module docstring). `records` (in-memory Records) replace data_dir.

    cores per row: the plain loop and torch's workers=0 run on 1 core, grain num_workers=0
    and the cache gather on grain's 2 in-process threads, worker processes on `w` cores (plus
    the main process, not counted), the device augmentation on XLA's all-core thread pool."""
    import numpy as np

    from cars_jax.data import pipeline
    from cars_jax.data.augment import AugmentConfig, train_transform
    from cars_jax.data.cache import build_cache, cache_size_for
    from cars_jax.data.sources import decode_image, labels_of, load_image_folders
    from cars_jax.data.synthetic import ensure_demo_dataset

    source = data_dir if records is None else '(in-memory records)'
    if records is None:
        if not os.path.isdir(os.path.join(data_dir, 'train')):
            ensure_demo_dataset(data_dir)
        records = load_image_folders(data_dir).train
    labels = labels_of(records)
    aug = AugmentConfig(image_size=image_size)   # the seed's augmentation at this size
    batches = min(batches, len(records) // batch_size)
    if batches < 1:
        raise ValueError(f'{len(records)} records cannot fill one batch of {batch_size}')
    n_images = batches * batch_size
    notes = []

    def plain_loop() -> float:
        rng = np.random.default_rng(0)
        idx = pipeline.epoch_indices(labels, 0, 0)[:n_images]
        t = time.perf_counter()
        for i in idx:
            train_transform(decode_image(records[int(i)]), rng, aug)
        return n_images / (time.perf_counter() - t)

    def grain_loader(num_workers: int, epoch: int) -> float:
        ds = pipeline.train_epoch_dataset(records, labels, aug, seed=0, epoch=epoch,
                                          batch_size=batch_size, max_steps=batches,
                                          num_workers=num_workers)
        # Timed from the iterator's creation: worker start-up counts, and batches that workers
        # buffered ahead cannot inflate the rate.
        t = time.perf_counter()
        it = iter(ds)
        for _ in range(batches):
            next(it)
        return n_images / (time.perf_counter() - t)

    results = {'machine': machine(), 'data_dir': source,
               'image_size': image_size, 'batch_size': batch_size, 'images_timed': n_images,
               'repeats': repeats, 'rows': [], 'notes': notes}
    base = statistics.median(plain_loop() for _ in range(repeats))
    rows = results['rows']
    rows.append(_loader_row('plain Python loop, 1 thread (baseline)', base, 1, base))

    # torch first: its DataLoader forks workers, best done before XLA starts its thread pools
    torch = seed_torch.import_torch() if use_torch else None
    torch_rows = []
    if torch is None:
        notes.append('torch DataLoader rows skipped: ' + ('--notorch' if not use_torch else
                                                          'torch is not importable'))
    else:
        for w in torch_workers:
            rates, name = [], ''
            for r in range(repeats):
                ips, name = seed_torch.torch_loader_rate(torch, records, labels, aug,
                                                          batch_size, batches, w, seed=r)
                rates.append(ips)
            torch_rows.append(_loader_row(f'{name}, num_workers={w}',
                                          statistics.median(rates), _cores(max(w, 1)), base))
        results['torch_loader'] = torch_rows[0]['pipeline'].rsplit(', num_workers', 1)[0] \
            if torch_rows else None

    for w in workers:
        ips = statistics.median(grain_loader(w, r) for r in range(repeats))
        name = f'grain, num_workers={w}' + (' (in-process threads)' if w == 0 else ' (processes)')
        rows.append(_loader_row(name, ips, _cores(2 if w == 0 else w), base))
    rows.extend(torch_rows)

    # the decode-once cache: built once (timed apart), then the host side of the device path
    size = cache_size_for(image_size, cache_size)
    t = time.perf_counter()
    cache = build_cache(records, size, log=lambda _: None)
    results['cache_build_s'] = time.perf_counter() - t
    results['cache_size'] = size
    results['cache_build_images_per_s'] = len(records) / results['cache_build_s']
    cached_batches = []

    def cached_loader(epoch: int) -> float:
        ds = pipeline.cached_train_epoch_dataset(cache.images, cache.orig_hw, labels, seed=0,
                                                 epoch=epoch, batch_size=batch_size,
                                                 max_steps=batches)
        out = []
        t = time.perf_counter()
        it = iter(ds)
        for _ in range(batches):
            out.append(next(it))
        rate = n_images / (time.perf_counter() - t)
        cached_batches[:] = out
        return rate

    ips = statistics.median(cached_loader(r) for r in range(repeats))
    rows.append(_loader_row(f'decode-once cache {size}px, host gather of uint8 batches '
                            '(grain threads)', ips, _cores(2), base))
    results['device_augment'] = _device_augment_row(cached_batches, aug, repeats, base, rows)

    if torch_rows:
        tbase = torch_rows[0]['images_per_s']
        results['torch_baseline'] = torch_rows[0]['pipeline']
        for r in rows:
            r['vs_torch'] = r['images_per_s'] / tbase
    return results


def _device_augment_row(batches: list, aug, repeats: int, base: float, rows: list) -> dict:
    """Times the jitted `augment_batch(sample_device_params(...))` over the cached batches
    (already on the device: the augmentation alone); appends its row, returns its details."""
    import jax

    from cars_jax.data.device_augment import augment_batch, sample_device_params

    fn = jax.jit(lambda key, images, hw: augment_batch(images, sample_device_params(key, hw, aug),
                                                       aug))
    on_device = [(jax.device_put(b['image']), jax.device_put(b['orig_hw'])) for b in batches]
    n = sum(len(b['image']) for b in batches)
    t = time.perf_counter()
    jax.block_until_ready(fn(jax.random.PRNGKey(0), *on_device[0]))
    compile_s = time.perf_counter() - t

    def once(r: int) -> float:
        t = time.perf_counter()
        out = [fn(jax.random.PRNGKey(1000 * r + i), im, hw) for i, (im, hw) in enumerate(on_device)]
        jax.block_until_ready(out)
        return n / (time.perf_counter() - t)

    ips = statistics.median(once(r) for r in range(repeats))
    backend = jax.default_backend()
    where = f'{backend} (this CPU, all cores)' if backend == 'cpu' else backend
    cores = _cores(os.cpu_count() or 1) if backend == 'cpu' else 1
    rows.append(_loader_row(f'jitted device augmentation of those batches on {where}', ips,
                            cores, base))
    return {'backend': backend, 'compile_s': compile_s, 'images_per_s': ips}


def seed_config(**overrides):
    """configs/base.py (the seed's recipe) with fields overridden."""
    from configs import base
    config = base.get_config()
    config.update(overrides)
    return config


def run_step(image_size: int, batch_size: int, steps: int, repeats: int,
             impls: list[str], *, widths: Sequence[int] = SEED_WIDTHS,
             stage_sizes: Sequence[int] = SEED_STAGES, num_classes: int = 196,
             use_torch: bool = True, config_overrides: dict | None = None) -> dict:
    """Images/s of the jitted train step and eval step of the seed's network (ResNet-18,
    196 classes, AdamW + one-cycle, MixUp, LS-CE) per conv implementation; compile separate.
    With torch: the same network and step in eager PyTorch on all cores, the 'vs PyTorch'
    baseline. `config_overrides`: other config fields (e.g. dtype) for every JAX row."""
    import jax
    import numpy as np

    from cars_jax.steps import create_train_state, make_steps, replicated_sharding
    rows, notes = [], []
    rng = np.random.default_rng(0)
    batch = {'image': rng.normal(size=(batch_size, image_size, image_size, 3)).astype(np.float32),
             'label': rng.integers(0, num_classes, batch_size).astype(np.int32)}
    arch = dict(widths=tuple(widths), stage_sizes=tuple(stage_sizes))
    for impl in impls:
        c = seed_config(image_size=image_size, batch_size=batch_size, conv_impl=impl, **arch,
                        **(config_overrides or {}))
        # placed where the steps keep it (as main.py does): the first call's program serves all
        state = jax.device_put(create_train_state(c, jax.random.PRNGKey(0), num_classes, 100),
                               replicated_sharding())
        train, evaluate = make_steps(c)
        t = time.perf_counter()
        state, m = train(state, batch, jax.random.PRNGKey(0))
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - t
        rates = []
        for r in range(repeats):
            t = time.perf_counter()
            for i in range(steps):
                state, m = train(state, batch, jax.random.PRNGKey(i))
            jax.block_until_ready(m)
            rates.append(steps * batch_size / (time.perf_counter() - t))
        eb = dict(batch, mask=np.ones(batch_size, np.float32))
        jax.block_until_ready(evaluate(state, eb))
        eval_rates = []
        for r in range(repeats):
            t = time.perf_counter()
            for _ in range(steps):
                out = evaluate(state, eb)
            jax.block_until_ready(out)
            eval_rates.append(steps * batch_size / (time.perf_counter() - t))
        rows.append({'framework': 'jax', 'conv_impl': impl,
                     'train_images_per_s': statistics.median(rates),
                     'eval_images_per_s': statistics.median(eval_rates),
                     'train_range': [min(rates), max(rates)],
                     'eval_range': [min(eval_rates), max(eval_rates)],
                     'first_step_incl_compile_s': compile_s})
    base = rows[0]['train_images_per_s']
    torch = seed_torch.import_torch() if use_torch else None
    torch_row = None
    if torch is None:
        notes.append('PyTorch row skipped: ' + ('--notorch' if not use_torch else
                                                'torch is not importable'))
    else:
        t = seed_torch.torch_step_rates(torch, image_size, batch_size, steps, repeats,
                                         num_classes=num_classes, **arch)
        torch_row = {'framework': seed_torch.torch_version(torch),
                     'conv_impl': f'pytorch eager, {t["threads"]} threads',
                     'train_images_per_s': t['train_images_per_s'],
                     'eval_images_per_s': t['eval_images_per_s'],
                     'train_range': t['train_range'], 'eval_range': t['eval_range'],
                     'first_step_incl_compile_s': t['first_step_s']}
        rows.append(torch_row)
    for r in rows:
        r['ratio'] = r['train_images_per_s'] / base
        if torch_row is not None:
            r['vs_pytorch'] = r['train_images_per_s'] / torch_row['train_images_per_s']
            r['eval_vs_pytorch'] = r['eval_images_per_s'] / torch_row['eval_images_per_s']
    return {'machine': machine(), 'backend': jax.default_backend(), 'image_size': image_size,
            'batch_size': batch_size, 'steps': steps, 'repeats': repeats,
            'num_classes': num_classes, **{k: list(v) for k, v in arch.items()},
            'rows': rows, 'notes': notes}


def synthetic_cars_arrays(num_images: int, num_classes: int, cache_size: int, eval_images: int,
                          eval_size: int, seed: int = 0) -> dict:
    """A Stanford-Cars-shaped dataset in memory: smooth random uint8 images (N, C, C, 3) (the
    decode-once cache), original sizes like the photos' (h 240..960, w 1.2..1.8 h), labels with
    the train split's imbalance (per-class weights ~ U[24, 68]), and an eval set (M, S, S, 3).
    Content is irrelevant to speed; shapes, dtypes and the sampler's weights are what count."""
    import numpy as np
    rng = np.random.default_rng(seed)

    def smooth(n: int, side: int) -> np.ndarray:
        g = 8
        pos = np.clip((np.arange(side) + 0.5) * g / side - 0.5, 0, g - 1)
        lo = np.minimum(np.floor(pos).astype(int), g - 2)
        w = (pos - lo).astype(np.float32)
        a = np.zeros((side, g), np.float32)
        a[np.arange(side), lo] = 1 - w
        a[np.arange(side), lo + 1] = w
        out = np.empty((n, side, side, 3), np.uint8)
        for s in range(0, n, 256):
            low = rng.uniform(0, 255, (min(256, n - s), 3, g, g)).astype(np.float32)
            img = a @ low @ a.T                                  # (n, 3, side, side)
            out[s:s + len(low)] = np.clip(img, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
        return out

    p = rng.uniform(24, 68, num_classes)
    labels = rng.choice(num_classes, num_images, p=p / p.sum()).astype(np.int32)
    h = rng.integers(240, 961, num_images)
    orig_hw = np.stack([h, np.round(h * rng.uniform(1.2, 1.8, num_images))], 1).astype(np.int32)
    return {'images': smooth(num_images, cache_size), 'orig_hw': orig_hw, 'labels': labels,
            'eval_images': smooth(eval_images, eval_size),
            'eval_labels': rng.integers(0, num_classes, eval_images).astype(np.int32)}


def chunk_sizes(steps_per_epoch: int, chunk_steps: int) -> list[int]:
    """One epoch's scan chunk lengths: full chunks of chunk_steps (0: the whole epoch) and at
    most one shorter tail, so at most two compiles."""
    k = min(chunk_steps, steps_per_epoch) if chunk_steps > 0 else steps_per_epoch
    return [k] * (steps_per_epoch // k) + ([steps_per_epoch % k] if steps_per_epoch % k else [])


def run_fused(num_images: int = 8144, num_classes: int = 196, cache_size: int = 0,
              image_size: int = 224, epochs: int = 70, batch_size: int = 32,
              chunk_steps: int = 0, run_epochs: int = 0, eval_images: int = 8041, *,
              widths: Sequence[int] = SEED_WIDTHS, stage_sizes: Sequence[int] = SEED_STAGES,
              seed: int = 0) -> dict:
    """The seed's recipe through `benchmarks/fused.py` on the default device: data resident, each
    epoch = scan chunks of `chunk_steps` train steps (+ one shorter tail), then an on-device
    eval of the eval set, as the recipe validates every epoch. Runs `run_epochs` (0: all) and
    projects `epochs` from the steady rate: compile + epochs x (train epoch + eval)."""
    import jax
    import numpy as np

    from cars_jax.data.augment import AugmentConfig
    from cars_jax.data.cache import cache_size_for
    from benchmarks.fused import device_dataset, make_fused_steps
    from cars_jax.data.pipeline import steps_per_epoch as spe_of
    from cars_jax.steps import create_train_state

    size = cache_size_for(image_size, cache_size)
    spe = spe_of(num_images, batch_size, drop_last=True)   # the fused scan: full batches only
    if spe < 1:
        raise ValueError(f'{num_images} images cannot fill one batch of {batch_size}')
    chunks = chunk_sizes(spe, chunk_steps)
    k = chunks[0]
    n_run = min(run_epochs, epochs) if run_epochs > 0 else epochs

    t = time.perf_counter()
    host = synthetic_cars_arrays(num_images, num_classes, size, eval_images, image_size, seed)
    gen_s = time.perf_counter() - t
    t = time.perf_counter()
    data = device_dataset(host['images'], host['orig_hw'], host['labels'])
    eval_x, eval_y = jax.device_put(host['eval_images']), jax.device_put(host['eval_labels'])
    jax.block_until_ready((data, eval_x, eval_y))
    put_s = time.perf_counter() - t

    config = seed_config(image_size=image_size, batch_size=batch_size, num_epochs=epochs,
                         cache_size=size, widths=tuple(widths), stage_sizes=tuple(stage_sizes),
                         num_classes=num_classes)
    aug = AugmentConfig.from_config(config)
    fns = make_fused_steps(config, aug, num_classes)
    key = jax.random.PRNGKey(seed)
    state = create_train_state(config, key, num_classes, spe)

    # compile ahead of time, once per distinct chunk length, and the eval
    t = time.perf_counter()
    idx0 = fns.epoch_indices(jax.random.fold_in(key, 1), data.labels, spe)
    compiled = {n: fns.train_chunk.lower(state, data, idx0[:n], key).compile()
                for n in sorted(set(chunks))}
    train_compile_s = time.perf_counter() - t
    t = time.perf_counter()
    eval_c = fns.evaluate.lower(state, eval_x, eval_y).compile()
    eval_compile_s = time.perf_counter() - t

    chunk_log, eval_times, finite = [], [], True
    t_run = time.perf_counter()
    for e in range(n_run):
        idx = fns.epoch_indices(jax.random.fold_in(key, 1 + e), data.labels, spe)
        start = 0
        for n in chunks:
            t = time.perf_counter()
            state, m = compiled[n](state, data, idx[start:start + n],
                                   jax.random.fold_in(key, 10_000 * (e + 1) + start))
            finite &= bool(np.asarray(m['finite']).min() > 0)   # per chunk, as a real run
            chunk_log.append((n * batch_size, time.perf_counter() - t))
            start += n
        t = time.perf_counter()
        jax.block_until_ready(eval_c(state, eval_x, eval_y))
        eval_times.append(time.perf_counter() - t)
    run_s = time.perf_counter() - t_run

    steady = chunk_log[1:] if len(chunk_log) > 1 else chunk_log   # the first chunk warms up
    steady_ips = sum(i for i, _ in steady) / sum(s for _, s in steady)
    eval_s = statistics.median(eval_times)
    compile_s = train_compile_s + eval_compile_s
    epoch_s = spe * batch_size / steady_ips + eval_s
    results = {
        'machine': machine(), 'backend': jax.default_backend(),
        'device': str(jax.devices()[0]), 'num_images': num_images, 'num_classes': num_classes,
        'image_size': image_size, 'cache_size': size, 'eval_images': eval_images,
        'batch_size': batch_size, 'widths': list(widths), 'stage_sizes': list(stage_sizes),
        'epochs': epochs, 'epochs_run': n_run, 'steps_per_epoch': spe, 'chunk_steps': k,
        'chunks_per_epoch': len(chunks), 'data_generation_s': gen_s, 'data_to_device_s': put_s,
        'resident_bytes': int(host['images'].nbytes + host['eval_images'].nbytes),
        'train_compile_s': train_compile_s, 'eval_compile_s': eval_compile_s,
        'steady_train_images_per_s': steady_ips,
        'chunk_images_per_s_median': statistics.median(i / s for i, s in chunk_log),
        'eval_images_per_s': eval_images / eval_s, 'eval_s_per_epoch': eval_s,
        'projected_epoch_s': epoch_s,
        'projected_wall_s': compile_s + epochs * epoch_s,
        'measured_run_s': run_s,
        'measured_wall_s': compile_s + run_s if n_run == epochs else None,
        'all_steps_finite': finite,
    }
    return results


def run_cpu(sizes: Sequence[int], settings: Sequence[str], batch_size: int, steps: int,
            repeats: int, *, widths: Sequence[int] = SEED_WIDTHS,
            stage_sizes: Sequence[int] = SEED_STAGES, num_classes: int = 196,
            use_torch: bool = True) -> dict:
    """Per size: the seed's PyTorch step (when torch imports), then every setting in a fresh
    process (cpu_settings.run_child); the numerics check against the first setting."""
    from benchmarks import cpu_settings
    unknown = [s for s in settings if s not in cpu_settings.SETTINGS]
    if unknown:
        raise ValueError(f'unknown --settings {unknown}; choose from '
                         f'{", ".join(cpu_settings.SETTINGS)}')
    torch = seed_torch.import_torch() if use_torch else None
    arch = dict(widths=tuple(widths), stage_sizes=tuple(stage_sizes))
    out = {'machine': machine(), 'batch_size': batch_size, 'steps': steps, 'repeats': repeats,
           'num_classes': num_classes, **{k: list(v) for k, v in arch.items()},
           'settings': {n: {'xla_flags': cpu_settings.SETTINGS[n][0],
                            'config': cpu_settings.SETTINGS[n][1]} for n in settings},
           'loss_atol': cpu_settings.LOSS_ATOL, 'sizes': {}}
    for size in sizes:
        rows = {}
        if torch is not None:
            t = seed_torch.torch_step_rates(torch, size, batch_size, steps, repeats,
                                             num_classes=num_classes, **arch)
            rows['pytorch'] = {'framework': seed_torch.torch_version(torch), **t}
        for name in settings:
            rows[name] = cpu_settings.run_child(name, size, batch_size, steps, repeats,
                                                widths, stage_sizes, num_classes)
        _compare(rows, settings)
        out['sizes'][str(size)] = rows
    return out


def _compare(rows: dict, settings: Sequence[str]) -> None:
    """Adds vs_pytorch / eval_vs_pytorch and the loss and augmentation deviations from the
    first setting (the augmented images themselves are dropped: 3,072 numbers per row)."""
    torch = rows.get('pytorch')
    base = rows[settings[0]].get('check_losses')
    base_augment = rows[settings[0]].get('check_augment')
    for name in settings:
        r = rows[name]
        augment = r.pop('check_augment', None)
        if 'error' in r:
            continue
        if torch is not None:
            r['vs_pytorch'] = r['train_images_per_s'] / torch['train_images_per_s']
            r['eval_vs_pytorch'] = r['eval_images_per_s'] / torch['eval_images_per_s']
        if base is not None:
            r['max_loss_diff'] = max(abs(a - b) for a, b in zip(r['check_losses'], base))
        if base_augment is not None and augment is not None:
            r['max_augment_diff'] = max(abs(a - b) for a, b in zip(augment, base_augment))


def print_cpu_table(results: dict) -> None:
    from benchmarks.cpu_settings import AUGMENT_ATOL, LOSS_ATOL
    print(f'XLA:CPU settings on {results["machine"]}: seed ResNet {results["stage_sizes"]} x '
          f'{results["widths"]}, batch {results["batch_size"]}, median [min-max] of '
          f'{results["repeats"]} x {results["steps"]} steps')
    for size, rows in results['sizes'].items():
        print(f'--- {size} px')
        print(f'{"setting":18s} {"train img/s":>22s} {"vs PyTorch":>10s} {"eval img/s":>24s} '
              f'{"vs PyTorch":>10s} {"compile s":>9s}  numerics vs the first setting (20 '
              'steps; device augmentation)')
        for name, r in rows.items():
            if 'error' in r:
                print(f'{name:18s} failed: {r["error"][:150]}')
                continue
            tr, ev = r['train_range'], r['eval_range']
            same = r.get('max_loss_diff')
            verdict = ('' if same is None else
                       f'max |loss diff| {same:.1e} '
                       + ('(same)' if same <= LOSS_ATOL else '(differs)'))
            aug = r.get('max_augment_diff')
            if aug is not None:
                verdict += (f'; augmentation {aug:.1e} '
                            + ('(same)' if aug <= AUGMENT_ATOL else '(differs)'))
            print(f'{name:18s} {r["train_images_per_s"]:7.1f} [{tr[0]:.1f}-{tr[1]:.1f}]'
                  f'{r.get("vs_pytorch", 1.0) if name != "pytorch" else 1.0:10.2f}x'
                  f' {r["eval_images_per_s"]:8.1f} [{ev[0]:.1f}-{ev[1]:.1f}]'
                  f'{r.get("eval_vs_pytorch", 1.0) if name != "pytorch" else 1.0:10.2f}x'
                  f' {r.get("first_step_incl_compile_s", r.get("first_step_s", 0.0)):9.1f}'
                  f'  {verdict}')


CONV_PASSES = ('forward', 'input_grad', 'weight_grad')


def run_convs(image_size: int, batch_size: int, repeats: int, use_torch: bool = True) -> dict:
    """`convs`: each seed conv's three passes as `lax.conv` and as the matmul form and, when
    torch imports, the same passes in PyTorch (oneDNN) in the same run."""
    from benchmarks.cpu_settings import conv_pass_times, seed_conv_layers
    out = {'machine': machine(), 'image_size': image_size, 'batch_size': batch_size,
           'repeats': repeats, 'xla_flags': os.environ.get('XLA_FLAGS', ''),
           'rows': conv_pass_times(image_size, batch_size, repeats)}
    torch = seed_torch.import_torch() if use_torch else None
    if torch is not None:
        out['torch_version'] = seed_torch.torch_version(torch)
        theirs = seed_torch.torch_conv_pass_times(torch, seed_conv_layers(image_size),
                                                  batch_size, repeats)
        for row, t in zip(out['rows'], theirs):
            row.update(t)
    return out


def conv_pass_totals(rows: list[dict], form: str) -> dict[str, float]:
    """ms per pass summed over the net's convs (each layer x its count; the 1x1 shortcuts
    left out); the stem's input gradient is left out too (training never computes it).
    form 'auto': each layer in the form `conv_impl=auto` takes for its output map."""
    from cars_jax.model import resolve_conv_impl

    def ms(r: dict, p: str) -> float:
        f = resolve_conv_impl('auto', r['output'], r['output']) if form == 'auto' else form
        return r[f'{f}_{p}_ms']
    return {p: sum(r['count'] * ms(r, p) for r in rows
                   if not (p == 'input_grad' and r['layer'].startswith('stem')))
            for p in CONV_PASSES}


def print_convs_table(results: dict) -> None:
    print(f'Seed convolutions on {results["machine"]}, {results["image_size"]} px, batch '
          f'{results["batch_size"]}, best of {results["repeats"]}, XLA_FLAGS='
          f'{results["xla_flags"] or "(none)"}: ms (GFLOP/s)')
    forms = ('xla', 'matmul') + (('torch',) if 'torch_forward_ms' in results['rows'][0] else ())
    print(f'{"layer":15s} {"map":>9s} {"GFLOP":>6s} '
          + ' '.join(f'{f + " " + p:>22s}' for f in forms for p in CONV_PASSES))
    for r in results['rows']:
        cells = []
        for form in forms:
            for p in CONV_PASSES:
                ms = r[f'{form}_{p}_ms']
                cells.append(f'{ms:11.1f} ({r["gflop"] / ms * 1e3:6.0f})')
        print(f'{r["layer"]:15s} {r["input"]:4d}->{r["output"]:<4d} {r["gflop"]:6.2f} '
              + ' '.join(f'{c:>22s}' for c in cells))
    for form in ('auto',) + forms:
        totals = conv_pass_totals(results['rows'], form)
        print(f'{form:>6s}: the net\'s convs (x count) ' + ', '.join(
            f'{p} {ms:.1f} ms' for p, ms in totals.items()))


def run_parts(image_size: int, batch_size: int, repeats: int, *, num_classes: int = 196,
              use_torch: bool = True, widths=SEED_WIDTHS, stage_sizes=SEED_STAGES) -> dict:
    """`parts`: cars_jax's jitted train step in parts and, when torch imports, the seed's
    eager PyTorch step in the same parts, in one process, one after the other."""
    from benchmarks.cpu_settings import step_part_times
    out = {'machine': machine(), 'image_size': image_size, 'batch_size': batch_size,
           'repeats': repeats, 'xla_flags': os.environ.get('XLA_FLAGS', ''),
           'jax': step_part_times(image_size, batch_size, repeats, num_classes,
                                  stage_sizes, widths)}
    torch = seed_torch.import_torch() if use_torch else None
    if torch is not None:
        out['torch_version'] = seed_torch.torch_version(torch)
        out['pytorch'] = seed_torch.torch_step_parts(torch, image_size, batch_size, repeats,
                                                     num_classes=num_classes,
                                                     stage_sizes=stage_sizes, widths=widths)
    return out


def print_parts_table(r: dict) -> None:
    print(f'The seed\'s train step in parts on {r["machine"]}, {r["image_size"]} px, batch '
          f'{r["batch_size"]}, median of {r["repeats"]} (ms)')
    has_torch = 'pytorch' in r
    print(f'{"part":22s} {"cars_jax":>9s}' + (f' {"PyTorch":>9s} {"jax/torch":>9s}' if has_torch
                                              else ''))
    for part, ms in r['jax'].items():
        line = f'{part:22s} {ms:9.1f}'
        if has_torch:
            theirs = r['pytorch'][part]
            line += f' {theirs:9.1f} {ms / theirs:8.2f}x'
        print(line)


def print_fused_table(r: dict) -> None:
    print(f'Fused benchmark on {r["machine"]} ({r["backend"]}: {r["device"]}): '
          f'{r["num_images"]} train images cached at {r["cache_size"]} px -> {r["image_size"]} px, '
          f'{r["num_classes"]} classes, batch {r["batch_size"]}, widths {r["widths"]}, '
          f'{r["steps_per_epoch"]} steps/epoch in {r["chunks_per_epoch"]} chunk(s) of '
          f'<= {r["chunk_steps"]}, {r["eval_images"]} eval images')
    print(f'  data generation (host)      {r["data_generation_s"]:10.1f} s')
    print(f'  data to device              {r["data_to_device_s"]:10.1f} s '
          f'({r["resident_bytes"] / 2**30:.2f} GiB resident)')
    print(f'  compile: train chunks       {r["train_compile_s"]:10.1f} s')
    print(f'  compile: eval               {r["eval_compile_s"]:10.1f} s')
    print(f'  steady train                {r["steady_train_images_per_s"]:10.1f} images/s')
    print(f'  on-device eval              {r["eval_images_per_s"]:10.1f} images/s')
    print(f'  PROJECTED wall, {r["epochs"]} epochs (compile + epochs x (train + eval), from the '
          f'measured rates): {r["projected_wall_s"]:.1f} s = {r["projected_wall_s"] / 60:.1f} min')
    if r['measured_wall_s'] is not None:
        print(f'  MEASURED wall, all {r["epochs"]} epochs run (compile + run): '
              f'{r["measured_wall_s"]:.1f} s')
    else:
        print(f'  ran {r["epochs_run"]} of {r["epochs"]} epochs in {r["measured_run_s"]:.1f} s '
              '(no measured full wall time)')
    if not r['all_steps_finite']:
        print('  WARNING: some steps were non-finite (skipped by the guard)')


def print_step_table(results: dict) -> None:
    print(f'Train-step benchmark on {results["machine"]} ({results["backend"]}): seed ResNet '
          f'{results["stage_sizes"]} x {results["widths"]}, {results["num_classes"]} classes, '
          f'{results["image_size"]} px, batch {results["batch_size"]}, median [min-max] of '
          f'{results["repeats"]}')
    torch = any('vs_pytorch' in r for r in results['rows'])
    print(f'{"conv_impl":30s} {"train img/s":>24s} {"vs first":>9s}'
          + (f' {"vs PyTorch":>11s}' if torch else '')
          + f' {"eval img/s":>24s}' + (f' {"vs PyTorch":>11s}' if torch else '')
          + f' {"1st step (compile) s":>21s}')

    def rate(r, key):
        lo, hi = r.get(f'{key}_range', (r[f'{key}_images_per_s'],) * 2)
        return f'{r[f"{key}_images_per_s"]:.1f} [{lo:.1f}-{hi:.1f}]'
    for r in results['rows']:
        print(f'{r["conv_impl"]:30s} {rate(r, "train"):>24s} {r["ratio"]:8.2f}x'
              + (f' {r["vs_pytorch"]:10.2f}x' if torch else '')
              + f' {rate(r, "eval"):>24s}'
              + (f' {r["eval_vs_pytorch"]:10.2f}x' if torch else '')
              + f' {r["first_step_incl_compile_s"]:21.1f}')
    for n in results.get('notes', []):
        print('note:', n)


def print_table(results: dict) -> None:
    print(f'Loader benchmark on {results["machine"]}: {results["images_timed"]} images at '
          f'{results["image_size"]} px, median of {results["repeats"]}')
    torch = any('vs_torch' in r for r in results['rows'])
    width = max(len(r['pipeline']) for r in results['rows'])
    print(f'{"pipeline":{width}s} {"images/s":>10s} {"vs baseline":>12s} {"cores":>6s} '
          f'{"img/s/core":>11s}' + (f' {"vs torch":>9s}' if torch else ''))
    for r in results['rows']:
        print(f'{r["pipeline"]:{width}s} {r["images_per_s"]:10.1f} {r["ratio"]:11.2f}x '
              f'{r["cores"]:6d} {r["images_per_s_per_core"]:11.1f}'
              + (f' {r["vs_torch"]:8.2f}x' if torch else ''))
    if 'cache_build_s' in results:
        print(f'decode-once cache build (not in the rows): {results["cache_build_s"]:.1f} s '
              f'({results["cache_build_images_per_s"]:.0f} images/s, {results["cache_size"]} px); '
              f'device augmentation compile {results["device_augment"]["compile_s"]:.1f} s')
    if torch:
        print(f'vs torch: against "{results["torch_baseline"]}"')
    for n in results.get('notes', []):
        print('note:', n)


def run_profile(image_size: int, batch_size: int, steps: int, *, num_classes: int = 196,
                use_torch: bool = True, widths=SEED_WIDTHS, stage_sizes=SEED_STAGES) -> dict:
    """`profile`: the seed's forward + backward op by op, cars_jax (XLA thunks) and, when torch
    imports, PyTorch (aten ops) in the same process, grouped into the same categories."""
    from benchmarks import op_profile as profile
    arch = dict(num_classes=num_classes, stage_sizes=stage_sizes, widths=widths)
    out = {'machine': machine(), 'image_size': image_size, 'batch_size': batch_size,
           'steps': steps, 'xla_flags': os.environ.get('XLA_FLAGS', ''),
           'jax': profile.jax_forward_backward_profile(image_size, batch_size, steps, **arch)}
    torch = seed_torch.import_torch() if use_torch else None
    if torch is not None:
        out['torch_version'] = seed_torch.torch_version(torch)
        out['pytorch'] = profile.torch_forward_backward_profile(torch, image_size, batch_size,
                                                                steps, **arch)
    out['max_pool_ms'] = profile.max_pool_grad_ms(image_size, batch_size, max(steps, 5), torch)
    return out


def print_profile_table(r: dict) -> None:
    from benchmarks.op_profile import CATEGORIES
    j, t = r['jax'], r.get('pytorch')
    print(f'The seed\'s forward + backward by op category on {r["machine"]}, {r["image_size"]} '
          f'px, batch {r["batch_size"]}, ms per call over {r["steps"]} profiled calls '
          '(cars_jax: XLA thunk thread-ms; PyTorch: aten self CPU ms)')
    print(f'{"category":34s} {"cars_jax":>9s} {"share":>6s}'
          + (f' {"PyTorch":>9s} {"share":>6s}' if t else ''))
    for c in CATEGORIES + ('total',):
        mine = j['total_ms'] if c == 'total' else j['category_ms'][c]
        line = f'{c:34s} {mine:9.1f} {100 * mine / j["total_ms"]:5.0f}%'
        if t:
            theirs = t['total_ms'] if c == 'total' else t['category_ms'][c]
            line += f' {theirs:9.1f} {100 * theirs / t["total_ms"]:5.0f}%'
        print(line)
    print('cars_jax by backend: ' + ', '.join(f'{b} {ms:.1f} ms'
                                              for b, ms in sorted(j['backend_ms'].items())))
    print('cars_jax top thunks:')
    for e in j['top']:
        print(f'  {e["ms"]:7.2f} ms  {e["thunk"]:32s} {e["category"]:34s} {e["op_name"][-60:]}')
    if t:
        print('PyTorch top ops:')
        for e in t['top']:
            print(f'  {e["ms"]:7.2f} ms  {e["op"]:48s} {e["category"]}')
    print('The stem\'s max-pool alone, forward + backward (median ms): ' + ', '.join(
        f'{k} {ms:.1f}' for k, ms in r['max_pool_ms'].items()))


MODES = ('loader', 'step', 'fused', 'cpu', 'convs', 'parts', 'profile', 'resume', 'suite')


def main(argv) -> None:
    if len(argv) < 2 or argv[1] not in MODES:
        raise app.UsageError('usage: python benchmarks/bench.py loader|step|fused|cpu|convs|'
                             'parts|profile|resume|suite [--flags]')
    arch = dict(widths=_ints(FLAGS.widths, SEED_WIDTHS),
                stage_sizes=_ints(FLAGS.stage_sizes, SEED_STAGES))
    if argv[1] not in ('cpu', 'suite'):   # main.py's XLA:CPU defaults (cpu and suite: per child)
        from cars_jax.runtime import apply_cpu_xla_flags
        apply_cpu_xla_flags()
    if argv[1] == 'loader':
        results = run_loader(FLAGS.data_dir, FLAGS.image_size, FLAGS.batch_size, FLAGS.batches,
                             FLAGS.repeats, _ints(FLAGS.workers, ()),
                             torch_workers=_ints(FLAGS.torch_workers, ()),
                             cache_size=FLAGS.cache_size, use_torch=FLAGS.torch)
        print_table(results)
    elif argv[1] == 'step':
        results = run_step(FLAGS.image_size, FLAGS.batch_size, FLAGS.steps, FLAGS.repeats,
                           FLAGS.conv_impls.split(','), num_classes=FLAGS.num_classes,
                           use_torch=FLAGS.torch, **arch)
        print_step_table(results)
    elif argv[1] == 'convs':
        results = run_convs(FLAGS.image_size, FLAGS.batch_size, FLAGS.repeats, FLAGS.torch)
        print_convs_table(results)
    elif argv[1] == 'parts':
        results = run_parts(FLAGS.image_size, FLAGS.batch_size, FLAGS.repeats,
                            num_classes=FLAGS.num_classes, use_torch=FLAGS.torch, **arch)
        print_parts_table(results)
    elif argv[1] == 'profile':
        results = run_profile(FLAGS.image_size, FLAGS.batch_size, FLAGS.steps,
                              num_classes=FLAGS.num_classes, use_torch=FLAGS.torch, **arch)
        print_profile_table(results)
    elif argv[1] == 'resume':
        from benchmarks.resume import print_resume_table, run_resume
        results = run_resume(FLAGS.steps)
        print_resume_table(results)
    elif argv[1] == 'suite':      # pytest in a child, which sets its own XLA:CPU defaults
        import shlex

        from benchmarks.suite import print_suite_table, run_suite
        results = run_suite(shlex.split(FLAGS.pytest_args))
        print_suite_table(results)
    elif argv[1] == 'cpu':
        from benchmarks.cpu_settings import SETTINGS
        results = run_cpu(_ints(FLAGS.sizes, ()), FLAGS.settings.split(',') if FLAGS.settings
                          else list(SETTINGS), FLAGS.batch_size, FLAGS.steps, FLAGS.repeats,
                          num_classes=FLAGS.num_classes, use_torch=FLAGS.torch, **arch)
        print_cpu_table(results)
    else:
        results = run_fused(FLAGS.num_images, FLAGS.num_classes, FLAGS.cache_size,
                            FLAGS.image_size, FLAGS.epochs, FLAGS.batch_size, FLAGS.chunk_steps,
                            FLAGS.run_epochs, FLAGS.eval_images, **arch)
        print_fused_table(results)
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    with open(FLAGS.out, 'w') as f:
        json.dump(results, f, indent=2)
    print(f'wrote {FLAGS.out}')


if __name__ == '__main__':
    define_flags()
    app.run(main)
