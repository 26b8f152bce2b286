"""Batch MixUp as in the seed: lam ~ Beta(alpha, alpha), random pairing, on a share of batches
(and CutMix, not the seed: `cutmix`; `mix_batch` picks one of the two per batch).

The seed mixes a batch when `random.random() < 0.5`, then draws `lam = np.random.beta(a, a)`
and `idx = torch.randperm(n)`, returning `lam * x + (1 - lam) * x[idx], y, y[idx], lam`. Here
the coin, lam and the permutation all come from one JAX key and the decision is traced
(`lax.cond`), so one compiled train step serves mixed and unmixed batches alike.
"""
import jax
import jax.numpy as jnp


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
    lam = jnp.clip(jax.random.beta(k_lam, alpha, alpha, (), jnp.float32), 0.0, 1.0)
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
    lam = jnp.clip(jax.random.beta(k_lam, alpha, alpha, (), jnp.float32), 0.0, 1.0)
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
