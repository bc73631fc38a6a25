"""The descriptor file (``sfmpairs extract``; schema in docs/formats.md): global
descriptors keyed by image name, written by extract and read by mine, whiten and
evaluate. Plain h5py, no torch.

A file sfmpairs did not write is read too when it holds ``names`` and ``descriptors``
and no ``schema`` attribute (descriptors from another tool).
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from sfmpairs.common import SfmpairsError, check_schema, h5_errors, h5_output, open_h5

SCHEMA = "sfmpairs/descriptors"
SCHEMA_VERSION = 1
STR = h5py.string_dtype("utf-8")


def read_descriptors(path: str | Path, names: np.ndarray) -> np.ndarray:
    """The descriptors of ``names`` (rows in that order) from a descriptor file; a
    clear error for a missing image or descriptors that are not L2-normalised."""
    path = Path(path)
    f = open_h5(path, "descriptor file")
    with f, h5_errors(path, "descriptor file"):
        if "schema" in f.attrs:  # sfmpairs' own (or another kind of sfmpairs file)
            check_schema(f.attrs, path, SCHEMA, SCHEMA_VERSION, "a descriptor file", " (sfmpairs extract writes them)")
        if "names" not in f or "descriptors" not in f:
            raise SfmpairsError(f"{path}: not a descriptor file (needs datasets names and descriptors)")
        file_names = f["names"].asstr()[()]
        desc = f["descriptors"]
        if desc.ndim != 2 or len(desc) != len(file_names) or desc.dtype.kind not in "fiu":
            raise SfmpairsError(f"{path}: descriptors must be (N, D) with one row per name")
        row = {n: i for i, n in enumerate(file_names)}
        missing = [n for n in names if n not in row]
        if missing:
            raise SfmpairsError(f"{path}: no descriptors for {len(missing)} images of the store, e.g. {missing[0]!r}")
        rows = np.array([row[n] for n in names], np.int64)
        out = np.asarray(desc[()], np.float32)[rows] if len(rows) else np.zeros((0, desc.shape[1]), np.float32)
    norms = np.linalg.norm(out, axis=1)
    if not np.all(np.isfinite(out)) or np.any(np.abs(norms - 1) > 1e-3):
        raise SfmpairsError(f"{path}: descriptors must be finite and L2-normalised")
    return out


def write_descriptors(path: str | Path, names, descriptors: np.ndarray, attrs: dict, skipped=()) -> None:
    """Write a descriptor file: ``names`` (N,), ``descriptors`` (N, D) float32,
    ``skipped`` (the images left out), and ``attrs`` (:func:`~sfmpairs.common.provenance_attrs`
    with :data:`SCHEMA` for sfmpairs' own)."""
    with h5_output(path) as f:
        f.create_dataset("names", data=list(names), dtype=STR)
        f.create_dataset("descriptors", data=np.asarray(descriptors, np.float32))
        f.create_dataset("skipped", data=list(skipped), dtype=STR)
        f.attrs.update(attrs)
