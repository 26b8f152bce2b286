"""configs/ and the config checks: every bad field gives one message naming it."""
import importlib
import pathlib

import pytest

from configs import base, demo

from cars_jax.config import ConfigError, incompatible_fields, validate_config


def _cfg(**overrides):
    c = demo.get_config()
    for k, v in overrides.items():
        c[k] = v
    return c


def test_base_holds_the_seeds_values():
    c = base.get_config()
    assert (c.image_size, c.batch_size, c.num_epochs, c.num_classes) == (224, 32, 70, 196)
    assert (c.learning_rate, c.weight_decay, c.pct_start, c.div_factor, c.final_div_factor) == (
        1e-3, 1e-4, 0.1, 25.0, 1e4)
    assert (c.label_smoothing, c.mixup_alpha, c.mixup_prob) == (0.05, 0.4, 0.5)
    assert (c.patience, c.min_delta, c.dropout) == (5, 1e-3, 0.5)
    assert tuple(c.rrc_scale) == (0.8, 1.0) and c.rotation_degrees == 15
    assert (c.brightness, c.contrast, c.saturation, c.hue) == (0.2, 0.2, 0.2, 0.1)
    assert (c.erasing_prob, tuple(c.erasing_scale), tuple(c.erasing_ratio)) == (
        0.3, (0.02, 0.33), (0.3, 3.3))
    assert tuple(c.stage_sizes) == (2, 2, 2, 2) and tuple(c.widths) == (64, 128, 256, 512)


SHIPPED_CONFIGS = sorted(p.stem for p in pathlib.Path(base.__file__).parent.glob('*.py')
                         if p.stem != '__init__')


def test_the_shipped_configs_are_found():
    assert {'base', 'demo', 'cars_lowres', 'fast', 'fast30', 'fast_wide', 'pretrain',
            'fast30_cosine', 'fast30_cosine_blur'} <= set(SHIPPED_CONFIGS)


@pytest.mark.parametrize('name', SHIPPED_CONFIGS)
def test_every_shipped_config_is_valid(name):
    c = importlib.import_module(f'configs.{name}').get_config()
    c.data_dir = c.data_dir or '/data/stanford_cars'   # base.py leaves it to the user
    validate_config(c)


def test_fast30_is_the_measured_30_epoch_run():
    # README "Real images": the run that reached 11.2% was fast.py with exactly these flags.
    from configs import fast
    from configs import fast30
    c, f = fast30.get_config(), fast.get_config()
    assert (c.num_epochs, c.patience, c.early_stopping_metric) == (30, 30, 'val_accuracy')
    assert (c.mixup_prob, c.mixup_alpha, c.erasing_prob, c.weight_decay) == (0.5, 0.4, 0.3, 0.05)
    changed = {k for k in c if c[k] != f[k]}
    assert changed == {'num_epochs', 'patience', 'early_stopping_metric', 'mixup_prob',
                       'erasing_prob', 'weight_decay'}


def test_fast30_cosine_is_the_measured_cosine_run():
    # docs/experiments.md section 6: the runs were fast30.py with --config.loss=cosine only
    from configs import fast30
    from configs import fast30_cosine
    c, f = fast30_cosine.get_config(), fast30.get_config()
    assert {k for k in c if c[k] != f[k]} == {'loss'} and c.cosine_ce_weight == 0.1


def test_fast30_cosine_blur_is_the_measured_blur_pool_run():
    # docs/experiments.md section 6: the runs were fast30_cosine.py with --config.blur_pool=True
    from configs import fast30_cosine
    from configs import fast30_cosine_blur
    c, f = fast30_cosine_blur.get_config(), fast30_cosine.get_config()
    assert {k for k in c if c[k] != f[k]} == {'blur_pool'} and c.blur_pool is True


def test_fast_wide_is_the_measured_10_epoch_run():
    # README "Real images": the 7.4% run was fast.py with widths (96, 192, 384, 768); keeping
    # the most accurate epoch instead of the lowest-loss one is the only other difference.
    from configs import fast
    from configs import fast_wide
    c, f = fast_wide.get_config(), fast.get_config()
    assert tuple(c.widths) == (96, 192, 384, 768) and c.num_epochs == 10
    assert {k for k in c if c[k] != f[k]} == {'widths', 'early_stopping_metric'}


@pytest.mark.parametrize('field,value', [
    ('learning_rate', -1e-3), ('batch_size', 0), ('num_epochs', -2), ('mixup_prob', 1.5),
    ('data_source', 'zip'), ('dtype', 'float16'), ('hue', 0.7), ('dropout', 1.0),
    ('rrc_scale', (1.0, 0.5)), ('blur_kernel', 4), ('stage_sizes', (2, 2)), ('widths', (8, 0, 8, 8)), ('val_split', 'x'),
    ('learning_rate', float('nan')), ('early_stopping_metric', 'val_top5'),
    ('cutmix_alpha', -1.0), ('cutmix_alpha', float('inf')), ('cutmix_share', 1.5),
    ('progressive_min_size', -8), ('progressive_multiple', 0),
])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ConfigError, match=f'--config.{field}'):
        validate_config(_cfg(**{field: value}))


def test_missing_data_dir_points_to_the_demo():
    c = base.get_config()
    with pytest.raises(ConfigError, match='data_dir.*configs/demo.py'):
        validate_config(c)


def test_incompatible_fields_lists_structural_changes_only():
    saved = demo.get_config()
    import json
    saved_json = json.loads(saved.to_json())
    now = _cfg(widths=(8, 8, 8, 8), learning_rate=0.5)
    diffs = incompatible_fields(saved_json, now)
    assert len(diffs) == 1 and diffs[0].startswith('widths')


# A format-1 config.json (written before the version key existed) misses the fields added
# since; its run ran with these values, which differ from (or are) configs/base.py's now.
_FORMAT_1_RAN_WITH = [('early_stopping_metric', 'val_loss', 'val_accuracy'),
                      ('stem_pool', True, False), ('ema_decay', 0.0, 0.999),
                      ('drop_last_batch', True, False)]


def _format_1_json(without):
    import json
    saved = json.loads(demo.get_config().to_json())    # format 1 had no version key
    del saved[without]
    return saved


@pytest.mark.parametrize('field,ran_with,other', _FORMAT_1_RAN_WITH)
def test_a_format_1_run_resumes_with_what_it_ran_with_and_names_a_change(field, ran_with, other):
    saved = _format_1_json(field)
    assert incompatible_fields(saved, _cfg(**{field: ran_with})) == []
    assert incompatible_fields(saved, _cfg(**{field: other})) == [
        f'{field}: checkpoint has {ran_with!r}, now {other!r}']


def test_a_run_writes_its_config_format_and_reads_back_the_plain_fields(tmp_path):
    import json

    from cars_jax.config import CONFIG_FORMAT, read_run_config, run_config_json
    c = _cfg(ema_decay=0.5)
    written = run_config_json(c)
    assert written['config_format'] == CONFIG_FORMAT >= 2
    (tmp_path / 'config.json').write_text(json.dumps(written))
    back = read_run_config(str(tmp_path / 'config.json'))
    assert 'config_format' not in back and back.to_dict() == json.loads(c.to_json())
    # format 1: the values its run used fill the fields it lacks; a field it has is kept
    (tmp_path / 'config.json').write_text(json.dumps(_format_1_json('drop_last_batch')))
    old = read_run_config(str(tmp_path / 'config.json'))
    assert old.drop_last_batch is True and old.cutmix_alpha == c.cutmix_alpha
    assert old.batch_size == c.batch_size


def test_a_config_json_from_a_newer_cars_jax_is_one_clear_error(tmp_path):
    import json

    from cars_jax.config import CONFIG_FORMAT, read_run_config
    path = tmp_path / 'config.json'
    path.write_text(json.dumps({'config_format': CONFIG_FORMAT + 1, 'batch_size': 4}))
    with pytest.raises(ConfigError, match=rf'config.json has config format {CONFIG_FORMAT + 1}'
                                          r'.*newer cars_jax.*upgrade'):
        read_run_config(str(path))


def test_a_config_missing_a_field_names_it_and_points_to_base():
    import ml_collections
    fields = _cfg().to_dict()
    del fields['cutmix_share']
    with pytest.raises(ConfigError, match=r"no field 'cutmix_share'.*configs/base.py"):
        validate_config(ml_collections.ConfigDict(fields))


def test_drop_last_batch_defaults_to_the_seeds_and_must_be_a_bool():
    import ml_collections
    assert base.get_config().drop_last_batch is False      # DataLoader(drop_last=False)
    for value in ('yes', 1, None):
        c = ml_collections.ConfigDict({**_cfg().to_dict(), 'drop_last_batch': value})
        with pytest.raises(ConfigError, match='--config.drop_last_batch'):
            validate_config(c)


@pytest.mark.parametrize('stages,stem_pool,smallest', [
    # Hand computation: every stride-2 layer (stem conv 7x7/2 pad 3, max-pool 3x3/2 pad 1,
    # the first block of stages 2..N) maps s to ceil(s / 2); the last stage needs an input
    # of at least 2x2, i.e. ceil(s / 2^k) >= 2 with k stride-2 layers before it.
    ((2, 2, 2, 2), True, 17),    # k = 4 (conv, pool, stage2, stage3): s >= 2^4 + 1
    ((2, 2, 2, 2), False, 9),    # k = 3
    ((1, 1), True, 5),           # k = 2 (conv, pool)
    ((1,), False, 3),            # k = 1 (conv)
])
def test_image_size_below_the_nets_minimum_is_an_error_naming_it(stages, stem_pool, smallest):
    kw = dict(stage_sizes=stages, widths=(8,) * len(stages), stem_pool=stem_pool)
    validate_config(_cfg(image_size=smallest, **kw))
    for too_small in (1, smallest - 1):
        with pytest.raises(ConfigError, match=rf'--config.image_size={too_small} .*smallest is '
                                              rf'{smallest} px'):
            validate_config(_cfg(image_size=too_small, **kw))


@pytest.mark.parametrize('overrides,field', [
    ({'progressive_min_size': 4}, 'progressive_min_size'),          # below the net's 5 px
    ({'progressive_min_size': 24}, 'progressive_min_size'),         # above image_size 16
    ({'progressive_min_size': 8, 'progressive_start_epoch': 2, 'progressive_end_epoch': 1},
     'progressive_end_epoch'),
    ({'progressive_min_size': 8, 'progressive_end_epoch': 3}, 'progressive_end_epoch'),  # > 2 epochs
])
def test_a_progressive_ramp_outside_the_net_or_the_run_names_the_field(overrides, field):
    from fixtures import tiny_config
    with pytest.raises(ConfigError, match=f'--config.{field}='):
        validate_config(tiny_config(**overrides))
    validate_config(tiny_config(progressive_min_size=8, progressive_end_epoch=2))


def test_a_format_2_run_resumes_without_progressive_resizing():
    """Format 2 (before progressive resizing) ran every epoch at image_size."""
    import json
    saved = {'config_format': 2, **json.loads(demo.get_config().to_json())}
    for k in [k for k in saved if k.startswith('progressive_')]:
        del saved[k]
    assert incompatible_fields(saved, _cfg()) == []
    assert incompatible_fields(saved, _cfg(progressive_min_size=32)) == [
        'progressive_min_size: checkpoint has 0, now 32']


@pytest.mark.parametrize('overrides,field', [
    ({'image_size': 66}, 'image_size'),                               # not a multiple of 4
    ({'image_size': 64, 'progressive_min_size': 48, 'progressive_multiple': 6,
      'progressive_end_epoch': 2}, 'progressive_min_size'),           # a ramp size of 6s
])
def test_the_space_to_depth_stem_takes_sides_that_are_multiples_of_its_block(overrides, field):
    with pytest.raises(ConfigError, match=f'--config.{field}=.*multiple'):
        validate_config(_cfg(stem='space_to_depth', **overrides))
    validate_config(_cfg(stem='space_to_depth', image_size=64))
    validate_config(_cfg(stem='space_to_depth', stem_pool=False, image_size=66 - 4 + 2))
    validate_config(_cfg(image_size=66))                              # the seed's stem: any size
    with pytest.raises(ConfigError, match='--config.stem='):
        validate_config(_cfg(stem='patchify'))


def test_a_format_3_run_resumes_without_cskd():
    """Format 3 (before CS-KD and the stem choice) trained without the class-wise
    self-distillation term, with the seed's stem."""
    import json
    saved = {'config_format': 3, **json.loads(demo.get_config().to_json())}
    for k in [k for k in saved if k.startswith('cskd_') or k == 'stem']:
        del saved[k]
    assert incompatible_fields(saved, _cfg()) == []
    assert incompatible_fields(saved, _cfg(cskd_weight=3.0)) == [
        'cskd_weight: checkpoint has 0.0, now 3.0']
    assert incompatible_fields(saved, _cfg(stem='space_to_depth')) == [
        "stem: checkpoint has 'conv7', now 'space_to_depth'"]
