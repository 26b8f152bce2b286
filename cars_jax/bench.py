"""Benchmarks, each figure a median over repeats, with the machine named.

  python -m cars_jax.bench loader [--data_dir=data/demo] [--image_size=224] [--batches=20]
  python -m cars_jax.bench step [--image_size=64] [--batch_size=32] [--conv_impls=xla,auto]

`loader`: images/s of the train pipeline (decode + the seed's augmentation + batching) with
grain `num_workers` 0, 1 and 2, against a plain single-threaded Python loop over the same
records measured in the same run (the ratio column).
`step`: images/s of the jitted train / eval step of the seed's network per conv
implementation (the first one is the baseline of the ratio column). Each writes a JSON.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string('data_dir', 'data/demo', 'Image-folder data (generated demo data if absent).')
flags.DEFINE_integer('image_size', 224, 'Output size of the train transform.')
flags.DEFINE_integer('batch_size', 32, 'Batch size.')
flags.DEFINE_integer('batches', 20, 'Batches timed per repeat (from iterator creation).')
flags.DEFINE_integer('repeats', 3, 'Repeats; the median is reported.')
flags.DEFINE_string('workers', '0,1,2', 'Comma-separated num_workers values.')
flags.DEFINE_string('out', 'runs/bench.json', 'Where to write the JSON results.')
flags.DEFINE_integer('steps', 5, 'step: timed steps per repeat (after one compile step).')
flags.DEFINE_string('conv_impls', 'xla,auto', 'step: conv implementations to compare.')


def machine() -> str:
    return f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.system()}'


def run_loader(data_dir, image_size, batch_size, batches, repeats, workers) -> dict:
    import numpy as np

    from cars_jax.data import pipeline
    from cars_jax.data.augment import AugmentConfig, train_transform
    from cars_jax.data.sources import decode_image, labels_of, load_image_folders
    from cars_jax.data.synthetic import ensure_demo_dataset

    if not os.path.isdir(os.path.join(data_dir, 'train')):
        ensure_demo_dataset(data_dir)
    records = load_image_folders(data_dir).train
    labels = labels_of(records)
    aug = AugmentConfig(image_size=image_size)   # the seed's augmentation at this size
    n_images = batches * batch_size

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

    results = {'machine': machine(), 'data_dir': data_dir, 'image_size': image_size,
               'batch_size': batch_size, 'images_timed': n_images, 'repeats': repeats, 'rows': []}
    base = statistics.median(plain_loop() for _ in range(repeats))
    results['rows'].append({'pipeline': 'plain Python loop, 1 thread (baseline)',
                            'images_per_s': base, 'ratio': 1.0})
    for w in workers:
        ips = statistics.median(grain_loader(w, r) for r in range(repeats))
        name = f'grain, num_workers={w}' + (' (in-process threads)' if w == 0 else ' (processes)')
        results['rows'].append({'pipeline': name, 'images_per_s': ips, 'ratio': ips / base})
    return results


def seed_config(**overrides):
    """configs/base.py of this checkout (the seed's recipe) with fields overridden."""
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs',
                        'base.py')
    spec = importlib.util.spec_from_file_location('cars_jax_configs_base', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.update(overrides)
    return config


def run_step(image_size: int, batch_size: int, steps: int, repeats: int,
             impls: list[str]) -> dict:
    """Images/s of the jitted train step and eval step of the seed's network (ResNet-18,
    196 classes, AdamW + one-cycle, MixUp, LS-CE) per conv implementation; compile separate."""
    import jax
    import numpy as np

    from cars_jax.steps import create_train_state, make_steps
    rows = []
    rng = np.random.default_rng(0)
    batch = {'image': rng.normal(size=(batch_size, image_size, image_size, 3)).astype(np.float32),
             'label': rng.integers(0, 196, batch_size).astype(np.int32)}
    for impl in impls:
        c = seed_config(image_size=image_size, batch_size=batch_size, conv_impl=impl)
        state = create_train_state(c, jax.random.PRNGKey(0), 196, 100)
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
        t = time.perf_counter()
        for _ in range(steps):
            out = evaluate(state, eb)
        jax.block_until_ready(out)
        rows.append({'conv_impl': impl, 'train_images_per_s': statistics.median(rates),
                     'eval_images_per_s': steps * batch_size / (time.perf_counter() - t),
                     'first_step_incl_compile_s': compile_s})
    base = rows[0]['train_images_per_s']
    for r in rows:
        r['ratio'] = r['train_images_per_s'] / base
    return {'machine': machine(), 'backend': jax.default_backend(), 'image_size': image_size,
            'batch_size': batch_size, 'steps': steps, 'repeats': repeats, 'rows': rows}


def print_step_table(results: dict) -> None:
    print(f'Train-step benchmark on {results["machine"]} ({results["backend"]}): seed ResNet-18, '
          f'{results["image_size"]} px, batch {results["batch_size"]}, median of {results["repeats"]}')
    print(f'{"conv_impl":10s} {"train img/s":>12s} {"vs first":>9s} {"eval img/s":>11s} '
          f'{"1st step (compile) s":>21s}')
    for r in results['rows']:
        print(f'{r["conv_impl"]:10s} {r["train_images_per_s"]:12.1f} {r["ratio"]:8.2f}x '
              f'{r["eval_images_per_s"]:11.1f} {r["first_step_incl_compile_s"]:21.1f}')


def print_table(results: dict) -> None:
    print(f'Loader benchmark on {results["machine"]}: {results["images_timed"]} images at '
          f'{results["image_size"]} px, median of {results["repeats"]}')
    print(f'{"pipeline":48s} {"images/s":>10s} {"vs baseline":>12s}')
    for r in results['rows']:
        print(f'{r["pipeline"]:48s} {r["images_per_s"]:10.1f} {r["ratio"]:11.2f}x')


def main(argv) -> None:
    if len(argv) < 2 or argv[1] not in ('loader', 'step'):
        raise app.UsageError('usage: python -m cars_jax.bench loader|step [--flags]')
    if argv[1] == 'loader':
        results = run_loader(FLAGS.data_dir, FLAGS.image_size, FLAGS.batch_size, FLAGS.batches,
                             FLAGS.repeats, [int(w) for w in FLAGS.workers.split(',')])
        print_table(results)
    else:
        results = run_step(FLAGS.image_size, FLAGS.batch_size, FLAGS.steps, FLAGS.repeats,
                           FLAGS.conv_impls.split(','))
        print_step_table(results)
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    with open(FLAGS.out, 'w') as f:
        json.dump(results, f, indent=2)
    print(f'wrote {FLAGS.out}')


if __name__ == '__main__':
    app.run(main)
