"""The retrieval network of Radenovic et al.: a torchvision backbone cut after its last
convolutional block (or a timm model's features, :mod:`.timm_backbone`), a global
pooling, optional whitening, L2 normalisation.

Config is a small dict of defaults (:data:`DEFAULT_CONFIG`); a checkpoint holds the
config and the weights, so that extraction and evaluation need only the file.
"""

from __future__ import annotations

import logging
import math
import pickle
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sfmpairs.common import SfmpairsError, atomic_output, file_sha256, now_iso
from sfmpairs.retrieval.backbones import BACKBONES, POOLS, TIMM_BACKBONES, check_arch, timm_name, wants_imagenet

logger = logging.getLogger("sfmpairs.network")

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


def _resnet_trunk(m: nn.Module) -> nn.Module:
    return nn.Sequential(*list(m.children())[:-2])  # without the average pooling and fc


# how to cut each backbone of BACKBONES after its last convolutional block
CUTS = {
    "alexnet": lambda m: m.features[:-1],  # without the last max-pooling
    "vgg16": lambda m: m.features[:-1],
    **{name: _resnet_trunk for name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")},
    "mobilenet_v3_large": lambda m: m.features,
    "mobilenet_v3_small": lambda m: m.features,
    "efficientnet_b0": lambda m: m.features,
}
assert set(CUTS) == set(BACKBONES) - set(TIMM_BACKBONES)

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
    idx = int(torch.argmin(torch.abs(((short**2 - short * b) / short**2) - overlap)))
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
        out = out + F.normalize(mac(x[..., top : top + s, left : left + s]), dim=-1)
    return out


# ----------------------------------------------------------------------------- network
class RetrievalNet(nn.Module):
    """features -> pooling -> (whitening) -> L2 normalisation."""

    def __init__(self, config: dict, features: nn.Module, channels: int):
        super().__init__()
        self.config = {**DEFAULT_CONFIG, **config}
        self.features = features
        self.channels = int(channels)
        self.p = nn.Parameter(torch.tensor(float(self.config["p"])))  # used by GeM
        dim = self.config["whitening"]
        self.whiten = nn.Linear(channels, int(dim), bias=True) if dim else None
        self.register_buffer("mean", torch.tensor(self.config["mean"]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(self.config["std"]).view(1, 3, 1, 1))

    @property
    def dim(self) -> int:
        return self.whiten.out_features if self.whiten is not None else self.channels

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


def hub_file(arch: str) -> Path:
    """Where torch's hub cache keeps torchvision's ImageNet weights of ``arch``."""
    import torchvision

    return Path(torch.hub.get_dir()) / "checkpoints" / Path(torchvision.models.get_model_weights(arch).DEFAULT.url).name


def pretrained_state_dict(arch: str) -> dict:
    """torchvision's ImageNet weights for ``arch``, through its weights API (downloaded
    into the torch hub cache where there is internet); a clear error where not."""
    import torchvision

    weights = torchvision.models.get_model_weights(arch).DEFAULT
    cache = hub_file(arch)
    try:  # weights_only: a file put in the cache by hand runs no code
        return weights.get_state_dict(progress=False, weights_only=True)
    except pickle.UnpicklingError:
        raise SfmpairsError(f"{cache}: refused: not plain weights (loading it would run code)") from None
    except Exception as e:  # offline: URLError; broken file: RuntimeError
        raise SfmpairsError(
            f"{cache}: pretrained ImageNet weights of {arch} are missing and could not be "
            f"downloaded from {weights.url} ({type(e).__name__}); put the file there, or "
            f"give a local weights file (--pretrained FILE), or start from random initialisation"
        ) from None


def _listed(items: list[str], noun: str, plural: str) -> str:
    """'2 missing keys (a, b)', at most two items named."""
    more = ", ..." if len(items) > 2 else ""
    return f"{len(items)} {noun if len(items) == 1 else plural} ({', '.join(items[:2])}{more})"


def read_weights_file(path: str | Path) -> dict:
    """The state dict of a local weights file: a state dict as torch.save writes it
    (torchvision's resnet18-f37072fd.pth, timm's pytorch_model.bin), or one under
    "state_dict" or "model", read as tensors and plain data only (nothing of the file
    runs); or a ``.safetensors`` file (timm's model.safetensors; needs the safetensors
    package, which timm brings)."""
    path = Path(path)
    state = _read_safetensors(path) if path.suffix == ".safetensors" else load_plain(path, "a weights file")
    if isinstance(state, dict) and state.get("schema") == CHECKPOINT_SCHEMA:
        raise SfmpairsError(f"{path}: an sfmpairs checkpoint, not backbone weights; give it as --model")
    if isinstance(state, dict):
        state = next((state[k] for k in ("state_dict", "model") if isinstance(state.get(k), dict)), state)
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SfmpairsError(f"{path}: not a weights file (no state dict of tensors)")
    if all(k.startswith("module.") for k in state):  # saved from DataParallel
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _read_safetensors(path: Path) -> dict:
    if not path.is_file():
        raise SfmpairsError(f"{path}: no such file")
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise SfmpairsError(f"{path}: reading .safetensors needs safetensors: pip install 'sfmpairs[timm]'") from None
    try:
        return load_file(path, device="cpu")
    except Exception as e:  # safetensors' SafetensorError, or what it raises of a broken header
        raise SfmpairsError(f"{path}: not a weights file ({type(e).__name__})") from None


def fit_weights(state: dict, backbone: nn.Module, head: set, arch: str, path) -> dict:
    """The entries of ``state`` for ``backbone`` without its ``head`` keys (cut off
    anyway, so any head is accepted); an error naming what does not fit."""
    own = {k: v for k, v in backbone.state_dict().items() if k not in head}
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own and k not in head]
    shapes = [
        f"{k}: file {tuple(state[k].shape)}, network {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = [
        _listed(keys, *nouns)
        for keys, nouns in (
            (missing, ("missing key", "missing keys")),
            (unexpected, ("unexpected key", "unexpected keys")),
            (shapes, ("shape mismatch", "shape mismatches")),
        )
        if keys
    ]
    if problems:
        raise SfmpairsError(f"{path}: not {arch} weights: {', '.join(problems)}")
    return {k: v for k, v in state.items() if k in own}


def head_keys(backbone: nn.Module, features: nn.Module) -> set:
    """The backbone's state-dict keys that ``features`` (the cut backbone) does not use."""
    kept = {id(t) for t in features.state_dict(keep_vars=True).values()}
    return {k for k, t in backbone.state_dict(keep_vars=True).items() if id(t) not in kept}


def build_network(config: dict | None = None, pretrained: bool | str | Path | None = False) -> RetrievalNet:
    """A :class:`RetrievalNet` for ``config`` (see :data:`DEFAULT_CONFIG`).

    ``config["arch"]``: a torchvision backbone of :data:`~.backbones.BACKBONES`,
    ``efficientnet_lite0`` or ``timm:NAME`` (:mod:`.timm_backbone`; these take their
    input normalisation from the model unless ``config`` gives one, as a checkpoint's
    does). ``pretrained``: False or None for random initialisation; True or "imagenet"
    for ImageNet weights (:func:`~.backbones.wants_imagenet`: a file of that name is
    ``./imagenet``): torchvision's or timm's, from their cache, else downloaded (neither:
    a one-line error); EfficientNet-Lite0's from its package, offline; or the path of a
    local weights file for the backbone (see :func:`read_weights_file`; its classifier
    head is ignored; weights that do not fit raise :class:`SfmpairsError` naming the
    keys).
    ``config["pretrained"]`` records the weights used ("imagenet (file name)" or "file
    name (sha256 first 12 digits)").
    """
    given = dict(config or {})
    config = {**DEFAULT_CONFIG, **given}
    arch = config["arch"]
    check_arch(arch)
    if config["pool"] not in POOLS:
        raise SfmpairsError(f"unknown pooling {config['pool']!r} (choose from {', '.join(POOLS)})")
    if timm_name(arch) is not None:
        from sfmpairs.retrieval.timm_backbone import timm_backbone

        features, channels, own = timm_backbone(arch, pretrained)
        config = {**DEFAULT_CONFIG, **own, **given, **{k: v for k, v in own.items() if k == "pretrained"}}
        return RetrievalNet(config, features, channels)
    features, channels, weights = torchvision_backbone(arch, pretrained)
    if weights:
        config["pretrained"] = weights
    return RetrievalNet(config, features, channels)


def torchvision_backbone(arch: str, pretrained) -> tuple[nn.Module, int, str | None]:
    """torchvision's ``arch`` cut after its last convolutional block, its channels, and
    the weights loaded (see :func:`build_network`; None: random)."""
    import torchvision

    backbone = torchvision.models.get_model(arch, weights=None)
    features = CUTS[arch](backbone)
    if wants_imagenet(pretrained):
        cache = (
            Path(torch.hub.get_dir())
            / "checkpoints"
            / Path(torchvision.models.get_model_weights(arch).DEFAULT.url).name
        )
        state = fit_weights(pretrained_state_dict(arch), backbone, head_keys(backbone, features), arch, cache)
        backbone.load_state_dict(state, strict=False)
        return (
            features,
            BACKBONES[arch],
            f"imagenet ({Path(torchvision.models.get_model_weights(arch).DEFAULT.url).name})",
        )
    if pretrained:
        state = read_weights_file(pretrained)
        backbone.load_state_dict(
            fit_weights(state, backbone, head_keys(backbone, features), arch, pretrained), strict=False
        )
        return features, BACKBONES[arch], f"{Path(pretrained).name} (sha256 {file_sha256(pretrained)[:12]})"
    return features, BACKBONES[arch], None


def open_network(
    model: str | Path | None = None,
    *,
    arch: str | None = None,
    pool: str | None = None,
    pretrained: bool | str | Path | None = None,
    device: str | torch.device = "cpu",
) -> RetrievalNet:
    """The network to extract with, in eval mode on ``device``: a checkpoint's
    (``model``), or an off-the-shelf one (the paper's baseline): ``arch`` (required:
    there is no default backbone) + ``pool`` (default gem), no whitening layer, image
    size 1024, with ``pretrained`` weights as :func:`build_network` takes them (None:
    random). Neither given, or both: a one-line error."""
    if model is not None:
        if arch is not None:
            raise SfmpairsError("give --model or --arch, not both")
        if pool is not None or pretrained not in (None, False):
            raise SfmpairsError("--pool and --pretrained go with --arch; a --model checkpoint has its own")
        return load_checkpoint(model, device)[0]
    if arch is None:
        raise SfmpairsError(
            "give --model CHECKPOINT, or --arch for an off-the-shelf network"
            + ("" if pool is None and pretrained in (None, False) else " (--pool and --pretrained go with --arch)")
        )
    config = {"arch": arch, "pool": DEFAULT_CONFIG["pool"] if pool is None else pool}
    if not pretrained:
        logger.warning(
            "%s with random weights: an untrained network (--pretrained for ImageNet weights)", config["arch"]
        )
    return build_network(config, pretrained=pretrained).to(device).eval()


def plain(value):
    """``value`` with numpy scalars as Python numbers and numpy arrays as tensors, inside
    dicts, lists and tuples: what ``torch.load(weights_only=True)`` reads back."""
    import numpy as np

    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    return value


def save_checkpoint(path: str | Path, net: RetrievalNet, overwrite: bool = True, **extra) -> None:
    """Write the network's config and weights (and ``extra``, e.g. training state)
    atomically, as tensors and plain Python values only (:func:`plain`), so that
    :func:`read_checkpoint` reads it without running any code of the file."""
    from sfmpairs import __version__

    state = {
        "schema": CHECKPOINT_SCHEMA,
        "schema_version": 1,
        "tool_version": __version__,
        "created": now_iso(),
        "config": plain(dict(net.config)),
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        **plain(extra),
    }
    with atomic_output(path, overwrite=overwrite) as tmp:
        torch.save(state, tmp)


def _refused(path: Path, error: Exception) -> SfmpairsError:
    """The one line for a file whose unpickling would call something other than torch's
    tensors and plain data (``torch.load(weights_only=True)`` refused it)."""
    import json
    import shlex

    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    what = found.group(1) if found else "a function"
    # the path as a Python literal (JSON's double-quoted string is one) in a shell-quoted command
    code = "from sfmpairs.retrieval.network import convert_checkpoint; "
    code += f'convert_checkpoint({json.dumps(str(path))}, "new.pt")'
    fix = (
        f"; if you made it with sfmpairs 0.3 or older, convert it (this reads its numbers and arrays and runs "
        f"nothing of it): python -c {shlex.quote(code)}"
        if what.startswith("numpy")
        else ""
    )
    return SfmpairsError(
        f"{path}: refused: loading it would call {what}, and checkpoints are read as tensors and plain data only{fix}"
    )


def load_plain(path: Path, what: str, device: str | torch.device = "cpu"):
    """What ``torch.load`` reads of ``path`` as tensors and plain Python data only
    (``weights_only=True``: nothing of the file runs). A missing file, one that is no
    torch file, or one whose unpickling would call anything else: one line naming the
    file (``what``: what it should have been, "a checkpoint")."""
    if not path.is_file():
        raise SfmpairsError(f"{path}: no such file")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        raise (_refused(path, e) if "GLOBAL" in str(e) else SfmpairsError(f"{path}: not {what}")) from None
    except Exception as e:  # a truncated or foreign file: zipfile's, torch's own errors
        raise SfmpairsError(f"{path}: not {what} ({type(e).__name__})") from None


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


# what each consumer reads of a checkpoint: (key, test, what it must be); a key may be absent
# where a default stands in (DEFAULT_CONFIG; epoch and val_map of a checkpoint not from train)
_CONFIG_CHECKS = (
    ("arch", lambda v: isinstance(v, str), "text"),
    ("pool", lambda v: isinstance(v, str), "text"),
    ("p", _is_number, "a number"),
    ("whitening", lambda v: v is None or _is_count(v), "null or a positive integer"),
    ("image_size", _is_count, "a positive integer"),
    ("train_image_size", _is_count, "a positive integer"),
    ("mean", lambda v: isinstance(v, (list, tuple)) and len(v) == 3 and all(map(_is_number, v)), "3 numbers"),
    ("std", lambda v: isinstance(v, (list, tuple)) and len(v) == 3 and all(map(_is_number, v)), "3 numbers"),
)
_STATE_CHECKS = (
    ("epoch", lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    ("val_map", lambda v: v is None or _is_number(v), "null or a number"),
)
# the training state of last.pt, which train --resume reads
_TRAIN_CHECKS = (
    ("epoch", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0"),
    ("best_map", lambda v: v is None or _is_number(v), "null or a number"),
    ("optimizer", lambda v: isinstance(v, dict), "a dict"),
    ("scheduler", lambda v: isinstance(v, dict), "a dict"),
    ("scaler", lambda v: isinstance(v, dict), "a dict"),
    ("rng", lambda v: isinstance(v, dict) and isinstance(v.get("torch"), torch.Tensor), "a dict with a torch state"),
    ("best_epoch", lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool)), "null or an integer"),
)
_TRAIN_OPTIONAL = ("best_epoch",)  # runs of sfmpairs 0.1: read from best.pt


def _structure_problem(state: dict, training: bool) -> str | None:
    """The first thing wrong with a checkpoint dict for the commands that read it; None if
    nothing is."""
    config, weights = state.get("config"), state.get("state_dict")
    if not isinstance(config, dict):
        return "no config" if config is None else f"config is {type(config).__name__}, not a dict"
    if not isinstance(weights, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()
    ):
        return "no state_dict" if weights is None else "state_dict is not a dict of named tensors"
    checks = [("config " + k, config, k, test, what) for k, test, what in _CONFIG_CHECKS]
    checks += [(k, state, k, test, what) for k, test, what in _STATE_CHECKS]
    if training:
        train = state.get("train")
        if not isinstance(train, dict):
            return "no training state (train)" if train is None else f"train is {type(train).__name__}, not a dict"
        missing = [k for k, *_ in _TRAIN_CHECKS if k not in train and k not in _TRAIN_OPTIONAL]
        if missing:
            return f"the training state (train) lacks {missing[0]}"
        checks += [("train " + k, train, k, test, what) for k, test, what in _TRAIN_CHECKS]
    for name, where, key, test, what in checks:
        if key in where and not test(where[key]):
            return f"{name} must be {what}, not {_short_repr(where[key])}"
    return None


def _short_repr(value) -> str:
    text = repr(value) if not isinstance(value, torch.Tensor) else f"a tensor of shape {tuple(value.shape)}"
    return text if len(text) <= 40 else text[:37] + "..."


def read_checkpoint(path: str | Path, device: str | torch.device = "cpu", training: bool = False) -> dict:
    """The checkpoint dict of a checkpoint file; a clear error for anything else.

    Read with ``torch.load(weights_only=True)``: tensors and plain Python data only, so
    that a file from elsewhere runs no code when read; one whose unpickling would call
    anything else is refused, naming what it would call. Checkpoints of every sfmpairs
    version hold only such data and load as they are (those holding numpy values, if
    any, are refused with the command that converts them: :func:`convert_checkpoint`).

    Its content is checked for what extract, evaluate, info and (``training``: the
    training state of ``last.pt``) train --resume read: a config dict of the right types,
    a state dict of tensors, ``epoch`` and ``val_map``; the first problem is one line
    naming the file."""
    path = Path(path)
    state = load_plain(path, "a checkpoint", device)
    if not isinstance(state, dict) or state.get("schema") != CHECKPOINT_SCHEMA:
        raise SfmpairsError(f"{path}: not an sfmpairs checkpoint")
    problem = _structure_problem(state, training)
    if problem is not None:
        raise SfmpairsError(f"{path}: a damaged sfmpairs checkpoint: {problem}")
    return state


def _numpy_globals() -> list:
    """The numpy objects a checkpoint of sfmpairs 0.3 or older may hold: numeric scalars
    and arrays (and their dtypes), for ``torch.serialization.safe_globals``; the functions
    under both module names numpy has pickled them with (``numpy.core``, ``numpy._core``)."""
    import numpy as np

    multiarray = getattr(np, "_core", None) or np.core
    functions = [
        (getattr(multiarray.multiarray, name), f"{module}.multiarray.{name}")
        for name in ("scalar", "_reconstruct")
        for module in ("numpy.core", "numpy._core")
    ]
    dtypes = {type(np.dtype(code)) for code in "?bhilqBHILQefd"}
    return [np.dtype, np.ndarray, *functions, *sorted(dtypes, key=str)]


def convert_checkpoint(source: str | Path, target: str | Path) -> None:
    """Rewrite a checkpoint that holds numpy values (numeric scalars and arrays, as
    sfmpairs 0.3 and older could write) as plain data (:func:`plain`), which
    :func:`read_checkpoint` reads. ``source`` is read as :func:`load_plain` reads, with
    only those numpy types admitted besides: nothing of the file runs, and a file that
    asks for anything else is refused in one line."""
    source = Path(source)
    if not source.is_file():
        raise SfmpairsError(f"{source}: no such file")
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            state = torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)|but got <class '([\w.]+)'>", str(e))
        what = next((g for g in found.groups() if g), "?") if found else "something else"
        raise SfmpairsError(
            f"{source}: refused: it holds {what}, not only the numbers and arrays of an older sfmpairs checkpoint"
        ) from None
    except Exception as e:  # a truncated or foreign file
        raise SfmpairsError(f"{source}: not a checkpoint ({type(e).__name__})") from None
    if not isinstance(state, dict) or state.get("schema") != CHECKPOINT_SCHEMA:
        raise SfmpairsError(f"{source}: not an sfmpairs checkpoint")
    with atomic_output(target, overwrite=False) as tmp:
        torch.save(plain(state), tmp)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu"):
    """(network, checkpoint dict) from a checkpoint file; a clear error for anything else."""
    state = read_checkpoint(path, device)
    try:
        with torch.device("meta"):  # no random initialisation to overwrite: about 0.1 s saved
            net = build_network(state["config"])
    except SfmpairsError as e:  # an architecture or pooling this version does not know
        raise SfmpairsError(f"{path}: {e}") from None
    fit_weights(state["state_dict"], net, set(), net.config["arch"], path)  # names the keys that do not fit
    try:
        net.load_state_dict(state["state_dict"], assign=True)
    except RuntimeError as e:
        raise SfmpairsError(f"{path}: weights do not fit the network ({str(e).splitlines()[0]})") from None
    return net.to(device).eval(), state
