"""Label-smoothed cross-entropy (PyTorch semantics), its MixUp form, and top-k hits.

All functions are pure, jit-able and return one value per example; the caller takes the mean
(PyTorch's `reduction='mean'` over a batch is the plain mean of these).

PyTorch's `nn.CrossEntropyLoss(label_smoothing=eps)` with K classes uses the target
`(1 - eps) * onehot(y) + eps / K`, so per example

    loss = (1 - eps) * (-log p_y) + eps * mean_k(-log p_k).

This is written out from one `log_softmax` instead of materialising the (N, K) target: the
same number, no extra (N, K) array, and finite for any finite logits (log_softmax subtracts
the row max, so logits of +-1e4 give no inf/nan).
"""
import jax
import jax.numpy as jnp


def _log_probs(logits: jax.Array):
    """(log p, -mean_k log p_k): log-softmax in float32 and the label-free smoothing term."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    uniform = -jnp.mean(logp, axis=-1)
    return logp, uniform


def _nll(logp: jax.Array, labels: jax.Array) -> jax.Array:
    labels = labels.astype(jnp.int32)
    return -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]


def smoothed_cross_entropy(logits: jax.Array, labels: jax.Array,
                           smoothing: float) -> jax.Array:
    """Per-example `CrossEntropyLoss(label_smoothing=smoothing)`.

    Args:
      logits: (N, K) scores (computed in float32 whatever the input dtype).
      labels: (N,) integer class ids in [0, K).
      smoothing: eps in [0, 1]; 0 gives the plain cross-entropy.
    Returns:
      (N,) float32 losses.
    """
    logp, uniform = _log_probs(logits)
    return (1.0 - smoothing) * _nll(logp, labels) + smoothing * uniform


def mixed_cross_entropy(logits: jax.Array, labels_a: jax.Array, labels_b: jax.Array,
                        lam: jax.Array | float, smoothing: float) -> jax.Array:
    """Per-example `lam * CE(logits, a) + (1 - lam) * CE(logits, b)` (the seed's mixup_loss).

    `lam` is a scalar (one per batch, as MixUp draws it) or an (N,) array. The mean over the
    batch equals the seed's `lam * criterion(out, y_a) + (1 - lam) * criterion(out, y_b)`.
    """
    logp, uniform = _log_probs(logits)
    lam = jnp.asarray(lam, jnp.float32)
    nll = lam * _nll(logp, labels_a) + (1.0 - lam) * _nll(logp, labels_b)
    # The smoothing term does not depend on the label, and lam + (1 - lam) = 1.
    return (1.0 - smoothing) * nll + smoothing * uniform


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """Per-example 1.0 where the label is among the k largest logits, else 0.0.

    Uses `jax.lax.top_k`, which breaks ties towards the lower class index, as
    `jnp.argmax` does, so `k=1` agrees with `argmax(logits) == label`. A k larger than the
    number of classes counts every example as correct.
    """
    k = min(int(k), logits.shape[-1])
    _, idx = jax.lax.top_k(logits, k)
    hit = jnp.any(idx == labels.astype(idx.dtype)[:, None], axis=-1)
    return hit.astype(jnp.float32)
