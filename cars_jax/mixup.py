"""Batch MixUp as in the seed: lam ~ Beta(alpha, alpha), random pairing, on a share of batches
(and CutMix, not the seed: `cutmix`; `mix_batch` picks one of the two per batch).

The seed mixes a batch when `random.random() < 0.5`, then draws `lam = np.random.beta(a, a)`
and `idx = torch.randperm(n)`, returning `lam * x + (1 - lam) * x[idx], y, y[idx], lam`. Here
the coin, lam and the permutation all come from one JAX key and the decision is traced
(`lax.cond`), so one compiled train step serves mixed and unmixed batches alike; lam comes
from `symmetric_beta`, an exact Beta(a, a) sampler that compiles to a small program.
"""
import math

import jax
import jax.numpy as jnp

# Jöhnk proposals drawn at once (`symmetric_beta`, alpha <= 1/2): each is accepted with
# probability >= 0.785, so all of them fail with probability < 1e-21.
JOHNK_PROPOSALS = 32


def symmetric_beta(key: jax.Array, alpha: float) -> jax.Array:
    """One float32 draw of Beta(alpha, alpha) (alpha > 0, a Python float), in [0, 1].

    Why not `jax.random.beta`: its two rejection-sampled gammas (vmapped while loops) cost ~1 s
    of every train step's compile for one scalar (a quarter of the tests' tiny train step). The
    symmetric case has exact methods made of a few elementwise ops:
    - alpha > 1/2, Ulrich's polar method (the first coordinate of a uniform point on a sphere
      of dimension 2 alpha, rescaled to [0, 1]): 1/2 + 1/2 sqrt(1 - U^(2 / (2 alpha - 1)))
      cos(2 pi V), U and V uniform.
    - alpha <= 1/2, Jöhnk's method, in logs (no underflow at small alpha): X = U^(1/alpha),
      Y = V^(1/alpha), accepted when X + Y <= 1, lam = X / (X + Y). Each pair is accepted with
      probability Gamma(1 + alpha)^2 / Gamma(1 + 2 alpha) >= 0.785; `JOHNK_PROPOSALS` pairs
      are drawn at once and the first accepted one is used (none accepted: the last pair's
      ratio, with probability < 1e-21).
    """
    if not (alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f'symmetric_beta needs a finite alpha > 0, got {alpha}')
    if alpha > 0.5:
        k_radius, k_angle = jax.random.split(key)
        u = jax.random.uniform(k_radius, (), jnp.float32)
        v = jax.random.uniform(k_angle, (), jnp.float32)
        radius = jnp.sqrt(1.0 - u ** (2.0 / (2.0 * alpha - 1.0)))
        return 0.5 + 0.5 * radius * jnp.cos(2.0 * jnp.pi * v)
    tiny = jnp.finfo(jnp.float32).tiny                  # log(0) never happens
    log_u = jnp.log(jax.random.uniform(key, (2, JOHNK_PROPOSALS), jnp.float32, minval=tiny))
    log_x, log_y = log_u[0] / alpha, log_u[1] / alpha
    accepted = jnp.logaddexp(log_x, log_y) <= 0.0
    first = jnp.where(accepted.any(), jnp.argmax(accepted), JOHNK_PROPOSALS - 1)
    return jax.nn.sigmoid(log_x[first] - log_y[first])   # X / (X + Y)


def mixup(rng: jax.Array, images: jax.Array, labels: jax.Array, alpha: float = 0.4,
          prob: float = 0.5) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Mix a batch with probability `prob`.

    Args:
      rng: a JAX PRNG key (a new one per batch).
      images: (N, ...) batch; the output keeps its dtype (integer images are rounded back).
      labels: (N,) integer labels.
      alpha: Beta(alpha, alpha) parameter; `alpha <= 0` never mixes (the seed's early return).
      prob: chance that a batch is mixed; `prob <= 0` never mixes, `prob >= 1` always does.
    Returns:
      (images_out, labels_a, labels_b, lam). Mixed: `lam * x + (1 - lam) * x[perm]`,
      `labels_a = labels`, `labels_b = labels[perm]`. Unmixed: `images` unchanged,
      `labels_b = labels`, `lam = 1.0`. lam is a float32 scalar; train with
      `losses.mixed_cross_entropy(logits, labels_a, labels_b, lam, eps)`, which is the plain
      label-smoothed loss when lam == 1.
    """
    labels = jnp.asarray(labels)
    one = jnp.ones((), jnp.float32)
    if alpha <= 0 or prob <= 0:
        return images, labels, labels, one

    k_coin, k_lam, k_perm = jax.random.split(rng, 3)
    mix = jax.random.uniform(k_coin, (), jnp.float32) < prob
    lam = symmetric_beta(k_lam, alpha)
    perm = jax.random.permutation(k_perm, images.shape[0])

    def mixed(_):
        x = images.astype(jnp.float32)
        out = lam * x + (1.0 - lam) * x[perm]
        if jnp.issubdtype(images.dtype, jnp.integer):
            out = jnp.round(out)
        return out.astype(images.dtype), labels[perm], lam

    def unmixed(_):
        return images, labels, one

    out, labels_b, lam_out = jax.lax.cond(mix, mixed, unmixed, None)
    return out, labels, labels_b, lam_out


def cutmix(rng: jax.Array, images: jax.Array, labels: jax.Array, alpha: float = 1.0,
           prob: float = 0.5) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """CutMix (Yun et al. 2019; not the seed): paste a box of a partner image into each image.

    Why: MixUp blends whole images into ghosts; CutMix keeps every pixel a real car pixel, so
    the local parts that tell car models apart stay intact while the labels still mix.
    As the paper's code: lam ~ Beta(alpha, alpha), a box of sides `sqrt(1 - lam)` times the
    image's, centred uniformly at random and clipped at the border (one box for the whole
    batch), then lam is corrected to the area actually kept. Same contract as `mixup`:
    returns (images_out, labels_a, labels_b, lam), lam = 1.0 and images unchanged when the
    batch is not mixed. Images are (N, H, W, C); any dtype (pixels are copied, not blended).
    """
    labels = jnp.asarray(labels)
    one = jnp.ones((), jnp.float32)
    if alpha <= 0 or prob <= 0:
        return images, labels, labels, one

    k_coin, k_lam, k_perm, k_box = jax.random.split(rng, 4)
    mix = jax.random.uniform(k_coin, (), jnp.float32) < prob
    lam = symmetric_beta(k_lam, alpha)
    perm = jax.random.permutation(k_perm, images.shape[0])
    height, width = images.shape[1], images.shape[2]
    cut = jnp.sqrt(1.0 - lam)
    half_h = jnp.floor(height * cut).astype(jnp.int32) // 2
    half_w = jnp.floor(width * cut).astype(jnp.int32) // 2
    cy = jax.random.randint(k_box, (), 0, height)
    cx = jax.random.randint(jax.random.fold_in(k_box, 1), (), 0, width)
    y0, y1 = jnp.clip(cy - half_h, 0, height), jnp.clip(cy + half_h, 0, height)
    x0, x1 = jnp.clip(cx - half_w, 0, width), jnp.clip(cx + half_w, 0, width)
    rows, cols = jnp.arange(height), jnp.arange(width)
    box = (((rows >= y0) & (rows < y1))[:, None] & ((cols >= x0) & (cols < x1))[None, :])
    kept = 1.0 - ((y1 - y0) * (x1 - x0)).astype(jnp.float32) / (height * width)

    def mixed(_):
        return jnp.where(box[None, :, :, None], images[perm], images), labels[perm], kept

    def unmixed(_):
        return images, labels, one

    out, labels_b, lam_out = jax.lax.cond(mix, mixed, unmixed, None)
    return out, labels, labels_b, lam_out


def mixing_mode(mixup_alpha: float, cutmix_alpha: float, cutmix_share: float) -> str:
    """'mixup', 'cutmix' or 'both': which of the two `mix_batch` draws its mixed batches from
    (the one rule, also for what the training log says)."""
    if cutmix_alpha <= 0 or cutmix_share <= 0:
        return 'mixup'
    if mixup_alpha <= 0 or cutmix_share >= 1:
        return 'cutmix'
    return 'both'


def mix_batch(rng: jax.Array, images: jax.Array, labels: jax.Array, mixup_alpha: float = 0.4,
              prob: float = 0.5, cutmix_alpha: float = 0.0,
              cutmix_share: float = 0.5) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Mix a share `prob` of batches with MixUp or CutMix (timm's switch; same contract).

    Only one of them enabled (alpha > 0): that one, drawn exactly as its own function draws it
    (with cutmix_alpha == 0 this *is* `mixup(rng, ...)`, so the seed's runs are unchanged).
    Both enabled: a mixed batch uses CutMix with chance `cutmix_share`, else MixUp.
    """
    mode = mixing_mode(mixup_alpha, cutmix_alpha, cutmix_share)
    if mode == 'mixup':
        return mixup(rng, images, labels, mixup_alpha, prob)
    if mode == 'cutmix':
        return cutmix(rng, images, labels, cutmix_alpha, prob)
    k_switch, k_mix = jax.random.split(rng)
    use_cutmix = jax.random.uniform(k_switch, (), jnp.float32) < cutmix_share
    return jax.lax.cond(use_cutmix,
                        lambda k: cutmix(k, images, labels, cutmix_alpha, prob),
                        lambda k: mixup(k, images, labels, mixup_alpha, prob), k_mix)
