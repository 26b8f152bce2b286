"""Makes the low-resolution development copy of Stanford Cars from the full devkit layout.

The results in docs/experiments.md were measured on the 8,144 official *train* images resized
to 128x96 (96x128 for portrait images; aspect ratio not kept, full frame) in the devkit layout,
with the original annotation files copied unchanged. A 30-epoch run at 64 px then fits a
2-core CPU. Usage:

    python -m cars_jax.data.lowres --src=/data/stanford_cars --dst=data/cars_128x96
    python main.py --config=configs/cars_lowres.py --config.data_dir=data/cars_128x96

The boxes in the copied `.mat` files stay in the original pixel coordinates, so
`use_bbox=True` cannot be used on the copy. Only the train split is written: the experiments
validate on a seeded, stratified 20% of it (`val_split='holdout'`).
"""
from __future__ import annotations

import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

from cars_jax.data.sources import DataError, decode_image, load_devkit
from cars_jax.fileio import atomic_write

LANDSCAPE = (128, 96)           # (width, height) of the development copy
QUALITY = 90                    # JPEG quality of the re-encoded images
ANNOTATION_FILES = ('cars_meta.mat', 'cars_train_annos.mat')


def lowres_size(width: int, height: int, landscape: tuple[int, int] = LANDSCAPE) -> tuple[int, int]:
    """(width, height) of the copy: the landscape size, transposed for portrait images."""
    return landscape if width >= height else (landscape[1], landscape[0])


def _write_one(src: str, dst: str, landscape: tuple[int, int], quality: int) -> None:
    pixels = decode_image(src)                      # any mode -> RGB, as training reads it
    h, w = pixels.shape[:2]
    image = Image.fromarray(pixels).resize(lowres_size(w, h, landscape), Image.BILINEAR)
    # a killed run never leaves half a JPEG
    atomic_write(dst, lambda tmp: image.save(tmp, format='JPEG', quality=quality))


def make_lowres_copy(src: str, dst: str, *, landscape: tuple[int, int] = LANDSCAPE,
                     quality: int = QUALITY, workers: int = 4) -> int:
    """Writes `dst/cars_train/*.jpg` and `dst/devkit/*.mat` from the devkit at `src`.

    Returns the number of images written. Files already present in dst are rewritten, so a
    rerun after an interruption finishes the copy. Unreadable source images raise DataError
    naming the file (the copy must hold every annotated image).
    """
    splits = load_devkit(src, use_test_labels=False)
    os.makedirs(os.path.join(dst, 'cars_train'), exist_ok=True)
    os.makedirs(os.path.join(dst, 'devkit'), exist_ok=True)
    for name in ANNOTATION_FILES:
        for folder in (os.path.join(src, 'devkit'), src):
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                shutil.copyfile(path, os.path.join(dst, 'devkit', name))
                break
    jobs = [(r.image, os.path.join(dst, 'cars_train', os.path.basename(r.image)))
            for r in splits.train]
    with ThreadPoolExecutor(max(1, workers)) as pool:   # PIL releases the GIL while coding
        list(pool.map(lambda job: _write_one(*job, landscape, quality), jobs))
    return len(jobs)


def main(argv: list[str]) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog='python -m cars_jax.data.lowres', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--src', required=True, help='the full devkit folder (cars_train/, devkit/)')
    parser.add_argument('--dst', required=True, help='the folder to write the copy to')
    parser.add_argument('--quality', type=int, default=QUALITY, help='JPEG quality (1-95)')
    args = parser.parse_args(argv)
    if not 1 <= args.quality <= 95:
        parser.error(f'--quality={args.quality}: must be in 1..95')
    if os.path.abspath(args.src) == os.path.abspath(args.dst):
        parser.error('--dst must differ from --src (the copy would overwrite the originals)')
    try:
        n = make_lowres_copy(args.src, args.dst, quality=args.quality)
    except DataError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    print(f'Wrote {n} images at {LANDSCAPE[0]}x{LANDSCAPE[1]} to {args.dst}/cars_train '
          f'and the annotation files to {args.dst}/devkit.')
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
