"""The seed notebook's PyTorch code, the reference side of the benchmarks and of the interop
tests: its network (written once here; tests/test_interop.py and tests/test_bench.py build it
from this module), its train step and its loader.

torch is optional: nothing here imports it at module level, so `benchmarks/bench.py` runs
without it and skips the PyTorch rows.
"""
from __future__ import annotations

import os
import statistics
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

SEED_STAGES = (2, 2, 2, 2)
SEED_WIDTHS = (64, 128, 256, 512)
TORCH_LOADER_PORT = ("torch DataLoader + the seed's transforms (cars_jax numpy/PIL port; "
                     'torchvision not installed)')
TORCH_LOADER_TV = "torch DataLoader + the seed's torchvision transforms"


def import_torch() -> Any | None:
    """torch, or None when it is not installed (the caller prints a note and skips the row)."""
    try:
        import torch
    except Exception:  # noqa: BLE001 - a broken install is as good as none here
        return None
    return torch


def import_torchvision_transforms() -> Any | None:
    """torchvision.transforms, or None. A torchvision wheel built for another torch raises a
    RuntimeError (not ImportError) on import, hence the broad except."""
    try:
        from torchvision import transforms
    except Exception:  # noqa: BLE001
        return None
    return transforms


def torch_version(torch: Any) -> str:
    return f'PyTorch {torch.__version__}'


def build_seed_resnet(torch: Any, num_classes: int = 196,
                      stage_sizes: Sequence[int] = SEED_STAGES,
                      widths: Sequence[int] = SEED_WIDTHS) -> Any:
    """The seed notebook's §3 network (seed-notebook.md), its code verbatim but for two things:
    the super().__init__() calls the notebook's summary leaves out, and the stage sizes and
    widths as arguments: the notebook's four `self.lN = self._mk(...)` lines and its
    `x=self.l1(x); ...; x=self.l4(x)` are loops over the stages, which build the same modules
    under the same names (l1, l2, ...). The defaults give the seed's VehicleResNet (ResNet-18
    topology + Dropout(0.5) + FC, 11,277,060 parameters at 196 classes)."""
    if len(stage_sizes) != len(widths) or not widths:
        raise ValueError(f'one width per stage: stage_sizes {tuple(stage_sizes)}, '
                         f'widths {tuple(widths)}')
    nn = torch.nn

    # ---- the notebook's §3 ----------------------------------------------------------------
    class ResidualBlock(nn.Module):          # = torchvision BasicBlock (post-activation)
        def __init__(self, in_c, out_c, stride=1):
            super().__init__()
            self.conv1 = nn.Conv2d(in_c, out_c, 3, stride, 1, bias=False); self.bn1 = nn.BatchNorm2d(out_c)
            self.conv2 = nn.Conv2d(out_c, out_c, 3, 1, 1, bias=False);     self.bn2 = nn.BatchNorm2d(out_c)
            self.relu  = nn.ReLU(inplace=True)
            self.down = None
            if stride!=1 or in_c!=out_c:
                self.down = nn.Sequential(nn.Conv2d(in_c, out_c, 1, stride, bias=False), nn.BatchNorm2d(out_c))
        def forward(self,x):
            id = x if self.down is None else self.down(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return self.relu(out + id)

    class VehicleResNet(nn.Module):
        def __init__(self, num_classes=196):
            super().__init__()
            self.conv1 = nn.Conv2d(3,widths[0],7,2,3,bias=False); self.bn1 = nn.BatchNorm2d(widths[0])
            self.relu  = nn.ReLU(inplace=True); self.maxp = nn.MaxPool2d(3,2,1)
            ci = widths[0]   # the notebook: self.l1 = self._mk(64, 64, 2, 1) ... self.l4
            for i, (b, co) in enumerate(zip(stage_sizes, widths), start=1):
                setattr(self, f'l{i}', self._mk(ci, co, b, 1 if i == 1 else 2)); ci = co
            self.avg = nn.AdaptiveAvgPool2d(1); self.drop = nn.Dropout(0.5); self.fc = nn.Linear(ci, num_classes)
        def _mk(self,ci,co,b,s):
            layers=[ResidualBlock(ci,co,s)]
            for _ in range(1,b): layers.append(ResidualBlock(co,co))
            return nn.Sequential(*layers)
        def forward(self,x):
            x=self.relu(self.bn1(self.conv1(x))); x=self.maxp(x)
            for i in range(1, len(widths) + 1): x=getattr(self, f'l{i}')(x)   # x=self.l1(x); ...
            x=self.avg(x).flatten(1); x=self.drop(x); return self.fc(x)
    # ---------------------------------------------------------------------------------------

    return VehicleResNet(num_classes)


def mixup_data(torch: Any, x: Any, y: Any, alpha: float) -> tuple:
    """The notebook's mixup_data, verbatim."""
    if alpha <= 0:
        return x, y, y, 1.0
    lam = np.random.beta(alpha, alpha)
    idx = torch.randperm(x.size(0)).to(x.device)
    mixed_x = lam * x + (1 - lam) * x[idx]
    return mixed_x, y, y[idx], lam


def mixup_loss(criterion: Any, pred: Any, y_a: Any, y_b: Any, lam: float) -> Any:
    """The notebook's mixup_loss, verbatim."""
    return lam * criterion(pred, y_a) + (1 - lam) * criterion(pred, y_b)


def seed_train_step(torch: Any, model: Any, criterion: Any, optimizer: Any, scheduler: Any,
                    x: Any, y: Any, mix: bool, alpha: float) -> tuple[Any, Any]:
    """One optimizer step of the notebook's loop (the model already in train mode): MixUp
    through its mixup_data / mixup_loss when `mix`, the criterion, the optimizer and the
    per-batch OneCycleLR step. Returns (logits, loss); the benchmark and the training script
    share it."""
    optimizer.zero_grad()
    if mix:
        x_m, y_a, y_b, lam = mixup_data(torch, x, y, alpha)
        out = model(x_m)
        loss = mixup_loss(criterion, out, y_a, y_b, lam)
    else:
        out = model(x)
        loss = criterion(out, y)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return out, loss


def torch_step_rates(torch: Any, image_size: int, batch_size: int, steps: int, repeats: int, *,
                     num_classes: int = 196, stage_sizes: Sequence[int] = SEED_STAGES,
                     widths: Sequence[int] = SEED_WIDTHS, num_threads: int | None = None) -> dict:
    """Images/s of the seed's train step (AdamW lr 1e-3 wd 1e-4, CE with label smoothing 0.05,
    MixUp alpha 0.4 on every other batch = half of them, OneCycleLR stepped per batch) and of
    its eval step (no_grad), eager float32 on the CPU with `num_threads` (default: all cores).
    The same shapes and medians as bench.py's JAX rows; the previous thread count is restored."""
    nn = torch.nn
    threads = int(num_threads or os.cpu_count() or 1)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        rng = np.random.default_rng(0)
        model = build_seed_resnet(torch, num_classes, stage_sizes, widths)
        criterion = nn.CrossEntropyLoss(label_smoothing=0.05)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
        total = max(70 * 255, 1 + repeats * steps + 1)     # the seed's schedule length
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=1e-3, total_steps=total, pct_start=0.1, anneal_strategy='cos',
            cycle_momentum=False)
        x = torch.from_numpy(rng.normal(size=(batch_size, 3, image_size, image_size))
                             .astype(np.float32))
        y = torch.from_numpy(rng.integers(0, num_classes, batch_size).astype(np.int64))

        def train(i: int) -> float:
            model.train()
            _, loss = seed_train_step(torch, model, criterion, optimizer, scheduler, x, y,
                                      mix=i % 2 == 0, alpha=0.4)      # MixUp on half the batches
            return float(loss.detach())

        t = time.perf_counter()
        train(0)
        first_s = time.perf_counter() - t
        rates = []
        for _ in range(repeats):
            t = time.perf_counter()
            for i in range(steps):
                train(i + 1)
            rates.append(steps * batch_size / (time.perf_counter() - t))

        def evaluate() -> None:
            model.eval()
            with torch.no_grad():
                out = model(x)
                criterion(out, y).item()
                (out.argmax(1) == y).sum().item()

        evaluate()
        eval_rates = []
        for _ in range(repeats):
            t = time.perf_counter()
            for _ in range(steps):
                evaluate()
            eval_rates.append(steps * batch_size / (time.perf_counter() - t))
    finally:
        torch.set_num_threads(old_threads)
    return {'train_images_per_s': statistics.median(rates),
            'eval_images_per_s': statistics.median(eval_rates),
            'train_range': [min(rates), max(rates)], 'eval_range': [min(eval_rates), max(eval_rates)],
            'first_step_s': first_s, 'threads': threads}


def eager_times_ms(fn, repeats: int) -> list[float]:
    """Milliseconds of `repeats` calls of an eager (synchronous) `fn()`, after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t))
    return times


def seed_model_and_batch(torch: Any, image_size: int, batch_size: int, num_classes: int = 196,
                         stage_sizes: Sequence[int] = SEED_STAGES,
                         widths: Sequence[int] = SEED_WIDTHS) -> tuple:
    """The seed's network (torch seed 0), its label-smoothed criterion and one synthetic NCHW
    batch (numpy seed 0): (model, criterion, x, y), as the step parts and the op profile time
    them."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = build_seed_resnet(torch, num_classes, stage_sizes, widths)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.05)
    x = torch.from_numpy(rng.normal(size=(batch_size, 3, image_size, image_size))
                         .astype(np.float32))
    y = torch.from_numpy(rng.integers(0, num_classes, batch_size).astype(np.int64))
    return model, criterion, x, y


def torch_step_parts(torch: Any, image_size: int, batch_size: int, repeats: int, *,
                     num_classes: int = 196, stage_sizes: Sequence[int] = SEED_STAGES,
                     widths: Sequence[int] = SEED_WIDTHS) -> dict[str, float]:
    """Median ms of the parts of the seed's train step (no MixUp), eager float32, all cores:
    forward in eval mode (no_grad), forward in train mode, forward + backward (zero_grad,
    criterion, backward), the AdamW step, and the whole step (`seed_train_step`)."""
    model, criterion, x, y = seed_model_and_batch(torch, image_size, batch_size, num_classes,
                                                  stage_sizes, widths)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=1e-3, total_steps=70 * 255, pct_start=0.1, anneal_strategy='cos',
        cycle_momentum=False)

    def forward_eval():
        model.eval()
        with torch.no_grad():
            model(x)

    def forward_train():
        model.train()
        with torch.no_grad():
            model(x)

    def forward_backward():
        model.train()
        optimizer.zero_grad()
        criterion(model(x), y).backward()

    def whole():
        model.train()
        seed_train_step(torch, model, criterion, optimizer, scheduler, x, y, mix=False, alpha=0.4)

    def median_ms(fn) -> float:
        return statistics.median(eager_times_ms(fn, repeats))

    parts = {'forward (eval)': median_ms(forward_eval),
             'forward (train)': median_ms(forward_train),
             'forward + backward': median_ms(forward_backward)}
    forward_backward()                                   # gradients for the optimizer alone
    parts['optimizer (AdamW)'] = median_ms(optimizer.step)
    parts['whole train step'] = median_ms(whole)
    return parts


def torch_conv_pass_times(torch: Any, layers: Sequence[tuple], batch_size: int,
                          repeats: int) -> list[dict[str, float]]:
    """Best-of-`repeats` ms of each conv's forward, input-gradient and weight-gradient pass in
    eager PyTorch, float32, all cores: `layers` as `cpu_settings.seed_conv_layers`; the
    gradients through `aten.convolution_backward` with one output each, the kernel autograd
    runs for a conv's backward."""
    from cars_jax.model import conv_output_size
    F = torch.nn.functional

    def best_ms(fn) -> float:
        return min(eager_times_ms(fn, repeats))

    rows = []
    for _, side, cin, cout, k, stride, pad in layers:
        out = conv_output_size(side, k, stride, pad)
        x = torch.ones(batch_size, cin, side, side)
        w = torch.full((cout, cin, k, k), 0.01)
        g = torch.ones(batch_size, cout, out, out)

        def backward(mask, x=x, w=w, g=g, stride=stride, pad=pad):
            return torch.ops.aten.convolution_backward(
                g, x, w, None, [stride, stride], [pad, pad], [1, 1], False, [0, 0], 1, mask)

        with torch.no_grad():
            rows.append({
                'torch_forward_ms': best_ms(lambda x=x, w=w, stride=stride, pad=pad:
                                            F.conv2d(x, w, None, stride, pad)),
                'torch_input_grad_ms': best_ms(lambda: backward([True, False, False])),
                'torch_weight_grad_ms': best_ms(lambda: backward([False, True, False])),
            })
    return rows


class SeedTransformDataset:
    """A map-style dataset (what torch's DataLoader indexes): decode one record with PIL and run
    the seed's train transforms on it, per item, as the notebook's ImageFolder + transforms.

    With `tv_transforms` (a torchvision Compose) it runs the real torchvision chain on a PIL
    image; otherwise cars_jax's numpy/PIL port (`augment.train_transform`), with a generator
    seeded by (seed, index, draw count) so workers do not repeat each other's draws. Plain
    Python (picklable, no torch import), so worker processes can receive it."""

    def __init__(self, records: Sequence[Any], aug: Any, seed: int = 0,
                 tv_transforms: Any | None = None):
        self.records, self.aug, self.seed, self.tv = records, aug, seed, tv_transforms
        self._draws = 0

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        from cars_jax.data.augment import train_transform
        from cars_jax.data.sources import decode_image
        rec = self.records[int(index)]
        self._draws += 1
        if self.tv is not None:
            from PIL import Image
            return self.tv(Image.fromarray(decode_image(rec))), int(rec.label)
        rng = np.random.default_rng([self.seed, int(index), self._draws, os.getpid()])
        return train_transform(decode_image(rec), rng, self.aug), int(rec.label)


def torchvision_seed_transforms(transforms: Any, image_size: int) -> Any:
    """The notebook's train_transforms (seed-notebook.md §2), verbatim."""
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size, scale=(0.8, 1.0)),
        transforms.RandomHorizontalFlip(),
        transforms.RandomRotation(15),
        transforms.ColorJitter(0.2, 0.2, 0.2, 0.1),
        transforms.RandomAffine(0, translate=(0.1, 0.1), shear=10),
        transforms.GaussianBlur(3, sigma=(0.1, 2.0)),
        transforms.RandomGrayscale(p=0.1),
        transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        transforms.RandomErasing(p=0.3, scale=(0.02, 0.33), ratio=(0.3, 3.3), value=0),
    ])


def torch_loader_rate(torch: Any, records: Sequence[Any], labels: np.ndarray, aug: Any,
                      batch_size: int, batches: int, num_workers: int, seed: int = 0) -> tuple[float, str]:
    """(images/s, row name) of the seed's loader: WeightedRandomSampler(1/class count,
    replacement) + DataLoader(batch_size, num_workers) over per-image decode + train transforms.
    Timed from the iterator's creation (worker start-up counts), `batches` batches."""
    transforms = import_torchvision_transforms()
    tv = torchvision_seed_transforms(transforms, aug.image_size) if transforms else None
    name = TORCH_LOADER_TV if tv is not None else TORCH_LOADER_PORT
    counts = np.bincount(labels)
    weights = torch.as_tensor(1.0 / counts[labels], dtype=torch.double)
    gen = torch.Generator().manual_seed(seed)
    sampler = torch.utils.data.WeightedRandomSampler(weights, num_samples=len(weights),
                                                     replacement=True, generator=gen)
    loader = torch.utils.data.DataLoader(SeedTransformDataset(records, aug, seed, tv),
                                         batch_size=batch_size, sampler=sampler,
                                         num_workers=num_workers, drop_last=True)
    t = time.perf_counter()
    it = iter(loader)
    for _ in range(batches):
        next(it)
    rate = batches * batch_size / (time.perf_counter() - t)
    del it
    return rate, name
