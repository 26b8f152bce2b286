"""PyTorch's OneCycleLR (two phases, cosine annealing) as an optax schedule.

The seed steps `OneCycleLR(max_lr, total_steps=epochs*steps_per_epoch, pct_start=0.1,
anneal_strategy='cos', div_factor=25, final_div_factor=1e4)` once per batch. The lr used by
the t-th optimizer step (t = 0 .. total_steps-1) is, in PyTorch:

    initial = max_lr / div_factor,   min_lr = initial / final_div_factor
    peak    = float(pct_start * total_steps) - 1          # end of phase 1 (may be fractional)
    end     = total_steps - 1                             # end of phase 2
    cos(a, b, p) = b + (a - b) / 2 * (1 + cos(pi * p))
    lr(t) = cos(initial, max_lr, t / peak)                     if t <= peak
            cos(max_lr, min_lr, (t - peak) / (end - peak))     otherwise

`optax.cosine_onecycle_schedule(T, ...)` is the same two-phase cosine curve with its peak at
`int(pct_start * T)` and its end at `T`. With `T = total_steps - 1` the end coincides with
PyTorch's, and so does the peak whenever `pct_start * total_steps` is a whole number
(`int(pct_start * (N - 1)) == pct_start * N - 1` then, for 0 < pct_start < 1): the two
formulas are the same and differ only by float32 rounding. For the seed (70 epochs x 255
steps, peak 1784, end 17849) the measured relative deviation from PyTorch's float64 formula
is <= 2e-6 over steps 0..16,000, <= 1.5e-5 to 17,500, and grows to 3.1e-3 at worst in the
last ~50 steps (lr < 1e-8), where float32 `1 + cos(pi * p)` cancels; all 69 end-of-epoch lrs
printed in the seed's log are reproduced to their 6 decimals. So that case uses optax's own
schedule.

When `pct_start * total_steps` is fractional (e.g. 12 epochs x 13 steps: peak 14.6), optax's
integer peak moves the whole warm-up by up to one step, measured 4% (N=156) to 11% (N=84)
off PyTorch; those cases use the PyTorch formula above written directly in jnp (the same
cosine-interpolation expression optax uses), exact up to float32 (measured <= 2.7e-5
relative for N=156 and N=84).

Both forms hold the final value `min_lr` for steps past `total_steps - 1` (PyTorch raises
beyond `total_steps`). A warm-up shorter than one step (peak <= 0, e.g. 10 steps with
pct_start 0.1) starts in the anneal at ~max_lr, as PyTorch's phase 2 does for peak < 0
(at exactly peak == 0 PyTorch divides by zero).
"""
import jax.numpy as jnp
import numpy as np
import optax


def _cos(start, end, pct):
    return end + (start - end) / 2.0 * (jnp.cos(jnp.pi * pct) + 1.0)


def onecycle_schedule(total_steps: int, max_lr: float, pct_start: float = 0.1,
                      div_factor: float = 25.0,
                      final_div_factor: float = 1e4) -> optax.Schedule:
    """PyTorch OneCycleLR(anneal_strategy='cos', three_phase=False) lr for optimizer step t.

    `schedule(t)` is the lr PyTorch uses for the t-th `optimizer.step()` when the scheduler
    is stepped once per batch; the seed prints `schedule(epoch * steps_per_epoch)` after
    each epoch. See the module docstring for how this relates to
    `optax.cosine_onecycle_schedule`, which is used whenever its breakpoints equal PyTorch's.
    """
    total_steps = int(total_steps)
    if total_steps < 2:
        raise ValueError(f'onecycle_schedule needs total_steps >= 2, got {total_steps}')
    if not 0.0 < pct_start < 1.0:
        raise ValueError(f'pct_start must be in (0, 1), got {pct_start}')
    initial = max_lr / div_factor
    min_lr = initial / final_div_factor
    end = float(total_steps - 1)
    peak = float(pct_start * total_steps) - 1.0  # PyTorch's phase-1 end_step

    if abs(peak - round(peak)) < 1e-6 and int(pct_start * end) == round(peak):
        return optax.cosine_onecycle_schedule(
            transition_steps=total_steps - 1, peak_value=max_lr, pct_start=pct_start,
            div_factor=div_factor, final_div_factor=final_div_factor)

    def schedule(count):
        t = jnp.minimum(jnp.asarray(count, jnp.float32), end)
        down = _cos(max_lr, min_lr, (t - peak) / (end - peak))
        if peak <= 0:
            return down
        up = _cos(initial, max_lr, t / peak)
        return jnp.where(t <= peak, up, down)

    return schedule



def progressive_image_size(epoch: int, final_size: int, min_size: int, start_epoch: int,
                           end_epoch: int, multiple: int = 8) -> int:
    """The train resolution of 0-based epoch `epoch` under progressive resizing (FFCV's ResNet
    recipes, `get_resolution`): low resolution early is cheaper per epoch and, at the end, the
    net trains its last epochs at the size it is evaluated at.

    `min_size` up to epoch `start_epoch`, `final_size` from `end_epoch` on, in between the
    linear interpolation rounded (half to even, as np.round) to a multiple of `multiple`
    (FFCV: 32 at 160-192 px; 8 here at 48-64 px), kept within [min_size, final_size]. Each
    distinct size compiles the train step once.
    """
    if not 0 < min_size <= final_size:
        raise ValueError(f'need 0 < min_size <= final_size, got {min_size}, {final_size}')
    if not 0 <= start_epoch <= end_epoch:
        raise ValueError(f'need 0 <= start_epoch <= end_epoch, got {start_epoch}, {end_epoch}')
    if epoch <= start_epoch:
        return int(min_size)
    if epoch >= end_epoch:
        return int(final_size)
    share = (epoch - start_epoch) / (end_epoch - start_epoch)
    size = int(np.round((min_size + share * (final_size - min_size)) / multiple)) * multiple
    return int(min(max(size, min_size), final_size))
