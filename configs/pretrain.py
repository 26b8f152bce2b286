"""Self-supervised pretraining (SimCLR) on the development copy's train images, 64 px.

For: `python main.py --mode=pretrain --config=configs/pretrain.py --config.data_dir=<dir>
--workdir=runs/simclr`, then a supervised run from its backbone:
`python main.py --config=configs/fast30.py --config.data_dir=<dir>
--config.pretrained_backbone=runs/simclr`. Same data, split and seed as configs/fast30.py
(the pretraining sees only the train part of the split; the supervised run checks it).
SimCLR's augmentation, scaled to 64 px low-resolution images (the S3L recipe pretrains at
56-112 px on small data sets): crops of 20-100% of the image (SimCLR: 8-100%; a 64 px crop of
8% of a 128x96 image is mostly blur), strong colour jitter (0.4, 0.4, 0.4, 0.1), grayscale
p 0.2, blur, flips; no rotation, shear, erasing or MixUp. No dropout (the head reads the
features). Batch 128 (256 views): more negatives per anchor, at the same images per step as
fast30's 4 steps.
"""
from configs import cars_lowres


def get_config():
    c = cars_lowres.get_config()
    c.num_epochs = 30
    c.batch_size = 128
    c.learning_rate = 2e-3
    c.weight_decay = 1e-4
    c.wd_exclude_bn_bias = True
    c.rrc_scale = (0.2, 1.0)
    c.brightness, c.contrast, c.saturation, c.hue = 0.4, 0.4, 0.4, 0.1
    c.grayscale_prob = 0.2
    c.rotation_degrees = 0.0
    c.translate = 0.0
    c.shear_degrees = 0.0
    c.erasing_prob = 0.0
    c.mixup_prob = 0.0
    c.dropout = 0.0
    c.log_every_steps = 10
    c.ssl_temperature = 0.2
    return c
