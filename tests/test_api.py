"""The research API the README shows: imports from the package root and one step of it."""
import jax
import numpy as np


def test_readme_research_loop_runs():
    from cars_jax import create_train_state, cutmix, eval_step, mix_batch, mixup, train_step  # noqa: F401
    from configs import base
    config = base.get_config()
    config.image_size, config.widths, config.stage_sizes = 32, (8, 8, 16, 16), (1, 1, 1, 1)
    state = create_train_state(config, jax.random.PRNGKey(0), num_classes=196, steps_per_epoch=255)
    rng = np.random.default_rng(0)
    batch = {'image': rng.normal(size=(4, 32, 32, 3)).astype(np.float32),
             'label': rng.integers(0, 196, 4).astype(np.int32)}
    state, metrics = jax.jit(train_step)(state, batch, jax.random.PRNGKey(1))
    assert int(state.step) == 1 and np.isfinite(float(metrics['loss']))
    # the lr of step 0 is the seed's OneCycle start: 1e-3 / 25
    np.testing.assert_allclose(float(metrics['lr']), 4e-5, rtol=1e-5)
    sums = jax.jit(eval_step)(state, batch)
    assert float(sums['count']) == 4
