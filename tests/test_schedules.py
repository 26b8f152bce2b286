"""One-cycle lr against PyTorch's OneCycleLR formula (written out in float64 numpy) and the seed's log."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cars_jax.schedules import onecycle_schedule, progressive_image_size

SEED_STEPS_PER_EPOCH = 255          # ceil(8144 / 32)
SEED_TOTAL = 70 * SEED_STEPS_PER_EPOCH


def torch_onecycle(t, total, max_lr, pct_start=0.1, div=25.0, final_div=1e4):
    """torch.optim.lr_scheduler.OneCycleLR(anneal_strategy='cos', three_phase=False).get_lr()."""
    initial = max_lr / div
    min_lr = initial / final_div
    phases = [(float(pct_start * total) - 1, initial, max_lr),
              (total - 1, max_lr, min_lr)]
    out = []
    for step in np.atleast_1d(t):
        start = 0.0
        for i, (end, lo, hi) in enumerate(phases):
            if step <= end or i == len(phases) - 1:
                pct = (step - start) / (end - start)
                out.append(hi + (lo - hi) / 2.0 * (np.cos(np.pi * pct) + 1))
                break
            start = end
    return np.array(out)


def _all_steps(schedule, total):
    return np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(total)), np.float64)


def test_seed_schedule_key_points():
    s = onecycle_schedule(SEED_TOTAL, 1e-3, 0.1, 25.0, 1e4)
    peak = 1784                                   # 0.1 * 17850 - 1
    mid = (peak + SEED_TOTAL - 1) // 2            # half-way through the anneal: lr ~ max/2
    for t in (0, 1, peak - 1, peak, peak + 1, mid, SEED_TOTAL - 2):
        np.testing.assert_allclose(float(s(t)), torch_onecycle(t, SEED_TOTAL, 1e-3)[0],
                                   rtol=3e-3 if t == SEED_TOTAL - 2 else 1e-5, err_msg=str(t))
    np.testing.assert_allclose(float(s(0)), 4e-5, rtol=1e-6)
    np.testing.assert_allclose(float(s(peak)), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(float(s(mid)), 0.5e-3, rtol=2e-3)
    np.testing.assert_allclose(float(s(SEED_TOTAL - 1)), 4e-9, rtol=1e-6)
    # Held at min_lr afterwards (PyTorch would refuse to step further).
    np.testing.assert_allclose(float(s(SEED_TOTAL + 10)), 4e-9, rtol=1e-6)


def test_seed_schedule_all_steps_and_is_optax_own():
    s = onecycle_schedule(SEED_TOTAL, 1e-3)
    got = _all_steps(s, SEED_TOTAL)
    ref = torch_onecycle(np.arange(SEED_TOTAL), SEED_TOTAL, 1e-3)
    rel = np.abs(got - ref) / ref
    # float32 only: <= 4.3e-4 measured away from the tail, 3.1e-3 where 1 + cos(pi p) cancels.
    assert rel[:SEED_TOTAL - 50].max() < 1e-3, rel[:SEED_TOTAL - 50].max()
    assert rel.max() < 5e-3, rel.max()
    assert got.argmax() == 1784
    # Integral pct_start * total: it *is* optax's cosine_onecycle_schedule(total - 1).
    lib = _all_steps(optax.cosine_onecycle_schedule(SEED_TOTAL - 1, 1e-3, 0.1, 25.0, 1e4),
                     SEED_TOTAL)
    np.testing.assert_array_equal(got, lib)


# The seed's log, "lr (end of epoch)": the lr after epoch * 255 scheduler steps, printed %.6f.
SEED_LOG_LR = {
    1: 0.000088, 2: 0.000221, 3: 0.000414, 4: 0.000627, 5: 0.000820, 6: 0.000953,
    7: 0.001000, 8: 0.000999, 9: 0.000998, 10: 0.000994, 11: 0.000990, 12: 0.000985,
    13: 0.000978, 14: 0.000970, 15: 0.000961, 16: 0.000950, 17: 0.000939, 18: 0.000927,
    19: 0.000913, 20: 0.000899, 21: 0.000883, 22: 0.000866, 23: 0.000849, 24: 0.000831,
    25: 0.000812, 26: 0.000792, 27: 0.000771, 28: 0.000750, 29: 0.000728, 30: 0.000706,
    31: 0.000683, 32: 0.000659, 33: 0.000635, 34: 0.000611, 35: 0.000587, 36: 0.000562,
    37: 0.000537, 38: 0.000512, 39: 0.000487, 40: 0.000463, 41: 0.000438, 42: 0.000413,
    43: 0.000389, 44: 0.000364, 45: 0.000341, 46: 0.000317, 47: 0.000294, 48: 0.000272,
    49: 0.000250, 50: 0.000229, 51: 0.000208, 52: 0.000188, 53: 0.000169, 54: 0.000151,
    55: 0.000133, 56: 0.000117, 57: 0.000101, 58: 0.000087, 59: 0.000073, 60: 0.000061,
    61: 0.000049, 62: 0.000039, 63: 0.000030, 64: 0.000022, 65: 0.000015, 66: 0.000010,
    67: 0.000006, 68: 0.000002, 69: 0.000001,
}


def test_reproduces_the_seed_log():
    s = onecycle_schedule(SEED_TOTAL, 1e-3)
    for epoch in (1, 7, 35, 64):        # the values named in the task
        assert f'{float(s(epoch * SEED_STEPS_PER_EPOCH)):.6f}' == f'{SEED_LOG_LR[epoch]:.6f}'
    got = {e: f'{float(v):.6f}' for e, v in zip(SEED_LOG_LR, jax.vmap(s)(
        jnp.array([e * SEED_STEPS_PER_EPOCH for e in SEED_LOG_LR])))}
    assert got == {e: f'{v:.6f}' for e, v in SEED_LOG_LR.items()}


@pytest.mark.parametrize('epochs,spe', [(12, 13), (12, 7), (3, 5), (12, 20), (70, 10), (1, 37)])
def test_other_lengths_match_pytorch(epochs, spe):
    """Fractional peaks (12x13: 14.6) use the written-out formula; integral ones optax's."""
    total = epochs * spe
    got = _all_steps(onecycle_schedule(total, 2e-3), total)
    ref = torch_onecycle(np.arange(total), total, 2e-3)
    rel = np.abs(got - ref) / ref
    assert rel.max() < 5e-3, (rel.max(), rel.argmax())
    assert rel[:-max(total // 50, 3)].max() < 1e-4
    np.testing.assert_allclose(got[0], 2e-3 / 25, rtol=1e-5)
    np.testing.assert_allclose(got[-1], 2e-3 / 25 / 1e4, rtol=1e-5)


def test_traced_and_int32_step():
    s = onecycle_schedule(1000, 1e-3)
    a = jax.jit(s)(jnp.int32(300))
    np.testing.assert_allclose(float(a), torch_onecycle(300, 1000, 1e-3)[0], rtol=1e-5)
    assert jnp.asarray(a).dtype == jnp.float32


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        onecycle_schedule(1, 1e-3)
    with pytest.raises(ValueError):
        onecycle_schedule(100, 1e-3, pct_start=0.0)


def test_the_runs_one_cycle_peaks_where_torchs_does_for_the_seeds_8144_images():
    """The schedule the training loop builds (steps per epoch from the data, as the seed's
    DataLoader(drop_last=False) counts them) against torch's OneCycleLR over the seed's run."""
    torch = pytest.importorskip('torch')
    from configs import base
    from cars_jax.data.pipeline import steps_per_epoch
    from cars_jax.optim import make_optimizer
    n, batch, epochs = 8144, 32, 70
    loader_len = len(torch.utils.data.DataLoader(range(n), batch_size=batch, drop_last=False))
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, epochs=epochs,
                                                steps_per_epoch=loader_len, pct_start=0.1,
                                                anneal_strategy='cos')
    torch_lr = []
    for _ in range(epochs * loader_len):
        torch_lr.append(opt.param_groups[0]['lr'])
        opt.step()
        sched.step()
    c = base.get_config()
    c.num_epochs, c.batch_size = epochs, batch
    spe = steps_per_epoch(n, c.batch_size, drop_last=c.drop_last_batch)
    _, schedule = make_optimizer(c, spe)
    ours = _all_steps(schedule, epochs * spe)
    assert len(ours) == len(torch_lr) == 17850
    assert int(np.argmax(ours)) == int(np.argmax(torch_lr)) == int(0.1 * 17850 - 1) == 1784
    # float32: as in test_seed_schedule_all_steps_and_is_optax_own (3.1e-3 at the tail)
    np.testing.assert_allclose(ours, torch_lr, rtol=5e-3)


def ffcv_get_resolution(epoch, min_res, max_res, end_ramp, start_ramp, multiple=32):
    """FFCV's examples/imagenet `get_resolution` (its 32 made a parameter)."""
    assert min_res <= max_res
    if epoch <= start_ramp:
        return min_res
    if epoch >= end_ramp:
        return max_res
    interp = np.interp([epoch], [start_ramp, end_ramp], [min_res, max_res])
    return int(np.round(interp[0] / multiple)) * multiple


@pytest.mark.parametrize('epochs,low,high,start,end,multiple', [
    (88, 160, 192, 65, 76, 32),     # FFCV's rn50 88-epoch config
    (40, 160, 192, 29, 34, 32),     # FFCV's rn18 40-epoch config
    (30, 48, 64, 10, 24, 8),        # 64 px here
    (30, 32, 64, 0, 30, 8),
])
def test_progressive_size_is_ffcvs_ramp(epochs, low, high, start, end, multiple):
    ours = [progressive_image_size(e, high, low, start, end, multiple) for e in range(epochs)]
    assert ours == [ffcv_get_resolution(e, low, high, end, start, multiple) for e in range(epochs)]


def test_progressive_size_by_hand():
    """48 -> 64 px over epochs 10..20 in steps of 8: 48 + 1.6 (e - 10), rounded to /8."""
    sizes = [progressive_image_size(e, 64, 48, 10, 20, 8) for e in range(22)]
    assert sizes == [48] * 13 + [56] * 5 + [64] * 4   # 51.2 -> 48, 52.8 -> 56, 60.8 -> 64
    # rounding below a min_size that is not a multiple stays at min_size: 51.4 / 16 -> 48 -> 50
    assert progressive_image_size(1, 64, 50, 0, 10, 16) == 50
    assert progressive_image_size(3, 64, 64, 0, 10) == 64           # no ramp: always final
    with pytest.raises(ValueError):
        progressive_image_size(0, 64, 80, 0, 10)
    with pytest.raises(ValueError):
        progressive_image_size(0, 64, 48, 10, 5)
