"""The seed's recipe shrunk to the generated demo data: a few CPU minutes end to end.

Same losses, MixUp, sampler, augmentation and one-cycle schedule as base.py; smaller
images, a narrower ResNet-18 and fewer epochs. The demo data (20 classes of procedurally
drawn cars differing only in small details) is generated under data_dir on first use.
"""
from configs import base


def get_config():
    c = base.get_config()
    c.data_source = 'demo'
    c.data_dir = 'data/demo'
    c.num_classes = 0              # taken from the generated data (20)
    c.image_size = 64
    c.widths = (32, 64, 128, 256)
    c.batch_size = 32
    c.num_epochs = 12
    c.learning_rate = 2e-3
    c.patience = 5
    return c
