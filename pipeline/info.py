"""``sfmpairs info``: what is in a file the tool wrote and how it was made."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from .common import SfmpairsError, h5_errors, open_h5


def _json_attr(attrs, key: str) -> dict:
    """A JSON object stored in an attribute (``parameters``); ValueError if it is not one
    (a corrupt file), which :func:`summary` turns into one line naming the file."""
    try:
        value = json.loads(attrs.get(key, "{}"))
    except (json.JSONDecodeError, TypeError, UnicodeDecodeError):
        raise ValueError(f"attribute {key!r} is not JSON") from None
    if not isinstance(value, dict):
        raise ValueError(f"attribute {key!r} is not a JSON object")
    return value


def _provenance(attrs) -> list[str]:
    lines = [
        f"schema      {attrs.get('schema')} v{attrs.get('schema_version')}",
        f"written by  {attrs.get('tool', '?')} {attrs.get('tool_version', '?')} at {attrs.get('created', '?')}",
        f"command     {attrs.get('command', '?')}",
    ]
    params = _json_attr(attrs, "parameters")
    if params:
        lines.append("parameters  " + ", ".join(f"{k}={v}" for k, v in sorted(params.items())))
    return lines


def _store_summary(h5: h5py.File) -> list[str]:
    clusters = h5["clusters/name"].asstr()[()]
    image_cluster = h5["images/cluster"][()]
    models = h5["models/name"].asstr()[()]
    model_cluster = h5["models/cluster"][()]
    n_img, n_pts = len(image_cluster), len(h5["points/xyz"])
    n_obs = len(h5["observations/point"])
    track = h5["points/track_length"][()]
    for name, index, n in (("images", image_cluster, len(clusters)), ("models", model_cluster, len(clusters))):
        if len(index) and (index.min() < 0 or index.max() >= n):
            raise ValueError(f"{name}/cluster: index out of range")
    lines = [
        f"SfM store   {len(clusters)} clusters, {len(models)} models, {n_img} images, "
        f"{n_pts} points, {n_obs} observations",
        f"            {n_obs / max(n_img, 1):.1f} observations per image, "
        f"mean track length {track.mean() if n_pts else 0:.2f}",
        f"images root {h5.attrs.get('images_root') or '(none)'}",
        *_provenance(h5.attrs),
        "",
        f"{'cluster':<48} {'models':>6} {'images':>7}",
    ]
    per_cluster = np.bincount(image_cluster, minlength=len(clusters))
    models_per = np.bincount(model_cluster, minlength=len(clusters))
    for name, m, n in zip(clusters, models_per, per_cluster):
        lines.append(f"{name:<48} {m:>6} {n:>7}")
    return lines


def _pairs_summary(h5: h5py.File) -> list[str]:
    clusters = h5["clusters/name"].asstr()[()]
    split = h5["clusters/split"].asstr()[()]
    lines = [
        f"pair file   strategy {h5.attrs.get('strategy')}, scale measure "
        f"{h5.attrs.get('scale_measure')}, {h5['images/name'].shape[0]} images, "
        f"{len(clusters)} clusters",
        f"source      {h5.attrs.get('source_store')} (sha256 {str(h5.attrs.get('source_store_sha256'))[:12]}…)",
        *_provenance(h5.attrs),
        "",
    ]
    lines.append(
        f"{'split':<6} {'clusters':>8} {'queries':>8} {'pool':>6} {'passing':>8} "
        f"{'pos. inliers':>12} {'pos. scale':>10} {'negatives/asked':>15}"
    )
    for name in ("train", "val"):
        if name not in h5:
            continue
        g = h5[name]
        q, pos, pool = g["query"][()], g["positive"][()], g["pool"][()]
        slot = (pool == pos[:, None]).argmax(axis=1) if len(q) else np.zeros(0, int)
        rows = np.arange(len(q))
        ratio = g["pool_inlier_ratio"][()][rows, slot] if len(q) else np.zeros(0)
        scale = g["pool_scale_change"][()][rows, slot] if len(q) else np.zeros(0)
        # hard negatives per query as mined (fewer than asked where clusters are few)
        negs = (
            f"{(g['negatives'][()] >= 0).sum(1).mean():.1f}/{h5.attrs.get('negatives')}"
            if "negatives" in g and len(q)
            else "-"
        )

        def mean(a):
            return f"{np.nanmean(a):.3f}" if len(a) and np.isfinite(a).any() else "-"

        lines.append(
            f"{name:<6} {int((split == name).sum()):>8} {len(q):>8} "
            f"{(pool >= 0).sum(1).mean() if len(q) else 0:>6.1f} "
            f"{g['pool_passes'][()].sum(1).mean() if len(q) else 0:>8.1f} "
            f"{mean(ratio):>12} {mean(scale):>10} {negs:>15}"
        )
    return lines


def histogram(values: np.ndarray, edges: np.ndarray, title: str, width: int = 40) -> list[str]:
    """A terminal histogram: one line per bin, a bar and the count; the last bin is
    open-ended."""
    values = values[np.isfinite(values)]
    counts = (
        np.histogram(np.clip(values, edges[0], edges[-1]), edges)[0] if len(values) else np.zeros(len(edges) - 1, int)
    )
    top = max(int(counts.max()), 1)
    lines = [f"{title} ({len(values)} values)"]
    for k, c in enumerate(counts):
        lo, hi = edges[k], edges[k + 1]
        label = f"{lo:>6.2f}-{hi:<6.2f}" if k < len(counts) - 1 else f"{lo:>6.2f}+      "
        lines.append(f"  {label} {'#' * int(round(width * c / top)):<{width}} {c}")
    return lines


def _pairs_histograms(h5: h5py.File) -> list[str]:
    ratio, scale, size = [], [], []
    for name in ("train", "val"):
        if name in h5 and len(h5[f"{name}/query"]):
            pool = h5[f"{name}/pool"][()]
            valid = pool >= 0
            co = h5[f"{name}/pool_co_observed"][()]
            ratio.append(h5[f"{name}/pool_inlier_ratio"][()][valid & (co > 0)])
            scale.append(h5[f"{name}/pool_scale_change"][()][valid & (co > 0)])
            size.append(valid.sum(1))
    if not size:
        return []
    ratio, scale, size = (np.concatenate(x) for x in (ratio, scale, size))
    k = max(int(size.max()), 1)
    return [
        "",
        *histogram(ratio, np.linspace(0, 1, 11), "inlier ratio of candidates sharing points"),
        "",
        *histogram(scale, np.array([1, 1.1, 1.25, 1.5, 1.75, 2, 2.5, 3, 4]), "scale change of those candidates"),
        "",
        *histogram(size.astype(float), np.linspace(0, k, min(k, 10) + 1), "pool size per query"),
    ]


def _descriptors_summary(h5: h5py.File) -> list[str]:
    n, dim = h5["descriptors"].shape
    config = _json_attr(h5.attrs, "parameters").get("config") or {}
    if not isinstance(config, dict):
        raise ValueError("attribute 'parameters' has no config object")
    net = f"{config.get('arch', '?')} + {config.get('pool', '?')}" if config else "?"
    skipped = len(h5["skipped"]) if "skipped" in h5 else 0
    return [f"descriptors {n} images, dimension {dim}, {skipped} skipped, network {net}", *_provenance(h5.attrs)]


def _whitening_summary(h5: h5py.File) -> list[str]:
    d, dim = h5["projection"].shape
    return [f"whitening   {h5.attrs.get('method')}: {dim} -> {d} dimensions", *_provenance(h5.attrs)]


SUMMARIES = {
    "sfmpairs/sfm-store": _store_summary,
    "sfmpairs/pairs": lambda h5: _pairs_summary(h5) + _pairs_histograms(h5),
    "sfmpairs/descriptors": _descriptors_summary,
    "sfmpairs/whitening": _whitening_summary,
}


def _checkpoint_summary(path: Path) -> list[str]:
    from sfmpairs.retrieval.network import read_checkpoint

    state = read_checkpoint(path)  # its config, state dict, epoch and val_map checked
    config = state["config"]
    weights = sum(v.numel() for v in state["state_dict"].values())
    lines = [
        f"checkpoint  {config.get('arch')} + {config.get('pool')}, whitening "
        f"{config.get('whitening') or 'none'}, image size {config.get('image_size')}"
        + (f" (trained at {config['train_image_size']})" if config.get("train_image_size") else "")
        + f", {weights / 1e6:.1f} M weights",
        f"schema      {state.get('schema')} v{state.get('schema_version')}",
        f"written by  sfmpairs {state.get('tool_version', '?')} at {state.get('created', '?')}",
        "config      " + ", ".join(f"{k}={v}" for k, v in sorted(config.items())),
    ]
    if "epoch" in state:
        lines.append(
            f"training    epoch {state['epoch']}"
            + (f", val mAP {100 * state['val_map']:.2f}" if state.get("val_map") is not None else "")
        )
    return lines


def summary(path: str | Path) -> str:
    """A human-readable summary of any file sfmpairs writes."""
    path = Path(path)
    if not path.exists():
        raise SfmpairsError(f"{path}: no such file")
    with open(path, "rb") as f:
        if f.read(4) == b"PK\x03\x04":  # a zip: torch.save's format
            return "\n".join([str(path), *_checkpoint_summary(path)])
    h5 = open_h5(path, "file written by sfmpairs")
    with h5_errors(path, "file"), h5:
        schema = h5.attrs.get("schema")
        if not isinstance(schema, str) or schema not in SUMMARIES:
            raise SfmpairsError(f"{path}: not a file written by sfmpairs (schema {schema!r})")
        try:
            return "\n".join([str(path), *SUMMARIES[schema](h5)])
        except (AttributeError, MemoryError) as e:  # a dataset turned group, a huge index
            raise ValueError(f"{type(e).__name__}: {e}") from None
