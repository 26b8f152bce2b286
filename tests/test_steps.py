"""The pure train / eval steps: compile once, learn, never let a NaN in, honest metrics."""
import jax
import ml_collections
import pytest
import numpy as np

from cars_jax.steps import (apply_gradients_if_finite, create_train_state, eval_step, make_steps,
                            mix_hyperparameters, predict_step, replicated_sharding, train_step)
from fixtures import numpy_smoothed_ce, tiny_batch, tiny_config


def test_train_step_compiles_once_and_learns():
    c = tiny_config(mixup_prob=0.0, dropout=0.0, learning_rate=1e-2)
    state = create_train_state(c, jax.random.PRNGKey(0), num_classes=3, steps_per_epoch=20)
    traces = []

    def counted(s, b, r):
        traces.append(1)
        return train_step(s, b, r, label_smoothing=0.05, mixup_alpha=0.4, mixup_prob=0.0)

    step = jax.jit(counted)
    batch = tiny_batch()
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
    new, m = jax.jit(train_step)(state, tiny_batch(), jax.random.PRNGKey(1))
    # OneCycle starts at max_lr / div_factor
    np.testing.assert_allclose(float(m['lr']), c.learning_rate / c.div_factor, rtol=1e-5)
    changed = jax.tree.map(lambda a, b: not np.allclose(a, b), before, new.batch_stats)
    assert all(jax.tree.leaves(changed))
    assert float(m['finite']) == 1.0 and float(m['grad_norm']) > 0


def test_nonfinite_batch_leaves_state_untouched():
    c = tiny_config()
    state = create_train_state(c, jax.random.PRNGKey(0), num_classes=3, steps_per_epoch=10)
    batch = tiny_batch()
    batch['image'][0, 0, 0, 0] = np.nan
    new, m = jax.jit(train_step)(state, batch, jax.random.PRNGKey(1))
    assert float(m['finite']) == 0.0
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(new.params)):
        np.testing.assert_array_equal(a, b)
    assert int(new.step) == int(state.step)


def test_an_update_that_overflows_leaves_state_untouched():
    """Finite loss, gradients and gradient norm, but an lr so large that the new parameters
    overflow: SGD at lr 3e38 with gradients of 2 steps every weight by 6e38, past float32's
    3.4e38 (whether a real batch's gradients pass 1.13 somewhere depends on its draws)."""
    c = tiny_config(learning_rate=3e38, div_factor=1.0, optimizer='sgd')
    state = create_train_state(c, jax.random.PRNGKey(0), num_classes=3, steps_per_epoch=10)
    grads = jax.tree.map(lambda p: np.full(p.shape, 2.0, np.float32), state.params)
    new, finite, norm = jax.jit(apply_gradients_if_finite)(state, grads, state.batch_stats,
                                                           np.float32(1.0))
    assert np.isfinite(float(norm)) and not bool(finite)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(new.params)):
        np.testing.assert_array_equal(a, b)
    assert int(new.step) == int(state.step)


def test_the_update_is_applied_only_when_every_part_is_finite():
    """Finite loss, gradients and statistics give optax's AdamW step (applied here by hand) and
    the gradients' numpy norm; a NaN or inf in one gradient element, a gradient whose norm
    overflows float32, a NaN statistic or a NaN loss leave every leaf and the step as they were."""
    import optax
    c = tiny_config()
    state = create_train_state(c, jax.random.PRNGKey(0), num_classes=3, steps_per_epoch=10)
    rng = np.random.default_rng(0)
    grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), state.params)
    stats = jax.tree.map(lambda x: np.asarray(x) + 0.5, state.batch_stats)
    step = jax.jit(apply_gradients_if_finite)

    new, finite, norm = step(state, grads, stats, np.float32(1.0))
    updates, _ = state.tx.update(grads, state.opt_state, state.params)
    expected = optax.apply_updates(state.params, updates)
    assert bool(finite) and int(new.step) == 1
    np.testing.assert_allclose(float(norm), np.sqrt(sum(
        (np.asarray(g, np.float64) ** 2).sum() for g in jax.tree.leaves(grads))), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    for a, b in zip(jax.tree.leaves(new.batch_stats), jax.tree.leaves(stats)):
        np.testing.assert_array_equal(np.asarray(a), b)

    def with_element(tree, value):
        leaves, treedef = jax.tree.flatten(tree)
        leaves = [np.array(x) for x in leaves]
        leaves[-1].flat[0] = value
        return jax.tree.unflatten(treedef, leaves)

    for bad_grads, bad_stats, loss in ((with_element(grads, np.nan), stats, 1.0),
                                       (with_element(grads, np.inf), stats, 1.0),
                                       (with_element(grads, 1e20), stats, 1.0),
                                       (grads, with_element(stats, np.nan), 1.0),
                                       (grads, stats, np.nan)):
        kept, finite, _ = step(state, bad_grads, bad_stats, np.float32(loss))
        assert not bool(finite) and int(kept.step) == 0
        for a, b in zip(jax.tree.leaves((kept.params, kept.batch_stats, kept.opt_state)),
                        jax.tree.leaves((state.params, state.batch_stats, state.opt_state))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_eval_step_matches_numpy_and_respects_mask():
    c = tiny_config()
    state = create_train_state(c, jax.random.PRNGKey(0), num_classes=3, steps_per_epoch=10)
    batch = tiny_batch(seed=4)
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
    state, m = train(state, tiny_batch(), jax.random.PRNGKey(2))
    assert float(m['mixed']) == 1.0  # mixup_prob=1 from the config reached the step
    assert float(evaluate(state, tiny_batch())['count']) == 8


def test_fresh_restored_and_stepped_states_run_one_program(tmp_path):
    """A fresh state's arrays are not committed to a device; a restored one's and a step's
    outputs are, and a restored step counter is not weakly typed. The program each step
    compiles (and the persistent cache's key) must not depend on either, or a resumed run
    compiles its steps anew (seconds each for the seed's net)."""
    from cars_jax.checkpoints import latest_manager, restore_checkpoint, save_checkpoint
    c = tiny_config()
    train, evaluate = make_steps(c)
    fresh = create_train_state(c, jax.random.PRNGKey(0), num_classes=3, steps_per_epoch=10)
    placed = jax.device_put(create_train_state(c, jax.random.PRNGKey(0), num_classes=3,
                                               steps_per_epoch=10), replicated_sharding())
    committed_params = fresh.replace(params=jax.device_put(fresh.params, jax.devices()[0]))
    mgr = latest_manager(str(tmp_path))
    save_checkpoint(mgr, placed, {'epoch': 0})
    mgr.wait_until_finished()
    restored, _ = restore_checkpoint(mgr, placed)
    mgr.close()
    states = (fresh, placed, committed_params, restored)
    batch, rng = tiny_batch(), jax.random.PRNGKey(2)
    programs = {train.lower(s, batch, rng).as_text() for s in states}
    assert len(programs) == 1
    assert len({evaluate.lower(s, batch).as_text() for s in states}) == 1
    stepped, _ = train(placed, batch, rng)
    assert stepped.params['conv1']['kernel'].sharding == replicated_sharding()
    assert train.lower(stepped, batch, rng).as_text() in programs


def test_make_steps_passes_cutmix_and_format_1_runs_read_without_it():
    c = tiny_config(mixup_prob=1.0, mixup_alpha=0.0, cutmix_alpha=1.0)
    state = create_train_state(c, jax.random.PRNGKey(0), num_classes=3, steps_per_epoch=10)
    assert mix_hyperparameters(c)['cutmix_alpha'] == 1.0
    train, _ = make_steps(c)
    _, m = train(state, tiny_batch(), jax.random.PRNGKey(2))
    assert float(m['mixed']) == 1.0 and float(m['finite']) == 1.0   # only CutMix is on
    from cars_jax.config import migrate_run_config   # a config.json from before CutMix
    old = ml_collections.ConfigDict(migrate_run_config(
        {k: v for k, v in tiny_config().items() if k not in ('cutmix_alpha', 'cutmix_share')}))
    hyper = mix_hyperparameters(old)
    assert (hyper['cutmix_alpha'], hyper['cutmix_share']) == (0.0, 0.5)


def test_eval_step_compiles_once():
    c = tiny_config()
    state = create_train_state(c, jax.random.PRNGKey(0), num_classes=3, steps_per_epoch=10)
    traces = []

    def counted(s, b):
        traces.append(1)
        return eval_step(s, b)

    step = jax.jit(counted)
    for seed in range(3):
        batch = tiny_batch(seed=seed)
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
    batch = tiny_batch(n=8)
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


def test_ema_follows_the_numpy_recurrence_and_leaves_training_unchanged():
    """The EMA is a by-product: the live trajectory equals a run without it, and the average
    equals e_t = d_t e_{t-1} + (1 - d_t) w_t with d_t = min(decay, (1 + t) / (10 + t)),
    computed here in numpy from the live weights of each step."""
    decay, steps = 0.5, 5     # below the warm-up's (1+t)/(10+t) at first, above it later
    plain = create_train_state(tiny_config(), jax.random.PRNGKey(0), 3, steps_per_epoch=10)
    averaged = create_train_state(tiny_config(ema_decay=decay), jax.random.PRNGKey(0), 3,
                                  steps_per_epoch=10)
    assert plain.ema is None and averaged.ema is not None
    step = jax.jit(train_step)
    leaves = lambda s: [np.asarray(x, np.float64) for x in
                        jax.tree.leaves({'params': s.params, 'batch_stats': s.batch_stats})]
    expected = leaves(averaged)   # the average starts at the init
    for t in range(1, steps + 1):
        batch, rng = tiny_batch(seed=t), jax.random.PRNGKey(t)
        plain, _ = step(plain, batch, rng)
        averaged, _ = step(averaged, batch, rng)
        for a, b in zip(leaves(plain), leaves(averaged)):
            np.testing.assert_array_equal(a, b)
        d = min(decay, (1 + t) / (10 + t))
        expected = [d * e + (1 - d) * w for e, w in zip(expected, leaves(averaged))]
    got = [np.asarray(x, np.float64) for x in jax.tree.leaves(averaged.ema)]
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)
    # and it is not the live weights (else the test above proves nothing)
    assert any(not np.allclose(g, w) for g, w in zip(got, leaves(averaged)))


def test_eval_and_predict_use_the_ema_when_kept():
    state = create_train_state(tiny_config(ema_decay=0.9), jax.random.PRNGKey(0), 3,
                               steps_per_epoch=10)
    state, _ = jax.jit(train_step)(state, tiny_batch(), jax.random.PRNGKey(1))
    batch = tiny_batch(seed=3)
    ema_only = state.replace(params=state.ema['params'], batch_stats=state.ema['batch_stats'],
                             ema=None)
    live_only = state.replace(ema=None)
    got = eval_step(state, batch)
    np.testing.assert_allclose(float(got['loss_sum']), float(eval_step(ema_only, batch)['loss_sum']),
                               rtol=1e-6)
    assert not np.isclose(float(got['loss_sum']), float(eval_step(live_only, batch)['loss_sum']))
    np.testing.assert_allclose(np.asarray(predict_step(state, batch['image'])),
                               np.asarray(predict_step(ema_only, batch['image'])), rtol=1e-6)


def test_ema_decay_is_validated():
    from cars_jax.config import ConfigError, validate_config
    for bad in (1.0, -0.1):
        with pytest.raises(ConfigError, match='ema_decay'):
            validate_config(tiny_config(ema_decay=bad))


def test_cosine_loss_config_reaches_the_train_and_eval_steps():
    """loss='cosine' (no CE term): eval's loss is the paper's formula on the eval logits, and
    the train step's loss lies in the cosine loss's [0, 2] and differs from the CE run's."""
    import numpy as np
    c = tiny_config(loss='cosine', cosine_ce_weight=0.0, mixup_prob=0.0)
    state = create_train_state(c, jax.random.PRNGKey(0), num_classes=3, steps_per_epoch=10)
    train, evaluate = make_steps(c)
    batch = tiny_batch()
    logits = np.asarray(state.apply_fn({'params': state.params, 'batch_stats': state.batch_stats},
                                       batch['image'], train=False), np.float64)
    cos = 1 - logits[np.arange(8), batch['label']] / np.linalg.norm(logits, axis=1)
    out = evaluate(state, dict(batch, mask=np.ones(8, np.float32)))
    np.testing.assert_allclose(float(out['loss_sum']), cos.sum(), rtol=1e-5)
    _, m = train(state, batch, jax.random.PRNGKey(1))
    state_ce = create_train_state(tiny_config(mixup_prob=0.0), jax.random.PRNGKey(0), 3, 10)
    _, m_ce = make_steps(tiny_config(mixup_prob=0.0))[0](state_ce, batch, jax.random.PRNGKey(1))
    assert 0.0 <= float(m['loss']) <= 2.0 and abs(float(m['loss']) - float(m_ce['loss'])) > 0.1


def test_distillation_step_loss_is_the_weighted_sum_of_task_and_teacher_terms():
    """(1 - w) x label-smoothed CE + w x T^2 KL(teacher || student), from the two networks'
    logits recomputed outside the step and combined in numpy; w = 0 is the plain step."""
    from cars_jax.model import build_model
    c = tiny_config(dropout=0.0, mixup_prob=0.0, distill_weight=0.3, distill_temperature=2.0)
    batch = tiny_batch()
    student = create_train_state(c, jax.random.PRNGKey(0), 3, 10)
    teacher_cfg = tiny_config(widths=(4, 12))                 # a teacher of another shape
    teacher_state = create_train_state(teacher_cfg, jax.random.PRNGKey(1), 3, 10)
    teacher = {'params': teacher_state.params, 'batch_stats': teacher_state.batch_stats}
    apply_t = build_model(teacher_cfg, 3).apply
    train_fn, _ = make_steps(c, teacher_apply=apply_t)
    rng = jax.random.PRNGKey(4)
    s_logits, _ = student.apply_fn({'params': student.params, 'batch_stats': student.batch_stats},
                                   batch['image'], train=True, mutable=['batch_stats'])
    t_logits = np.asarray(apply_t(teacher, batch['image'], train=False), np.float64)
    s_logits = np.asarray(s_logits, np.float64)
    soft = lambda x: np.exp(x / 2.0) / np.exp(x / 2.0).sum(-1, keepdims=True)
    kd = 4.0 * (soft(t_logits) * np.log(soft(t_logits) / soft(s_logits))).sum(-1)
    ce = numpy_smoothed_ce(s_logits, batch['label'], c.label_smoothing)
    _, m = train_fn(jax.tree.map(np.copy, student), batch, rng, teacher)
    np.testing.assert_allclose(float(m['loss']), 0.7 * ce.mean() + 0.3 * kd.mean(), rtol=1e-4)
    c0 = tiny_config(dropout=0.0, mixup_prob=0.0, distill_weight=0.0)
    with_teacher, _ = make_steps(c0, teacher_apply=apply_t)[0](jax.tree.map(np.copy, student),
                                                               batch, rng, teacher)
    plain, _ = make_steps(c0)[0](jax.tree.map(np.copy, student), batch, rng)
    for x, y in zip(jax.tree.leaves(with_teacher.params), jax.tree.leaves(plain.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
