"""The seed's Stanford Cars recipe, value for value (the PyTorch notebook the project reimplements).

Every hyperparameter of the PyTorch notebook is a named field here; override any of them on
the command line: `python main.py --config=configs/base.py --config.batch_size=64`.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    # ---- data ------------------------------------------------------------------------------
    c.data_source = 'folders'      # folders (<dir>/train|test/<class>/*) | devkit | tfds | demo
    c.data_dir = ''                # root of the chosen layout (tfds: the TFDS data_dir)
    c.tfds_name = 'cars196'
    c.val_split = 'test'           # 'test': validate on the test split (the seed) | 'holdout'
    c.val_fraction = 0.2           # holdout: stratified share of train held out for validation
    c.use_bbox = False             # devkit/tfds: crop to the annotated bounding box
    c.bbox_margin = 16             # pixels added around the box before cropping
    c.num_classes = 196            # checked against the data; 0 = take it from the data
    c.num_workers = 0              # grain worker processes decoding + augmenting (0 = threads)
    c.prefetch_batches = 4         # batches buffered ahead of the train step
    c.weighted_sampling = True     # PyTorch WeightedRandomSampler(1/class count, replacement)
    c.augment_on = 'auto'          # host: decode + augment per image on CPU (the seed) | device:
                                   #   decode once to a uint8 cache, augment inside the jitted
                                   #   step | auto: device on GPU/TPU, host on CPU
    c.cache_size = 0               # device: cache side C (0: 8/7 of image_size, 256 for 224)
    c.cache_dir = ''               # device: '': <data_dir>/.cars_jax_cache if writable, else <workdir>/cache

    # ---- augmentation (train; the notebook's order) ----------------------------------------
    c.image_size = 224
    c.rrc_scale = (0.8, 1.0)       # RandomResizedCrop(224, scale=(0.8, 1.0))
    c.rrc_ratio = (3 / 4, 4 / 3)
    c.hflip_prob = 0.5             # RandomHorizontalFlip()
    c.rotation_degrees = 15.0      # RandomRotation(15), fill 0
    c.brightness = 0.2             # ColorJitter(0.2, 0.2, 0.2, 0.1)
    c.contrast = 0.2
    c.saturation = 0.2
    c.hue = 0.1
    c.translate = 0.1              # RandomAffine(0, translate=(0.1, 0.1), shear=10)
    c.shear_degrees = 10.0
    c.blur_kernel = 3              # GaussianBlur(3, sigma=(0.1, 2.0)), always applied
    c.blur_sigma = (0.1, 2.0)
    c.grayscale_prob = 0.1         # RandomGrayscale(p=0.1)
    c.mean = (0.485, 0.456, 0.406) # Normalize(ImageNet)
    c.std = (0.229, 0.224, 0.225)
    c.erasing_prob = 0.3           # RandomErasing(p=0.3, scale=(0.02, 0.33), ratio=(0.3, 3.3), value=0)
    c.erasing_scale = (0.02, 0.33)
    c.erasing_ratio = (0.3, 3.3)
    c.erasing_value = 0.0
    c.eval_resize = 'squash'       # eval: 'squash' to image_size^2 (seed) | 'center_crop'
    c.eval_flip_tta = False        # validation/test score = mean logits of image + mirror (not the seed)
    # Progressive resizing (not the seed; FFCV's ResNet recipes): train at progressive_min_size
    # px up to epoch progressive_start_epoch (0-based), then linearly (in multiples of
    # progressive_multiple px) up to image_size from epoch progressive_end_epoch on; validation,
    # test and serving always at image_size. Early epochs cost (min/size)^2 of the FLOPs.
    c.progressive_min_size = 0     # 0: off, every epoch at image_size
    c.progressive_start_epoch = 0
    c.progressive_end_epoch = 0
    c.progressive_multiple = 8

    # ---- model: the seed's VehicleResNet = ResNet-18 topology + Dropout(0.5) -----------------
    c.stage_sizes = (2, 2, 2, 2)
    c.widths = (64, 128, 256, 512)
    c.dropout = 0.5
    c.init = 'pytorch'             # pytorch (the seed's defaults) | he_normal
    c.zero_init_last_bn = False    # zero the scale of each block's last BN (not the seed)
    c.stem_pool = True             # 3x3/2 max-pool after the stem (seed); False: 2x resolution
                                   #   in every stage, 4x FLOPs (small inputs: 4x4 last maps at 64 px)
    c.stem = 'conv7'               # conv7: the seed's 7x7/2 conv | space_to_depth: 4x4 pixel
                                   #   blocks to channels then a 3x3 conv (TResNet; not the seed):
                                   #   same maps and cost, no pixel skipped (sides: multiples of 4)
    c.blur_pool = False            # blur ([1,2,1]^2/16) before each strided block's convs (FFCV's
                                   #   BlurPool; anti-aliasing, not the seed; no parameters)
    c.bn_momentum = 0.1            # PyTorch convention (flax momentum = 1 - this)
    c.bn_eps = 1e-5
    # Start the backbone from a self-supervised pretraining (not the seed): the workdir of a
    # `python main.py --mode=pretrain` run on the same split (checked); the classifier starts fresh.
    c.pretrained_backbone = ''
    c.conv_impl = 'auto'           # auto: CPU im2col+matmul on <=4x4 maps, GPU/TPU lax.conv | xla | matmul
    c.dtype = 'auto'               # auto: bfloat16 compute on GPU/TPU, float32 on CPU | float32 | bfloat16

    # ---- optimisation ----------------------------------------------------------------------
    c.optimizer = 'adamw'          # adamw (the seed) | sgd (Nesterov, decoupled decay)
    c.momentum = 0.9               # sgd only
    c.batch_size = 32
    c.drop_last_batch = False      # False: train each epoch's last partial batch too, ceil(N / batch)
                                   #   steps (the seed's DataLoader, drop_last=False); True: full
                                   #   batches only, N // batch steps. Several devices: the partial
                                   #   batch is cut to a multiple of the device count
    c.num_epochs = 70
    c.learning_rate = 1e-3         # AdamW lr = OneCycleLR max_lr
    c.weight_decay = 1e-4
    c.wd_exclude_bn_bias = False   # the seed decays every parameter
    c.adam_b1 = 0.9
    c.adam_b2 = 0.999
    c.adam_eps = 1e-8
    c.pct_start = 0.1              # OneCycleLR(pct_start=0.1, anneal_strategy='cos',
    c.div_factor = 25.0            #   div_factor=25, final_div_factor=1e4), stepped per batch
    c.final_div_factor = 1e4
    c.label_smoothing = 0.05
    # 'cosine' (not the seed): 1 - cos(output, one-hot label), scale-free, reported to help on
    # small data sets from scratch (Barz & Denzler 2020), plus cosine_ce_weight x the
    # label-smoothed cross-entropy on the same outputs (the paper: 0.1, on a second head).
    c.loss = 'cross_entropy'
    c.cosine_ce_weight = 0.1
    c.mixup_alpha = 0.4
    c.mixup_prob = 0.5             # share of batches that are mixed
    c.cutmix_alpha = 0.0           # >0: CutMix (not the seed) with lam ~ Beta(a, a); 1.0 is usual
    c.cutmix_share = 0.5           # with both alphas > 0: share of mixed batches that use CutMix
    c.ema_decay = 0.0              # >0: evaluate, keep and serve an EMA of the weights (not the
                                   #   seed; e.g. 0.999 = a horizon of ~1000 steps)
    # Distillation (not the seed): also fit a finished run's predictions (its best checkpoint,
    # same split: checked) on the same mixed images: (1 - w) x the loss above + w x T^2 KL.
    c.distill_from = ''            # the teacher's workdir ('' : none)
    c.distill_weight = 0.5
    c.distill_temperature = 4.0
    # Class-wise self-knowledge distillation (CS-KD, Yun et al. 2020; not the seed): each image
    # also fits the net's own softened prediction on another train image of its class (no
    # gradient through that one): the loss above + w x T^2 KL. Costs one more forward pass.
    c.cskd_weight = 0.0            # 0: off; the paper's value for fine-grained sets is 3
    c.cskd_temperature = 4.0

    # ---- self-supervised pretraining (--mode=pretrain: SimCLR on the train images) ------------
    c.ssl_temperature = 0.2        # NT-Xent temperature (SimCLR: 0.1-0.5; 0.2 at small batches)
    c.ssl_projection_dim = 128     # projection head: widths[-1] -> ReLU -> 128 (SimCLR's)

    # ---- early stopping and checkpoints -----------------------------------------------------
    c.early_stopping_metric = 'val_loss'   # val_loss (the seed; min) | val_accuracy (max): picks
                                           #   the best checkpoint and drives the patience count
    c.patience = 5
    c.min_delta = 1e-3
    c.checkpoint_every_steps = 0   # also save a resume checkpoint every N steps (0: per epoch only)
    c.max_steps_per_epoch = 0      # >0: cut epochs short (smoke tests)
    c.log_every_steps = 50         # progress line within an epoch
    c.tensorboard = True           # also write TensorBoard event files (workdir/tensorboard; no TensorFlow)
    return c
