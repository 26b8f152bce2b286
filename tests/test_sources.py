"""Record sources, decoding and the bad-file scan (cars_jax/data/sources.py)."""
import os
import pickle

import numpy as np
import pytest
from PIL import Image

import fixtures
from cars_jax.data import sources
from cars_jax.data.sources import DataError, ImageDecodeError, Record


def _mode(path):
    with Image.open(path) as im:
        return im.mode


# ------------------------------------------------------------------------------------------
# Image folders
# ------------------------------------------------------------------------------------------


def test_folders_class_index_is_sorted_folder_names(tmp_path):
    root = str(tmp_path)
    classes = {'b_car': 2, 'a_car': 1, 'Zeta': 1, 'Ram C-V Van': 3}
    fixtures.make_image_folders(root, classes, classes)
    cls_dir = tmp_path / 'train' / 'a_car'
    fixtures.write_image(str(cls_dir / 'upper.JPG'), fmt='JPEG')       # case-insensitive ext
    fixtures.write_image(str(cls_dir / 'nested' / 'deep.png'))          # subfolders count
    (cls_dir / 'notes.txt').write_text('x')
    (cls_dir / '.DS_Store').write_bytes(b'\0' * 10)
    fixtures.write_image(str(cls_dir / '.hidden.jpg'))
    fixtures.write_image(str(tmp_path / 'train' / '.ipynb_checkpoints' / 'x.jpg'))

    s = sources.load_image_folders(root)
    # torchvision ImageFolder order: a case-sensitive sort (upper case first).
    assert s.class_names == ['Ram C-V Van', 'Zeta', 'a_car', 'b_car']
    assert s.num_classes == 4
    by_label = {}
    for r in s.train:
        by_label.setdefault(r.label, []).append(r.key)
    assert {k: len(v) for k, v in by_label.items()} == {0: 3, 1: 1, 2: 3, 3: 2}
    assert sorted(by_label[2]) == sorted([
        os.path.join('train', 'a_car', 'train_000.jpg'),
        os.path.join('train', 'a_car', 'upper.JPG'),
        os.path.join('train', 'a_car', 'nested', 'deep.png')])
    assert all(isinstance(r.image, str) and os.path.isfile(r.image) for r in s.train)
    assert all(r.bbox is None for r in s.train)
    assert len(s.test) == 7 and [r.label for r in s.test] == [0, 0, 0, 1, 2, 3, 3]
    assert s.warnings == []
    np.testing.assert_array_equal(sources.labels_of(s.test), [0, 0, 0, 1, 2, 3, 3])
    assert sources.labels_of(s.test).dtype == np.int32


def test_folders_mismatched_classes_lists_differences(tmp_path):
    fixtures.make_image_folders(str(tmp_path), {'audi': 1, 'bmw': 1, 'fiat': 1},
                                {'audi': 1, 'bmw': 1, 'kia': 1})
    with pytest.raises(DataError) as e:
        sources.load_image_folders(str(tmp_path))
    msg = str(e.value)
    assert "only in train: 'fiat'" in msg and "only in test: 'kia'" in msg
    assert 'audi' not in msg


def test_folders_empty_train_class_is_an_error_empty_test_class_is_not(tmp_path):
    root = str(tmp_path / 'a')
    fixtures.make_image_folders(root, {'audi': 2, 'bmw': 0}, {'audi': 1, 'bmw': 1})
    (tmp_path / 'a' / 'train' / 'bmw' / 'readme.txt').write_text('no images here')
    with pytest.raises(DataError, match="have no images.*'bmw'"):
        sources.load_image_folders(root)

    root = str(tmp_path / 'b')
    fixtures.make_image_folders(root, {'audi': 2, 'bmw': 1}, {'audi': 1, 'bmw': 0})
    s = sources.load_image_folders(root)
    assert [r.label for r in s.test] == [0] and len(s.train) == 3


def test_folders_missing_dirs_explain_layout_and_demo(tmp_path):
    for root in (str(tmp_path / 'nope'), str(tmp_path)):     # missing dir, then no train/
        with pytest.raises(DataError) as e:
            sources.load_image_folders(root)
        msg = str(e.value)
        assert root in msg and '<data_dir>/train/<class name>/' in msg
        assert 'python main.py --config=configs/demo.py' in msg


def test_folders_without_test_dir_warns_to_use_holdout(tmp_path):
    fixtures.make_image_folders(str(tmp_path), {'audi': 2, 'bmw': 2})
    s = sources.load_image_folders(str(tmp_path))
    assert len(s.train) == 4 and len(s.test) == 0
    assert any('holdout' in w for w in s.warnings)


# ------------------------------------------------------------------------------------------
# Bad files: scan and decoding of every PIL mode
# ------------------------------------------------------------------------------------------


@pytest.fixture
def bad_tree(tmp_path):
    fixtures.make_bad_image_folder(str(tmp_path / 'train' / 'mixed'))
    fixtures.make_image_folders(str(tmp_path), {'other': 1}, None)
    return str(tmp_path)


def test_bad_folder_records_ignore_non_images(bad_tree):
    s = sources.load_image_folders(bad_tree)
    names = sorted(os.path.basename(r.key) for r in s.train if r.label == 0)  # mixed < other
    assert names == sorted(fixtures.BAD_FOLDER_READABLE + fixtures.BAD_FOLDER_UNREADABLE)


def test_scan_flags_exactly_the_unreadable_files(bad_tree, tmp_path):
    s = sources.load_image_folders(bad_tree)
    good, skipped = sources.scan_records(s.train, num_threads=4)
    flagged = {os.path.basename(k): reason for k, reason in skipped}
    assert sorted(flagged) == sorted(fixtures.BAD_FOLDER_UNREADABLE)
    assert 'truncated' in flagged['truncated.jpg']
    assert '0 bytes' in flagged['empty.jpg']
    assert 'not an image' in flagged['random_bytes.jpg']
    assert len(good) == len(s.train) - 3
    assert [r.key for r in good] == [r.key for r in s.train
                                     if os.path.basename(r.key) not in flagged]
    # Every record the scan keeps decodes to uint8 RGB.
    for r in good:
        img = sources.decode_image(r)
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3, r.key


def test_decode_converts_every_mode_to_rgb(bad_tree):
    folder = os.path.join(bad_tree, 'train', 'mixed')
    modes = {n: _mode(os.path.join(folder, n)) for n in fixtures.BAD_FOLDER_PIXELS}
    assert modes == {'gray.png': 'L', 'gray16.png': 'I;16', 'cmyk.jpg': 'CMYK',
                     'rgba.png': 'RGBA', 'palette.png': 'P', 'binary.bmp': '1', 'la.png': 'LA'}
    for name, rgb in fixtures.BAD_FOLDER_PIXELS.items():
        img = sources.decode_image(os.path.join(folder, name))
        assert img.dtype == np.uint8 and img.shape[2] == 3, name
        np.testing.assert_allclose(img[0, 0].astype(int), rgb, atol=3, err_msg=name)
    g16 = sources.decode_image(os.path.join(folder, 'gray16.png'))
    assert g16.shape == (6, 8, 3) and tuple(g16[1, 0]) == (128, 128, 128)   # 32768 -> 128
    pal = sources.decode_image(os.path.join(folder, 'palette.png'))
    assert tuple(pal[1, 1]) == (200, 100, 50)
    with open(os.path.join(folder, 'cmyk.jpg'), 'rb') as f:              # bytes input
        np.testing.assert_array_equal(sources.decode_image(f.read()),
                                      sources.decode_image(os.path.join(folder, 'cmyk.jpg')))


def test_decode_unreadable_raises_clear_error(bad_tree):
    folder = os.path.join(bad_tree, 'train', 'mixed')
    for name in fixtures.BAD_FOLDER_UNREADABLE:
        path = os.path.join(folder, name)
        with pytest.raises(ImageDecodeError, match='Cannot decode image') as e:
            sources.decode_image(path)
        assert path in str(e.value) and isinstance(e.value, DataError)
        with pytest.raises(ImageDecodeError, match=r'\[record k/' + name):
            sources.decode_image(Record(image=path, label=0, key='k/' + name))
    with pytest.raises(ImageDecodeError, match='0 bytes'):
        sources.decode_image(b'')
    with pytest.raises(ImageDecodeError, match='not an image'):
        sources.decode_image(b'garbage' * 10)
    with pytest.raises(ImageDecodeError, match='cannot read file'):
        sources.decode_image(os.path.join(folder, 'missing.jpg'))


def test_decode_arrays_and_no_exif_rotation(tmp_path):
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    out = sources.decode_image(gray)
    assert out.shape == (3, 4, 3) and (out[..., 0] == gray).all() and (out[..., 2] == gray).all()
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0] = 9
    assert sources.decode_image(rgba).shape == (2, 2, 3)
    with pytest.raises(ImageDecodeError, match='uint8'):
        sources.decode_image(np.zeros((2, 2, 3), np.float32))
    # EXIF orientation 6 (rotate 90) is NOT applied, as in torchvision's ImageFolder.
    exif = Image.Exif()
    exif[0x0112] = 6
    path = str(tmp_path / 'rot.jpg')
    Image.fromarray(fixtures.pattern(40, 20)).save(path, exif=exif)
    assert sources.decode_image(path).shape == (20, 40, 3)


def test_decode_bbox_crop_margin_and_clipping():
    img = fixtures.pattern(30, 20)                                  # H=20, W=30
    np.testing.assert_array_equal(sources.decode_image(img, bbox=(5, 4, 10, 8)), img[4:8, 5:10])
    np.testing.assert_array_equal(sources.decode_image(img, bbox=(5, 4, 10, 8), bbox_margin=2),
                                  img[2:10, 3:12])
    # A box reaching past the edge (as some Stanford Cars boxes do) is clipped.
    np.testing.assert_array_equal(sources.decode_image(img, bbox=(20, 15, 40, 35), bbox_margin=3),
                                  img[12:20, 17:30])
    np.testing.assert_array_equal(sources.decode_image(img, bbox=(-5, -5, 100, 100)), img)
    # Fractional boxes cover every touched pixel; an empty box falls back to the full image.
    np.testing.assert_array_equal(sources.decode_image(img, bbox=(1.5, 2.2, 3.1, 4.0)),
                                  img[2:4, 1:4])
    np.testing.assert_array_equal(sources.decode_image(img, bbox=(50, 50, 60, 60)), img)
    out = sources.decode_image(img, bbox=(5, 4, 10, 8))
    assert out.flags['C_CONTIGUOUS']


def test_scan_cache_second_scan_opens_nothing(bad_tree, tmp_path, monkeypatch):
    s = sources.load_image_folders(bad_tree)
    cache = str(tmp_path / 'cache' / 'scan.json')
    opened = []
    real_open = Image.open

    def counting_open(fp, *a, **k):
        opened.append(fp)
        return real_open(fp, *a, **k)

    monkeypatch.setattr(Image, 'open', counting_open)
    good1, skipped1 = sources.scan_records(s.train, cache_path=cache)
    first = len(opened)
    assert first >= len(s.train) - 1 and os.path.isfile(cache)      # 0-byte file: not opened
    good2, skipped2 = sources.scan_records(s.train, cache_path=cache)
    assert len(opened) == first                                      # nothing opened again
    assert [r.key for r in good2] == [r.key for r in good1] and skipped2 == skipped1

    # A changed file (size/mtime) is rescanned, and only that one.
    fixed = next(r.image for r in s.train if r.key.endswith('truncated.jpg'))
    fixtures.write_image(fixed, (10, 10))
    good3, skipped3 = sources.scan_records(s.train, cache_path=cache)
    assert len(opened) == first + 1
    assert len(skipped3) == 2 and len(good3) == len(good1) + 1

    # A corrupt cache is ignored (rescan), not fatal.
    with open(cache, 'w') as f:
        f.write('{not json')
    _, skipped4 = sources.scan_records(s.train, cache_path=cache)
    assert skipped4 == skipped3


def test_scan_skips_in_memory_records():
    recs = [Record(image=np.zeros((4, 4, 3), np.uint8), label=0, key='a'),
            Record(image=b'not decoded by the scan', label=1, key='b')]
    good, skipped = sources.scan_records(recs)
    assert good == recs and skipped == []


def test_format_skipped(tmp_path):
    skipped = [(f'train/c/{i}.jpg', 'truncated image') for i in range(25)]
    full = str(tmp_path / 'run' / 'skipped.txt')
    text = sources.format_skipped(skipped, limit=20, write_full_list_to=full)
    assert text.startswith('Skipped 25 unreadable files')
    assert 'train/c/19.jpg: truncated image' in text and 'train/c/20.jpg' not in text
    assert 'and 5 more' in text and full in text
    with open(full) as f:
        assert len(f.read().splitlines()) == 25
    assert 'Skipped 1 unreadable file ' in sources.format_skipped([('x.jpg', 'bad')])
    assert sources.format_skipped([]) == 'Skipped 0 unreadable files.'


# ------------------------------------------------------------------------------------------
# Stanford Cars devkit
# ------------------------------------------------------------------------------------------

NAMES = ['smart fortwo Convertible 2012', 'Ram C/V Cargo Van Minivan 2012', 'AM General Hummer']
TRAIN_ROWS = [  # fname, class (1-based), bbox, (width, height)
    ('00001.jpg', 3, (2, 3, 20, 14), (24, 16)),
    ('00002.jpg', 1, (1, 1, 300, 200), (320, 240)),      # uint16 values in the .mat
    ('00003.jpg', 2, (10, 5, 40, 30), (32, 24)),         # box past the right/bottom edge
    ('00004.jpg', 1, (0, 0, 5, 5), (16, 16)),
]
TEST_ROWS = [('00001.jpg', 2, (1, 2, 10, 12), (20, 16)),
             ('00002.jpg', 3, (3, 3, 9, 9), (12, 12))]


def test_devkit_labels_names_bboxes(tmp_path):
    root = fixtures.make_devkit(str(tmp_path), NAMES, TRAIN_ROWS, TEST_ROWS)
    s = sources.load_devkit(root)
    assert s.class_names == NAMES                             # cars_meta.mat order, not sorted
    assert [r.label for r in s.train] == [2, 0, 1, 0]         # 1-based -> 0-based
    assert [r.key for r in s.train] == [f'cars_train/0000{i}.jpg' for i in range(1, 5)]
    assert s.train[1].bbox == (1.0, 1.0, 300.0, 200.0)
    assert all(isinstance(v, float) for v in s.train[0].bbox)
    assert s.train[0].image == os.path.join(root, 'cars_train', '00001.jpg')
    assert [r.label for r in s.test] == [1, 2] and s.test[0].key == 'cars_test/00001.jpg'
    assert s.test[1].bbox == (3.0, 3.0, 9.0, 9.0)
    assert s.warnings == []

    # bbox crop with a margin, clipped at the image edge (32x24 image, box to x=40, y=30).
    r = s.train[2]
    full = sources.decode_image(r)
    crop = sources.decode_image(r, bbox=r.bbox, bbox_margin=3)
    assert full.shape == (24, 32, 3) and crop.shape == (24 - 2, 32 - 7, 3)
    np.testing.assert_array_equal(crop, full[2:, 7:])
    assert sources.decode_image(s.train[0], bbox=s.train[0].bbox).shape == (11, 18, 3)


def test_devkit_test_labels_in_devkit_folder(tmp_path):
    root = fixtures.make_devkit(str(tmp_path), NAMES, TRAIN_ROWS, TEST_ROWS,
                                test_labels_in='devkit')
    assert [r.label for r in sources.load_devkit(root).test] == [1, 2]


@pytest.mark.parametrize('case', ['no_labels_file', 'not_used', 'no_test_images'])
def test_devkit_without_test_split_warns_holdout(tmp_path, case):
    root = str(tmp_path)
    if case == 'no_labels_file':
        fixtures.make_devkit(root, NAMES, TRAIN_ROWS, TEST_ROWS, test_labels_in=None)
    elif case == 'no_test_images':
        fixtures.make_devkit(root, NAMES, TRAIN_ROWS, None)
        fixtures.make_devkit(str(tmp_path / 'x'), NAMES, TRAIN_ROWS, TEST_ROWS)
        os.replace(str(tmp_path / 'x' / 'cars_test_annos_withlabels.mat'),
                   os.path.join(root, 'cars_test_annos_withlabels.mat'))
    else:
        fixtures.make_devkit(root, NAMES, TRAIN_ROWS, TEST_ROWS)
    s = sources.load_devkit(root, use_test_labels=(case != 'not_used'))
    assert len(s.train) == 4 and len(s.test) == 0
    assert len(s.warnings) == 1 and 'holdout' in s.warnings[0]


@pytest.mark.parametrize('missing', ['devkit/cars_meta.mat', 'devkit/cars_train_annos.mat',
                                     'cars_train'])
def test_devkit_missing_file_names_exact_path(tmp_path, missing):
    import shutil
    root = fixtures.make_devkit(str(tmp_path), NAMES, TRAIN_ROWS, None)
    path = os.path.join(root, *missing.split('/'))
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    with pytest.raises(DataError) as e:
        sources.load_devkit(root)
    assert repr(path) in str(e.value) and 'configs/demo.py' in str(e.value)


def test_devkit_missing_dir_and_bad_annotations(tmp_path):
    with pytest.raises(DataError, match='does not exist.*configs/demo.py'):
        sources.load_devkit(str(tmp_path / 'nope'))
    root = fixtures.make_devkit(str(tmp_path / 'a'), NAMES[:2], TRAIN_ROWS, None)
    with pytest.raises(DataError, match=r'class 3, outside 1\.\.2'):
        sources.load_devkit(root)
    # The unlabelled test annotations file in the place of the labelled one.
    root = fixtures.make_devkit(str(tmp_path / 'b'), NAMES, TRAIN_ROWS, TEST_ROWS,
                                test_labels_in=None)
    os.replace(os.path.join(root, 'devkit', 'cars_test_annos.mat'),
               os.path.join(root, 'cars_test_annos_withlabels.mat'))
    with pytest.raises(DataError, match='cars_test_annos_withlabels.mat.*class'):
        sources.load_devkit(root)


def test_devkit_missing_images_are_left_out_with_warning(tmp_path):
    root = fixtures.make_devkit(str(tmp_path), NAMES, TRAIN_ROWS, None)
    os.remove(os.path.join(root, 'cars_train', '00002.jpg'))
    s = sources.load_devkit(root)
    assert [r.key for r in s.train] == ['cars_train/00001.jpg', 'cars_train/00003.jpg',
                                        'cars_train/00004.jpg']
    assert any('00002.jpg' in w and 'missing' in w for w in s.warnings)
    for f in ('00001.jpg', '00003.jpg', '00004.jpg'):
        os.remove(os.path.join(root, 'cars_train', f))
    with pytest.raises(DataError, match='None of the 4 annotated images'):
        sources.load_devkit(root)


def _schema(mat_path, key):
    import scipy.io
    m = scipy.io.loadmat(mat_path)
    arr = m[key]
    if key == 'class_names':
        return (arr.shape[0], arr.dtype, arr[0, 0].shape, arr[0, 0].dtype.kind, m['__version__'])
    rec = arr[0, 0]
    return (arr.shape[0], arr.dtype,
            [(f, rec[f].shape, rec[f].dtype.kind) for f in arr.dtype.names], m['__version__'])


@pytest.mark.skipif(not os.path.isdir(fixtures.REAL_DATA), reason='real data folder absent')
def test_fixture_mat_files_match_the_real_schema(tmp_path):
    root = fixtures.make_devkit(str(tmp_path), NAMES, TRAIN_ROWS, None, write_images=False)
    for name, key in (('cars_meta.mat', 'class_names'), ('cars_train_annos.mat', 'annotations')):
        assert (_schema(os.path.join(root, 'devkit', name), key)
                == _schema(os.path.join(fixtures.REAL_DATA, 'devkit', name), key))


REAL_GRAYSCALE = ['00266', '00472', '01085', '02176', '02948', '03048', '03439', '03469',
                  '03539', '04577', '04848', '05177', '05502', '05713', '06947', '07383',
                  '07693', '07774', '08137', '08144']


@pytest.mark.skipif(not os.path.isdir(fixtures.REAL_DATA), reason='real data folder absent')
def test_devkit_reads_the_real_low_res_copy():
    s = sources.load_devkit(fixtures.REAL_DATA)
    assert len(s.train) == 8144 and len(s.class_names) == 196 and len(s.test) == 0
    assert any('holdout' in w for w in s.warnings)
    r0 = s.train[0]
    assert r0.key == 'cars_train/00001.jpg' and r0.label == 13         # class 14, 1-based
    assert r0.bbox == (39.0, 116.0, 569.0, 375.0)
    assert s.class_names[0] == 'AM General Hummer SUV 2000'
    assert s.class_names[-1] == 'smart fortwo Convertible 2012'
    assert 'Ram C/V Cargo Van Minivan 2012' in s.class_names
    counts = np.bincount(sources.labels_of(s.train), minlength=196)
    assert counts.min() >= 24 and counts.max() <= 68
    by_name = {os.path.basename(r.key): r for r in s.train}
    for stem in REAL_GRAYSCALE:
        rec = by_name[stem + '.jpg']
        assert _mode(rec.image) == 'L'
        img = sources.decode_image(rec)
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
        assert (img[..., 0] == img[..., 1]).all() and (img[..., 1] == img[..., 2]).all()


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(fixtures.REAL_DATA), reason='real data folder absent')
def test_scan_real_low_res_copy_finds_nothing(tmp_path):
    s = sources.load_devkit(fixtures.REAL_DATA)
    good, skipped = sources.scan_records(s.train, cache_path=str(tmp_path / 'scan.json'))
    assert skipped == [] and len(good) == 8144
    tr, va = sources.stratified_split(sources.labels_of(good), 0.2, seed=0)
    assert len(tr) + len(va) == 8144 and 0.19 < len(va) / 8144 < 0.21


# ------------------------------------------------------------------------------------------
# Stratified holdout split
# ------------------------------------------------------------------------------------------


def test_stratified_split_counts_determinism_disjointness():
    sizes = {0: 1, 1: 2, 2: 3, 3: 10, 4: 25, 5: 7}
    labels = np.concatenate([np.full(n, c) for c, n in sizes.items()])
    labels = labels[np.random.default_rng(1).permutation(len(labels))]
    tr, va = sources.stratified_split(labels, 0.2, seed=0)
    # round(0.2 n) (half up), >= 1 where n >= 2, < n: 1->0, 2->1, 3->1, 10->2, 25->5, 7->1
    assert np.bincount(labels[va], minlength=6).tolist() == [0, 1, 1, 2, 5, 1]
    assert len(np.intersect1d(tr, va)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([tr, va])), np.arange(len(labels)))
    assert (np.diff(tr) > 0).all() and (np.diff(va) > 0).all()
    tr2, va2 = sources.stratified_split(labels, 0.2, seed=0)
    np.testing.assert_array_equal(va, va2)
    np.testing.assert_array_equal(tr, tr2)
    others = [sources.stratified_split(labels, 0.2, seed=s)[1] for s in (1, 2, 3)]
    assert any(not np.array_equal(va, o) for o in others)
    assert np.bincount(labels[sources.stratified_split(labels, 0.5, seed=0)[1]],
                       minlength=6).tolist() == [0, 1, 2, 5, 13, 4]
    tr0, va0 = sources.stratified_split(labels, 0.0, seed=0)
    assert len(va0) == 0 and len(tr0) == len(labels)
    with pytest.raises(ValueError):
        sources.stratified_split(labels, 1.0, seed=0)


# ------------------------------------------------------------------------------------------
# TFDS (a real tiny cars196 ArrayRecord dataset, prepared here without TensorFlow)
# ------------------------------------------------------------------------------------------

TFDS_TRAIN = [  # label (0-based), pixel bbox, (width, height), mode
    (13, (4.0, 2.0, 20.0, 10.0), (24, 16), 'RGB'),
    (195, (0.0, 0.0, 30.0, 40.0), (30, 40), 'L'),
    (0, (1.0, 1.0, 5.0, 5.0), (8, 8), 'RGB'),
]
TFDS_TEST = [(7, (2.0, 2.0, 6.0, 6.0), (10, 10), 'RGB')]


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory):
    pytest.importorskip('tensorflow_datasets')
    base = tmp_path_factory.mktemp('tfds')
    return fixtures.make_tfds_cars196(str(base / 'data'), TFDS_TRAIN, TFDS_TEST,
                                      str(base / 'images'))


def test_tfds_records(tfds_dir):
    s = sources.load_tfds('cars196', data_dir=tfds_dir)
    assert len(s.class_names) == 196 and s.class_names[-1] == 'smart fortwo Convertible 2012'
    assert len(s.train) == 3 and len(s.test) == 1 and s.warnings == []
    recs = sorted((s.train[i] for i in range(len(s.train))), key=lambda r: r.key)
    assert [r.key for r in recs] == ['train/00001', 'train/00002', 'train/00003']
    for r, (label, box, (w, h), mode) in zip(recs, TFDS_TRAIN):
        assert r.label == label and isinstance(r.image, bytes)
        np.testing.assert_allclose(r.bbox, box, atol=1e-3)           # normalised -> pixels
        img = sources.decode_image(r)
        assert img.shape == (h, w, 3) and img.dtype == np.uint8       # L -> RGB
        crop = sources.decode_image(r, bbox=r.bbox, bbox_margin=1)
        assert crop.shape[:2] == (min(h, box[3] + 1) - max(0, box[1] - 1),
                                  min(w, box[2] + 1) - max(0, box[0] - 1))
    assert s.test[0].label == 7 and s.test[-1].key == 'test/00001'
    # labels_of: fast path, same labels as the records, int32.
    labels = sources.labels_of(s.train)
    assert labels.dtype == np.int32
    assert labels.tolist() == [s.train[i].label for i in range(3)]
    assert [r.key for r in s.train[0:2]] == [s.train[0].key, s.train[1].key]
    assert [r.key for r in s.train.__getitems__([2, 0])] == [s.train[2].key, s.train[0].key]
    with pytest.raises(IndexError):
        s.train[3]
    # Picklable (grain worker processes) and scan passes it through untouched.
    clone = pickle.loads(pickle.dumps(s.train))
    assert clone[1].key == s.train[1].key and clone[1].image == s.train[1].image
    good, skipped = sources.scan_records(s.train)
    assert good is s.train and skipped == []
    decoded = sources.load_tfds('cars196', data_dir=tfds_dir, decode=True)
    r = decoded.train[0]
    assert isinstance(r.image, np.ndarray) and r.image.dtype == np.uint8
    np.testing.assert_allclose(r.bbox, s.train[0].bbox)


def test_tfds_not_prepared_explains_what_to_do(tmp_path):
    pytest.importorskip('tensorflow_datasets')
    with pytest.raises(DataError) as e:
        sources.load_tfds('cars196', data_dir=str(tmp_path))
    msg = str(e.value)
    assert 'not prepared' in msg and str(tmp_path) in msg
    assert 'TensorFlow' in msg and 'array_record' in msg and 'devkit' in msg
    with pytest.raises(DataError, match='no dataset'):
        sources.load_tfds('no_such_dataset_xyz', data_dir=str(tmp_path))


# ------------------------------------------------------------------------------------------
# Symlinks in image folders: each real file once, under its own class folder
# ------------------------------------------------------------------------------------------


def _labels_by_name(records, class_names):
    out = {}
    for r in records:
        out.setdefault(class_names[r.label], []).append(r.key)
    return {k: sorted(v) for k, v in out.items()}


def test_folder_symlink_loop_to_an_ancestor_is_skipped_and_counted(tmp_path):
    root = str(tmp_path)
    fixtures.make_image_folders(root, {'audi': 3, 'bmw': 2}, {'audi': 1, 'bmw': 1})
    os.symlink('..', tmp_path / 'train' / 'audi' / 'loop')          # train/audi/loop -> train/
    s = sources.load_image_folders(root)
    # 3 + 2 train images, each under its own folder, none through the loop
    assert _labels_by_name(s.train, s.class_names) == {
        'audi': [os.path.join('train', 'audi', f'train_00{i}.jpg') for i in range(3)],
        'bmw': [os.path.join('train', 'bmw', f'train_00{i}.jpg') for i in range(2)]}
    assert len(s.test) == 2
    assert [w for w in s.warnings if '1 symlink' in w and 'loop' in w], s.warnings


def test_symlinks_never_count_a_file_twice_or_under_another_class(tmp_path):
    root = str(tmp_path)
    fixtures.make_image_folders(root, {'audi': 2, 'bmw': 2}, {'audi': 1, 'bmw': 1})
    train = tmp_path / 'train'
    outside = tmp_path / 'more_audi'                        # a folder outside the data tree
    fixtures.write_image(str(outside / 'extra.jpg'), seed=7)
    os.symlink(outside, train / 'audi' / 'more')             # followed: audi gains extra.jpg
    os.symlink(outside, train / 'bmw' / 'more_again')       # the same folder again: skipped
    os.symlink('../audi', train / 'bmw' / 'audi_link')      # another class's folder: skipped
    os.symlink('../../test', train / 'bmw' / 'test_split')  # holds class folders: skipped
    os.symlink('../audi/train_000.jpg', train / 'bmw' / 'stolen.jpg')   # another class's file
    os.symlink('train_001.jpg', train / 'audi' / 'again.jpg')          # the same file again
    fixtures.write_image(str(tmp_path / 'loose.jpg'), seed=9)
    os.symlink('../../loose.jpg', train / 'bmw' / 'loose.jpg')         # file link: followed
    s = sources.load_image_folders(root)
    j = os.path.join
    assert _labels_by_name(s.train, s.class_names) == {
        'audi': [j('train', 'audi', 'more', 'extra.jpg'), j('train', 'audi', 'train_000.jpg'),
                 j('train', 'audi', 'train_001.jpg')],
        'bmw': [j('train', 'bmw', 'loose.jpg'), j('train', 'bmw', 'train_000.jpg'),
                j('train', 'bmw', 'train_001.jpg')]}
    assert sorted(r.key for r in s.test) == [j('test', 'audi', 'test_000.jpg'),
                                             j('test', 'bmw', 'test_000.jpg')]
    note = [w for w in s.warnings if 'symlink' in w]
    assert len(note) == 1 and note[0].startswith('5 symlinks'), s.warnings


def test_a_symlinked_class_folder_is_followed_once(tmp_path):
    root = str(tmp_path)
    fixtures.make_image_folders(str(tmp_path / 'elsewhere'), {'bmw': 2})
    fixtures.make_image_folders(root, {'audi': 1}, {'audi': 1, 'bmw': 1})
    os.symlink(tmp_path / 'elsewhere' / 'train' / 'bmw', tmp_path / 'train' / 'bmw')
    s = sources.load_image_folders(root)
    assert s.class_names == ['audi', 'bmw']
    assert [r.label for r in s.train] == [0, 1, 1] and s.warnings == []


def test_use_bbox_counts_the_boxes_past_the_image_edge(tmp_path):
    from fixtures import tiny_config
    from cars_jax.data.dataset import build_data
    rows = TRAIN_ROWS + [('00005.jpg', 2, (50, 50, 60, 60), (32, 24))]    # entirely outside
    root = fixtures.make_devkit(str(tmp_path), NAMES, rows, TEST_ROWS)
    config = tiny_config(data_source='devkit', data_dir=root, num_classes=0, use_bbox=True)
    # by hand: 00003 (box to x=40, y=30 on 32x24) and 00005 pass the edge; 00005 is empty
    # once clipped; the other train and test boxes lie inside their images
    notes = [n for n in build_data(config).notes if 'bounding box' in n]
    assert notes == ['2 of 7 bounding boxes extend past their image and are clipped to it '
                     '(1 lies entirely outside it: the whole image is used).']
    config.use_bbox = False
    assert not [n for n in build_data(config).notes if 'bounding box' in n]


def test_build_data_reports_skipped_files_without_a_log_prefix(bad_tree, caplog):
    from fixtures import tiny_config
    from cars_jax.data.dataset import build_data
    config = tiny_config(data_source='folders', data_dir=bad_tree, num_classes=0,
                         val_split='holdout')
    with caplog.at_level('INFO'):
        data = build_data(config)
    assert len(data.skipped) == 3
    assert not [r for r in caplog.records if 'Skipped' in r.getMessage()], caplog.text


def test_data_bundle_describes_each_split_in_words():
    """The run's first log line says what each split is, with or without a test split."""
    from cars_jax.data.dataset import DataBundle
    rec = [Record('a.jpg', 0)]
    bundle = lambda test, val_is_test=False: DataBundle(rec * 8, rec * 2, test, ['a'], [], [],
                                                        val_is_test)
    assert bundle([]).describe() == ('8 train / 2 val images (held out of train), '
                                     'no test split')
    assert bundle(rec * 3).describe() == '8 train / 2 val (held out of train) / 3 test images'
    assert bundle(rec * 2, True).describe() == ('8 train / 2 val images (validation = the '
                                                'test split)')
