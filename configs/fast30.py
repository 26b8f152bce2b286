"""A 30-epoch from-scratch recipe on the development copy (configs/cars_lowres.py); with the
cosine loss it becomes configs/fast30_cosine.py, and with BlurPool too the best measured one,
configs/fast30_cosine_blur.py.

For: 30 epochs. configs/fast.py memorises the training images in 30 epochs (train accuracy 97%
at epoch 22, validation flat near 10%); this puts back the seed's regularisers that pay off
late, plus a real weight decay:
  - MixUp on half the batches, alpha 0.4 (the seed's);
  - random erasing with p 0.3 (the seed's);
  - AdamW decoupled weight decay 0.05 (the seed's 1e-4 is negligible), not on BN/biases;
  - best checkpoint and patience on validation accuracy: with label smoothing the validation
    loss rises from epoch ~11 while accuracy still improves, so the seed's val-loss rule would
    stop too early;
  - patience 30: the full one-cycle schedule runs.
Measured (docs/experiments.md): 11.5 +- 1.0% top-1 / 26.2 +- 2.5% top-5 over seeds 0-2 (the
first run, seed 0 with earlier CPU kernels: 11.2% / 25.1%), against the
seed's recipe's 7.2%; the 2x target (14.4%) is not met.
"""
from configs import fast


def get_config():
    c = fast.get_config()
    c.num_epochs = 30
    c.mixup_prob = 0.5
    c.mixup_alpha = 0.4
    c.erasing_prob = 0.3
    c.weight_decay = 0.05
    c.early_stopping_metric = 'val_accuracy'
    c.patience = 30
    return c
