"""A generated, fine-grained "demo" data set: procedurally drawn cars in ImageFolder layout.

Users without Stanford Cars (and CI) run the whole recipe end to end on it in a few CPU
minutes. Like Stanford Cars, it is *fine-grained*: every image shows one car whose body colour,
size, position, facing (left/right), background and lighting vary freely per image, and the
classes differ ONLY in small details on the car's front face:

* grille pattern: horizontal bars (H) / vertical bars (V) / mesh / none,
* headlight shape (Round / Rect) and colour (White / Amber / Blue),
* badge: a chrome disc ("Orbis Motors") or a red diamond ("Rhombo Motors").

That gives 4 x 2 x 3 x 2 = 48 possible classes (`MAX_CLASSES`). The first 24 classes of the
table differ in grille and headlights alone (their badge is a redundant cue); classes 25-48 are
the same 24 front designs with the other badge, so beyond 24 classes the badge is needed too.

Layout written by `generate_demo_dataset(root)` (the seed's torchvision ImageFolder layout):

    root/train/<class name>/<NNNNN>.jpg   imbalanced: counts spread over train_per_class
    root/test/<class name>/<NNNNN>.jpg    balanced: test_per_class images per class
    root/regions.json                     {"train/<class>/00012.jpg": [x1, y1, x2, y2], ...}
    root/classes.json                     the attributes of every class
    root/README.txt                       what all this is
    root/.complete                        written LAST (the generation parameters as JSON)

A region box is the bounding box of the front detail area (grille + headlights + badge) in
pixels of that image, PIL crop convention (x2, y2 exclusive): ``image.crop(box)`` cuts it out.
It covers about 13-21% of the image area, so Grad-CAM maps can be checked against it.

Everything is deterministic: each image is drawn from its own RNG seeded with
(seed, split, class, index), so the same arguments give byte-identical files whatever the
number of worker processes.
"""
from __future__ import annotations

import colorsys
import dataclasses
import json
import multiprocessing
import os
import pathlib
import shutil
import sys
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    'DemoClass', 'MAX_CLASSES', 'demo_classes', 'train_counts', 'generate_demo_dataset',
    'ensure_demo_dataset', 'is_complete', 'render_image',
]

FORMAT_VERSION = 1
COMPLETE_MARKER = '.complete'
REGIONS_FILE = 'regions.json'
CLASSES_FILE = 'classes.json'
README_FILE = 'README.txt'
SPLITS = ('train', 'test')
JPEG_QUALITY = 92

GRILLES = ('H', 'V', 'Mesh', 'None')
LIGHT_SHAPES = ('Round', 'Rect')
LIGHT_COLOURS = {'White': (246, 246, 232), 'Amber': (255, 150, 0), 'Blue': (35, 110, 255)}
BADGES = {  # brand name -> (badge shape, fill colour)
    'Orbis': ('disc', (212, 212, 218)),
    'Rhombo': ('diamond', (225, 25, 35)),
}
GRILLE_YEAR = {'H': 2012, 'V': 2009, 'Mesh': 2016, 'None': 2021}
MAX_CLASSES = len(GRILLES) * len(LIGHT_SHAPES) * len(LIGHT_COLOURS) * len(BADGES)

# Geometry is designed in a canonical 96 x 72 frame (the default size) for a car facing right;
# it is scaled to the requested size and mirrored for cars facing left.
_CW, _CH = 96.0, 72.0
_SS = 2  # supersampling factor (drawn at 2x, box-filtered down: anti-aliased shapes)
_CAR_LEN = 76.0  # car length in canonical px at scale 1 (side 0..40, front face 40..76)
_FACE = (40.0, -35.0, 76.0, -4.0)  # front face / detail region, relative to (x0, ground)


@dataclasses.dataclass(frozen=True)
class DemoClass:
    """One demo class: its folder name and the front details that define it."""
    index: int          # position in the generation table (NOT the ImageFolder label)
    name: str
    grille: str         # one of GRILLES
    light_shape: str    # one of LIGHT_SHAPES
    light_colour: str   # one of LIGHT_COLOURS
    brand: str          # one of BADGES (the badge)

    @property
    def badge(self) -> str:
        return BADGES[self.brand][0]


def _class_table() -> list[DemoClass]:
    brands = list(BADGES)
    designs = [(g, s, c) for g in GRILLES for s in LIGHT_SHAPES for c in LIGHT_COLOURS]
    # Interleave grilles so that any prefix of the table covers all grille patterns.
    designs.sort(key=lambda d: (LIGHT_SHAPES.index(d[1]) * 3 + list(LIGHT_COLOURS).index(d[2]),
                                GRILLES.index(d[0])))
    rows = []
    for rnd in range(len(brands)):  # first pass: badge = parity of the design; second: the other
        for g, s, c in designs:
            parity = (GRILLES.index(g) + LIGHT_SHAPES.index(s) + list(LIGHT_COLOURS).index(c)) % 2
            brand = brands[(parity + rnd) % len(brands)]
            name = f'{brand} Motors Grille-{g} {s}-{c} {GRILLE_YEAR[g]}'
            rows.append(DemoClass(len(rows), name, g, s, c, brand))
    return rows


_TABLE = _class_table()


def demo_classes(num_classes: int = 20) -> list[DemoClass]:
    """The first `num_classes` classes of the fixed class table (independent of the seed)."""
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError(f'num_classes must be in [1, {MAX_CLASSES}], got {num_classes}')
    return _TABLE[:num_classes]


def train_counts(num_classes: int, train_per_class: tuple[int, int], seed: int) -> list[int]:
    """Per-class train counts (in table order): evenly spread over [lo, hi], seeded order."""
    lo, hi = (int(v) for v in train_per_class)
    if not 1 <= lo <= hi:
        raise ValueError(f'train_per_class must satisfy 1 <= lo <= hi, got {train_per_class}')
    counts = np.rint(np.linspace(lo, hi, num_classes)).astype(int)
    perm = np.random.default_rng([seed, 0xC0FFEE]).permutation(num_classes)
    return [int(c) for c in counts[perm]]


# --------------------------------------------------------------------------------------------
# Rendering (pure: parameters + RNG -> image, box)
# --------------------------------------------------------------------------------------------

def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v)) * 255.0


def _rgb(c) -> tuple[int, int, int]:
    return tuple(int(round(float(x))) for x in np.clip(c, 0, 255))


def _background(rng: np.random.Generator, w: int, h: int, horizon: float) -> np.ndarray:
    """Sky + ground with random colours and textures; float32 (h, w, 3) in [0, 255]."""
    ys = (np.arange(h, dtype=np.float32) + 0.5)[:, None, None]
    xs = (np.arange(w, dtype=np.float32) + 0.5)[None, :, None]
    sky_top = _hsv(rng.random(), rng.uniform(0.0, 0.6), rng.uniform(0.45, 1.0))
    sky_bot = _hsv(rng.random(), rng.uniform(0.0, 0.4), rng.uniform(0.5, 1.0))
    gnd_top = _hsv(rng.random(), rng.uniform(0.0, 0.6), rng.uniform(0.2, 0.75))
    gnd_bot = _hsv(rng.random(), rng.uniform(0.0, 0.6), rng.uniform(0.15, 0.7))
    t_sky = np.clip(ys / max(horizon, 1.0), 0, 1)
    t_gnd = np.clip((ys - horizon) / max(h - horizon, 1.0), 0, 1)
    img = np.where(ys < horizon, sky_top * (1 - t_sky) + sky_bot * t_sky,
                   gnd_top * (1 - t_gnd) + gnd_bot * t_gnd)
    img = np.broadcast_to(img, (h, w, 3)).astype(np.float32)
    if rng.random() < 0.7:  # low-frequency blotches (clouds, dirt, lighting)
        gh, gw = rng.integers(2, 6), rng.integers(2, 8)
        coarse = rng.normal(0, rng.uniform(8, 28), size=(gh, gw, 3)).astype(np.float32)
        field = np.stack([np.asarray(Image.fromarray(coarse[..., k]).resize((w, h), Image.BICUBIC))
                          for k in range(3)], -1)
        img = img + field
    if rng.random() < 0.5:  # a diagonal/vertical shading ramp
        ang = rng.uniform(0, 2 * np.pi)
        ramp = (np.cos(ang) * xs / w + np.sin(ang) * ys / h) * rng.uniform(10, 40)
        img = img + ramp
    return img


def _draw_scenery(d: ImageDraw.ImageDraw, rng: np.random.Generator, sx: float, sy: float,
                  horizon: float, ground: float) -> None:
    """Class-independent clutter: buildings/trees on the horizon, road markings."""
    if rng.random() < 0.6:
        x = rng.uniform(-10, 0)
        base = _hsv(rng.random(), rng.uniform(0, 0.5), rng.uniform(0.15, 0.7))
        while x < _CW:
            bw = rng.uniform(5, 18)
            bh = rng.uniform(4, min(28, horizon - 2)) if horizon > 8 else 3
            col = _rgb(base * rng.uniform(0.7, 1.3))
            if rng.random() < 0.5:
                d.rectangle([x * sx, (horizon - bh) * sy, (x + bw) * sx, horizon * sy], fill=col)
            else:
                d.ellipse([x * sx, (horizon - bh) * sy, (x + bw) * sx, (horizon + bh * 0.3) * sy],
                          fill=col)
            x += bw + rng.uniform(-2, 10)
    if rng.random() < 0.5:
        y = rng.uniform(horizon + 2, _CH - 1)
        col = _rgb(_hsv(rng.uniform(0.1, 0.17), rng.uniform(0, 0.8), rng.uniform(0.6, 1.0)))
        x = rng.uniform(-12, 0)
        thick = rng.uniform(0.8, 2.0)
        while x < _CW:
            seg = rng.uniform(6, 14)
            d.rectangle([x * sx, y * sy, (x + seg) * sx, (y + thick) * sy], fill=col)
            x += seg + rng.uniform(4, 10)


def _draw_car(d: ImageDraw.ImageDraw, rng: np.random.Generator, cls: DemoClass,
              x0: float, ground: float, k: float, sx: float, sy: float) -> None:
    """The car facing right; car-relative canonical coordinates scaled by k."""

    def P(x, y):  # car-relative canonical -> supersampled pixel
        return ((x0 + x * k) * sx, (ground + y * k) * sy)

    def R(x1, y1, x2, y2):
        (a, b), (c, e) = P(x1, y1), P(x2, y2)
        return [min(a, c), min(b, e), max(a, c), max(b, e)]

    lw = max(1, int(round(1.0 * k * sx)))  # outline width ~1 canonical px
    body = _hsv(rng.random(), rng.uniform(0.0, 0.9), rng.uniform(0.25, 0.95))
    side = _rgb(body * rng.uniform(0.68, 0.85))
    face = _rgb(body * rng.uniform(0.95, 1.08))
    dark = _rgb(body * 0.45)
    glass = _rgb(_hsv(rng.uniform(0.5, 0.7), rng.uniform(0.1, 0.5), rng.uniform(0.15, 0.45)))
    glass_hi = _rgb(np.array(glass) * 1.5 + 20)
    tyre = (22, 22, 24)
    hub = _rgb(np.full(3, rng.uniform(120, 210)))

    # shadow on the ground
    sh = _rgb(np.full(3, rng.uniform(10, 50)))
    d.ellipse(R(-3, -3, 79, 2.5), fill=sh)
    # cabin (side windows + windscreen above the front face)
    d.polygon([P(3, -33), P(12, -49), P(44, -49), P(46, -35), P(44, -33)], fill=side)
    d.polygon([P(6, -33.5), P(13.5, -46.5), P(25, -46.5), P(25, -33.5)], fill=glass)
    d.polygon([P(27, -33.5), P(27, -46.5), P(41.5, -46.5), P(42.5, -33.5)], fill=glass)
    d.polygon([P(42, -35), P(47, -49), P(69, -49), P(74, -35)], fill=face)
    d.polygon([P(44.5, -36), P(48.5, -47), P(67.5, -47), P(71.5, -36)], fill=glass)
    d.line([P(52, -45), P(56, -38)], fill=glass_hi, width=lw)  # reflection streak
    # side body with door line, handle, mirror
    d.rectangle(R(0, -34, 41, -5), fill=side)
    d.line([P(25.5, -33), P(25.5, -8)], fill=dark, width=lw)
    d.rectangle(R(29, -27, 33, -25.5), fill=dark)
    d.polygon([P(41, -36), P(37, -39), P(37, -35)], fill=side)
    # wheels (side) and tyre stubs under the front face
    for cx in (9.0, 32.0):
        d.ellipse(R(cx - 7, -14, cx + 7, 0), fill=tyre)
        d.ellipse(R(cx - 3.5, -10.5, cx + 3.5, -3.5), fill=hub)
    d.rectangle(R(42, -6, 48, 0), fill=tyre)
    d.rectangle(R(68, -6, 74, 0), fill=tyre)
    # front face panel + bumper
    fx1, fy1, fx2, fy2 = _FACE
    d.rectangle(R(fx1, fy1, fx2, fy2), fill=face)
    d.rectangle(R(fx1, -5.5, fx2, fy2), fill=dark)

    # ---- the class-defining details: bold and coarse (bars 3.5-4.5 px at 96 x 72), so that
    # they survive a resize to 64 px, blur and a stride-4 CNN stem -----------------------------
    chrome = (205, 205, 210)
    black = (15, 15, 17)
    gx1, gy1, gx2, gy2 = 43.0, -21.5, 73.0, -6.5  # grille opening, 30 x 15
    if cls.grille != 'None':
        d.rectangle(R(gx1, gy1, gx2, gy2), fill=black)
        if cls.grille == 'H':    # two wide horizontal slats
            for y in (gy1 + 2.5, gy1 + 9.0):
                d.rectangle(R(gx1 + 1.5, y, gx2 - 1.5, y + 3.5), fill=chrome)
        elif cls.grille == 'V':  # three wide vertical slats
            for x in (gx1 + 3.0, gx1 + 12.75, gx1 + 22.5):
                d.rectangle(R(x, gy1 + 1.5, x + 4.5, gy2 - 1.5), fill=chrome)
        else:                    # Mesh: chrome lattice with 2 x 4 square dark holes
            d.rectangle(R(gx1 + 1.0, gy1 + 1.0, gx2 - 1.0, gy2 - 1.0), fill=chrome)
            for x in (gx1 + 3.0, gx1 + 9.75, gx1 + 16.5, gx1 + 23.25):
                for y in (gy1 + 3.0, gy1 + 8.5):
                    d.rectangle(R(x, y, x + 3.75, y + 3.5), fill=black)
    light = LIGHT_COLOURS[cls.light_colour]
    rim = (30, 30, 32)
    ly = -28.5
    for cx in (46.5, 69.5):
        if cls.light_shape == 'Round':  # a tall disc ...
            d.ellipse(R(cx - 5.2, ly - 5.2, cx + 5.2, ly + 5.2), fill=light, outline=rim, width=lw)
        else:                           # ... or a flat wide slab
            d.rectangle(R(cx - 6.2, ly - 2.3, cx + 6.2, ly + 2.3), fill=light, outline=rim,
                        width=lw)
    shape, colour = BADGES[cls.brand]
    bx, by, br = 58.0, ly, 4.0
    if shape == 'disc':
        d.ellipse(R(bx - br, by - br, bx + br, by + br), fill=colour, outline=rim, width=lw)
    else:
        d.polygon([P(bx, by - br - 0.8), P(bx + br, by), P(bx, by + br + 0.8), P(bx - br, by)],
                  fill=colour, outline=rim)


def render_image(cls: DemoClass, rng: np.random.Generator,
                 image_size: tuple[int, int] = (96, 72)) -> tuple[Image.Image, list[int]]:
    """Draw one image of class `cls`; returns (RGB image, detail box [x1, y1, x2, y2])."""
    w, h = int(image_size[0]), int(image_size[1])
    sx, sy = w / _CW * _SS, h / _CH * _SS  # canonical -> supersampled pixels

    k = rng.uniform(0.9, 1.07)                       # car size
    ground = rng.uniform(58.0, 68.5)                 # y of the wheels' contact line
    margin = 3.0
    x0 = rng.uniform(margin, _CW - margin - _CAR_LEN * k)
    horizon = rng.uniform(24.0, ground - 12.0)
    facing_left = bool(rng.random() < 0.5)

    bg = _background(rng, w * _SS, h * _SS, horizon * sy)
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), 'RGB')
    d = ImageDraw.Draw(img)
    _draw_scenery(d, rng, sx, sy, horizon, ground)
    _draw_car(d, rng, cls, x0, ground, k, sx, sy)
    img = img.resize((w, h), Image.BOX)

    # global lighting (brightness / contrast / slight colour cast) + sensor noise
    a = np.asarray(img, np.float32)
    mean = a.mean()
    a = (a - mean) * rng.uniform(0.75, 1.25) + mean
    a = a * rng.uniform(0.7, 1.2) * rng.uniform(0.94, 1.06, size=3).astype(np.float32)
    a = a + rng.normal(0, rng.uniform(1.0, 6.0), size=a.shape).astype(np.float32)
    img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), 'RGB')

    fx1, fy1, fx2, fy2 = _FACE
    bx1, bx2 = (x0 + fx1 * k) * w / _CW, (x0 + fx2 * k) * w / _CW
    by1, by2 = (ground + fy1 * k) * h / _CH, (ground + fy2 * k) * h / _CH
    if facing_left:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
        bx1, bx2 = w - bx2, w - bx1
    box = [max(0, int(np.floor(bx1))), max(0, int(np.floor(by1))),
           min(w, int(np.ceil(bx2))), min(h, int(np.ceil(by2)))]
    return img, box


def _image_rng(seed: int, split: str, class_index: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), SPLITS.index(split), int(class_index), int(index),
                                  0xCA25])


def _jax_backends_running() -> bool:
    """Whether JAX has started its (multithreaded) runtime in this process."""
    if 'jax' not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge  # private, hence the fallback
        return bool(xla_bridge.backends_are_initialized())
    except Exception:  # noqa: BLE001 - unknown JAX version: assume it runs
        return True


def _start_method_context():
    """'fork' where it is safe (fast: workers need no imports), else a fresh interpreter per
    worker ('forkserver' / 'spawn', ~1-2 s: the worker imports cars_jax): forking a process
    whose JAX runtime runs can deadlock the child. The output is the same either way."""
    methods = multiprocessing.get_all_start_methods()
    if 'fork' in methods and not _jax_backends_running():
        return multiprocessing.get_context('fork')
    return multiprocessing.get_context('forkserver' if 'forkserver' in methods else 'spawn')


def _render_job(job) -> tuple[str, list[int]]:
    """Worker: render one image, write its JPEG, return (relative path, box)."""
    root, rel, seed, split, class_index, index, image_size = job
    img, box = render_image(_TABLE[class_index], _image_rng(seed, split, class_index, index),
                            image_size)
    img.save(os.path.join(root, rel), format='JPEG', quality=JPEG_QUALITY, subsampling=0)
    return rel, box


# --------------------------------------------------------------------------------------------
# Writing the tree
# --------------------------------------------------------------------------------------------

def _params(num_classes, train_per_class, test_per_class, image_size, seed) -> dict:
    return {
        'format_version': FORMAT_VERSION,
        'num_classes': int(num_classes),
        'train_per_class': [int(v) for v in train_per_class],
        'test_per_class': int(test_per_class),
        'image_size': [int(v) for v in image_size],
        'seed': int(seed),
    }


def _remove_outputs(root: pathlib.Path) -> None:
    """Remove what generate_demo_dataset writes (and nothing else) under root.

    Refuses (ValueError) when root/train or root/test holds anything but demo class folders:
    a real data set pointed at by mistake is never deleted.
    """
    known = {c.name for c in _TABLE}
    for split in SPLITS:
        p = root / split
        if p.is_dir() and not p.is_symlink():
            foreign = sorted(e.name for e in p.iterdir() if not (e.is_dir() and e.name in known))
            if foreign:
                raise ValueError(
                    f'{p} holds {foreign[:3]}{" ..." if len(foreign) > 3 else ""}, which the demo '
                    'generator did not write; refusing to replace it. Choose another folder for '
                    'the demo data.')
    for name in (COMPLETE_MARKER, REGIONS_FILE, CLASSES_FILE, README_FILE):
        p = root / name
        if p.is_file() or p.is_symlink():
            p.unlink()
    for split in SPLITS:
        p = root / split
        if p.is_symlink() or p.is_file():
            p.unlink()
        elif p.exists():
            shutil.rmtree(p)


def _readme(params: dict, classes: Sequence[DemoClass], counts: Sequence[int]) -> str:
    w, h = params['image_size']
    n_train, n_test = sum(counts), params['test_per_class'] * len(classes)
    lines = [
        'cars_jax demo data: procedurally drawn "cars" for a fine-grained classification demo',
        '=' * 86,
        '',
        'Generated by cars_jax.data.synthetic.generate_demo_dataset with',
        '  ' + json.dumps(params, sort_keys=True),
        'Same parameters -> byte-identical files. Not real photographs; for smoke tests and',
        'demos of the training recipe only.',
        '',
        'Every image shows one car. Its body colour, size, position, facing (left/right),',
        'background, scenery and lighting vary freely from image to image. The classes differ',
        'ONLY in small details on the front face of the car:',
        '  grille      H (horizontal bars) | V (vertical bars) | Mesh | None (no grille)',
        '  headlights  Round | Rect, coloured White | Amber | Blue',
        '  badge       chrome disc ("Orbis Motors") | red diamond ("Rhombo Motors")',
        '',
        f'Layout (torchvision ImageFolder): train/<class>/NNNNN.jpg ({n_train} images,',
        f'imbalanced: {min(counts)}..{max(counts)} per class), test/<class>/NNNNN.jpg '
        f'({n_test} images, {params["test_per_class"]} per class). JPEG, RGB, {w}x{h} px.',
        'Labels are the class folders; ImageFolder numbers them in sorted order of the names.',
        '',
        'regions.json maps every image path (relative to this folder, "/"-separated) to the',
        'box [x1, y1, x2, y2] of its discriminative detail region (grille + headlights +',
        'badge) in pixels of that image, x2/y2 exclusive (PIL crop convention). A model that',
        'classifies well must look there: use it to check Grad-CAM maps.',
        'classes.json lists the details of every class.',
        '.complete is written last; a folder without it is an interrupted generation.',
        '',
        f'Classes ({len(classes)}): name, train images',
    ]
    lines += [f'  {c.name}  ({n})' for c, n in sorted(zip(classes, counts), key=lambda t: t[0].name)]
    return '\n'.join(lines) + '\n'


def generate_demo_dataset(root: str | os.PathLike, *, num_classes: int = 20,
                          train_per_class: tuple[int, int] = (40, 120), test_per_class: int = 30,
                          image_size: tuple[int, int] = (96, 72), seed: int = 0,
                          num_workers: int = 2) -> pathlib.Path:
    """Write the demo data set under `root` (see the module doc); returns root as a Path.

    Args:
      root: output folder; previous demo output in it is replaced, other files are kept.
      num_classes: 1..MAX_CLASSES (48); the first classes of the fixed class table.
      train_per_class: (lo, hi): train counts spread evenly over [lo, hi] across classes
        (seeded order), i.e. imbalanced hi:lo.
      test_per_class: test images per class (balanced).
      image_size: (width, height) in pixels.
      seed: the only source of randomness.
      num_workers: processes drawing images (<= 1: in this process). Does not change output.
    """
    root = pathlib.Path(root)
    classes = demo_classes(num_classes)
    counts = train_counts(num_classes, train_per_class, seed)
    if int(test_per_class) < 1:
        raise ValueError(f'test_per_class must be >= 1, got {test_per_class}')
    w, h = (int(v) for v in image_size)
    if w < 16 or h < 12:
        raise ValueError(f'image_size (width, height) must be at least (16, 12), got {image_size}')
    params = _params(num_classes, train_per_class, test_per_class, (w, h), seed)

    root.mkdir(parents=True, exist_ok=True)
    _remove_outputs(root)
    jobs = []
    for split in SPLITS:
        for c, n_train in zip(classes, counts):
            (root / split / c.name).mkdir(parents=True)
            n = n_train if split == 'train' else int(test_per_class)
            for i in range(n):
                rel = f'{split}/{c.name}/{i:05d}.jpg'
                jobs.append((str(root), rel, int(seed), split, c.index, i, (w, h)))

    if num_workers and num_workers > 1:
        pool = _start_method_context().Pool(int(num_workers))
        try:
            results = pool.map(_render_job, jobs, chunksize=max(1, len(jobs) // (8 * num_workers)))
            pool.close()  # close + join: `with Pool` terminates, which takes seconds here
        except BaseException:
            pool.terminate()
            raise
        finally:
            pool.join()
    else:
        results = [_render_job(j) for j in jobs]

    regions = {rel: box for rel, box in results}
    (root / REGIONS_FILE).write_text(json.dumps(regions, sort_keys=True, indent=0) + '\n')
    table = [dict(dataclasses.asdict(c), badge=c.badge, train_images=n)
             for c, n in zip(classes, counts)]
    (root / CLASSES_FILE).write_text(json.dumps(table, indent=1) + '\n')
    (root / README_FILE).write_text(_readme(params, classes, counts))
    (root / COMPLETE_MARKER).write_text(json.dumps(params, sort_keys=True) + '\n')
    return root


def is_complete(root: str | os.PathLike) -> bool:
    """Whether `root` holds a finished generation (its `.complete` marker, written last)."""
    return (pathlib.Path(root) / COMPLETE_MARKER).is_file()


def ensure_demo_dataset(root: str | os.PathLike, **kwargs) -> pathlib.Path:
    """Generate the demo data under `root` unless a finished generation is already there.

    A tree without `.complete` (an interrupted generation) has its partial output removed and is
    regenerated. A finished tree is used as it is, whatever parameters made it (its `.complete`
    and README.txt record them): callers that only need "the demo data" (e.g. the data loader
    with a user's data_dir) never discard a set generated with other settings.
    kwargs: as for `generate_demo_dataset`.
    """
    root = pathlib.Path(root)
    if is_complete(root):
        return root
    return generate_demo_dataset(root, **kwargs)
