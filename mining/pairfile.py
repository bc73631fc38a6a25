"""The pair file (``sfmpairs mine``), schema in docs/formats.md."""

from __future__ import annotations

from pathlib import Path

import h5py

from sfmpairs.common import SfmpairsError, check_schema

SCHEMA = "sfmpairs/pairs"
SCHEMA_VERSION = 2  # 2: val ground truth (val/gt_*)
SPLITS = ("train", "val")
STR = h5py.string_dtype("utf-8")


def read_pair_file(path: str | Path) -> dict:
    """Every dataset of a pair file: image names and clusters, cluster names, the
    images root, the strategy, and per split (``splits[name]``) its datasets."""
    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except (FileNotFoundError, OSError):
        raise SfmpairsError(f"{path}: not a readable pair file") from None
    with f:
        check_schema(f.attrs, path, SCHEMA, SCHEMA_VERSION, "a pair file", " (sfmpairs mine writes them)")
        out = {"names": f["images/name"].asstr()[()], "cluster": f["images/cluster"][()],
               "cluster_names": f["clusters/name"].asstr()[()], "images_root": f.attrs.get("images_root", ""),
               "strategy": f.attrs.get("strategy"), "source_store": f.attrs.get("source_store"),
               "min_co_observed": int(f.attrs.get("min_co_observed", 1)),
               "splits": {}}
        for split in ("train", "val"):
            if split in f:
                out["splits"][split] = {k: f[f"{split}/{k}"][()] for k in f[split]}
    return out
