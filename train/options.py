"""The training options and their defaults: plain data, no torch import, so that the
command line shows them quickly. Each default is written here once; :mod:`.train` uses
them, and ``sfmpairs train --help`` shows them.
"""

from __future__ import annotations

MARGINS = {"alexnet": 0.7, "vgg16": 0.75}  # the contrastive margin; resnets and the rest: 0.85

TRAIN_DEFAULTS = {
    "arch": "resnet50", "pool": "gem", "p": 3.0, "whitening": None,
    "pretrained": False,  # True: torchvision's ImageNet weights; or a local weights file
    "weights": None,  # a checkpoint to start from
    "epochs": 30, "query_size": 2000, "pool_size": 20000, "neg_num": 5, "batch_size": 5,
    "image_size": 362,  # longer side of the images in training and mining
    "test_image_size": 1024,  # validation's, and extract's and evaluate's by default
    "loss": "contrastive", "margin": None,  # None: by architecture (MARGINS)
    "optimizer": "adam", "lr": 1e-6, "momentum": 0.9, "weight_decay": 1e-6,
    "lr_decay": 0.1,  # lr *= exp(-lr_decay) every epoch (the paper; the authors' code: 0.01)
    "p_lr_factor": 10.0,  # GeM p learns 10 times faster, without weight decay
    "min_covisible": 1,  # validation: positives share this many 3D points
    "seed": 0, "device": "auto", "amp": None,  # None: on for CUDA
    "workers": None, "skip_bad": False, "cache_mb": 2048,
}
