"""The best measured 30-epoch from-scratch recipe: configs/fast30_cosine.py with BlurPool.

Why: at 64 px the strided convolutions of stages 2-4 subsample 16x16, 8x8 and 4x4 maps, and
a stride-2 window that skips every other position aliases the fine detail that tells car
models apart into whatever pattern the sampling grid happens to hit. A fixed [1,2,1]^2/16
blur before each strided block's convolutions (Zhang, "Making Convolutional Networks
Shift-Invariant Again", ICML 2019; FFCV's ResNets) removes what the stride cannot represent;
it adds no parameters and little compute (a 3x3 blur of each strided block's input).
Everything else is fast30_cosine's.
Measured: docs/experiments.md, section 6 ("On top of the cosine loss").
"""
from configs import fast30_cosine


def get_config():
    c = fast30_cosine.get_config()
    c.blur_pool = True
    return c
