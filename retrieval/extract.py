"""``sfmpairs extract``: global descriptors of images with a checkpoint or an
off-the-shelf network.

Fast on CPU and CUDA: decoding and resizing in DataLoader workers, batches of images of
equal size (so batching never changes a descriptor), batch normalisation folded into the
convolutions, channels-last memory, mixed precision (float16 on CUDA, bfloat16 on CPUs
that compute it natively; ``precision="fp32"`` for exact float32, TF32 off), pinned
memory on CUDA, descriptors kept on the device until the end (no per-image host-device
sync).
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sfmpairs.common import SfmpairsError, atomic_output, check_output_path, file_sha256, progress, provenance_attrs
from sfmpairs.config import conf_dict, make_conf
from sfmpairs.distributed import ONE, Ranks, join, leave, rank_device

from .backbones import wants_imagenet
from .data import image_loader
from .descriptors import SCHEMA as DESCRIPTORS_SCHEMA
from .descriptors import SCHEMA_VERSION as DESCRIPTORS_VERSION
from .descriptors import write_descriptors
from .network import RetrievalNet, open_network
from .options import ExtractConf

logger = logging.getLogger("sfmpairs.extract")


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SfmpairsError(f"--device {device}: CUDA is not available on this machine")
    try:
        return torch.device(device)
    except RuntimeError:
        raise SfmpairsError(f"unknown device {device!r} (use auto, cpu or cuda)") from None


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX): only there is
    bfloat16 faster than float32."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The dtype the forward pass runs in under autocast, None for float32.

    ``auto``: float16 on CUDA, bfloat16 on CPUs that compute it natively, else float32.
    Descriptors are always returned as float32; reduced precision moves them by about
    1e-3 (the benchmark shows what that does to mAP).
    """
    if precision not in PRECISIONS:
        raise SfmpairsError(f"unknown precision {precision!r} (choose {', '.join(PRECISIONS)})")
    if precision == "auto":
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_has_bf16() else None
    if precision == "fp16" and device.type == "cpu":
        raise SfmpairsError("--precision fp16 needs CUDA; on CPU use bf16 or fp32")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


@contextlib.contextmanager
def float32_convolutions(exact: bool = True):
    """cuDNN convolutions in true float32 within the block where ``exact``: by default
    cuDNN runs float32 convolutions in TF32 on Ampere and newer GPUs, which moves
    descriptors by about 1e-4 (``precision="fp32"`` promises float32)."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = saved and not exact
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = saved


def multiscale_forward(net: RetrievalNet, x: torch.Tensor, scales=ExtractConf.scales) -> torch.Tensor:
    """Descriptors of a batch at several scales, combined by the generalised mean with
    the network's GeM exponent p, then L2-normalised. As in the authors' code, p = 1
    (the mean) for other poolings and for a network with a whitening layer, whose
    outputs can be negative (a fractional power of a negative mean is NaN)."""
    if len(scales) == 1 and scales[0] == 1:
        return net(x)
    p = net.p.detach().float() if net.config["pool"] == "gem" and net.whiten is None else 1.0
    acc = 0
    for s in scales:
        xs = x if s == 1 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
        acc = acc + net(xs).float().pow(p)
    return F.normalize((acc / len(scales)).pow(1.0 / p), dim=-1)


def inference_copy(net: RetrievalNet, device: torch.device) -> RetrievalNet:
    """A copy of the network for inference: batch normalisation folded into the
    convolutions (torch.fx), channels-last memory. Same descriptors within 1e-5, about
    a fifth faster on CPU."""
    import copy

    from torch.fx.experimental.optimization import fuse

    fast = copy.deepcopy(net).eval().to(device)
    try:
        fast.features = fuse(fast.features)
    except Exception:  # a backbone fx cannot trace: keep it unfused
        logger.debug("could not fold batch normalisation of %s", net.config["arch"])
    return fast.to(memory_format=torch.channels_last)


def extract_descriptors(
    net: RetrievalNet,
    root,
    names,
    *,
    image_size: int | None = None,
    scales=ExtractConf.scales,
    device: str | torch.device = "cpu",
    batch_size: int = ExtractConf.batch_size,
    workers: int | None = None,
    skip_bad: bool = False,
    precision: str = ExtractConf.precision,
    desc: str = "extract",
    boxes=None,
):
    """(descriptors (N, D) float32 numpy, bad {index: message}) of ``root/names``.

    The function training calls every epoch. Rows of bad images (only with
    ``skip_bad``) are NaN; without it a bad image raises :class:`SfmpairsError`.
    ``precision``: see :func:`autocast_dtype`.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    dtype = autocast_dtype(device, precision)
    image_size = image_size or net.config["image_size"]
    loader = image_loader(root, names, image_size, batch_size, workers, pin_memory=cuda, boxes=boxes)
    batches = progress(iter(loader), total=len(loader), desc=desc, unit="batch")  # workers start now
    net = inference_copy(net, device)
    out = torch.full((len(names), net.dim), float("nan"), device=device)
    bad = {}
    with (
        torch.inference_mode(),
        torch.autocast(device.type, dtype=dtype, enabled=dtype is not None),
        float32_convolutions(dtype is None),
    ):
        for stacks, bad_items in batches:
            for i, message in bad_items:
                if not skip_bad:
                    raise SfmpairsError(message)
                bad[i] = message
            for images, index in stacks:  # one stack per image size
                x = net.normalise_input(images.to(device, non_blocking=True))
                x = x.contiguous(memory_format=torch.channels_last)
                out[index.to(device, non_blocking=True)] = multiscale_forward(net, x, scales).float()
    out = out.cpu().numpy()
    check_finite(out, bad, dtype, names)
    return out, bad


def extract_across_ranks(net: RetrievalNet, root, names, ranks: Ranks = ONE, **kwargs):
    """:func:`extract_descriptors` with the images shared among the ranks of a
    ``torchrun`` run, each rank its contiguous share, and the descriptors gathered in
    order on every rank: the same result as one process, in 1 / ranks of the time."""
    if not ranks.distributed:
        return extract_descriptors(net, root, names, **kwargs)
    a, b = ranks.share(len(names))
    boxes = kwargs.pop("boxes", None)
    try:
        desc, bad = extract_descriptors(net, root, names[a:b], boxes=None if boxes is None else boxes[a:b], **kwargs)
        part = (desc, {a + i: message for i, message in bad.items()}, None)
    except SfmpairsError as e:  # every rank raises it, not only the one whose share held the problem
        part = (None, None, (str(e), getattr(e, "reduced", None)))
    parts = ranks.gather(part)
    for _, _, error in parts:
        if error is not None:
            message, reduced = error
            raise NonFiniteDescriptors(message, reduced) if reduced is not None else SfmpairsError(message)
    return np.concatenate([d for d, _, _ in parts]), {i: m for _, part, _ in parts for i, m in part.items()}


class NonFiniteDescriptors(SfmpairsError):
    """Descriptors of readable images that are NaN or infinite; ``reduced``: computed in
    reduced precision (where the network's activations can overflow)."""

    def __init__(self, message: str, reduced: bool):
        super().__init__(message)
        self.reduced = reduced


def check_finite(desc: np.ndarray, bad: dict, dtype, names) -> None:
    """A descriptor that is not finite (other than a skipped image's) is an error, never a
    silent NaN: in reduced precision the network's activations overflowed."""
    wrong = ~np.isfinite(desc).all(axis=1)
    wrong[list(bad)] = False
    if wrong.any():
        first = names[int(np.flatnonzero(wrong)[0])]
        hint = (
            "; the network's activations overflow reduced precision: use --precision fp32"
            if dtype is not None
            else "; the network's weights may hold NaN or infinity"
        )
        raise NonFiniteDescriptors(
            f"{wrong.sum()} of {len(desc)} descriptors are not finite (first: {first}) "
            f"in {str(dtype or torch.float32).replace('torch.', '')}{hint}",
            dtype is not None,
        )


def read_image_list(path: str | Path) -> list[str]:
    path = Path(path)
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except OSError as e:
        raise SfmpairsError(f"{path}: cannot read ({e.strerror or e})") from None
    names = [n for n in names if n and not n.startswith("#")]
    if not names:
        raise SfmpairsError(f"{path}: no image names")
    return names


def apply_whitening(desc: np.ndarray, whitening: dict) -> np.ndarray:
    """Project L2-normalised descriptors with a whitening (mean m, projection P) and
    re-normalise."""
    mean, projection = whitening["mean"], whitening["projection"]
    if desc.shape[1] != len(mean):
        raise SfmpairsError(
            f"the whitening is for descriptors of dimension {len(mean)}, these have dimension {desc.shape[1]}"
        )
    with np.errstate(all="ignore"):
        v = (desc - mean) @ projection.T
        v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    if not np.all(np.isfinite(v)):
        raise SfmpairsError("the whitening gives descriptors that are not finite (a corrupt whitening file?)")
    return v


def network_inputs(model, pretrained) -> dict:
    """Provenance of the network: the checkpoint file and its sha256, or the weights an
    off-the-shelf network started from ("imagenet", a weights file and its sha256, or
    None for random weights)."""
    if model is not None:
        return {"model": str(Path(model).resolve()), "model_sha256": file_sha256(model)}
    if wants_imagenet(pretrained):
        return {"model": None, "pretrained": "imagenet"}
    if pretrained:
        return {
            "model": None,
            "pretrained": str(Path(pretrained).resolve()),
            "pretrained_sha256": file_sha256(pretrained),
        }
    return {"model": None, "pretrained": None}


def images_to_describe(store, images_root, image_list) -> tuple[list[str], Path]:
    """The image names to describe and their folder: every image of an SfM store
    (under its images root unless another is given), or a list under a folder."""
    if store is not None:
        from sfmpairs.sfm_io.store import read_store

        s = read_store(store, keys=["images/name"])
        names = list(s["images/name"])
        images_root = images_root or s["attrs"].get("images_root")
        if not images_root:
            raise SfmpairsError(f"{store}: the store names no images root; give --images-root")
    elif images_root is not None and image_list is not None:
        names = read_image_list(image_list)
    else:
        raise SfmpairsError("give --store, or --images-root and --list")
    if not Path(images_root).is_dir():
        raise SfmpairsError(f"{images_root}: images root is not a folder")
    return names, Path(images_root)


def whitened(desc: np.ndarray, wh: dict | None, whitening) -> np.ndarray:
    """The descriptors with the whitening file's whitening applied (``wh``: its
    contents, None for none)."""
    if wh is None:
        return desc
    if wh["mean"].shape[-1] != desc.shape[1]:
        raise SfmpairsError(
            f"{whitening}: whitening of {wh['mean'].shape[-1]}-d descriptors, the network gives {desc.shape[1]}-d"
        )
    return apply_whitening(desc, wh).astype(np.float32)


def _extract_all(net, names, images_root, model, conf: ExtractConf, device, ranks: Ranks):
    """The descriptors of every image (rows NaN where one was skipped) and the skipped
    ones, with the extraction logged."""
    size = conf.image_size or net.config["image_size"]
    dtype = autocast_dtype(device, conf.precision)
    weights = f"checkpoint {model}" if model else f"weights {net.config.get('pretrained') or 'random'}"
    scales = ",".join(f"{s:g}" for s in conf.scales)
    precision = str(dtype or torch.float32).replace("torch.", "")
    ranks_text = f", {ranks.world_size} ranks" if ranks.distributed else ""
    logger.info(
        f"extracting {len(names)} images from {images_root} with {net.config['arch']} + {net.config['pool']}, "
        f"{weights}, at {size} px, scales {scales}, on {device} in {precision}{ranks_text}"
    )
    kwargs = dict(image_size=size, scales=conf.scales, device=device, precision=conf.precision)
    kwargs.update(batch_size=conf.batch_size, workers=conf.workers, skip_bad=conf.skip_bad)
    return extract_across_ranks(net, images_root, names, ranks, **kwargs)


def extract(
    model: str | Path | None = None,
    output: str | Path | None = None,
    *,
    arch: str | None = None,
    pool: str | None = None,
    pretrained: bool | str | Path | None = None,
    store: str | Path | None = None,
    images_root: str | Path | None = None,
    image_list: str | Path | None = None,
    whitening: str | Path | None = None,
    overwrite: bool = False,
    **options,
) -> dict:
    """Descriptors of a store's images (``store``) or of a list (``images_root`` +
    ``image_list``) into a descriptor file (docs/formats.md), with the network of the
    checkpoint ``model`` or an off-the-shelf one (``arch``, ``pool``, ``pretrained``:
    see :func:`~sfmpairs.retrieval.network.open_network`). ``options``: the settings of
    :class:`~.options.ExtractConf`. Under torchrun each rank describes its share and
    rank 0 writes the file."""
    from .whiten import read_whitening

    t0 = time.perf_counter()
    conf = make_conf(ExtractConf, **options)
    conf.check()
    if output is None:
        raise SfmpairsError("give an output file (-o)")
    names, images_root = images_to_describe(store, images_root, image_list)
    check_output_path(output, overwrite)  # before the work, not after it
    wh = read_whitening(whitening) if whitening is not None else None
    device = resolve_device(conf.device)
    ranks, joined = join(device.type)
    try:
        device = rank_device(device, ranks)
        net = open_network(model, arch=arch, pool=pool, pretrained=pretrained, device=device)
        desc, bad = _extract_all(net, names, images_root, model, conf, device, ranks)
    finally:
        leave(joined)
    if not ranks.main:  # rank 0 writes the one descriptor file
        return {"output": str(output), "images": len(names) - len(bad), "skipped": len(bad), "rank": ranks.rank}
    keep = np.array([i not in bad for i in range(len(names))], bool)
    desc = whitened(desc[keep], wh, whitening)
    for i, message in bad.items():
        logger.warning("skipped %s", message)
    dtype = autocast_dtype(device, conf.precision)
    parameters = {**conf_dict(conf), "image_size": conf.image_size or net.config["image_size"]}
    parameters.update(device=str(device), world_size=ranks.world_size, compute_dtype=str(dtype or torch.float32))
    parameters.update(whitening=str(whitening) if whitening else None, config=net.config)
    inputs = {**network_inputs(model, pretrained), "images_root": str(images_root.resolve())}
    inputs.update(store=str(Path(store).resolve()) if store else None)
    inputs.update(list=str(Path(image_list).resolve()) if image_list else None)
    attrs = provenance_attrs(DESCRIPTORS_SCHEMA, DESCRIPTORS_VERSION, parameters, inputs)
    with atomic_output(output, overwrite) as tmp:
        kept = [n for n, k in zip(names, keep) if k]
        write_descriptors(tmp, kept, desc, skipped=[names[i] for i in sorted(bad)], attrs=attrs)
    seconds = time.perf_counter() - t0
    logger.info(
        f"wrote {output}: {len(desc)} descriptors of dimension {desc.shape[1]} ({len(bad)} skipped) in {seconds:.1f} s"
    )
    return {"output": str(output), "images": int(keep.sum()), "skipped": len(bad), "seconds": seconds}
