"""The seed's recipe, unchanged but for the input size and length, on the development copy.

For: the seed's recipe on real images on a CPU. Data: the 8,144 real Stanford Cars *train*
images at 128x96 in devkit layout (`python -m cars_jax.data.lowres --src=<devkit> --dst=<dir>`,
then `--config.data_dir=<dir>`); there are no test images in that copy, so validation is a
seeded, stratified 20% of them. 64x64 inputs keep a 30-epoch run CPU-feasible.
Measured (docs/experiments.md, seed 0, full batches only): 7.9% top-1 / 21.0% top-5 at
epoch 29 of 30 (an earlier run with other augmentation draws: 7.2% / 23.5%).
"""
from configs import base


def get_config():
    c = base.get_config()
    c.data_source = 'devkit'
    c.data_dir = ''                # the development copy: --config.data_dir=<dir>
    c.val_split = 'holdout'
    c.val_fraction = 0.2
    c.image_size = 64
    c.num_epochs = 30
    c.log_every_steps = 100
    return c
