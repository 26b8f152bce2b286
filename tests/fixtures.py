"""Helpers that build small data trees for tests (import as `import fixtures`).

- `write_image`: one small image file in any PIL mode / format.
- `make_image_folders`: <root>/train|test/<class>/*.jpg.
- `make_bad_image_folder`: valid and broken files side by side (see BAD_FOLDER_* below).
- `make_devkit`: the original Stanford Cars layout, with .mat files in the exact schema of
  the real devkit (shared/reference/stanford-cars-format.md).
- `make_tfds_cars196`: a real, tiny cars196 TFDS dataset in ArrayRecord format, prepared
  without TensorFlow (the builder's download step is replaced by local examples).
"""
from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image

# The development copy (python -m cars_jax.data.lowres): tests that read it skip without it.
REAL_DATA = os.environ.get('CARS_JAX_REAL_DATA', '') or os.path.join('data', 'cars_128x96')


def pattern(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A deterministic uint8 RGB image with some structure (not a flat colour)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = rng.integers(0, 256, size=3)
    img = np.stack([(x * 7 + base[0]) % 256, (y * 5 + base[1]) % 256,
                    ((x + y) * 3 + base[2]) % 256], axis=-1)
    return img.astype(np.uint8)


def write_image(path: str, size: tuple[int, int] = (24, 16), *, mode: str = 'RGB',
                color=None, fmt: str | None = None, seed: int = 0, **save_kw) -> str:
    """Writes a (width, height) image: a flat `color` if given, else `pattern`."""
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    w, h = size
    if color is not None:
        im = Image.new(mode, size, color)
    else:
        im = Image.fromarray(pattern(w, h, seed))
        if mode != 'RGB':
            im = im.convert(mode)
    im.save(path, format=fmt, **save_kw)
    return path


def make_image_folders(root: str, train: Mapping[str, int], test: Mapping[str, int] | None = None,
                       *, size=(24, 16), ext: str = '.jpg') -> str:
    """<root>/train/<class>/<i>.jpg (and test/): {class name: number of images}. A count of
    0 makes an empty class folder; test=None writes no test/ folder."""
    for split, counts in (('train', train), ('test', test)):
        if counts is None:
            continue
        for ci, (name, n) in enumerate(counts.items()):
            d = os.path.join(root, split, name)
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                write_image(os.path.join(d, f'{split}_{i:03d}{ext}'), size, seed=ci * 100 + i)
    return root


# Names in the folder that `make_bad_image_folder` writes.
BAD_FOLDER_UNREADABLE = ('truncated.jpg', 'empty.jpg', 'random_bytes.jpg')
BAD_FOLDER_READABLE = ('good_1.jpg', 'good_2.JPG', 'rgba.png', 'cmyk.jpg', 'gray.png',
                       'gray16.png', 'palette.png', 'binary.bmp', 'anim.gif', 'la.png')
BAD_FOLDER_IGNORED = ('.DS_Store', 'notes.txt')
# Expected RGB of pixel (0, 0) for the flat-colour files (JPEG ones within a tolerance).
BAD_FOLDER_PIXELS = {
    'gray.png': (77, 77, 77),          # L 77
    'gray16.png': (255, 255, 255),     # I;16 65535 -> 255 (PIL's own convert would clip)
    'cmyk.jpg': (255, 0, 0),           # CMYK (0, 255, 255, 0) = red
    'rgba.png': (200, 100, 50),        # alpha dropped, as torchvision's loader does
    'palette.png': (10, 20, 30),       # palette entry 0
    'binary.bmp': (255, 255, 255),     # mode 1, white
    'la.png': (90, 90, 90),            # LA, alpha dropped
}


def make_bad_image_folder(folder: str) -> str:
    """A folder mixing valid images in many PIL modes with broken files.

    Unreadable: a JPEG cut halfway, a 0-byte .jpg, random bytes named .jpg. Readable: RGB
    JPEGs, RGBA PNG, CMYK JPEG, grayscale L PNG, 16-bit PNG (opens as I;16, with a second
    row of 32768 -> 128), palette P, 1-bit BMP, GIF, LA. Ignored: .DS_Store, notes.txt.
    """
    os.makedirs(folder, exist_ok=True)
    j = lambda n: os.path.join(folder, n)  # noqa: E731
    write_image(j('good_1.jpg'), (40, 30), seed=1)
    write_image(j('good_2.JPG'), (30, 40), seed=2, fmt='JPEG')
    full = io.BytesIO()
    Image.fromarray(pattern(64, 48, 3)).save(full, 'JPEG', quality=95)
    data = full.getvalue()
    with open(j('truncated.jpg'), 'wb') as f:
        f.write(data[:len(data) // 2])
    open(j('empty.jpg'), 'wb').close()
    with open(j('random_bytes.jpg'), 'wb') as f:
        f.write(np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes())
    write_image(j('rgba.png'), (8, 6), mode='RGBA', color=(200, 100, 50, 0))
    write_image(j('cmyk.jpg'), (16, 16), mode='CMYK', color=(0, 255, 255, 0), quality=95)
    write_image(j('gray.png'), (8, 6), mode='L', color=77)
    g16 = np.full((6, 8), 65535, np.uint16)
    g16[1] = 32768
    Image.fromarray(g16).save(j('gray16.png'))
    p = Image.new('P', (8, 6), 0)
    p.putpalette([10, 20, 30, 200, 100, 50] + [0] * (768 - 6))
    p.putpixel((1, 1), 1)
    p.save(j('palette.png'))
    write_image(j('binary.bmp'), (8, 6), mode='1', color=1)
    write_image(j('anim.gif'), (8, 6), mode='P', color=3)
    write_image(j('la.png'), (8, 6), mode='LA', color=(90, 0))
    with open(j('.DS_Store'), 'wb') as f:
        f.write(b'\x00\x00\x00\x01Bud1' + bytes(100))
    with open(j('notes.txt'), 'w') as f:
        f.write('not an image\n')
    return folder


# ---- Stanford Cars devkit --------------------------------------------------------------

ANNO_FIELDS = ('bbox_x1', 'bbox_y1', 'bbox_x2', 'bbox_y2', 'class', 'fname')


def _mat_uint(v: int) -> np.ndarray:
    # The real files store each number as a (1, 1) array of the smallest fitting uint type.
    return np.array([[v]], dtype=np.uint8 if v < 256 else np.uint16)


def class_names_array(names: Sequence[str]) -> np.ndarray:
    """cars_meta.mat's `class_names`: object array (1, K) of (1,) str arrays."""
    arr = np.empty((1, len(names)), dtype=object)
    for i, n in enumerate(names):
        arr[0, i] = np.array([n])
    return arr


def annotations_array(rows: Sequence[tuple], with_class: bool = True) -> np.ndarray:
    """The `annotations` struct array (1, N), every field dtype object.

    rows: (fname, class_1_based, (x1, y1, x2, y2)).
    """
    fields = ANNO_FIELDS if with_class else tuple(f for f in ANNO_FIELDS if f != 'class')
    arr = np.empty((1, len(rows)), dtype=[(f, 'O') for f in fields])
    for i, (fname, cls, box) in enumerate(rows):
        vals = [_mat_uint(int(v)) for v in box]
        if with_class:
            vals.append(_mat_uint(int(cls)))
        vals.append(np.array([fname]))       # (1,) <U9
        arr[0, i] = tuple(vals)
    return arr


def make_devkit(root: str, class_names: Sequence[str],
                train: Sequence[tuple], test: Sequence[tuple] | None = None, *,
                test_labels_in: str | None = 'root', write_images: bool = True,
                write_unlabelled_test_annos: bool = True) -> str:
    """The original Stanford Cars layout under root.

    train/test rows: (fname, class_1_based, (x1, y1, x2, y2), (width, height)). Images are
    patterned JPEGs of that size (written unless write_images=False). test=None writes no
    cars_test/. cars_test_annos_withlabels.mat goes to root ('root'), devkit/ ('devkit')
    or nowhere (None); cars_test_annos.mat (no class field) is written too.
    """
    import scipy.io  # pylint: disable=import-outside-toplevel
    devkit = os.path.join(root, 'devkit')
    os.makedirs(devkit, exist_ok=True)
    scipy.io.savemat(os.path.join(devkit, 'cars_meta.mat'),
                     {'class_names': class_names_array(class_names)})
    scipy.io.savemat(os.path.join(devkit, 'cars_train_annos.mat'),
                     {'annotations': annotations_array([r[:3] for r in train])})
    splits = [('cars_train', train)]
    if test is not None:
        splits.append(('cars_test', test))
        if write_unlabelled_test_annos:
            scipy.io.savemat(os.path.join(devkit, 'cars_test_annos.mat'),
                             {'annotations': annotations_array([r[:3] for r in test],
                                                               with_class=False)})
        if test_labels_in is not None:
            where = devkit if test_labels_in == 'devkit' else root
            scipy.io.savemat(os.path.join(where, 'cars_test_annos_withlabels.mat'),
                             {'annotations': annotations_array([r[:3] for r in test])})
    if write_images:
        for sub, rows in splits:
            for i, (fname, _, _, size) in enumerate(rows):
                write_image(os.path.join(root, sub, fname), size, seed=i)
    return root


# ---- TFDS cars196 (ArrayRecord, prepared without TensorFlow) ---------------------------

def make_tfds_cars196(data_dir: str, train: Sequence[tuple], test: Sequence[tuple] | None,
                      image_dir: str) -> str:
    """Prepares a tiny real `cars196` TFDS dataset (file_format='array_record') in data_dir.

    rows: (label_0_based, (x1, y1, x2, y2) pixel box, (width, height), mode). Images are
    JPEG files written to image_dir; the stored features are what cars196.py stores (the
    encoded file bytes, normalised [ymin, xmin, ymax, xmax] bbox, label, id). Only the
    download/generation step of the builder is replaced (cars196.py reads with tf.io).
    """
    from unittest import mock  # pylint: disable=import-outside-toplevel

    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    from tensorflow_datasets.image_classification import cars196  # pylint: disable=import-outside-toplevel

    def examples(split, rows):
        for i, (label, (x1, y1, x2, y2), (w, h), mode) in enumerate(rows):
            name = f'{i + 1:05d}'
            path = write_image(os.path.join(image_dir, split, name + '.jpg'), (w, h),
                               mode=mode, seed=i)
            bbox = tfds.features.BBox(ymin=y1 / h, xmin=x1 / w, ymax=y2 / h, xmax=x2 / w)
            yield name, {'image': path, 'label': int(label), 'bbox': bbox, 'id': name}

    def split_generators(self, dl_manager):  # pylint: disable=unused-argument
        gens = {'train': examples('train', train)}
        if test is not None:
            gens['test'] = examples('test', test)
        return gens

    with mock.patch.object(cars196.Cars196, '_split_generators', split_generators):
        builder = tfds.builder('cars196', data_dir=data_dir, file_format='array_record')
        builder.download_and_prepare(file_format='array_record')
    return data_dir


# ---- tiny configs, batches and runs shared by the step, loop and device tests ----------------

def tiny_config(**overrides):
    """The demo config shrunk to a 2-stage net of widths (4, 8) at 16 px: compiles in seconds."""
    from configs import demo
    c = demo.get_config()
    c.image_size, c.batch_size = 16, 8
    c.stage_sizes, c.widths = (1, 1), (4, 8)
    c.num_epochs = 2
    for k, v in overrides.items():
        c[k] = v
    return c


def tiny_batch(n: int = 8, k: int = 3, seed: int = 0) -> dict:
    """n normalised 16x16 images of k classes whose mean tells the class (learnable)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % k
    images = rng.normal(size=(n, 16, 16, 3)).astype(np.float32) + labels[:, None, None, None]
    return {'image': images, 'label': labels.astype(np.int32)}


def make_colour_folders(root, n_classes=3, n_train=(10, 6, 4), n_test=3, size=(24, 18)):
    """A tiny ImageFolder tree (pathlib root): class c is a colour, with noise."""
    rng = np.random.default_rng(0)
    for split, counts in (('train', n_train), ('test', (n_test,) * n_classes)):
        for c in range(n_classes):
            d = root / split / f'class_{c}'
            d.mkdir(parents=True)
            for i in range(counts[c]):
                img = np.full(size[::-1] + (3,), 40, np.uint8)
                img[..., c] = 220
                img = np.clip(img + rng.integers(-30, 30, img.shape), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f'{i:03d}.jpg')
    return root


def run_config(data_dir, **overrides):
    """tiny_config training on make_colour_folders' data: 2 epochs of at most 3 steps."""
    fields = dict(data_source='folders', data_dir=str(data_dir), num_classes=0, batch_size=4,
                  max_steps_per_epoch=3, num_epochs=2, log_every_steps=2, patience=5)
    return tiny_config(**{**fields, **overrides})


def restore_latest(workdir, config, n_classes=3):
    """(state, meta) of the latest checkpoint of a run made with `config`."""
    import jax
    from cars_jax.checkpoints import checkpoint_managers, restore_checkpoint
    from cars_jax.steps import create_train_state
    latest, best = checkpoint_managers(str(workdir))
    try:
        template = create_train_state(config, jax.random.PRNGKey(9), n_classes, 3)
        return restore_checkpoint(latest, template)
    finally:
        latest.close()
        best.close()


def numpy_smoothed_ce(logits, labels, eps):
    """Per-example label-smoothed cross-entropy in numpy (PyTorch's formula): the reference the
    train steps' losses are checked against."""
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    return (1 - eps) * -logp[np.arange(len(labels)), labels] + eps * -logp.mean(-1)
