"""The training stage's configuration (``sfmpairs train``): plain data, no torch, so that
the command line shows it quickly. Each default is written here once; :mod:`.train`
merges the caller's settings into it and records it in the run's ``config.json``.
"""

from __future__ import annotations

from dataclasses import dataclass

from sfmpairs.common import SfmpairsError
from sfmpairs.config import check_choices, setting
from sfmpairs.retrieval.backbones import BACKBONES, EXTRAS, POOLS, check_arch, wants_imagenet
from sfmpairs.retrieval.options import DeviceConf

MARGINS = {"alexnet": 0.7, "vgg16": 0.75}  # the contrastive margin by architecture
DEFAULT_MARGIN = 0.85  # resnets and the rest
LOSSES = ("contrastive", "triplet")
OPTIMIZERS = ("adam", "sgd")
NEGATIVE_MINING = ("hard", "random")
# what --resume may change; everything else is the run's own
RESUME_OPTIONS = ("epochs", "lr", "device", "workers")
NETWORK_KEYS = ("arch", "pool", "p", "whitening")


def parse_pretrained(text: str) -> bool | str:
    """``--pretrained`` alone (or the word ``imagenet``): ImageNet weights (True); with
    another value: a weights file (one named imagenet: ``./imagenet``)."""
    return True if wants_imagenet(text) else text


@dataclass(frozen=True)
class TrainConf(DeviceConf):
    arch: str = setting(
        "resnet50",
        "Backbone: "
        + ", ".join(f"{a} (extra {EXTRAS[a]})" if a in EXTRAS else a for a in BACKBONES)
        + "; or timm:NAME, any timm model (extra timm), e.g. timm:convnext_tiny, timm:vit_small_patch14_dinov2.",
        metavar="NAME",
    )
    pool: str = setting("gem", "Global pooling.", choices=POOLS)
    p: float = setting(3.0, "GeM's initial exponent.", cli=False)
    whitening: int | None = setting(None, "Add a learnable whitening layer to this many dimensions.")
    pretrained: bool | str = setting(
        False,
        "Start from ImageNet weights (torchvision's or timm's, downloaded; efficientnet_lite0's installed "
        "with its extra), or from a local weights file (.pth, .safetensors; e.g. resnet50-11ad3fa6.pth).",
        default_text="random",
        flag_value="imagenet",
        metavar="[FILE]",
        parse=parse_pretrained,
    )
    weights: str | None = setting(
        None, "Start from this checkpoint (its network: --arch, --pool are ignored).", metavar="FILE"
    )
    epochs: int = setting(30, "Epochs.")
    query_size: int = setting(2000, "Training queries per epoch.")
    pool_size: int = setting(20000, "Images in the negative pool per epoch.")
    neg_num: int = setting(5, "Hard negatives per tuple, one per other cluster.")
    negative_mining: str = setting(
        "hard",
        "hard: the most similar images of other clusters, re-mined every epoch "
        "with the current network (the paper); random: drawn at random (a control).",
        choices=NEGATIVE_MINING,
    )
    batch_size: int = setting(5, "Tuples per batch.")
    image_size: int = setting(362, "Longer side of the images in training and mining.")
    test_image_size: int = setting(1024, "Longer side in validation, recorded for extract and evaluate.")
    loss: str = setting("contrastive", "Loss of a tuple.", choices=LOSSES)
    margin: float | None = setting(
        None,
        "Loss margin.",
        default_text=", ".join([f"{m} {a}" for a, m in MARGINS.items()] + [f"else {DEFAULT_MARGIN}"]),
    )
    optimizer: str = setting("adam", "Optimizer.", choices=OPTIMIZERS)
    lr: float = setting(1e-6, "Initial learning rate (GeM's p: --p-lr-factor times higher).")
    momentum: float = setting(0.9, "SGD momentum.")
    weight_decay: float = setting(1e-6, "Weight decay (not on GeM's p).")
    lr_decay: float = setting(
        0.1, "The learning rate is multiplied by exp(-DECAY) every epoch (the paper's; the authors' code: 0.01)."
    )
    p_lr_factor: float = setting(10.0, "GeM's p learns this many times faster, without weight decay.")
    min_covisible: int = setting(1, "Validation: a positive shares at least this many 3D points with the query.")
    seed: int = setting(0, "Random seed.")
    amp: bool | None = setting(
        None,
        "Mixed precision: float16 on CUDA; bfloat16 on a CPU that computes it natively.",
        default_text="on with CUDA, off on the CPU",
    )
    skip_bad: bool = setting(False, "Skip missing or corrupt images.")
    cache_mb: int = setting(2048, "Memory for decoded training images, in MiB.")

    def check(self) -> None:
        """Refuse settings outside their range, naming the option."""
        check_arch(self.arch)
        check_choices(self)
        for key in ("epochs", "query_size", "pool_size", "batch_size", "image_size", "test_image_size", "neg_num"):
            if getattr(self, key) < 1:
                raise SfmpairsError(f"--{key.replace('_', '-')} must be at least 1")
        if not self.lr > 0:
            raise SfmpairsError("--lr must be positive")

    def margin_for(self, arch: str) -> float:
        """The loss margin: the one given, else the architecture's."""
        return self.margin if self.margin is not None else MARGINS.get(arch, DEFAULT_MARGIN)
