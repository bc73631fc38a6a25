"""``sfmpairs whiten``: learned whitening (Lw) from matching pairs, and PCA whitening.

Lw (Radenovic et al.): with matching pairs (q, p), C_S is the covariance of the
differences x_q - x_p; P1 = C_S^(-1/2) whitens them; the rotation R diagonalises the
covariance of the P1-whitened descriptors (ordered by decreasing variance); the
projection is R P1, keeping ``dim`` rows: after it, matching-pair differences have
identity covariance. PCA whitening: the top ``dim`` principal directions scaled to unit
variance.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from ..common import SfmpairsError, atomic_output, file_sha256, provenance_attrs

SCHEMA = "sfmpairs/whitening"
METHODS = ("lw", "pca")


def _inv_sqrt(cov: np.ndarray, eps: float = 1e-9):
    w, v = np.linalg.eigh(cov)
    w = np.maximum(w, eps * max(w.max(), eps))
    return (v / np.sqrt(w)) @ v.T


def learn_lw(desc: np.ndarray, queries: np.ndarray, positives: np.ndarray, dim: int | None = None):
    """(mean, projection (dim, D)) of learned whitening from pairs of descriptor rows."""
    X = np.asarray(desc, np.float64)
    mean = X[queries].mean(axis=0)
    diff = X[queries] - X[positives]
    P1 = _inv_sqrt(diff.T @ diff / len(diff))
    Y = (X - mean) @ P1.T
    w, v = np.linalg.eigh(Y.T @ Y / len(Y))
    R = v[:, np.argsort(-w)].T
    return mean, (R @ P1)[: dim or X.shape[1]]


def learn_pca(desc: np.ndarray, dim: int | None = None):
    """(mean, projection (dim, D)) of PCA whitening."""
    X = np.asarray(desc, np.float64)
    mean = X.mean(axis=0)
    w, v = np.linalg.eigh(np.cov((X - mean).T, bias=True))
    order = np.argsort(-w)[: dim or X.shape[1]]
    return mean, (v[:, order] / np.sqrt(np.maximum(w[order], 1e-12 * w.max()))).T


def read_whitening(path: str | Path) -> dict:
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("schema") != SCHEMA:
                raise SfmpairsError(f"{path}: not a whitening file")
            return {"mean": f["mean"][()], "projection": f["projection"][()],
                    "method": f.attrs.get("method")}
    except FileNotFoundError:
        raise SfmpairsError(f"{path}: no such file") from None
    except OSError:
        raise SfmpairsError(f"{path}: not an HDF5 file") from None


def whiten(descriptors: str | Path, pairs: str | Path, output: str | Path, *, method: str = "lw",
           dim: int | None = None, all_passing: bool = False, overwrite: bool = False) -> dict:
    """Learn a whitening from a descriptor file and the train split of a pair file."""
    from ..mining.pairfile import read_descriptors, read_pair_file

    if method not in METHODS:
        raise SfmpairsError(f"unknown whitening method {method!r} (choose lw or pca)")
    pf = read_pair_file(pairs)
    names, train = pf["names"], pf["splits"].get("train")
    if train is None:
        raise SfmpairsError(f"{pairs}: no train split")
    q, p, images = train["query"], train["positive"], train["images"]
    if all_passing:
        q, p = np.repeat(q, train["pool_passes"].sum(1)), train["pool"][train["pool_passes"]]
    used = np.unique(np.concatenate([images, q, p]))
    desc = read_descriptors(descriptors, names[used])
    row = np.full(len(names), -1)
    row[used] = np.arange(len(used))
    D = desc.shape[1]
    dim = dim or D
    if not 1 <= dim <= D:
        raise SfmpairsError(f"--dim must be between 1 and {D}")
    if method == "lw":
        if len(q) < 2:
            raise SfmpairsError(f"{pairs}: learned whitening needs matching pairs; the train split has {len(q)}")
        mean, projection = learn_lw(desc, row[q], row[p], dim)
    else:
        mean, projection = learn_pca(desc[row[images]], dim)
    with atomic_output(output, overwrite) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("mean", data=mean)
            f.create_dataset("projection", data=projection)
            f.attrs.update(provenance_attrs(SCHEMA, 1, {"method": method, "dim": dim, "all_passing": all_passing},
                                            {"descriptors": str(Path(descriptors).resolve()),
                                             "descriptors_sha256": file_sha256(descriptors),
                                             "pairs": str(Path(pairs).resolve())}))
            f.attrs["method"] = method
    return {"output": str(output), "method": method, "dim": dim, "pairs": len(q)}
