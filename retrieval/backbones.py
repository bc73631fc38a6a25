"""The backbones and poolings sfmpairs knows, as plain data (no torch import, so that
the command line lists them quickly). :mod:`.network` builds them.
"""

from __future__ import annotations

# backbone -> channels of its last convolutional block (where the network cuts it)
BACKBONES = {
    "alexnet": 256,
    "vgg16": 512,
    "resnet18": 512,
    "resnet34": 512,
    "resnet50": 2048,
    "resnet101": 2048,
    "resnet152": 2048,
    "mobilenet_v3_large": 960,
    "mobilenet_v3_small": 576,
    "efficientnet_b0": 1280,
}
POOLS = ("mac", "spoc", "gem", "rmac")
