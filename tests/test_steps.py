"""The pure train / eval steps: compile once, learn, never let a NaN in, honest metrics."""
import jax
import pytest
import numpy as np

import demo
from cars_jax.steps import create_train_state, eval_step, make_steps, train_step


def tiny_config(**kw):
    c = demo.get_config()
    c.image_size, c.batch_size = 16, 8
    c.stage_sizes, c.widths = (1, 1), (4, 8)
    c.num_epochs = 2
    for k, v in kw.items():
        c[k] = v
    return c


def _batch(n=8, k=3, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % k
    images = rng.normal(size=(n, 16, 16, 3)).astype(np.float32) + labels[:, None, None, None]
    return {'image': images, 'label': labels.astype(np.int32)}


def test_train_step_compiles_once_and_learns():
    c = tiny_config(mixup_prob=0.0, dropout=0.0, learning_rate=1e-2)
    state = create_train_state(c, jax.random.PRNGKey(0), num_classes=3, steps_per_epoch=20)
    traces = []

    def counted(s, b, r):
        traces.append(1)
        return train_step(s, b, r, label_smoothing=0.05, mixup_alpha=0.4, mixup_prob=0.0)

    step = jax.jit(counted)
    batch = _batch()
    losses = []
    for i in range(15):
        state, m = step(state, batch, jax.random.PRNGKey(i))
        losses.append(float(m['loss']))
    assert len(traces) == 1
    assert losses[-1] < 0.7 * losses[0]
    assert int(state.step) == 15


def test_step_reports_scheduled_lr_and_updates_batch_stats():
    c = tiny_config()
    state = create_train_state(c, jax.random.PRNGKey(0), num_classes=3, steps_per_epoch=10)
    before = jax.tree.map(np.asarray, state.batch_stats)
    new, m = jax.jit(train_step)(state, _batch(), jax.random.PRNGKey(1))
    # OneCycle starts at max_lr / div_factor
    np.testing.assert_allclose(float(m['lr']), c.learning_rate / c.div_factor, rtol=1e-5)
    changed = jax.tree.map(lambda a, b: not np.allclose(a, b), before, new.batch_stats)
    assert all(jax.tree.leaves(changed))
    assert float(m['finite']) == 1.0 and float(m['grad_norm']) > 0


def test_nonfinite_batch_leaves_state_untouched():
    c = tiny_config()
    state = create_train_state(c, jax.random.PRNGKey(0), num_classes=3, steps_per_epoch=10)
    batch = _batch()
    batch['image'][0, 0, 0, 0] = np.nan
    new, m = jax.jit(train_step)(state, batch, jax.random.PRNGKey(1))
    assert float(m['finite']) == 0.0
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(new.params)):
        np.testing.assert_array_equal(a, b)
    assert int(new.step) == int(state.step)


def test_an_update_that_overflows_leaves_state_untouched():
    """Finite loss and gradients, but an lr so large that the new parameters overflow."""
    c = tiny_config(learning_rate=3e38, div_factor=1.0, optimizer='sgd')
    state = create_train_state(c, jax.random.PRNGKey(0), num_classes=3, steps_per_epoch=10)
    new, m = jax.jit(train_step)(state, _batch(), jax.random.PRNGKey(1))
    assert np.isfinite(float(m['loss'])) and float(m['finite']) == 0.0
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(new.params)):
        np.testing.assert_array_equal(a, b)
    assert int(new.step) == int(state.step)


def test_eval_step_matches_numpy_and_respects_mask():
    c = tiny_config()
    state = create_train_state(c, jax.random.PRNGKey(0), num_classes=3, steps_per_epoch=10)
    batch = _batch(seed=4)
    batch['mask'] = np.array([1, 1, 1, 1, 1, 0, 0, 0], np.float32)
    out = jax.device_get(jax.jit(eval_step)(state, batch))
    logits = np.asarray(state.apply_fn({'params': state.params, 'batch_stats': state.batch_stats},
                                       batch['image'], train=False), np.float64)
    eps, k = 0.05, 3
    logp = logits - logits.max(1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
    target = np.full((8, k), eps / k)
    target[np.arange(8), batch['label']] += 1 - eps
    ce = -(target * logp).sum(1)
    m = batch['mask']
    np.testing.assert_allclose(out['loss_sum'], (ce * m).sum(), rtol=1e-5)
    np.testing.assert_allclose(out['correct_sum'], ((logits.argmax(1) == batch['label']) * m).sum())
    assert out['count'] == 5 and out['top5_sum'] == 5  # 3 classes: top-5 always hits


def test_make_steps_binds_config_and_donates_state():
    c = tiny_config(mixup_prob=1.0)
    state = create_train_state(c, jax.random.PRNGKey(0), num_classes=3, steps_per_epoch=10)
    train, evaluate = make_steps(c)
    state, m = train(state, _batch(), jax.random.PRNGKey(2))
    assert float(m['mixed']) == 1.0  # mixup_prob=1 from the config reached the step
    assert float(evaluate(state, _batch())['count']) == 8


def test_eval_step_compiles_once():
    c = tiny_config()
    state = create_train_state(c, jax.random.PRNGKey(0), num_classes=3, steps_per_epoch=10)
    traces = []

    def counted(s, b):
        traces.append(1)
        return eval_step(s, b)

    step = jax.jit(counted)
    for seed in range(3):
        batch = _batch(seed=seed)
        batch['mask'] = np.ones(8, np.float32)
        step(state, batch)
    assert len(traces) == 1


def _pattern_batch(n, seed):
    """4 classes told apart by *where* a bright square sits (a spatial cue, not a mean shift)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    images = rng.normal(0, 0.5, size=(n, 16, 16, 3)).astype(np.float32)
    for i, k in enumerate(labels):
        r, c = divmod(int(k), 2)
        images[i, 8 * r:8 * r + 8, 8 * c:8 * c + 8] += 1.5
    return {'image': images, 'label': labels.astype(np.int32)}


def test_bfloat16_trains_to_the_float32_accuracy_with_float32_state():
    """bf16 compute: params, optimiser state and BN statistics stay float32, the loss is
    float32, and a short run reaches the float32 run's held-out accuracy (within noise)."""
    import jax.numpy as jnp
    val = _pattern_batch(256, seed=99)
    results = {}
    for dtype in ('float32', 'bfloat16'):
        c = tiny_config(mixup_prob=0.0, dropout=0.0, learning_rate=1e-2, dtype=dtype,
                        batch_size=32)
        state = create_train_state(c, jax.random.PRNGKey(0), num_classes=4, steps_per_epoch=20)
        step, evaluate = make_steps(c)
        for i in range(40):
            state, m = step(state, _pattern_batch(32, seed=i), jax.random.PRNGKey(i))
            assert m['loss'].dtype == jnp.float32 and float(m['finite']) == 1.0
        for leaf in jax.tree.leaves((state.params, state.batch_stats, state.opt_state)):
            assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype
        out = evaluate(state, val)
        results[dtype] = float(out['correct_sum'] / out['count'])
    assert results['float32'] > 0.9, results
    # 256 held-out images: one standard error of an accuracy near 0.95 is ~0.014
    assert abs(results['bfloat16'] - results['float32']) <= 0.05, results


def test_dtype_auto_is_bfloat16_on_accelerators_and_float32_on_cpu():
    import jax.numpy as jnp
    from cars_jax.model import compute_dtype
    assert compute_dtype('auto', 'cpu') == jnp.float32
    assert compute_dtype('auto', 'gpu') == jnp.bfloat16
    assert compute_dtype('auto', 'tpu') == jnp.bfloat16
    assert compute_dtype('float32', 'gpu') == jnp.float32
    with pytest.raises(ValueError, match='float16'):
        compute_dtype('float16', 'cpu')


def test_flip_tta_scores_the_mean_logits_of_image_and_mirror():
    c = tiny_config()
    state = create_train_state(c, jax.random.PRNGKey(0), num_classes=3, steps_per_epoch=10)
    batch = _batch(n=8)
    batch['mask'] = np.ones(8, np.float32)
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    plain = np.asarray(state.apply_fn(variables, batch['image'], train=False))
    mirror = np.asarray(state.apply_fn(variables, batch['image'][:, :, ::-1].copy(), train=False))
    mean = (plain + mirror) / 2
    got = eval_step(state, batch, flip_tta=True)
    want_correct = np.sum(mean.argmax(-1) == batch['label'])
    assert float(got['correct_sum']) == want_correct
    logp = mean - np.log(np.exp(mean - mean.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - mean.max(-1, keepdims=True)
    eps = 0.05
    target = np.full(mean.shape, eps / 3) + (1 - eps) * np.eye(3)[batch['label']]
    np.testing.assert_allclose(float(got['loss_sum']), -(target * logp).sum(), rtol=1e-5)
    assert not np.allclose(plain, mirror)      # the mirror is a different view
