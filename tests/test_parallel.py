"""Data parallelism with jax.sharding: 2 (forced CPU) devices give one device's trajectory,
through full batches and an epoch's last partial batch."""
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent('''
    import sys, numpy as np, jax
    sys.path.insert(0, 'tests')
    from fixtures import tiny_batch, tiny_config
    from cars_jax.steps import create_train_state, make_steps, data_parallel_mesh
    assert jax.local_device_count() == 2, jax.devices()
    c = tiny_config(batch_size=8, dropout=0.0)
    def run(mesh):
        state = create_train_state(c, jax.random.PRNGKey(0), 3, 10)
        train, evaluate = make_steps(c, mesh)
        for i in range(3):
            state, m = train(state, tiny_batch(seed=i), jax.random.PRNGKey(i))
        # an epoch's last partial batch (6 rows, 3 per device): a second compiled shape
        state, m = train(state, tiny_batch(n=6, seed=3), jax.random.PRNGKey(3))
        return state, evaluate(state, dict(tiny_batch(seed=9), mask=np.ones(8, np.float32)))
    one, e1 = run(data_parallel_mesh(jax.devices()[:1]))
    two, e2 = run(data_parallel_mesh())
    leaves = lambda s: jax.tree.leaves((s.params, s.batch_stats, s.opt_state))
    err = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(leaves(one), leaves(two)))
    print('MAXDIFF', err)
    # BN running means after train steps equal a single-device (global-batch) computation
    assert err < 1e-5, err
    assert abs(float(e1['loss_sum']) - float(e2['loss_sum'])) < 1e-4
    print('OK')
''')


def test_two_devices_match_one_device():
    env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=2',
           'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': ROOT}
    r = subprocess.run([sys.executable, '-c', SCRIPT], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and 'OK' in r.stdout, r.stdout + r.stderr
