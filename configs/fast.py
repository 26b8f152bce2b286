"""A faster from-scratch recipe on the real low-resolution data (a first candidate, see README).

Changes against configs/cars_lowres.py, each a guess to be confirmed by the ablation the
project still owes (README, "Real images"):
  - plain shuffling instead of the class-weighted sampler: Stanford Cars is nearly balanced
    (24-68 images per class), and drawing with replacement shows only ~63% of the distinct
    images each epoch;
  - a higher peak learning rate, no weight decay on BN/biases, zero-init of each block's last BN;
  - less regularisation for a short run: dropout 0.2, MixUp on 20% of batches, smoothing 0.1.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import cars_lowres  # noqa: E402


def get_config():
    c = cars_lowres.get_config()
    c.weighted_sampling = False
    c.learning_rate = 3e-3
    c.wd_exclude_bn_bias = True
    c.zero_init_last_bn = True
    c.dropout = 0.2
    c.mixup_prob = 0.2
    c.label_smoothing = 0.1
    c.num_epochs = 10
    return c
