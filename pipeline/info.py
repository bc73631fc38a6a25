"""``sfmpairs info``: what is in a file the tool wrote and how it was made."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from .common import SfmpairsError


def _provenance(attrs) -> list[str]:
    lines = [f"schema      {attrs.get('schema')} v{attrs.get('schema_version')}",
             f"written by  {attrs.get('tool', '?')} {attrs.get('tool_version', '?')} "
             f"at {attrs.get('created', '?')}",
             f"command     {attrs.get('command', '?')}"]
    params = json.loads(attrs.get("parameters", "{}"))
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
    lines = [f"SfM store   {len(clusters)} clusters, {len(models)} models, {n_img} images, "
             f"{n_pts} points, {n_obs} observations",
             f"            {n_obs / max(n_img, 1):.1f} observations per image, "
             f"mean track length {track.mean() if n_pts else 0:.2f}",
             f"images root {h5.attrs.get('images_root') or '(none)'}",
             *_provenance(h5.attrs), "", f"{'cluster':<48} {'models':>6} {'images':>7}"]
    per_cluster = np.bincount(image_cluster, minlength=len(clusters))
    models_per = np.bincount(model_cluster, minlength=len(clusters))
    for name, m, n in zip(clusters, models_per, per_cluster):
        lines.append(f"{name:<48} {m:>6} {n:>7}")
    return lines


SUMMARIES = {"sfmpairs/sfm-store": _store_summary}


def summary(path: str | Path) -> str:
    """A human-readable summary of any file sfmpairs writes."""
    path = Path(path)
    if not path.exists():
        raise SfmpairsError(f"{path}: no such file")
    try:
        h5 = h5py.File(path, "r")
    except OSError:
        raise SfmpairsError(f"{path}: not an HDF5 file") from None
    with h5:
        schema = h5.attrs.get("schema")
        if schema not in SUMMARIES:
            raise SfmpairsError(f"{path}: not a file written by sfmpairs (schema {schema!r})")
        return "\n".join([str(path), *SUMMARIES[schema](h5)])
