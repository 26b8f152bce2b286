"""cars_jax: the from-scratch Stanford Cars recipe as pure JAX functions.

Research API (each a pure function or a Flax module; compose your own loop with them):
    create_train_state, train_step, eval_step, predict_step, TrainState,
    inference_variables (the weights to evaluate and serve: the EMA when a run keeps one)
    ResNet, build_model, mixup, cutmix, mix_batch, smoothed_cross_entropy, mixed_cross_entropy,
    onecycle_schedule, make_optimizer
    beyond the seed: cosine_loss, distillation_loss, nt_xent_loss (SimCLR), ContrastiveNet,
    progressive_image_size; cars_jax.pretrain (create_pretrain_state, pretrain_step, with_backbone)
    train_step_cached + data.device_augment (the augmentation inside jit),
    distributed (multi-host batches)
The side-effecting loop is cars_jax.train.train_and_evaluate (used by main.py).
"""
from cars_jax.losses import (cosine_loss, distillation_loss, mixed_cross_entropy, nt_xent_loss,
                             smoothed_cross_entropy, topk_correct)
from cars_jax.mixup import cutmix, mix_batch, mixup
from cars_jax.model import ContrastiveNet, ResNet, build_model, count_params, init_variables
from cars_jax.optim import make_optimizer
from cars_jax.schedules import onecycle_schedule, progressive_image_size
from cars_jax.steps import (TrainState, create_train_state, eval_step, inference_variables,
                            make_steps, predict_step, train_step, train_step_cached)

__version__ = '0.1.0'
__all__ = [
    'ContrastiveNet', 'ResNet', 'TrainState', 'build_model', 'cosine_loss', 'count_params',
    'create_train_state', 'cutmix', 'distillation_loss', 'eval_step', 'inference_variables',
    'init_variables', 'make_optimizer', 'make_steps', 'mix_batch', 'mixed_cross_entropy', 'mixup',
    'nt_xent_loss', 'onecycle_schedule', 'predict_step', 'progressive_image_size',
    'smoothed_cross_entropy', 'topk_correct', 'train_step', 'train_step_cached',
]
