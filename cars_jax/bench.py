"""Benchmarks, each figure a median over repeats, with the machine named.

  python -m cars_jax.bench loader [--data_dir=data/demo] [--image_size=224] [--batches=20]

`loader`: images/s of the train pipeline (decode + the seed's augmentation + batching) with
grain `num_workers` 0, 1 and 2, against a plain single-threaded Python loop over the same
records measured in the same run (the ratio column). Writes a JSON next to the table.
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
flags.DEFINE_string('out', 'runs/bench_loader.json', 'Where to write the JSON results.')


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


def print_table(results: dict) -> None:
    print(f'Loader benchmark on {results["machine"]}: {results["images_timed"]} images at '
          f'{results["image_size"]} px, median of {results["repeats"]}')
    print(f'{"pipeline":48s} {"images/s":>10s} {"vs baseline":>12s}')
    for r in results['rows']:
        print(f'{r["pipeline"]:48s} {r["images_per_s"]:10.1f} {r["ratio"]:11.2f}x')


def main(argv) -> None:
    if len(argv) < 2 or argv[1] != 'loader':
        raise app.UsageError('usage: python -m cars_jax.bench loader [--flags]')
    results = run_loader(FLAGS.data_dir, FLAGS.image_size, FLAGS.batch_size, FLAGS.batches,
                         FLAGS.repeats, [int(w) for w in FLAGS.workers.split(',')])
    print_table(results)
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    with open(FLAGS.out, 'w') as f:
        json.dump(results, f, indent=2)
    print(f'wrote {FLAGS.out}')


if __name__ == '__main__':
    app.run(main)
