"""Label-smoothed cross-entropy (PyTorch semantics), the cosine loss, their MixUp forms,
top-k hits, a teacher's distillation term, and SimCLR's contrastive loss for self-supervised
pretraining.

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


LOSSES = ('cross_entropy', 'cosine')


def cosine_loss(logits: jax.Array, labels: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Per-example cosine loss with one-hot class embeddings (Barz & Denzler, "Deep Learning
    on Small Datasets using a Cosine Loss", WACV 2020): `1 - <onehot(y), f / ||f||>`, i.e.
    one minus the label's share of the L2-normalised output. It ignores the output's scale,
    which is what helps on small data sets: nothing rewards pushing logits apart without
    bound. `eps` guards a zero output as torch's F.normalize does. Values lie in [0, 2]."""
    f = logits.astype(jnp.float32)
    # max(||f||, eps) taken under the root: the gradient stays finite at a zero output
    f = f / jnp.sqrt(jnp.maximum(jnp.sum(f * f, axis=-1, keepdims=True), eps * eps))
    return 1.0 - jnp.take_along_axis(f, labels.astype(jnp.int32)[:, None], axis=-1)[:, 0]


def mixed_loss(logits: jax.Array, labels_a: jax.Array, labels_b: jax.Array,
               lam: jax.Array | float, smoothing: float, loss: str = 'cross_entropy',
               ce_weight: float = 0.1) -> jax.Array:
    """Per-example training loss of a (possibly MixUp-ed) batch: `loss='cross_entropy'` is
    `mixed_cross_entropy` (the seed's); `'cosine'` is `lam * cos(a) + (1 - lam) * cos(b)` plus
    `ce_weight` times the label-smoothed cross-entropy on the same outputs (the paper adds
    0.1 x cross-entropy on a second head; here it is the same head). Unmixed: a == b, lam 1."""
    if loss not in LOSSES:
        raise ValueError(f'loss must be one of {LOSSES}, got {loss!r}')
    ce = mixed_cross_entropy(logits, labels_a, labels_b, lam, smoothing)
    if loss == 'cross_entropy':
        return ce
    lam = jnp.asarray(lam, jnp.float32)
    cos = lam * cosine_loss(logits, labels_a) + (1.0 - lam) * cosine_loss(logits, labels_b)
    return cos + ce_weight * ce if ce_weight else cos


def distillation_loss(student_logits: jax.Array, teacher_logits: jax.Array,
                      temperature: float = 4.0) -> jax.Array:
    """Per-example knowledge distillation term (Hinton et al. 2015): T^2 * KL(p_t || p_s) with
    p = softmax(logits / T). The T^2 keeps its gradient's scale independent of T. Zero when
    the student's softened distribution is the teacher's; no gradient reaches the teacher."""
    t = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32)) / temperature
    log_pt = jax.nn.log_softmax(t, axis=-1)
    log_ps = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    return temperature ** 2 * jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1)


def nt_xent_loss(z1: jax.Array, z2: jax.Array, temperature: float = 0.2,
                 eps: float = 1e-12) -> tuple[jax.Array, jax.Array]:
    """SimCLR's contrastive loss (NT-Xent; Chen et al., ICML 2020) of two views' embeddings.

    z1[i] and z2[i] are one image's two augmented views, (N, D) each. The 2N embeddings are
    L2-normalised; each one's positive is its other view and its negatives the 2N - 2 others:
        l(i, j) = -log( exp(s_ij / t) / sum_{k != i} exp(s_ik / t) ),  s = cosine similarity,
    averaged over all 2N anchors. Also returns the share of anchors whose most similar other
    embedding is their positive (a label-free progress signal). Computed in float32.
    """
    z = jnp.concatenate([z1, z2]).astype(jnp.float32)
    z = z / jnp.sqrt(jnp.maximum(jnp.sum(z * z, axis=-1, keepdims=True), eps * eps))
    n2 = z.shape[0]
    sim = (z @ z.T) / temperature
    sim = jnp.where(jnp.eye(n2, dtype=bool), -jnp.inf, sim)        # not itself
    positive = (jnp.arange(n2) + n2 // 2) % n2
    logp = jax.nn.log_softmax(sim, axis=-1)
    loss = -jnp.mean(jnp.take_along_axis(logp, positive[:, None], axis=-1))
    hits = jnp.mean((jnp.argmax(sim, axis=-1) == positive).astype(jnp.float32))
    return loss, hits


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
