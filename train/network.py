"""The retrieval network of Radenovic et al.: a torchvision backbone cut after its last
convolutional block, a global pooling, optional whitening, L2 normalisation.

Config is a small dict of defaults (:data:`DEFAULT_CONFIG`); a checkpoint holds the
config and the weights, so that extraction and evaluation need only the file.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..common import SfmpairsError, atomic_output, now_iso

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DEFAULT_CONFIG = {
    "arch": "resnet50",
    "pool": "gem",  # mac, spoc, gem or rmac
    "p": 3.0,  # initial GeM exponent (learnable)
    "whitening": None,  # output dimension of a learnable whitening layer, or None
    "image_size": 1024,  # longer side of the images the network sees
    "mean": IMAGENET_MEAN,
    "std": IMAGENET_STD,
}

# arch -> (channels of the last convolutional block, how to cut the backbone)
ARCHS = {
    "alexnet": (256, lambda m: m.features[:-1]),  # without the last max-pooling
    "vgg16": (512, lambda m: m.features[:-1]),
    "resnet18": (512, lambda m: nn.Sequential(*list(m.children())[:-2])),
    "resnet34": (512, lambda m: nn.Sequential(*list(m.children())[:-2])),
    "resnet50": (2048, lambda m: nn.Sequential(*list(m.children())[:-2])),
    "resnet101": (2048, lambda m: nn.Sequential(*list(m.children())[:-2])),
    "resnet152": (2048, lambda m: nn.Sequential(*list(m.children())[:-2])),
    "mobilenet_v3_large": (960, lambda m: m.features),
    "mobilenet_v3_small": (576, lambda m: m.features),
    "efficientnet_b0": (1280, lambda m: m.features),
}
POOLS = ("mac", "spoc", "gem", "rmac")
CHECKPOINT_SCHEMA = "sfmpairs/checkpoint"


# ----------------------------------------------------------------------------- pooling
def mac(x: torch.Tensor) -> torch.Tensor:
    """Maximum activation of convolutions: (B, C, H, W) -> (B, C)."""
    return x.amax(dim=(-2, -1))


def spoc(x: torch.Tensor) -> torch.Tensor:
    """Sum-pooled (here: average-pooled) convolutional features."""
    return x.mean(dim=(-2, -1))


def gem(x: torch.Tensor, p: torch.Tensor | float, eps: float = 1e-6) -> torch.Tensor:
    """Generalised mean: (mean x^p)^(1/p); p = 1 is SPoC, p -> inf is MAC."""
    return x.clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


def rmac_regions(h: int, w: int, levels: int = 3, overlap: float = 0.4):
    """The R-MAC regions of Tolias et al. (ICLR 2016): square regions at ``levels``
    scales, overlapping by about ``overlap``. Returns (top, left, size) tuples."""
    short, long_ = min(h, w), max(h, w)
    steps = torch.arange(1, 7, dtype=torch.float64)
    b = (long_ - short) / steps
    idx = int(torch.argmin(torch.abs(((short ** 2 - short * b) / short ** 2) - overlap)))
    extra = int(idx + 1) if long_ > short else 0
    extra_h, extra_w = (extra, 0) if h > w else (0, extra)
    regions = []
    for level in range(1, levels + 1):
        size = math.floor(2 * short / (level + 1))
        if size < 1:
            break
        nh, nw = level + extra_h, level + extra_w
        tops = [0] if nh == 1 else [round(i * (h - size) / (nh - 1)) for i in range(nh)]
        lefts = [0] if nw == 1 else [round(i * (w - size) / (nw - 1)) for i in range(nw)]
        regions += [(top, left, size) for top in tops for left in lefts]
    return regions


def rmac(x: torch.Tensor, levels: int = 3) -> torch.Tensor:
    """Regional MAC: the sum of the L2-normalised MACs of the R-MAC regions and of
    the whole map."""
    h, w = x.shape[-2:]
    out = F.normalize(mac(x), dim=-1)
    for top, left, s in rmac_regions(h, w, levels):
        out = out + F.normalize(mac(x[..., top:top + s, left:left + s]), dim=-1)
    return out


# ----------------------------------------------------------------------------- network
class RetrievalNet(nn.Module):
    """features -> pooling -> (whitening) -> L2 normalisation."""

    def __init__(self, config: dict, features: nn.Module, channels: int):
        super().__init__()
        self.config = {**DEFAULT_CONFIG, **config}
        self.features = features
        self.p = nn.Parameter(torch.tensor(float(self.config["p"])))  # used by GeM
        dim = self.config["whitening"]
        self.whiten = nn.Linear(channels, int(dim), bias=True) if dim else None
        self.register_buffer("mean", torch.tensor(self.config["mean"]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(self.config["std"]).view(1, 3, 1, 1))

    @property
    def dim(self) -> int:
        return self.whiten.out_features if self.whiten is not None else ARCHS[self.config["arch"]][0]

    def normalise_input(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 or [0, 1] float images (B, 3, H, W) -> normalised float input."""
        if images.dtype == torch.uint8:
            images = images.float().div_(255)
        return (images - self.mean) / self.std

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        kind = self.config["pool"]
        if kind == "gem":
            return gem(x, self.p)
        return {"mac": mac, "spoc": spoc, "rmac": rmac}[kind](x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, H, W) -> L2-normalised descriptors (B, D)."""
        v = self.pool(self.features(x).float())
        if self.whiten is not None:
            v = self.whiten(F.normalize(v, dim=-1))
        return F.normalize(v, dim=-1)


def pretrained_state_dict(arch: str) -> dict:
    """torchvision's ImageNet weights for ``arch``, through its weights API (downloaded
    into the torch hub cache where there is internet); a clear error where not."""
    import torchvision

    weights = torchvision.models.get_model_weights(arch).DEFAULT
    filename = Path(weights.url).name
    try:
        return weights.get_state_dict(progress=False)
    except Exception as e:  # offline: URLError; broken file: RuntimeError
        cache = Path(torch.hub.get_dir()) / "checkpoints" / filename
        raise SfmpairsError(
            f"{cache}: pretrained ImageNet weights of {arch} are missing and could not be "
            f"downloaded from {weights.url} ({type(e).__name__}); put the file there, or "
            f"train from random initialisation or --weights") from None


def build_network(config: dict | None = None, pretrained: bool = False) -> RetrievalNet:
    """A :class:`RetrievalNet` for ``config`` (see :data:`DEFAULT_CONFIG`), randomly
    initialised, or with the backbone's ImageNet weights when ``pretrained``."""
    import torchvision

    config = {**DEFAULT_CONFIG, **(config or {})}
    arch = config["arch"]
    if arch not in ARCHS:
        raise SfmpairsError(f"unknown architecture {arch!r} (choose from {', '.join(ARCHS)})")
    if config["pool"] not in POOLS:
        raise SfmpairsError(f"unknown pooling {config['pool']!r} (choose from {', '.join(POOLS)})")
    backbone = torchvision.models.get_model(arch, weights=None)
    if pretrained:
        backbone.load_state_dict(pretrained_state_dict(arch))
    channels, cut = ARCHS[arch]
    return RetrievalNet(config, cut(backbone), channels)


def save_checkpoint(path: str | Path, net: RetrievalNet, overwrite: bool = True, **extra) -> None:
    """Write the network's config and weights (and ``extra``, e.g. training state)
    atomically."""
    from .. import __version__

    state = {"schema": CHECKPOINT_SCHEMA, "schema_version": 1, "tool_version": __version__,
             "created": now_iso(), "config": dict(net.config),
             "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()}, **extra}
    with atomic_output(path, overwrite=overwrite) as tmp:
        torch.save(state, tmp)


def read_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> dict:
    """The checkpoint dict of a checkpoint file; a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise SfmpairsError(f"{path}: no such file")
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:
        raise SfmpairsError(f"{path}: not a checkpoint ({type(e).__name__})") from None
    if not isinstance(state, dict) or state.get("schema") != CHECKPOINT_SCHEMA:
        raise SfmpairsError(f"{path}: not an sfmpairs checkpoint")
    return state


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu"):
    """(network, checkpoint dict) from a checkpoint file; a clear error for anything else."""
    state = read_checkpoint(path, device)
    with torch.device("meta"):  # no random initialisation to overwrite: about 0.1 s saved
        net = build_network(state["config"])
    try:
        net.load_state_dict(state["state_dict"], assign=True)
    except RuntimeError as e:
        raise SfmpairsError(f"{path}: weights do not fit the network ({str(e).splitlines()[0]})") from None
    return net.to(device).eval(), state
