"""The seed notebook's PyTorch training loop, end to end, on a cars_jax config's data and split.

So that "cars_jax's seed recipe" and "the seed's own PyTorch code" can be compared on the same
images, the same train/validation split and the same hyperparameters, with the whole loop timed:

  python benchmarks/seed_torch_train.py --config=configs/cars_lowres.py \\
      --config.data_dir=DIR --workdir=runs/torch_seed \\
      [--epochs N] [--max_steps_per_epoch N] [--num_workers 2] [--threads 2] [--device auto]

  # the low-resolution development run, 30 epochs (config.num_epochs), as cars_jax trains it:
  python benchmarks/seed_torch_train.py --config=configs/cars_lowres.py \
      --config.data_dir=DIR --workdir=runs/torch_seed_lowres --num_workers 2 --threads 2

Defaults: --epochs config.num_epochs, --max_steps_per_epoch config.max_steps_per_epoch,
--num_workers 4 (the notebook's) but at most the number of cores, --threads all cores,
--device auto (cuda when this torch build sees one).

What comes from the config (`--config.NAME=VALUE` overrides work as for main.py):
  data      data_source, data_dir, val_split, val_fraction, seed, num_classes: the records are
            built by cars_jax.data.dataset.build_data, the function cars_jax's own training
            uses, so the 80/20 holdout split is the same one, record for record.
  transforms image_size and the augmentation fields, through torchvision's transforms when
            torchvision is importable (the notebook's Compose, verbatim), else through
            cars_jax's numpy/PIL port of them (benchmarks/seed_torch.py SeedTransformDataset);
            evaluation: squash resize to image_size^2 + normalise (eval_resize).
  model     the notebook's VehicleResNet (benchmarks/seed_torch.py build_seed_resnet) with
            stage_sizes, widths, dropout, bn_momentum, bn_eps; PyTorch's default init.
  loop      batch_size, num_epochs, learning_rate, weight_decay, adam_b1/b2/eps, pct_start,
            div_factor, final_div_factor, label_smoothing, mixup_alpha, mixup_prob,
            weighted_sampling, early_stopping_metric, patience, min_delta.

The loop is the notebook's: DataLoader(batch_size, sampler=WeightedRandomSampler(1/class count
per sample, num_samples=len(train), replacement=True), drop_last=False, num_workers); AdamW on
every parameter; OneCycleLR(max_lr=learning_rate, epochs, steps_per_epoch=len(loader),
anneal_strategy='cos', cycle_momentum=False) stepped after every batch; MixUp on a
`random.random() < mixup_prob` share of batches with lam ~ np.random.beta(alpha, alpha) and a
torch.randperm pairing, loss lam*CE(out, y_a) + (1-lam)*CE(out, y_b); CrossEntropyLoss with
label smoothing; train accuracy against the original labels (mixed batches included); after
each epoch val loss (same criterion, per-image mean) / top-1 / top-5; early stopping when the
val loss has not improved by more than min_delta for `patience` epochs; the best weights (by
val loss) are kept and saved as <workdir>/best_high_acc_model.pt, the notebook's file name,
which `python main.py --mode=eval --init_from=...` reads. With a labelled test split beside a
holdout validation, the best weights are scored on it once at the end.

--max_steps_per_epoch N (or --config.max_steps_per_epoch) cuts every epoch to N batches; the
OneCycle schedule is then laid over the steps actually run. Seeds: random, numpy and torch are
seeded from config.seed (the notebook set none); the numpy/PIL port draws its augmentation from
per-process generators, so runs are not bit-reproducible.

Output (stdout, one line per epoch, flushed): train loss/acc, val loss/top-1/top-5, lr at the
end of the epoch, images/s of the train part, the share of it spent waiting for data, the epoch
wall time including validation, and the ETA. Files in --workdir:
  metrics.jsonl      one JSON row per epoch (those numbers and the timings; lr_first is the lr
                     of the epoch's first step). train_loss, train_accuracy, val_loss,
                     val_accuracy, val_top5, lr, img_per_s and data_wait_share mean what they
                     mean in cars_jax's metrics.jsonl; train_time_s is the train part (cars_jax's
                     epoch_time_s), epoch_wall_s adds validation.
  final_report.json  best epoch, its val loss / top-1 / top-5, the last epoch's, total wall
                     time, machine, torch version, loader, parameter count (written on Ctrl-C
                     too, with "interrupted": true)
  split.json         the keys of the train and validation records used
  config.json        the config as run
Errors a user can fix (missing data dir, torch not installed, bad config values) are one
line on stderr, exit code 2.
"""
from __future__ import annotations

import json
import os
import platform
import random
import socket
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', os.path.join(ROOT, 'configs', 'cars_lowres.py'),
                                'A cars_jax config file; override fields with '
                                '--config.NAME=VALUE.', lock_config=True)
flags.DEFINE_string('workdir', os.path.join('runs', 'torch_seed'),
                    'Output folder (metrics.jsonl, final_report.json, best weights).')
flags.DEFINE_integer('epochs', None, 'Epochs (default: config.num_epochs).')
flags.DEFINE_integer('max_steps_per_epoch', None,
                     '>0: at most this many batches per epoch '
                     '(default: config.max_steps_per_epoch).')
flags.DEFINE_integer('num_workers', None,
                     'DataLoader worker processes (default: 4 as the notebook, at most the cores).')
flags.DEFINE_integer('threads', None, 'torch.set_num_threads (default: all cores).')
flags.DEFINE_enum('device', 'auto', ['auto', 'cpu', 'cuda'], 'auto: cuda when available.')

# Config fields of cars_jax that go beyond the seed's loop, with the seed's value: a config that
# sets another value is run without it (a note says so).
NOT_IN_SEED = {'cutmix_alpha': 0.0, 'ema_decay': 0.0, 'eval_flip_tta': False,
               'wd_exclude_bn_bias': False, 'optimizer': 'adamw', 'init': 'pytorch',
               'zero_init_last_bn': False, 'stem_pool': True}


class UserError(Exception):
    """A problem the user can fix: printed as one line, exit code 2."""


class EvalDataset:
    """Decode + the seed's test transform (squash resize, ToTensor, Normalize), per record."""

    def __init__(self, records, aug, tv_transforms=None):
        self.records, self.aug, self.tv = records, aug, tv_transforms

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        from cars_jax.data.augment import eval_transform
        from cars_jax.data.sources import decode_image
        rec = self.records[int(index)]
        if self.tv is not None:
            from PIL import Image
            return self.tv(Image.fromarray(decode_image(rec))), int(rec.label)
        return eval_transform(decode_image(rec), self.aug), int(rec.label)


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


def _write_json(path: str, obj) -> None:
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _record_key(rec) -> str:
    return rec.key or (rec.image if isinstance(rec.image, str) else '')


def _to_nchw(x, channels_last: bool):
    """The port yields (B, H, W, 3) float32 batches; torchvision's ToTensor (B, 3, H, W)."""
    return x.permute(0, 3, 1, 2).contiguous() if channels_last else x


def evaluate(torch, model, loader, criterion, device, channels_last: bool) -> dict:
    """Per-image mean loss (the training criterion), top-1 and top-5 accuracy."""
    model.eval()
    loss_sum, top1, top5, n = 0.0, 0, 0, 0
    with torch.no_grad():
        for x, y in loader:
            x, y = _to_nchw(x, channels_last).to(device), y.to(device)
            out = model(x)
            loss_sum += float(criterion(out, y)) * y.size(0)
            k = min(5, out.size(1))
            top = out.topk(k, dim=1).indices
            top1 += int((top[:, 0] == y).sum())
            top5 += int((top == y[:, None]).any(dim=1).sum())
            n += y.size(0)
    n = max(n, 1)
    return {'loss': loss_sum / n, 'accuracy': top1 / n, 'top5': top5 / n}


def improves(metric: str, best: dict, val: dict, min_delta: float) -> bool:
    """The notebook's rule (cars_jax.train.improves): better than the best so far by more than
    min_delta; val_loss lower (the seed), val_accuracy higher."""
    if metric == 'val_accuracy':
        return val['accuracy'] - best['accuracy'] > min_delta
    return best['loss'] - val['loss'] > min_delta


def machine_info(torch, threads: int, num_workers: int, device: str) -> dict:
    info = {'hostname': socket.gethostname(), 'platform': platform.platform(),
            'processor': platform.processor() or platform.machine(), 'cpu_count': os.cpu_count(),
            'torch_threads': threads, 'num_workers': num_workers, 'device': device,
            'python': platform.python_version()}
    if device == 'cuda':
        info['gpu'] = torch.cuda.get_device_name(0)
    return info


def train(config, workdir: str, *, epochs: int | None = None,
          max_steps_per_epoch: int | None = None, num_workers: int | None = None,
          threads: int | None = None, device: str = 'auto',
          log=print) -> dict:
    """Runs the seed's loop; returns the final report (also written to workdir)."""
    t_start = time.time()
    try:   # before importing cars_jax (which imports jax): the cheap checks fail fast
        import torch
    except Exception as e:  # noqa: BLE001 - a broken install is as good as none
        raise UserError(f'torch is not installed or fails to import ({type(e).__name__}: {e}); '
                        'install a CPU build: pip install torch --index-url '
                        'https://download.pytorch.org/whl/cpu') from e
    epochs = int(config.num_epochs if epochs is None else epochs)
    max_steps = int(config.max_steps_per_epoch if max_steps_per_epoch is None
                    else max_steps_per_epoch)
    num_workers = min(4, os.cpu_count() or 1) if num_workers is None else int(num_workers)
    threads = int(threads or os.cpu_count() or 1)
    if epochs < 1:
        raise UserError(f'--epochs must be >= 1, got {epochs}')
    if config.batch_size < 1:
        raise UserError(f'--config.batch_size must be >= 1, got {config.batch_size}')
    if num_workers < 0:
        raise UserError(f'--num_workers must be >= 0, got {num_workers}')
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    elif device == 'cuda' and not torch.cuda.is_available():
        raise UserError('--device=cuda but this torch build sees no CUDA device.')
    if config.data_source in ('folders', 'devkit') and not os.path.isdir(config.data_dir or ''):
        raise UserError(f'data directory {config.data_dir!r} not found '
                        f'(--config.data_dir, data_source={config.data_source}).')
    if config.use_bbox:
        raise UserError('--config.use_bbox=True: the seed trains on whole images; this script '
                        'has no bounding-box crops.')
    if config.early_stopping_metric not in ('val_loss', 'val_accuracy'):
        raise UserError('early_stopping_metric must be val_loss or val_accuracy, got '
                        f'{config.early_stopping_metric!r}')
    from benchmarks import seed_torch
    from cars_jax.data.augment import AugmentConfig
    from cars_jax.data.dataset import build_data
    from cars_jax.data.sources import DataError
    try:
        aug = AugmentConfig.from_config(config)
    except ValueError as e:
        raise UserError(str(e)) from e
    for name, seed_value in NOT_IN_SEED.items():
        if name in config and config[name] != seed_value:
            log(f'note: --config.{name}={config[name]!r} is not part of the seed\'s loop; '
                'not applied here.')

    torch.set_num_threads(threads)
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)

    try:
        data = build_data(config)
    except DataError as e:
        raise UserError(str(e)) from e
    for note in data.notes:
        log(note)
    os.makedirs(workdir, exist_ok=True)
    _write_json(os.path.join(workdir, 'config.json'), json.loads(config.to_json()))
    _write_json(os.path.join(workdir, 'split.json'),
                {'train': [_record_key(r) for r in data.train],
                 'val': [_record_key(r) for r in data.val]})
    metrics_path = os.path.join(workdir, 'metrics.jsonl')
    open(metrics_path, 'w').close()
    num_classes = len(data.class_names)
    labels = np.asarray(data.train_labels)
    n_train = len(data.train)

    transforms = seed_torch.import_torchvision_transforms()
    tv_train = tv_eval = None
    if transforms is not None:
        tv_train = seed_torch.torchvision_seed_transforms(transforms, aug.image_size)
        size = aug.image_size
        resize = ([transforms.Resize((size, size))] if aug.eval_resize == 'squash'
                  else [transforms.Resize(size), transforms.CenterCrop(size)])
        tv_eval = transforms.Compose(resize + [  # the notebook's test_transforms when squash
            transforms.ToTensor(), transforms.Normalize(list(aug.mean), list(aug.std))])
    port = tv_train is None               # the port's batches are channels-last
    loader_name = (seed_torch.TORCH_LOADER_TV if tv_train is not None
                   else seed_torch.TORCH_LOADER_PORT)
    train_ds = seed_torch.SeedTransformDataset(data.train, aug, config.seed, tv_train)
    if config.weighted_sampling:
        counts = np.bincount(labels, minlength=num_classes)
        class_weights = np.where(counts > 0, n_train / np.maximum(counts, 1), 0.0)
        sample_weights = torch.as_tensor(class_weights[labels], dtype=torch.double)
        sampler = torch.utils.data.WeightedRandomSampler(sample_weights,
                                                         num_samples=len(sample_weights),
                                                         replacement=True)
        shuffle = None
    else:
        sampler, shuffle = None, True
    pin = device == 'cuda'
    train_loader = torch.utils.data.DataLoader(train_ds, batch_size=config.batch_size,
                                               sampler=sampler, shuffle=shuffle,
                                               num_workers=num_workers, drop_last=False,
                                               pin_memory=pin)
    val_loader = torch.utils.data.DataLoader(EvalDataset(data.val, aug, tv_eval),
                                             batch_size=config.batch_size, shuffle=False,
                                             num_workers=num_workers, pin_memory=pin)
    steps_per_epoch = len(train_loader)
    if max_steps > 0:
        steps_per_epoch = min(steps_per_epoch, max_steps)

    model = seed_torch.build_seed_resnet(torch, num_classes, tuple(config.stage_sizes),
                                          tuple(config.widths))
    model.drop.p = float(config.dropout)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum, m.eps = float(config.bn_momentum), float(config.bn_eps)
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=float(config.label_smoothing))
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(config.learning_rate),
                                  betas=(float(config.adam_b1), float(config.adam_b2)),
                                  eps=float(config.adam_eps),
                                  weight_decay=float(config.weight_decay))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=float(config.learning_rate), epochs=epochs,
        steps_per_epoch=steps_per_epoch, pct_start=float(config.pct_start),
        anneal_strategy='cos', cycle_momentum=False, div_factor=float(config.div_factor),
        final_div_factor=float(config.final_div_factor))

    log(f'seed PyTorch loop: {num_classes} classes, {n_train} train / {len(data.val)} val / '
        f'{len(data.test)} test images; {steps_per_epoch} steps/epoch (drop_last=False) x '
        f'{epochs} epochs, batch {config.batch_size}, {aug.image_size}px, {n_params:,} params, '
        f'{torch_version(torch)} on {device}, {threads} threads, {num_workers} loader workers; '
        f'{loader_name}.')

    best = {'loss': float('inf'), 'accuracy': float('-inf'), 'top5': None, 'epoch': None}
    best_state = None
    best_path = os.path.join(workdir, 'best_high_acc_model.pt')
    rows: list[dict] = []
    bad_epochs, stopped_early, interrupted = 0, False, False
    mixup_prob, alpha = float(config.mixup_prob), float(config.mixup_alpha)
    t_loop = time.time()
    setup_s = t_loop - t_start
    try:
        for epoch in range(epochs):
            t_epoch = time.time()
            model.train()
            loss_sum, correct, seen, mixed, steps, wait = 0.0, 0, 0, 0, 0, 0.0
            lr_first = None
            it = iter(train_loader)
            while steps < steps_per_epoch:
                t = time.time()
                try:
                    x, y = next(it)
                except StopIteration:
                    break
                x, y = _to_nchw(x, port).to(device), y.to(device)
                wait += time.time() - t
                if lr_first is None:
                    lr_first = optimizer.param_groups[0]['lr']
                mix = random.random() < mixup_prob               # the notebook's coin
                out, loss = seed_torch.seed_train_step(torch, model, criterion, optimizer,
                                                       scheduler, x, y, mix, alpha)
                mixed += mix
                loss_sum += float(loss.detach()) * y.size(0)
                correct += int((out.argmax(1) == y).sum())
                seen += y.size(0)
                steps += 1
            del it
            train_s = time.time() - t_epoch
            t_val = time.time()
            val = evaluate(torch, model, val_loader, criterion, device, port)
            val_s = time.time() - t_val
            improved = improves(config.early_stopping_metric, best, val, float(config.min_delta))
            if improved:
                best.update(val, epoch=epoch + 1)
                best_state = {k: v.detach().to('cpu', copy=True)
                              for k, v in model.state_dict().items()}
                torch.save(best_state, best_path)
                bad_epochs = 0
            else:
                bad_epochs += 1
            epoch_s = time.time() - t_epoch
            lr = optimizer.param_groups[0]['lr']
            row = {'epoch': epoch + 1, 'steps': steps, 'images': seen, 'mixed_batches': mixed,
                   'train_loss': loss_sum / max(seen, 1), 'train_accuracy': correct / max(seen, 1),
                   'val_loss': val['loss'], 'val_accuracy': val['accuracy'],
                   'val_top5': val['top5'], 'lr_first': lr_first, 'lr': lr,
                   'train_time_s': train_s, 'data_wait_s': wait,
                   'data_wait_share': wait / max(train_s, 1e-9), 'val_time_s': val_s,
                   'epoch_wall_s': epoch_s, 'img_per_s': seen / max(train_s, 1e-9),
                   'elapsed_s': time.time() - t_start, 'improved': improved}
            rows.append(row)
            with open(metrics_path, 'a') as f:
                f.write(json.dumps(row) + '\n')
            eta = (time.time() - t_loop) / (epoch + 1) * (epochs - epoch - 1)
            log(f'Epoch {epoch + 1}/{epochs} | train loss {row["train_loss"]:.4f} '
                f'acc {row["train_accuracy"]:.3f} | val loss {val["loss"]:.4f} '
                f'top1 {val["accuracy"]:.3f} top5 {val["top5"]:.3f} | lr {lr:.2e} | '
                f'{row["img_per_s"]:.1f} img/s (train {train_s:.1f}s, waiting for data '
                f'{row["data_wait_share"]:.0%}) | epoch {epoch_s:.1f}s | ETA {_fmt_time(eta)}'
                + (' | best, saved' if improved
                   else f' | no improvement {bad_epochs}/{config.patience}'))
            if bad_epochs >= config.patience:
                stopped_early = True
                log(f'Early stopping at epoch {epoch + 1}: no '
                    f'{config.early_stopping_metric} improvement > {config.min_delta} for '
                    f'{config.patience} epochs.')
                break
    except KeyboardInterrupt:
        interrupted = True
        log(f'Interrupted after {len(rows)} complete epoch(s); writing what there is.')

    test = None
    if not interrupted and len(data.test) and best_state is not None:
        model.load_state_dict(best_state)
        test_loader = torch.utils.data.DataLoader(EvalDataset(data.test, aug, tv_eval),
                                                  batch_size=config.batch_size, shuffle=False,
                                                  num_workers=num_workers, pin_memory=pin)
        test = evaluate(torch, model, test_loader, criterion, device, port)
        log(f'Test (best weights, epoch {best["epoch"]}): loss {test["loss"]:.4f} '
            f'top1 {test["accuracy"]:.3f} top5 {test["top5"]:.3f}')
    last = rows[-1] if rows else {}
    report = {
        'recipe': "the seed notebook's PyTorch loop", 'interrupted': interrupted,
        'epochs_planned': epochs, 'epochs_run': len(rows), 'stopped_early': stopped_early,
        'early_stopping_metric': config.early_stopping_metric,
        'best_epoch': best['epoch'],
        'best_val_loss': best['loss'] if best['epoch'] else None,
        'best_val_accuracy': best['accuracy'] if best['epoch'] else None,
        'best_val_top5': best['top5'],
        'last_val_loss': last.get('val_loss'), 'last_val_accuracy': last.get('val_accuracy'),
        'last_val_top5': last.get('val_top5'),
        'test': test,
        'best_weights': os.path.basename(best_path) if best_state is not None else None,
        'train_images': n_train, 'val_images': len(data.val), 'test_images': len(data.test),
        'num_classes': num_classes, 'steps_per_epoch': steps_per_epoch,
        'batch_size': config.batch_size, 'image_size': aug.image_size, 'params': n_params,
        'setup_s': setup_s, 'loop_wall_s': time.time() - t_loop,
        'total_wall_s': time.time() - t_start,
        'mean_train_img_per_s': (sum(r['images'] for r in rows)
                                 / max(sum(r['train_time_s'] for r in rows), 1e-9)
                                 if rows else None),
        'mean_epoch_wall_s': (sum(r['epoch_wall_s'] for r in rows) / len(rows)) if rows else None,
        'machine': machine_info(torch, threads, num_workers, device),
        'torch_version': torch.__version__, 'loader': loader_name,
    }
    _write_json(os.path.join(workdir, 'final_report.json'), report)
    log(f'Best epoch {report["best_epoch"]}: val loss '
        + (f'{report["best_val_loss"]:.4f} top1 {report["best_val_accuracy"]:.3f} '
           f'top5 {report["best_val_top5"]:.3f}' if best['epoch'] else 'n/a')
        + f'; total {_fmt_time(report["total_wall_s"])}; report in {workdir}/final_report.json')
    return report


def torch_version(torch) -> str:
    return f'PyTorch {torch.__version__}'


def main(argv) -> None:
    if len(argv) > 1:
        print(f'error: unexpected arguments {argv[1:]}', file=sys.stderr)
        sys.exit(2)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    try:
        report = train(FLAGS.config, FLAGS.workdir, epochs=FLAGS.epochs,
                       max_steps_per_epoch=FLAGS.max_steps_per_epoch,
                       num_workers=FLAGS.num_workers, threads=FLAGS.threads,
                       device=FLAGS.device, log=log)
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    sys.exit(130 if report['interrupted'] else 0)


def parse_flags(argv: list[str]) -> list[str]:
    """absl parsing; a missing config file or a bad flag is one line, exit 2."""
    for a in argv[1:]:
        if a.startswith('--config=') and not os.path.isfile(a.split('=', 1)[1]):
            print(f'error: config file {a.split("=", 1)[1]!r} not found.', file=sys.stderr)
            sys.exit(2)
    try:
        return FLAGS(argv)
    except Exception as e:  # noqa: BLE001 - flags/ml_collections raise several types
        msg = ' '.join(str(e).split())
        print(f'error: {msg}', file=sys.stderr)
        sys.exit(2)


if __name__ == '__main__':
    app.run(main, flags_parser=parse_flags)
