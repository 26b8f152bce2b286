"""Config checking: turn a bad field into one message that names it and says what is allowed."""
from __future__ import annotations

import json
import math
import os
import re
from typing import Any

import ml_collections


class ConfigError(ValueError):
    """A user error in the config: the message names the field and the allowed values."""


_CHOICES = {
    'data_source': ('folders', 'devkit', 'tfds', 'demo'),
    'val_split': ('test', 'holdout'),
    'eval_resize': ('squash', 'center_crop'),
    'init': ('pytorch', 'he_normal'),
    'conv_impl': ('auto', 'xla', 'matmul'),
    'dtype': ('auto', 'float32', 'bfloat16'),
    'augment_on': ('auto', 'host', 'device'),
    'optimizer': ('adamw', 'sgd'),
    'early_stopping_metric': ('val_loss', 'val_accuracy'),
    'loss': ('cross_entropy', 'cosine'),
    'stem': ('conv7', 'space_to_depth'),
}
_POSITIVE_INT = ('batch_size', 'num_epochs', 'image_size', 'blur_kernel', 'log_every_steps',
                 'progressive_multiple', 'ssl_projection_dim')
_NON_NEGATIVE_INT = ('num_workers', 'prefetch_batches', 'patience', 'checkpoint_every_steps',
                     'max_steps_per_epoch', 'num_classes', 'bbox_margin', 'cache_size',
                     'progressive_min_size', 'progressive_start_epoch', 'progressive_end_epoch')
_POSITIVE_FLOAT = ('learning_rate', 'div_factor', 'final_div_factor', 'adam_eps', 'ssl_temperature',
                   'distill_temperature', 'cskd_temperature')
_NON_NEGATIVE_FLOAT = ('weight_decay', 'rotation_degrees', 'brightness', 'contrast', 'saturation',
                       'translate', 'shear_degrees', 'mixup_alpha', 'min_delta', 'cosine_ce_weight',
                       'cskd_weight')
_PROBABILITY = ('hflip_prob', 'grayscale_prob', 'erasing_prob', 'mixup_prob', 'adam_b1', 'adam_b2',
                'momentum', 'distill_weight')
_RANGES = ('rrc_scale', 'rrc_ratio', 'blur_sigma', 'erasing_scale', 'erasing_ratio')


def _fail(field: str, value: Any, allowed: str) -> None:
    raise ConfigError(f'--config.{field}={value!r} is invalid: {allowed}.')


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks every field of configs/base.py; raises ConfigError on the first bad one (a
    missing field included: configs derive from `configs.base.get_config()`)."""
    try:
        _validate_fields(config)
    except (KeyError, AttributeError) as e:
        name = re.search(r'\w+', str(e))   # the first word: ConfigDict adds "Did you mean"
        raise ConfigError(f'the config has no field {name[0] if name else e!r}: a config starts from '
                          'configs/base.py (`from configs import base; config = '
                          'base.get_config()`) and changes fields of it.') from None


def _validate_fields(config: ml_collections.ConfigDict) -> None:
    for field, choices in _CHOICES.items():
        if config[field] not in choices:
            _fail(field, config[field], f'choose one of {", ".join(choices)}')
    for field in _POSITIVE_INT:
        if not isinstance(config[field], int) or config[field] <= 0:
            _fail(field, config[field], 'must be a positive integer')
    for field in _NON_NEGATIVE_INT:
        if not isinstance(config[field], int) or config[field] < 0:
            _fail(field, config[field], 'must be an integer >= 0')
    for field in _POSITIVE_FLOAT:
        v = config[field]
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            _fail(field, v, 'must be a finite number > 0')
    for field in _NON_NEGATIVE_FLOAT:
        v = config[field]
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            _fail(field, v, 'must be a finite number >= 0')
    for field in _PROBABILITY:
        v = config[field]
        if not isinstance(v, (int, float)) or not 0 <= v <= 1:
            _fail(field, v, 'must be a number in [0, 1]')
    for field in _RANGES:
        v = tuple(config[field])
        if len(v) != 2 or not all(isinstance(x, (int, float)) for x in v) or not 0 <= v[0] <= v[1]:
            _fail(field, v, 'must be a pair (low, high) with 0 <= low <= high')
    if config.data_source != 'demo' and not config.data_dir:
        _fail('data_dir', config.data_dir,
              f'data_source={config.data_source!r} needs the data folder; '
              'or run the generated demo: python main.py --config=configs/demo.py')
    if config.hue > 0.5:
        _fail('hue', config.hue, 'must be in [0, 0.5] (as torchvision ColorJitter)')
    if not 0 <= config.dropout < 1:
        _fail('dropout', config.dropout, 'must be in [0, 1)')
    if not 0 <= config.label_smoothing < 1:
        _fail('label_smoothing', config.label_smoothing, 'must be in [0, 1)')
    if not 0 <= config.ema_decay < 1:
        _fail('ema_decay', config.ema_decay, 'must be in [0, 1) (0: no EMA; 0.999: ~1000 steps)')
    cutmix_alpha, cutmix_share = config.cutmix_alpha, config.cutmix_share
    if not isinstance(cutmix_alpha, (int, float)) or not 0 <= cutmix_alpha < math.inf:
        _fail('cutmix_alpha', cutmix_alpha, 'must be a finite number >= 0 (0: no CutMix)')
    if not isinstance(cutmix_share, (int, float)) or not 0 <= cutmix_share <= 1:
        _fail('cutmix_share', cutmix_share, 'must be a number in [0, 1]')
    if not isinstance(config.drop_last_batch, bool):
        _fail('drop_last_batch', config.drop_last_batch, 'must be True or False')
    if not isinstance(config.blur_pool, bool):
        _fail('blur_pool', config.blur_pool, 'must be True or False')
    if not isinstance(config.tensorboard, bool):
        _fail('tensorboard', config.tensorboard, 'must be True or False')
    if not 0 < config.pct_start < 1:
        _fail('pct_start', config.pct_start, 'must be in (0, 1)')
    if config.val_split == 'holdout' and not 0 < config.val_fraction < 1:
        _fail('val_fraction', config.val_fraction, 'must be in (0, 1) with val_split=holdout')
    if config.blur_kernel % 2 != 1:
        _fail('blur_kernel', config.blur_kernel, 'must be odd')
    if len(config.stage_sizes) != len(config.widths) or not config.stage_sizes:
        _fail('stage_sizes', config.stage_sizes, f'needs one entry per width in {config.widths}')
    if any(int(s) <= 0 for s in config.stage_sizes) or any(int(w) <= 0 for w in config.widths):
        _fail('widths', config.widths, 'stage sizes and widths must be positive')
    if len(config.mean) != 3 or len(config.std) != 3 or min(config.std) <= 0:
        _fail('std', config.std, 'mean and std need 3 values each, std > 0')
    _check_image_size(config)
    _check_progressive(config)
    if not isinstance(config.pretrained_backbone, str):
        _fail('pretrained_backbone', config.pretrained_backbone,
              "must be the workdir of a --mode=pretrain run, or '' (none)")
    if not isinstance(config.distill_from, str):
        _fail('distill_from', config.distill_from, "must be a finished run's workdir, or '' (none)")


def _check_image_size(config: ml_collections.ConfigDict) -> None:
    """The last stage must see a map of at least 2x2 (see model.min_image_size); the
    space-to-depth stem takes sides that are multiples of its block."""
    stages, pool, smallest = _smallest_image_size(config)
    if config.image_size < smallest:
        _fail('image_size', config.image_size,
              f'the last stage (stage{stages}) would see a single pixel; with {stages} stages '
              f'and stem_pool={pool} the smallest is {smallest} px')
    block = _stem_block(config)
    if config.image_size % block:
        _fail('image_size', config.image_size, f'must be a multiple of {block} with '
              f'stem=space_to_depth and stem_pool={pool} (the stem folds {block}x{block} blocks)')


def _stem_block(config: ml_collections.ConfigDict) -> int:
    from cars_jax.model import stem_block   # model imports this module
    return stem_block(config.stem, config.stem_pool)


def _smallest_image_size(config: ml_collections.ConfigDict) -> tuple[int, bool, int]:
    from cars_jax.model import min_image_size   # model imports this module
    stages, pool = len(config.stage_sizes), config.stem_pool
    return stages, pool, min_image_size(stages, pool, config.stem)


def _check_progressive(config: ml_collections.ConfigDict) -> None:
    """Progressive resizing: a ramp inside the run, from a size the net can take."""
    low = config.progressive_min_size
    if not low:
        return
    smallest = _smallest_image_size(config)[2]
    if not smallest <= low <= config.image_size:
        _fail('progressive_min_size', low, f'must be 0 (off) or in [{smallest}, image_size='
              f'{config.image_size}] ({smallest}: the smallest input of this net)')
    block = _stem_block(config)
    if low % block or config.progressive_multiple % block:
        _fail('progressive_min_size', low, f'and progressive_multiple '
              f'({config.progressive_multiple}) must be multiples of {block} with '
              f'stem=space_to_depth (every train size must be)')
    start, end = config.progressive_start_epoch, config.progressive_end_epoch
    if not start <= end <= config.num_epochs:
        _fail('progressive_end_epoch', end, f'needs progressive_start_epoch ({start}) <= '
              f'progressive_end_epoch <= num_epochs ({config.num_epochs})')


# Fields whose change makes an existing checkpoint unusable (shapes or the data stream differ).
_STRUCTURAL = ('stage_sizes', 'widths', 'num_classes', 'data_source', 'data_dir', 'image_size',
               'batch_size', 'num_epochs', 'seed', 'val_split', 'val_fraction', 'weighted_sampling',
               'max_steps_per_epoch', 'early_stopping_metric', 'stem_pool', 'ema_decay',
               'drop_last_batch', 'progressive_min_size', 'progressive_start_epoch',
               'progressive_end_epoch', 'progressive_multiple', 'pretrained_backbone',
               'ssl_temperature', 'ssl_projection_dim', 'distill_from', 'distill_weight',
               'distill_temperature', 'blur_pool', 'cskd_weight', 'cskd_temperature', 'stem')


# ---- a run's config.json: its format version and the one migration from older formats ----

# The format of the config.json each run writes (key 'config_format'). A field added to
# configs/base.py after a format was released raises the version, and `_ADDED_AFTER` says what
# the runs of the older format ran with: the rest of the package reads plain fields.
CONFIG_FORMAT = 4
# format -> {field: value} for the fields the next format added. Format 1 is a config.json
# without 'config_format' (drop_last_batch: those runs dropped each epoch's last partial batch).
_ADDED_AFTER = {
    1: {'early_stopping_metric': 'val_loss', 'stem_pool': True, 'zero_init_last_bn': False,
        'ema_decay': 0.0, 'cutmix_alpha': 0.0, 'cutmix_share': 0.5, 'tensorboard': True,
        'drop_last_batch': True, 'loss': 'cross_entropy', 'cosine_ce_weight': 0.1,
        'optimizer': 'adamw', 'momentum': 0.9, 'eval_flip_tta': False,
        'wd_exclude_bn_bias': False},
    2: {'progressive_min_size': 0, 'progressive_start_epoch': 0, 'progressive_end_epoch': 0,
        'progressive_multiple': 8, 'pretrained_backbone': '', 'ssl_temperature': 0.2,
        'ssl_projection_dim': 128, 'distill_from': '', 'distill_weight': 0.5,
        'distill_temperature': 4.0, 'blur_pool': False},
    3: {'cskd_weight': 0.0, 'cskd_temperature': 4.0, 'stem': 'conv7'},
}


def run_config_json(config: ml_collections.ConfigDict) -> dict:
    """What a run writes to its config.json: every field, and the format version."""
    return {'config_format': CONFIG_FORMAT, **json.loads(config.to_json())}


def migrate_run_config(saved: dict, source: str = 'config.json') -> dict:
    """A saved config.json (any format this version knows) as the current format's fields,
    without the version key. The one place that knows what earlier runs ran with."""
    saved = dict(saved)
    version = saved.pop('config_format', 1)
    if not isinstance(version, int) or not 1 <= version <= CONFIG_FORMAT:
        raise ConfigError(f'{source} has config format {version!r}, and this cars_jax reads '
                          f'formats 1 to {CONFIG_FORMAT}: it was written by a newer cars_jax; '
                          'upgrade cars_jax to use that run.')
    for older in range(version, CONFIG_FORMAT):
        saved = {**_ADDED_AFTER[older], **saved}
    return saved


def read_run_config(path: str) -> ml_collections.ConfigDict:
    """The config a run wrote to `path` (its config.json), migrated to the current format."""
    with open(path) as f:
        return ml_collections.ConfigDict(migrate_run_config(json.load(f), path))


# A run started from another run's weights or predictions (a pretrained backbone, a teacher)
# must share its split: the other run trained on its train images, which must not be this run's
# validation or test images. With a holdout split the seed and share choose those images.
_SPLIT_SOURCE = ('data_source', 'data_dir', 'tfds_name', 'val_split')
_HOLDOUT = ('val_fraction', 'seed')


def check_same_split(theirs: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
                     holdout: bool, flag: str) -> None:
    """ConfigError naming the first split field in which `theirs` (the config of the run
    named by --config.`flag`) differs from `config`."""
    check_same_fields(theirs, config, _SPLIT_SOURCE + (_HOLDOUT if holdout else ()), flag,
                      'it saw the train images of its split, which must not be this run\'s '
                      'validation or test images; use the same split')


def check_same_fields(theirs: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
                      fields: tuple[str, ...], flag: str, why: str) -> None:
    """ConfigError naming the first of `fields` in which `theirs` (the config of the run named
    by --config.`flag`) differs from `config` (folders compared by their real path)."""
    for k in fields:
        a, b = _norm(theirs[k]), _norm(config[k])
        if k == 'data_dir':
            a, b = (os.path.realpath(v) if v else v for v in (a, b))
        if a != b:
            raise ConfigError(f'--config.{flag}={config[flag]!r} was trained with {k}={theirs[k]!r}, '
                              f'this run has {config[k]!r}: {why}.')


def incompatible_fields(saved: dict, current: ml_collections.ConfigDict) -> list[str]:
    """Fields in which a resumed run's config differs from the one its checkpoint was made
    with (`saved`: a config.json's content, any known format)."""
    saved, now = migrate_run_config(saved), json.loads(current.to_json())
    return [f'{k}: checkpoint has {saved.get(k)!r}, now {now.get(k)!r}'
            for k in _STRUCTURAL if _norm(saved.get(k)) != _norm(now.get(k))]


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, (list, tuple)) else v
