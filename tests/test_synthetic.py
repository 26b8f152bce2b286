"""Tests of the generated fine-grained demo data set (cars_jax/data/synthetic.py)."""
import json
import os
import pathlib
import re

import numpy as np
import pytest
from PIL import Image

from cars_jax.data import synthetic

# Small settings: 6 classes, 12..36 train images per class (3:1), 15 test images per class.
KW = dict(num_classes=6, train_per_class=(12, 36), test_per_class=15, seed=3)


def _files(root: pathlib.Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob('*')) if p.is_file()}


@pytest.fixture(scope='module')
def demo(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp('demo') / 'cars'
    out = synthetic.generate_demo_dataset(root, num_workers=2, **KW)
    assert out == root
    return root


def _class_dirs(root, split):
    return sorted(p.name for p in (root / split).iterdir() if p.is_dir())


def test_layout_and_counts(demo):
    names = [c.name for c in synthetic.demo_classes(KW['num_classes'])]
    assert {p.name for p in demo.iterdir()} == {
        'train', 'test', 'regions.json', 'classes.json', 'README.txt', '.complete'}
    for split in ('train', 'test'):
        assert _class_dirs(demo, split) == sorted(names)
        for name in names:
            files = sorted(os.listdir(demo / split / name))
            assert files == [f'{i:05d}.jpg' for i in range(len(files))]
    test_counts = [len(os.listdir(demo / 'test' / n)) for n in names]
    assert test_counts == [KW['test_per_class']] * KW['num_classes']
    train_counts = [len(os.listdir(demo / 'train' / n)) for n in names]
    assert train_counts == synthetic.train_counts(KW['num_classes'], KW['train_per_class'],
                                                  KW['seed'])
    readme = (demo / 'README.txt').read_text()
    assert 'regions.json' in readme and all(n in readme for n in names)
    assert json.loads((demo / '.complete').read_text())['num_classes'] == KW['num_classes']
    table = json.loads((demo / 'classes.json').read_text())
    assert [t['name'] for t in table] == names
    assert [t['train_images'] for t in table] == train_counts


def test_train_counts_imbalanced_test_balanced(demo):
    counts = np.array([len(os.listdir(demo / 'train' / n)) for n in _class_dirs(demo, 'train')])
    lo, hi = KW['train_per_class']
    assert counts.min() == lo and counts.max() == hi  # 3:1
    assert len(set(counts.tolist())) == len(counts)   # spread, not two-valued
    # default settings: 20 classes, 40..120, ~1600 images, order depends on the seed only
    c0 = synthetic.train_counts(20, (40, 120), 0)
    assert min(c0) == 40 and max(c0) == 120 and sum(c0) == 1600
    assert c0 == synthetic.train_counts(20, (40, 120), 0)
    assert c0 != synthetic.train_counts(20, (40, 120), 1)
    assert sorted(c0) == sorted(synthetic.train_counts(20, (40, 120), 1))


def test_images_decode_rgb_of_requested_size(demo):
    for p in list((demo / 'train').rglob('*.jpg'))[:40] + list((demo / 'test').rglob('*.jpg')):
        with Image.open(p) as im:
            assert im.format == 'JPEG' and im.mode == 'RGB' and im.size == (96, 72)


def test_regions_cover_every_image_in_bounds(demo):
    regions = json.loads((demo / 'regions.json').read_text())
    images = {p.relative_to(demo).as_posix() for p in demo.rglob('*.jpg')}
    assert set(regions) == images
    shares = []
    for rel, box in regions.items():
        assert len(box) == 4 and all(isinstance(v, int) for v in box), (rel, box)
        x1, y1, x2, y2 = box
        assert 0 <= x1 < x2 <= 96 and 0 <= y1 < y2 <= 72, (rel, box)
        shares.append((x2 - x1) * (y2 - y1) / (96 * 72))
    assert 0.10 <= min(shares) and max(shares) <= 0.25, (min(shares), max(shares))
    # the box follows the car's facing: both halves of the image are used
    centres = np.array([(b[0] + b[2]) / 2 for b in regions.values()])
    assert (centres < 48).mean() > 0.2 and (centres > 48).mean() > 0.2


def test_other_image_size(tmp_path):
    root = synthetic.generate_demo_dataset(tmp_path, num_classes=2, train_per_class=(2, 3),
                                           test_per_class=1, image_size=(128, 96), num_workers=1)
    regions = json.loads((root / 'regions.json').read_text())
    assert len(regions) == 2 + 3 + 2
    for rel, (x1, y1, x2, y2) in regions.items():
        with Image.open(root / rel) as im:
            assert im.size == (128, 96) and im.mode == 'RGB'
        assert 0 <= x1 < x2 <= 128 and 0 <= y1 < y2 <= 96
        assert 0.10 <= (x2 - x1) * (y2 - y1) / (128 * 96) <= 0.25


def test_deterministic_and_independent_of_workers(demo, tmp_path, monkeypatch):
    reference = _files(demo)
    # workers in fresh interpreters, as when JAX already runs in this process (no fork)
    monkeypatch.setattr(synthetic, '_jax_backends_running', lambda: True)
    assert synthetic._start_method_context().get_start_method() != 'fork'
    again = synthetic.generate_demo_dataset(tmp_path / 'again', num_workers=2, **KW)
    assert _files(again) == reference
    monkeypatch.undo()
    serial = synthetic.generate_demo_dataset(tmp_path / 'serial', num_workers=1, **KW)
    assert _files(serial) == reference
    other = synthetic.generate_demo_dataset(tmp_path / 'other', num_workers=1,
                                            **dict(KW, seed=KW['seed'] + 1))
    other_files = _files(other)
    assert other_files.keys() != reference.keys() or other_files != reference
    common = [k for k in reference if k.endswith('.jpg') and k in other_files]
    assert all(reference[k] != other_files[k] for k in common)


def test_ensure_regenerates_partial_tree_and_skips_complete_one(demo, tmp_path, monkeypatch):
    root = tmp_path / 'cars'
    stale = root / 'train' / synthetic.demo_classes(30)[-1].name  # a class of another run
    stale.mkdir(parents=True)
    (stale / '00000.jpg').write_bytes(b'half-written')
    (root / 'regions.json').write_text('{')
    (root / 'keep.txt').write_text('not ours')            # unrelated files are left alone
    assert not synthetic.is_complete(root)
    assert synthetic.ensure_demo_dataset(root, num_workers=1, **KW) == root
    files = _files(root)
    assert files.pop('keep.txt') == b'not ours'
    assert files == _files(demo)

    # complete with the same parameters: nothing is generated again
    def fail(*a, **k):
        raise AssertionError('regenerated a complete tree')
    monkeypatch.setattr(synthetic, 'generate_demo_dataset', fail)
    assert synthetic.ensure_demo_dataset(root, num_workers=2, **KW) == root
    monkeypatch.undo()

    # a tree whose generation was interrupted (no .complete) is regenerated
    (root / '.complete').unlink()
    victim = next((root / 'test').rglob('*.jpg'))
    victim.unlink()
    synthetic.ensure_demo_dataset(root, num_workers=1, **KW)
    assert (root / '.complete').is_file() and victim.is_file()
    files = _files(root)
    files.pop('keep.txt')
    assert files == _files(demo)

    # a complete tree is used as it is, even when other parameters are asked for
    monkeypatch.setattr(synthetic, 'generate_demo_dataset', fail)
    synthetic.ensure_demo_dataset(root, num_workers=1, **dict(KW, num_classes=2))
    monkeypatch.undo()
    assert len(_class_dirs(root, 'train')) == KW['num_classes']


def test_class_names_unique_valid_folder_names():
    classes = synthetic.demo_classes(synthetic.MAX_CLASSES)
    assert synthetic.MAX_CLASSES >= 48
    names = [c.name for c in classes]
    assert len(set(names)) == len(names) == len(
        {(c.grille, c.light_shape, c.light_colour, c.badge) for c in classes})
    for n in names:
        assert re.fullmatch(r'[A-Za-z0-9][A-Za-z0-9 \-]*[A-Za-z0-9]', n), n
        assert '  ' not in n and 'Grille-' in n
    # any prefix of the table uses every grille pattern
    assert {c.grille for c in synthetic.demo_classes(4)} == set(synthetic.GRILLES)
    # the first 24 classes are told apart by grille + headlights alone
    assert len({(c.grille, c.light_shape, c.light_colour)
                for c in synthetic.demo_classes(24)}) == 24
    with pytest.raises(ValueError):
        synthetic.demo_classes(synthetic.MAX_CLASSES + 1)
    with pytest.raises(ValueError):
        synthetic.demo_classes(0)


def _features(root, regions, split, names, where):
    """16x16 crops of the detail box (or a far background corner), mirror-averaged."""
    xs, ys = [], []
    for label, name in enumerate(names):
        for p in sorted((root / split / name).iterdir()):
            rel = p.relative_to(root).as_posix()
            x1, y1, x2, y2 = regions[rel]
            with Image.open(p) as im:
                w, h = im.size
                if where == 'background':  # the top corner on the far side from the front
                    box = (0, 0, w // 4, h // 4) if (x1 + x2) / 2 > w / 2 else (w - w // 4, 0, w, h // 4)
                else:
                    box = (x1, y1, x2, y2)
                a = np.asarray(im.convert('RGB').crop(box).resize((16, 16), Image.BILINEAR),
                               np.float32)
            a = (a + a[:, ::-1]) / 2          # facing left/right must not matter
            a = (a - a.mean()) / (a.std() + 1.0)  # nor global lighting
            xs.append(a.ravel())
            ys.append(label)
    return np.stack(xs), np.array(ys)


def test_classes_differ_only_in_the_detail_region(demo):
    """Nearest class mean: far above chance on the detail box, about chance far from it."""
    regions = json.loads((demo / 'regions.json').read_text())
    names = _class_dirs(demo, 'train')
    chance = 1 / len(names)
    acc = {}
    for where in ('detail', 'background'):
        xtr, ytr = _features(demo, regions, 'train', names, where)
        xte, yte = _features(demo, regions, 'test', names, where)
        means = np.stack([xtr[ytr == c].mean(0) for c in range(len(names))])
        pred = ((xte[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
        acc[where] = float((pred == yte).mean())
    assert acc['detail'] >= 0.75, acc
    assert acc['background'] <= chance + 0.15, acc


def test_never_deletes_a_foreign_tree(tmp_path):
    """A real data set under root (not demo class folders) is refused, not deleted."""
    real = tmp_path / 'train' / 'Audi S4 Sedan 2012' / '00001.jpg'
    real.parent.mkdir(parents=True)
    real.write_bytes(b'precious')
    with pytest.raises(ValueError, match='refusing'):
        synthetic.ensure_demo_dataset(tmp_path, num_classes=2, train_per_class=(1, 1),
                                      test_per_class=1, num_workers=1)
    assert real.read_bytes() == b'precious'
