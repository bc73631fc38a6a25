"""The pair file (``sfmpairs mine``) and the descriptor file, schemas in docs/formats.md."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from ..common import SfmpairsError

SCHEMA = "sfmpairs/pairs"
SCHEMA_VERSION = 2  # 2: val ground truth (val/gt_*)
DESCRIPTORS_SCHEMA = "sfmpairs/descriptors"
DESCRIPTORS_VERSION = 1
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
        if f.attrs.get("schema") != "sfmpairs/pairs":
            raise SfmpairsError(f"{path}: not a pair file (sfmpairs mine writes them)")
        out = {"names": f["images/name"].asstr()[()], "cluster": f["images/cluster"][()],
               "cluster_names": f["clusters/name"].asstr()[()], "images_root": f.attrs.get("images_root", ""),
               "strategy": f.attrs.get("strategy"), "source_store": f.attrs.get("source_store"),
               "min_co_observed": int(f.attrs.get("min_co_observed", 1)),
               "splits": {}}
        for split in ("train", "val"):
            if split in f:
                out["splits"][split] = {k: f[f"{split}/{k}"][()] for k in f[split]}
    return out


def read_descriptors(path: str | Path, names: np.ndarray) -> np.ndarray:
    """The descriptors of ``names`` (rows in that order) from a descriptor file; a
    clear error for a missing image or descriptors that are not L2-normalised."""
    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except FileNotFoundError:
        raise SfmpairsError(f"{path}: no such file") from None
    except OSError:
        raise SfmpairsError(f"{path}: not an HDF5 file") from None
    with f:
        if "names" not in f or "descriptors" not in f:
            raise SfmpairsError(f"{path}: not a descriptor file (needs datasets names and descriptors)")
        file_names = f["names"].asstr()[()]
        desc = f["descriptors"]
        if desc.ndim != 2 or len(desc) != len(file_names):
            raise SfmpairsError(f"{path}: descriptors must be (N, D) with one row per name")
        row = {n: i for i, n in enumerate(file_names)}
        missing = [n for n in names if n not in row]
        if missing:
            raise SfmpairsError(f"{path}: no descriptors for {len(missing)} images of the store, "
                                f"e.g. {missing[0]!r}")
        rows = np.array([row[n] for n in names], np.int64)
        out = np.asarray(desc[()], np.float32)[rows] if len(rows) else np.zeros((0, desc.shape[1]), np.float32)
    norms = np.linalg.norm(out, axis=1)
    if not np.all(np.isfinite(out)) or np.any(np.abs(norms - 1) > 1e-3):
        raise SfmpairsError(f"{path}: descriptors must be finite and L2-normalised")
    return out


def write_descriptors(path: str | Path, names, descriptors: np.ndarray, attrs: dict) -> None:
    """Write a descriptor file (used by tests and, later, by ``sfmpairs extract``)."""
    with h5py.File(path, "w") as f:
        f.create_dataset("names", data=list(names), dtype=STR)
        f.create_dataset("descriptors", data=np.asarray(descriptors, np.float32))
        f.attrs.update(attrs)
