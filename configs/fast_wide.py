"""configs/fast.py with a 1.5x wider ResNet-18: the only 10-epoch run to pass the seed's 30-epoch 7.2%.

Measured (README, "Real images", 10-epoch ablation; session 5, seed 0, 64 px, the 80/20 split
of the real 128x96 train images): most accurate epoch 9 = 7.4% top-1 / 20.9% top-5, epoch 10
= 6.9% / 21.2%, against fast.py's 6.7% / 19.1%. One run: the gain is within one standard error
(~0.6 points) in top-1, but top-5 was above fast.py's at every one of the last three epochs.
The run selected its checkpoint by validation loss (epoch 8: 6.5%); here the most accurate
epoch is kept (`early_stopping_metric=val_accuracy`), which changes neither the trajectory nor
the 10-epoch stop. Widths (96, 192, 384, 768): 2.25x the FLOPs and 25M parameters; ~40 min for
the 10 epochs on a 2-core AMD EPYC (27 img/s) where fast.py takes ~30.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import fast  # noqa: E402


def get_config():
    c = fast.get_config()
    c.widths = (96, 192, 384, 768)
    c.early_stopping_metric = 'val_accuracy'
    return c
