"""Evaluation, reports, Grad-CAM figures and predictions: the impure edge around the model.

  evaluate(...)            loss / top-1 / top-5 sums through the jitted eval step (per epoch)
  predict_records(...)     class probabilities of every record (for reports)
  write_eval_report(...)   classification report, per-class CSV, confusion matrix, accuracy bars
  gradcam_figure(...)      Grad-CAM grid of one image per class (the seed's figure, done right)
  localisation_scores(...) pointing game / mass inside the demo data's detail boxes vs chance
  predict_paths(...)       top-k class names of image files, with optional flip TTA
"""
from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from cars_jax import gradcam as gc
from cars_jax import metrics, report_plots
from cars_jax.config import read_run_config
from cars_jax.data import pipeline
from cars_jax.data.augment import AugmentConfig, denormalize, eval_transform
from cars_jax.data.sources import (IMAGE_EXTENSIONS, DataError, Record, decode_image,
                                   format_skipped)
from cars_jax.distributed import global_batch, host_local
from cars_jax.fileio import atomic_write_text, write_json_atomic
from cars_jax.model import build_model, stage_map_sizes
from cars_jax.steps import TrainState, create_train_state, inference_variables, predict_step


def _eval_batches(records: Sequence[Record], config: ml_collections.ConfigDict,
                  shard: tuple[int, int] = (0, 1)):
    ds = pipeline.eval_dataset(records, AugmentConfig.from_config(config),
                               batch_size=config.batch_size, use_bbox=config.use_bbox,
                               bbox_margin=config.bbox_margin, num_workers=config.num_workers,
                               prefetch=config.prefetch_batches, shard=shard)
    for batch in ds:
        yield pipeline.pad_batch(batch, config.batch_size // shard[1])


def evaluate(eval_fn: Callable, state: TrainState, records: Sequence[Record],
             config: ml_collections.ConfigDict, mesh: Mesh | None = None) -> dict[str, float]:
    """Label-smoothed loss, top-1 and top-5 over all records (padded last batch).
    With a mesh spanning several processes, each process reads its rows of every batch."""
    multi = mesh is not None and jax.process_count() > 1
    shard = (jax.process_index(), jax.process_count()) if multi else (0, 1)
    sums: dict[str, float] = {}
    for batch in _eval_batches(records, config, shard):
        batch = {k: batch[k] for k in ('image', 'label', 'mask')}
        out = host_local(eval_fn(state, global_batch(batch, mesh) if multi else batch))
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    n = max(sums.get('count', 0.0), 1.0)
    return {'loss': sums.get('loss_sum', float('nan')) / n,
            'accuracy': sums.get('correct_sum', 0.0) / n, 'top5': sums.get('top5_sum', 0.0) / n,
            'count': int(sums.get('count', 0))}


def predict_records(state: TrainState, records: Sequence[Record], config: ml_collections.ConfigDict
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(probs (N, K), labels (N,), record indices (N,)) of every record, inference mode."""
    predict = jax.jit(predict_step)
    probs, labels, index = [], [], []
    for batch in _eval_batches(records, config):
        keep = batch['mask'] > 0
        probs.append(np.asarray(predict(state, batch['image']))[keep])
        labels.append(batch['label'][keep])
        index.append(batch['index'][keep])
    return np.concatenate(probs), np.concatenate(labels), np.concatenate(index)


# ---- checkpoints of a workdir ----------------------------------------------------------------

def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config a run wrote to its workdir."""
    path = os.path.join(workdir, 'config.json')
    if not os.path.exists(path):
        raise FileNotFoundError(f'{path} not found: --workdir must be a cars_jax run directory '
                                '(train one with python main.py --config=... --workdir=...).')
    return read_run_config(path)


def load_class_names(workdir: str) -> list[str]:
    with open(os.path.join(workdir, 'class_names.json')) as f:
        return json.load(f)


def restore_best_state(workdir: str, config: ml_collections.ConfigDict, num_classes: int
                       ) -> tuple[TrainState, dict]:
    """(state, meta) of the best checkpoint of `workdir`."""
    from cars_jax.checkpoints import checkpoint_managers, restore_checkpoint
    latest_mgr, best_mgr = checkpoint_managers(workdir,
                                               config.early_stopping_metric)
    try:
        step = best_mgr.best_step()
        if step is None:
            raise FileNotFoundError(f'no best checkpoint in {workdir}/checkpoints/best yet '
                                    '(it is written after the first epoch).')
        # The schedule is not in the saved tree: any length that builds one gives the template
        # (steps_per_epoch=1 broke for 1-epoch runs: a one-cycle needs 2 steps or more).
        template = create_train_state(config, jax.random.PRNGKey(0), num_classes,
                                      steps_per_epoch=2)
        return restore_checkpoint(best_mgr, template, step)
    finally:
        latest_mgr.close()
        best_mgr.close()


# ---- reports ---------------------------------------------------------------------------------

def write_eval_report(state: TrainState, records: Sequence[Record], class_names: list[str],
                      config: ml_collections.ConfigDict, out_dir: str, split: str,
                      log: Callable[[str], None] = print) -> dict[str, Any]:
    """Classification report of `records` written to out_dir/{split}_*: JSON, per-class CSV,
    confusion matrix PNG and per-class accuracy PNG; returns the report."""
    os.makedirs(out_dir, exist_ok=True)
    probs, labels, _ = predict_records(state, records, config)
    k = len(class_names)
    report = metrics.classification_report(labels, probs, k, class_names)
    cm = metrics.confusion_matrix(labels, probs.argmax(1), k)
    metrics.write_per_class_csv(report, os.path.join(out_dir, f'{split}_per_class.csv'))
    report_plots.plot_confusion_matrix(cm, class_names, os.path.join(out_dir, f'{split}_confusion.png'))
    report_plots.plot_per_class_accuracy(report, os.path.join(out_dir, f'{split}_per_class_accuracy.png'))
    write_json_atomic(os.path.join(out_dir, f'{split}_report.json'), report, indent=1)
    log(f'[{split}] ' + metrics.format_report(report).replace('\n', f'\n[{split}] '))
    return report


def localisation_scores(state: TrainState, model, records: Sequence[Record], regions: dict,
                        data_dir: str, config: ml_collections.ConfigDict) -> dict[str, float]:
    """Grad-CAM against the demo data's detail boxes, on correctly classified images.

    pointing game: share whose map maximum lies in the box; mass inside: mean share of the
    map's mass in the box; chance: mean share of the image the box covers (a uniform map's
    mass share, and the pointing-game score of a random point)."""
    cam_fn = gc.make_gradcam_fn(model, gradcam_layer(config))
    s = config.image_size
    hits, masses, areas = [], [], []
    for batch in _eval_batches(records, config):
        out = jax.device_get(cam_fn(inference_variables(state), batch['image']))
        for i in np.flatnonzero(batch['mask'] > 0):
            rec = records[int(batch['index'][i])]
            if int(out['targets'][i]) != rec.label:
                continue
            rel = os.path.relpath(rec.image, data_dir).replace(os.sep, '/')
            if rel not in regions:
                continue
            w, h = _image_size(rec.image)
            box = np.asarray([gc.scale_box(regions[rel], (w, h), (s, s))], np.float32)
            cam = out['cam'][i][None]
            hits.append(gc.pointing_game(cam, box)[0])
            masses.append(gc.mass_inside(cam, box)[0])
            areas.append(gc.box_area_share(box, s, s)[0])
    if not hits:
        return {'images': 0}
    return {'images': len(hits), 'pointing_game': float(np.mean(hits)),
            'mass_inside': float(np.mean(masses)), 'chance_area_share': float(np.mean(areas))}


def last_stage(config: ml_collections.ConfigDict) -> str:
    """Name of the last stage's activation (the seed's model.l4 for ResNet-18)."""
    return f'stage{len(config.stage_sizes)}'


def stage_sides(config: ml_collections.ConfigDict) -> dict[str, int]:
    """{'stage1': side, ...}: each stage's map side at config.image_size."""
    sides = stage_map_sizes(config.image_size, len(config.stage_sizes),
                            config.stem_pool, config.stem)
    return {f'stage{i + 1}': s for i, s in enumerate(sides)}


def gradcam_layer(config: ml_collections.ConfigDict) -> str:
    """The stage Grad-CAM explains by default: the deepest whose maps are at least 2x2. The
    last stage's 1x1 maps (the seed's net below 33 px) upsample to a flat map; a 2x2 map is
    coarse but still says which quarter of the image the class evidence is in."""
    sides = stage_sides(config)
    return ([name for name, side in sides.items() if side >= 2] or ['stage1'])[-1]


def _image_size(path: str) -> tuple[int, int]:
    from PIL import Image
    with Image.open(path) as im:
        return im.size


def one_per_class(records: Sequence[Record], n_classes: int) -> list[int]:
    """Index of the first record of each of the first n classes (the seed's Grad-CAM pick)."""
    first: dict[int, int] = {}
    for i in range(len(records)):
        label = records[i].label
        if label < n_classes and label not in first:
            first[label] = i
        if len(first) == n_classes:
            break
    return [first[c] for c in sorted(first)]


def gradcam_figure(state: TrainState, model, images: np.ndarray, labels: Sequence[int] | None,
                   class_names: list[str], config: ml_collections.ConfigDict, path: str,
                   titles: Sequence[str] | None = None, layer: str | None = None,
                   log: Callable[[str], None] = print) -> dict:
    """Grad-CAM grid of normalised eval images (N, S, S, 3). labels None: the truth is
    unknown and `titles` (e.g. file names) caption the images; layer None: `gradcam_layer`.
    A layer with 1x1 maps (flat Grad-CAM) is drawn, with a warning naming a better one.
    Returns the predictions, their confidence, the layer and its low-resolution maps."""
    sides, best = stage_sides(config), gradcam_layer(config)
    if layer is None:
        layer = best
        if layer != last_stage(config):
            log(f'Grad-CAM on {layer} ({sides[layer]}x{sides[layer]} maps): the last stage, '
                f'{last_stage(config)}, has 1x1 maps at {config.image_size} px.')
    elif sides[layer] < 2:
        log(f'Warning: --layer={layer} has {sides[layer]}x{sides[layer]} maps at '
            f'{config.image_size} px, so every Grad-CAM map is flat; use --layer={best} (the '
            f'deepest stage with at least 2x2 maps) or a larger --config.image_size.')
    cam_fn = gc.make_gradcam_fn(model, layer)
    out = jax.device_get(cam_fn(inference_variables(state), jnp.asarray(images)))
    preds = out['targets']
    conf = out['probs'][np.arange(len(preds)), preds]
    true_names = [class_names[int(l)] for l in labels] if labels is not None else None
    pred_names = [class_names[int(p)] for p in preds]
    gc.plot_gradcam_grid(denormalize(images, config.mean, config.std), out['cam'], true_names,
                         pred_names, conf, path, captions=titles,
                         title=f'Grad-CAM ({layer}, {sides[layer]}x{sides[layer]} maps, '
                               'predicted class)')
    return {'preds': preds, 'confidence': conf, 'layer': layer, 'cam_lowres': out['cam_lowres']}


# ---- predictions on files ----------------------------------------------------------------

def image_paths(path: str) -> list[str]:
    """An image file, or every image file under a folder (sorted)."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f'--images={path} does not exist (give an image file or a folder).')
    found = sorted(os.path.join(d, f) for d, _, files in os.walk(path) for f in files
                   if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith('.'))
    if not found:
        raise FileNotFoundError(f'no image files ({", ".join(IMAGE_EXTENSIONS)}) under {path}.')
    return found


def load_eval_images(paths: Sequence[str], config: ml_collections.ConfigDict
                     ) -> tuple[np.ndarray, list[str], list[tuple[str, str]]]:
    """Eval-transformed images of the readable paths, and (path, reason) of the others."""
    aug = AugmentConfig.from_config(config)
    images, ok, bad = [], [], []
    for p in paths:
        try:
            images.append(eval_transform(decode_image(p), aug))
            ok.append(p)
        except Exception as e:  # noqa: BLE001 - any unreadable file is reported, not fatal
            bad.append((p, str(getattr(e, 'reason', e))))
    shape = (0, config.image_size, config.image_size, 3)
    return (np.stack(images) if images else np.zeros(shape, np.float32)), ok, bad


def predict_paths(state: TrainState, paths: Sequence[str], class_names: list[str],
                  config: ml_collections.ConfigDict, *, top_k: int = 5, tta_flip: bool = False,
                  csv_path: str | None = None) -> tuple[list[dict], list[tuple[str, str]]]:
    """Top-k (name, probability) per readable image; flip TTA averages the probabilities of
    the image and its mirror. Writes a CSV (path, rank, class, name, probability)."""
    images, ok, bad = load_eval_images(paths, config)
    predict = jax.jit(predict_step)
    rows = []
    bs = config.batch_size
    for start in range(0, len(ok), bs):
        x = images[start:start + bs]
        pad = bs - len(x)
        xp = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)]) if pad else x
        probs = np.asarray(predict(state, xp))
        if tta_flip:
            probs = 0.5 * (probs + np.asarray(predict(state, xp[:, :, ::-1])))
        for j, p in enumerate(probs[:len(x)]):
            top = np.argsort(-p, kind='stable')[:top_k]
            rows.append({'path': ok[start + j],
                         'top': [(int(c), class_names[int(c)], float(p[c])) for c in top]})
    if csv_path:
        atomic_write_text(csv_path, lambda f: _write_predictions(f, rows, bad), newline='',
                          encoding='utf-8')
    return rows, bad


def _write_predictions(f, rows: list[dict], bad: list[tuple[str, str]]) -> None:
    w = csv.writer(f)
    w.writerow(['path', 'rank', 'class', 'name', 'probability'])
    for r in rows:
        for rank, (c, name, prob) in enumerate(r['top'], 1):
            w.writerow([r['path'], rank, c, name, f'{prob:.6f}'])
    for p, reason in bad:
        w.writerow([p, '', '', f'UNREADABLE: {reason}', ''])


# ---- the CLI modes ---------------------------------------------------------------------------

def _load(workdir: str, init_from: str | None = None,
          config: ml_collections.ConfigDict | None = None):
    """(config, class_names, state, meta) of a workdir's best checkpoint, or of a seed PyTorch
    checkpoint (`init_from`, a .pt state_dict) with the class names of config's data."""
    if init_from is None:
        config = load_run_config(workdir)
        class_names = load_class_names(workdir)
        state, meta = restore_best_state(workdir, config, len(class_names))
        return config, class_names, state, meta
    from cars_jax import interop
    from cars_jax.data.dataset import build_data
    _, variables, arch = interop.model_from_torch_checkpoint(init_from, config)
    class_names = build_data(config).class_names
    if len(class_names) != arch['num_classes']:
        raise interop.InteropError(
            f'{init_from} has {arch["num_classes"]} outputs but {config.data_dir} has '
            f'{len(class_names)} classes; point --config.data_dir at the data it was trained on.')
    config = interop.seed_checkpoint_config(config, arch)
    template = create_train_state(config, jax.random.PRNGKey(0), len(class_names), 1)
    state = template.replace(params=variables['params'], batch_stats=variables['batch_stats'])
    os.makedirs(workdir, exist_ok=True)
    return config, class_names, state, {'progress': {'best_epoch': -1}, 'init_from': init_from}


def _demo_regions(config) -> dict | None:
    path = os.path.join(config.data_dir, 'regions.json')
    if config.data_source in ('demo', 'folders') and os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return None


def full_report(state: TrainState, data, config: ml_collections.ConfigDict, out_dir: str,
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """Reports of the validation (and test) split, plus Grad-CAM localisation scores when the
    data records detail regions (the demo); writes out_dir/summary.json."""
    class_names = data.class_names
    result: dict[str, Any] = {}
    for split, records in (('val', data.val), ('test', data.test)):
        if len(records):
            result[split] = write_eval_report(state, records, class_names, config, out_dir, split,
                                              log)
    regions = _demo_regions(config)
    if regions is not None:
        model = build_model(config, len(class_names))
        loc = localisation_scores(state, model, data.val, regions, config.data_dir, config)
        result['localisation'] = loc
        if loc.get('images'):
            log(f'Grad-CAM localisation on {loc["images"]} correctly classified validation images: '
                f'pointing game {loc["pointing_game"]:.3f}, map mass inside the detail box '
                f'{loc["mass_inside"]:.3f}; chance (box area share) {loc["chance_area_share"]:.3f}.')
    summary = {k: ({m: v[m] for m in ('top1', 'top5', 'macro_f1', 'weighted_f1')}
                   if k in ('val', 'test') else v) for k, v in result.items()}
    write_json_atomic(os.path.join(out_dir, 'summary.json'), summary, indent=2)
    log(f'Reports in {out_dir}/')
    return result


def run_eval(workdir: str, log: Callable[[str], None] = print, init_from: str | None = None,
             config: ml_collections.ConfigDict | None = None) -> dict[str, Any]:
    """--mode=eval: the best checkpoint's full report (see `full_report`)."""
    from cars_jax.data.dataset import build_data
    config, class_names, state, meta = _load(workdir, init_from, config)
    data = build_data(config)
    if data.class_names != class_names:
        raise DataError(f'the classes under {config.data_dir} differ from those {workdir} was '
                        'trained on.')
    if data.skipped:
        log(format_skipped(data.skipped, limit=5))
    log(f'Evaluating {init_from}.' if init_from else
        f'Best checkpoint: epoch {meta["progress"]["best_epoch"] + 1}.')
    return full_report(state, data, config, os.path.join(workdir, 'eval'), log)


def run_gradcam(workdir: str, images: str | None = None, num_classes_shown: int = 10,
                layer: str | None = None, log: Callable[[str], None] = print,
                init_from: str | None = None, config: ml_collections.ConfigDict | None = None
                ) -> str:
    """--mode=gradcam: a grid for --images, or one validation image per class of the first
    `num_classes_shown` classes (the seed's figure)."""
    config, class_names, state, _ = _load(workdir, init_from, config)
    model = build_model(config, len(class_names))
    stages = [f'stage{i + 1}' for i in range(len(config.stage_sizes))]
    if layer is not None and layer not in stages:
        from cars_jax.config import ConfigError
        raise ConfigError(f'--layer={layer} is not a stage of this model; choose one of '
                          f'{", ".join(stages)}.')
    if images:
        paths = image_paths(images)[:40]
        x, ok, bad = load_eval_images(paths, config)
        for p, reason in bad:
            log(f'skipped unreadable {p}: {reason}')
        if not ok:
            raise DataError(f'none of the images under {images} could be read.')
        labels, titles = None, [os.path.basename(p) for p in ok]
    else:
        from cars_jax.data.dataset import build_data
        data = build_data(config)
        idx = one_per_class(data.val, num_classes_shown)
        aug = AugmentConfig.from_config(config)
        x = np.stack([eval_transform(decode_image(data.val[i]), aug) for i in idx])
        labels, titles = [data.val[i].label for i in idx], None
    path = os.path.join(workdir, 'gradcam.png')
    out = gradcam_figure(state, model, x, labels, class_names, config, path, titles, layer, log)
    if labels is not None:
        log(f'{int(np.sum(out["preds"] == np.asarray(labels)))}/{len(labels)} shown images correct.')
    log(f'Grad-CAM grid written to {path}')
    return path


def run_predict(workdir: str, images: str, top_k: int = 5, tta_flip: bool = False,
                log: Callable[[str], None] = print, init_from: str | None = None,
                config: ml_collections.ConfigDict | None = None) -> str:
    """--mode=predict: top-k class names with probabilities per image, and a CSV."""
    paths = image_paths(images)
    config, class_names, state, _ = _load(workdir, init_from, config)
    csv_path = os.path.join(workdir, 'predictions.csv')
    rows, bad = predict_paths(state, paths, class_names, config, top_k=top_k, tta_flip=tta_flip,
                              csv_path=csv_path)
    for r in rows:
        log(r['path'] + ': ' + ', '.join(f'{name} {p:.1%}' for _, name, p in r['top']))
    for p, reason in bad:
        log(f'{p}: UNREADABLE ({reason})')
    log(f'{len(rows)} images predicted{f", {len(bad)} unreadable" if bad else ""}; CSV: {csv_path}')
    return csv_path


def run_export(workdir: str, export_dir: str, platforms: Sequence[str] | None = None,
               log: Callable[[str], None] = print, init_from: str | None = None,
               config: ml_collections.ConfigDict | None = None) -> str:
    """--mode=export: the best checkpoint (or a seed .pt) as a self-contained jax.export
    artifact with its class names and preprocessing (load it with the copied serving.py)."""
    from cars_jax.export import export_model
    config, class_names, state, _ = _load(workdir, init_from, config)
    model = build_model(config, len(class_names))
    export_model(inference_variables(state), model, class_names, config, export_dir,
                 config.image_size, platforms=tuple(platforms) if platforms else None)
    log(f'Exported to {export_dir}/ (load: python -c "import sys; sys.path.insert(0, '
        f"'{export_dir}'); import serving; p = serving.load_exported('{export_dir}')\")")
    return export_dir


__all__ = ['evaluate', 'predict_records', 'write_eval_report', 'localisation_scores',
           'gradcam_figure', 'predict_paths', 'full_report', 'run_eval', 'run_gradcam',
           'run_predict', 'run_export']
