"""The ablation table from finished runs: grouping by recipe, mean and sample spread by hand."""
import json

from cars_jax.runs_table import main, run_summary, spread, table
from cars_jax.config import run_config_json
from fixtures import tiny_config


def _fake_run(path, top1, top5, best_epoch, epoch_s, **overrides):
    path.mkdir()
    c = tiny_config(**overrides)
    (path / 'config.json').write_text(json.dumps(run_config_json(c)))
    (path / 'final_report.json').write_text(json.dumps(
        {'best_epoch': best_epoch, 'val': {'accuracy': top1, 'top5': top5}}))
    (path / 'metrics.jsonl').write_text(''.join(
        json.dumps({'epoch': i + 1, 'epoch_time_s': t}) + '\n' for i, t in enumerate(epoch_s)))
    return str(path)


def test_spread_is_the_sample_standard_deviation():
    st = spread([10.0, 12.0, 14.0])       # mean 12, sd sqrt((4 + 0 + 4) / 2) = 2
    assert st == {'mean': 12.0, 'sd': 2.0, 'min': 10.0, 'max': 14.0, 'n': 3}
    assert spread([7.5])['sd'] == 0.0


def test_runs_of_one_recipe_make_one_row_and_a_change_another(tmp_path, capsys):
    runs = [_fake_run(tmp_path / 'a', 0.10, 0.25, 20, [60, 60], seed=0),
            _fake_run(tmp_path / 'b', 0.12, 0.27, 22, [60, 120], seed=1),
            _fake_run(tmp_path / 'c', 0.13, 0.30, 25, [30, 30], seed=0, loss='cosine')]
    s = run_summary(runs[1])
    assert (round(s['top1'], 6), s['best_epoch'], s['epochs'], s['train_s']) == (12.0, 22, 2, 180)
    rows = table([run_summary(r) for r in runs]).splitlines()
    assert len(rows) == 4
    # baseline: top-1 11.0 +- sqrt(2) = 1.4, top-5 26.0 +- 1.4, 2 and 3 minutes -> 2.5 (printed 2)
    assert rows[2] == ('| (baseline) | 0, 1 | 11.0 ± 1.4 [10.0-12.0] | 26.0 ± 1.4 [25.0-27.0] | '
                       '20, 22 | 2 |')
    assert rows[3] == "| loss='cosine' | 0 | 13.0 | 30.0 | 25 | 1 |"
    assert main(runs) == 0 and '(baseline)' in capsys.readouterr().out
    assert main([str(tmp_path)]) == 2 and 'not a finished run' in capsys.readouterr().err
