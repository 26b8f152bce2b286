"""The development copy maker: sizes, orientation, labels and annotation files."""
import filecmp
import os

import numpy as np
import pytest
from PIL import Image

from cars_jax.data import lowres
from cars_jax.data.sources import load_devkit
from fixtures import make_devkit


def test_copy_has_the_sizes_labels_and_annotations_of_the_source(tmp_path):
    src, dst = str(tmp_path / 'full'), str(tmp_path / 'low')
    rows = [('00001.jpg', 1, (1, 1, 20, 10), (300, 200)),     # landscape
            ('00002.jpg', 2, (1, 1, 10, 20), (150, 400)),     # portrait
            ('00003.jpg', 2, (0, 0, 5, 5), (256, 256))]       # square counts as landscape
    make_devkit(src, ['Make A 2012', 'Make B 2009'], rows)
    Image.open(os.path.join(src, 'cars_train', '00003.jpg')).convert('L').save(
        os.path.join(src, 'cars_train', '00003.jpg'))          # a grayscale source image

    assert lowres.make_lowres_copy(src, dst, workers=2) == 3
    sizes = {n: Image.open(os.path.join(dst, 'cars_train', n)).size for n in
             sorted(os.listdir(os.path.join(dst, 'cars_train')))}
    assert sizes == {'00001.jpg': (128, 96), '00002.jpg': (96, 128), '00003.jpg': (128, 96)}
    assert Image.open(os.path.join(dst, 'cars_train', '00003.jpg')).mode == 'RGB'
    for name in ('cars_meta.mat', 'cars_train_annos.mat'):
        assert filecmp.cmp(os.path.join(src, 'devkit', name), os.path.join(dst, 'devkit', name),
                           shallow=False)
    a, b = load_devkit(src, use_test_labels=False), load_devkit(dst)
    assert [r.label for r in a.train] == [r.label for r in b.train] == [0, 1, 1]
    assert a.class_names == b.class_names and not b.test
    # the content is the source image resized, not something else: compare with PIL directly
    want = np.asarray(Image.open(os.path.join(src, 'cars_train', '00001.jpg')).convert('RGB')
                      .resize((128, 96), Image.BILINEAR), np.float32)
    got = np.asarray(Image.open(os.path.join(dst, 'cars_train', '00001.jpg')), np.float32)
    def blocks(a):      # 8x8 block means: JPEG keeps them (its error is in the high frequencies)
        return a.reshape(12, 8, 16, 8, 3).mean(axis=(1, 3))
    assert np.abs(blocks(got) - blocks(want)).mean() < 3
    other = np.asarray(Image.open(os.path.join(src, 'cars_train', '00003.jpg')).convert('RGB')
                       .resize((128, 96), Image.BILINEAR), np.float32)
    assert np.abs(blocks(got) - blocks(other)).mean() > 10      # the check tells images apart


def test_cli_errors_name_the_problem(tmp_path, capsys):
    assert lowres.main(['--src', str(tmp_path / 'nope'), '--dst', str(tmp_path / 'x')]) == 2
    assert 'nope' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        lowres.main(['--src', str(tmp_path), '--dst', str(tmp_path)])
    assert '--dst must differ' in capsys.readouterr().err
