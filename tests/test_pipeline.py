"""Grain pipeline: the seed's class-weighted sampler, determinism, exact resume, padding."""
import numpy as np
import pytest

from cars_jax.data import pipeline
from cars_jax.data.augment import AugmentConfig
from cars_jax.data.sources import Record
from configs import demo


def _aug(size=16):
    c = demo.get_config()
    c.image_size = size
    return AugmentConfig.from_config(c)


def _records(labels, size=(20, 14)):
    rng = np.random.default_rng(0)
    return [Record(image=rng.integers(0, 256, size + (3,), dtype=np.uint8), label=int(l),
                   key=f'img{i}') for i, l in enumerate(labels)]


def test_class_balanced_probabilities_match_hand_computation():
    p = pipeline.class_balanced_probabilities(np.array([0, 0, 0, 1]))
    # weights 1/3,1/3,1/3,1 -> total 2
    np.testing.assert_allclose(p, [1 / 6, 1 / 6, 1 / 6, 1 / 2])


def test_weighted_sampler_equalises_a_10_to_1_imbalance():
    labels = np.array([0] * 200 + [1] * 20)
    draws = np.concatenate([labels[pipeline.epoch_indices(labels, seed=3, epoch=e)]
                            for e in range(20)])
    assert len(draws) == 20 * 220
    share = np.mean(draws == 1)
    sd = np.sqrt(0.25 / len(draws))
    assert abs(share - 0.5) < 4 * sd
    # without weighting the minority keeps its natural share 1/11
    plain = labels[pipeline.epoch_indices(labels, seed=3, epoch=0, weighted=False)]
    assert np.mean(plain == 1) == pytest.approx(20 / 220)


def test_sampler_is_deterministic_in_seed_and_epoch_and_uses_replacement():
    labels = np.array([0] * 30 + [1] * 3)
    a = pipeline.epoch_indices(labels, seed=1, epoch=4)
    np.testing.assert_array_equal(a, pipeline.epoch_indices(labels, seed=1, epoch=4))
    assert not np.array_equal(a, pipeline.epoch_indices(labels, seed=1, epoch=5))
    assert not np.array_equal(a, pipeline.epoch_indices(labels, seed=2, epoch=4))
    assert len(np.unique(a)) < len(a)  # with replacement: minority items repeat


def test_train_epoch_batches_shapes_and_determinism():
    labels = np.array([0] * 12 + [1] * 4 + [2] * 4)
    recs = _records(labels)
    kw = dict(seed=0, epoch=0, batch_size=4, weighted=True)
    ds = pipeline.train_epoch_dataset(recs, labels, _aug(), **kw)
    batches = list(ds)
    assert len(batches) == 5
    b = batches[0]
    assert b['image'].shape == (4, 16, 16, 3) and b['image'].dtype == np.float32
    assert b['label'].dtype == np.int32
    np.testing.assert_array_equal(b['label'], labels[b['index']])
    again = list(pipeline.train_epoch_dataset(recs, labels, _aug(), **kw))
    for x, y in zip(batches, again):
        np.testing.assert_array_equal(x['image'], y['image'])
    other = list(pipeline.train_epoch_dataset(recs, labels, _aug(), **{**kw, 'epoch': 1}))
    assert not np.array_equal(batches[0]['index'], other[0]['index'])


def test_max_steps_cuts_the_epoch():
    labels = np.arange(20) % 2
    ds = pipeline.train_epoch_dataset(_records(labels), labels, _aug(), seed=0, epoch=0,
                                      batch_size=4, max_steps=2)
    assert len(list(ds)) == 2
    assert pipeline.steps_per_epoch(20, 4, 2) == 2 and pipeline.steps_per_epoch(21, 4, 2) == 2
    # uncut: the 21st image is a batch of its own (the seed's drop_last=False), or dropped
    assert pipeline.steps_per_epoch(21, 4) == 6
    assert pipeline.steps_per_epoch(21, 4, drop_last=True) == 5


@pytest.mark.parametrize('n,batch', [(8144, 32), (10, 4), (21, 4), (20, 4), (3, 8), (1, 1),
                                     (33, 32), (31, 32), (8041, 64)])
@pytest.mark.parametrize('drop_last', [False, True])
def test_steps_per_epoch_is_the_length_of_torchs_dataloader(n, batch, drop_last):
    torch = pytest.importorskip('torch')
    loader = torch.utils.data.DataLoader(range(n), batch_size=batch, drop_last=drop_last)
    assert pipeline.steps_per_epoch(n, batch, drop_last=drop_last) == len(loader)
    by_hand = n // batch if drop_last else (n + batch - 1) // batch
    assert pipeline.steps_per_epoch(n, batch, drop_last=drop_last) == by_hand
    sizes = pipeline.epoch_batch_sizes(n, batch, drop_last=drop_last)
    assert sizes == [len(b) for b in loader]


def test_the_seeds_epoch_is_255_steps_and_drop_last_batch_keeps_the_old_254():
    assert pipeline.steps_per_epoch(8144, 32) == 255                 # ceil(8144 / 32)
    assert pipeline.steps_per_epoch(8144, 32, drop_last=True) == 254
    assert pipeline.epoch_batch_sizes(8144, 32)[-1] == 8144 - 254 * 32 == 16


@pytest.mark.parametrize('n,batch,devices,sizes', [
    (22, 8, 1, [8, 8, 6]),
    (22, 8, 2, [8, 8, 6]),       # 6 rows split 3 + 3
    (22, 8, 4, [8, 8, 4]),       # 6 -> 4: 2 images of the draw unused (< 4 devices)
    (22, 8, 8, [8, 8]),          # 6 -> 0: the partial batch goes
    (8144, 32, 8, [32] * 254 + [16]),
    (8144, 32, 32, [32] * 254),  # 16 rows cannot split over 32 devices
])
def test_the_last_batch_is_cut_to_a_multiple_of_the_devices(n, batch, devices, sizes):
    got = pipeline.epoch_batch_sizes(n, batch, num_devices=devices)
    assert got == sizes
    assert n - sum(got) == (n % batch) % devices
    assert pipeline.steps_per_epoch(n, batch, num_devices=devices) == len(sizes)


def test_an_epoch_of_10_images_with_batch_4_trains_4_4_2_every_drawn_image():
    labels = np.arange(10) % 3
    recs = _records(labels)
    kw = dict(seed=3, epoch=1, batch_size=4, weighted=True)
    batches = list(pipeline.train_epoch_dataset(recs, labels, _aug(), **kw))
    assert [len(b['label']) for b in batches] == [4, 4, 2]
    drawn = pipeline.epoch_indices(labels, seed=3, epoch=1)
    np.testing.assert_array_equal(np.concatenate([b['index'] for b in batches]), drawn)
    assert batches[-1]['image'].shape == (2, 16, 16, 3)
    old = list(pipeline.train_epoch_dataset(recs, labels, _aug(), drop_last=True, **kw))
    assert [len(b['label']) for b in old] == [4, 4]
    cut = list(pipeline.train_epoch_dataset(recs, labels, _aug(), max_steps=2, **kw))
    assert [len(b['label']) for b in cut] == [4, 4]


def test_the_cached_epoch_has_the_same_partial_last_batch():
    labels = np.arange(10) % 3
    images = np.arange(10, dtype=np.uint8)[:, None, None, None] * np.ones((1, 4, 4, 3), np.uint8)
    hw = np.full((10, 2), 4)
    batches = list(pipeline.cached_train_epoch_dataset(images, hw, labels, seed=3, epoch=1,
                                                       batch_size=4))
    assert [len(b['label']) for b in batches] == [4, 4, 2]
    drawn = pipeline.epoch_indices(labels, seed=3, epoch=1)
    np.testing.assert_array_equal(np.concatenate([b['index'] for b in batches]), drawn)
    np.testing.assert_array_equal(batches[-1]['image'][:, 0, 0, 0], drawn[8:])


@pytest.mark.parametrize('n,epoch,rest_sizes', [(24, 2, [4, 4, 4, 4]),
                                                  (10, 0, [2])])   # stopped before the partial batch
def test_iterator_state_resumes_exactly(n, epoch, rest_sizes):
    labels = np.arange(n) % 3
    recs = _records(labels)
    make = lambda: pipeline.train_epoch_dataset(recs, labels, _aug(), seed=5, epoch=epoch,
                                                batch_size=4)
    it = pipeline.iterate(make())
    next(it), next(it)
    state = it.get_state()
    rest, resumed = list(it), list(pipeline.iterate(make(), state))
    assert [len(b['label']) for b in rest] == [len(b['label']) for b in resumed] == rest_sizes
    for x, y in zip(rest, resumed, strict=True):
        np.testing.assert_array_equal(x['image'], y['image'])
        np.testing.assert_array_equal(x['index'], y['index'])


def test_eval_dataset_covers_every_record_once_and_pads():
    labels = np.arange(10) % 3
    batches = [pipeline.pad_batch(b, 4) for b in
               pipeline.eval_dataset(_records(labels), _aug(), batch_size=4)]
    assert [b['mask'].sum() for b in batches] == [4, 4, 2]
    idx = np.concatenate([b['index'][b['mask'] > 0] for b in batches])
    np.testing.assert_array_equal(idx, np.arange(10))
    assert batches[-1]['image'].shape == (4, 16, 16, 3)
    assert np.all(batches[-1]['image'][2:] == 0)


def test_a_record_unreadable_mid_epoch_is_substituted_not_fatal(tmp_path):
    labels = np.array([0, 1, 0, 1])
    recs = _records(labels)
    bad = tmp_path / 'gone.jpg'
    bad.write_bytes(b'not a jpeg')
    recs[1] = Record(image=str(bad), label=1, key='gone.jpg')
    batches = list(pipeline.eval_dataset(recs, _aug(), batch_size=4))
    assert batches[0]['image'].shape[0] == 4
    assert 1 not in batches[0]['index']  # replaced by the next readable record


def test_worker_processes_give_the_same_batches_and_resume():
    labels = np.arange(24) % 3
    recs = _records(labels)
    make = lambda w: pipeline.train_epoch_dataset(recs, labels, _aug(), seed=0, epoch=0,
                                                  batch_size=4, num_workers=w)
    threads = list(make(0))
    it = iter(make(1))
    first = [next(it), next(it)]
    state = it.get_state()
    rest = list(pipeline.iterate(make(1), state))
    assert len(first) + len(rest) == len(threads) == 6
    for x, y in zip(threads, first + rest):
        np.testing.assert_array_equal(x['image'], y['image'])


@pytest.mark.parametrize('processes', [2, 4])
def test_processes_read_their_rows_and_together_make_the_single_process_batches(processes):
    """Multi-host input: process p's batch k is rows [p*b, (p+1)*b) of the global batch k,
    augmentation included (draws depend on the position in the epoch, not on the split)."""
    labels = np.array([0, 1, 2, 3] * 6)
    recs, aug = _records(labels), _aug()
    kw = dict(seed=5, epoch=2, batch_size=8, weighted=True)
    whole = list(pipeline.train_epoch_dataset(recs, labels, aug, **kw))
    parts = [list(pipeline.train_epoch_dataset(recs, labels, aug, shard=(p, processes), **kw))
             for p in range(processes)]
    assert all(len(part) == len(whole) == 3 for part in parts)
    for k, batch in enumerate(whole):
        for key in ('image', 'label', 'index'):
            joined = np.concatenate([part[k][key] for part in parts])
            np.testing.assert_array_equal(joined, batch[key])
    ev = list(pipeline.eval_dataset(recs[:21], aug, batch_size=8))
    ev_parts = [[pipeline.pad_batch(b, 8 // processes) for b in
                 pipeline.eval_dataset(recs[:21], aug, batch_size=8, shard=(p, processes))]
                for p in range(processes)]
    got = np.concatenate([b['index'][b['mask'] > 0] for part in ev_parts for b in part])
    assert sorted(got.tolist()) == list(range(21))              # every record once
    assert sum(float(b['mask'].sum()) for part in ev_parts for b in part) == 21
    assert len({len(part) for part in ev_parts}) == 1            # same number of steps
    assert sum(len(b['label']) for b in ev) == 21


@pytest.mark.parametrize('processes,devices,sizes', [(2, 2, [8, 8, 6]), (2, 4, [8, 8, 4]),
                                                     (4, 4, [8, 8, 4])])
def test_processes_split_the_partial_last_batch_too(processes, devices, sizes):
    """22 images, batch 8: the last 6 are split over the processes when they divide over the
    devices, else cut to the largest multiple of the device count."""
    labels = np.arange(22) % 4
    recs, aug = _records(labels), _aug()
    kw = dict(seed=5, epoch=2, batch_size=8, weighted=True, num_devices=devices)
    whole = list(pipeline.train_epoch_dataset(recs, labels, aug, **kw))
    assert [len(b['label']) for b in whole] == sizes
    parts = [list(pipeline.train_epoch_dataset(recs, labels, aug, shard=(p, processes), **kw))
             for p in range(processes)]
    for k, batch in enumerate(whole):
        assert all(len(part[k]['label']) == sizes[k] // processes for part in parts)
        for key in ('image', 'label', 'index'):
            np.testing.assert_array_equal(np.concatenate([part[k][key] for part in parts]),
                                          batch[key])
    cached = [list(pipeline.cached_train_epoch_dataset(
        np.zeros((22, 2, 2, 3), np.uint8), np.full((22, 2), 2), labels, shard=(p, processes),
        **kw)) for p in range(processes)]
    for k, batch in enumerate(whole):
        np.testing.assert_array_equal(np.concatenate([part[k]['index'] for part in cached]),
                                      batch['index'])
