"""Batch MixUp as in the seed: lam ~ Beta(alpha, alpha), random pairing, on a share of batches.

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
