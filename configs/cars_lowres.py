"""The seed's recipe, unchanged but for the input size, on the real low-resolution copy.

Data: the 8,144 real Stanford Cars *train* images at 128x96 in devkit layout
(../shared/data/stanford-cars-128x96; no official test images there), so validation is a
seeded, stratified 20% of them: "real Stanford Cars train images at 128x96, 80/20 split;
not the official test set". 64x64 inputs keep a 30-epoch run CPU-feasible.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import base  # noqa: E402


def get_config():
    c = base.get_config()
    c.data_source = 'devkit'
    c.data_dir = '../shared/data/stanford-cars-128x96'
    c.val_split = 'holdout'
    c.val_fraction = 0.2
    c.image_size = 64
    c.num_epochs = 30
    c.log_every_steps = 100
    return c
