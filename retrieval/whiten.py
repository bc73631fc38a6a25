"""``sfmpairs whiten``: learned whitening (Lw) from matching pairs, and PCA whitening.

Lw (Radenovic et al.): with matching pairs (q, p), C_S is the covariance of the
differences x_q - x_p; P1 = C_S^(-1/2) whitens them; the rotation R diagonalises the
covariance of the P1-whitened descriptors (ordered by decreasing variance); the
projection is R P1, keeping ``dim`` rows: after it, matching-pair differences have
identity covariance. PCA whitening: the top ``dim`` principal directions scaled to unit
variance.

Both live in the span of their data: with fewer independent pairs (or images) than
dimensions, C_S has no inverse square root, and the projection keeps only the dimensions
the data span (by default all of them, with a warning; a larger ``dim`` is refused)
rather than dividing by zero eigenvalues.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from sfmpairs.common import (
    SfmpairsError,
    atomic_output,
    check_output_path,
    check_schema,
    file_sha256,
    h5_errors,
    h5_output,
    open_h5,
    provenance_attrs,
)
from sfmpairs.config import conf_dict, make_conf

from .options import WHITENINGS as METHODS
from .options import WhitenConf

logger = logging.getLogger("sfmpairs.whiten")

SCHEMA = "sfmpairs/whitening"
SCHEMA_VERSION = 1


def _eig_range(cov: np.ndarray):
    """(eigenvalues, eigenvectors as columns) of a covariance matrix on its range: the
    eigenvalues above numpy's ``matrix_rank`` tolerance, in decreasing order."""
    w, v = np.linalg.eigh(cov)
    order = np.argsort(-w)
    w, v = w[order], v[:, order]
    keep = w > max(w[0], 0) * len(w) * np.finfo(w.dtype).eps
    return w[keep], v[:, keep]


def _output_dim(dim: int | None, rank: int, size: int, what: str) -> int:
    """The output dimension: ``dim``, or where it is None all ``rank`` dimensions the
    data span (with a warning where they are fewer than the ``size`` of the input); an
    error where ``dim`` asks for more than the data span. ``what`` names the data."""
    if rank == 0:
        raise SfmpairsError(f"{what} span no dimension (all zero)")
    if dim is not None and dim > rank:
        raise SfmpairsError(
            f"{what} span only {rank} of {size} dimensions; ask for --dim {rank} or fewer, or learn from more data"
        )
    if dim is None and rank < size:
        logger.warning("%s span %d of %d dimensions: the whitening has %d dimensions", what, rank, size, rank)
    return rank if dim is None else dim


def learn_lw(desc: np.ndarray, queries: np.ndarray, positives: np.ndarray, dim: int | None = None):
    """(mean, projection (dim, D)) of learned whitening from pairs of descriptor rows.

    With fewer independent matching pairs than dimensions, the pair differences span
    only ``rank`` < D dimensions and have no inverse square root on the others: the
    whitening then lives in their span. ``dim=None`` keeps all ``rank`` dimensions
    (a warning names the pairs, the rank and the dimension produced); a ``dim`` above
    the rank is refused with :class:`SfmpairsError`.
    """
    X = np.asarray(desc, np.float64)
    mean = X[queries].mean(axis=0)
    diff = X[queries] - X[positives]
    w, v = _eig_range(diff.T @ diff / len(diff))
    dim = _output_dim(dim, len(w), X.shape[1], f"learned whitening: the differences of {len(diff)} matching pairs")
    P1 = (v / np.sqrt(w)).T  # (rank, D): matching-pair differences get identity covariance
    Y = (X - mean) @ P1.T
    w2, v2 = np.linalg.eigh(Y.T @ Y / len(Y))
    R = v2[:, np.argsort(-w2)].T  # a rotation: the whitened set's variances, decreasing
    return mean, (R @ P1)[:dim]


def learn_pca(desc: np.ndarray, dim: int | None = None):
    """(mean, projection (dim, D)) of PCA whitening, on the span of the centred
    descriptors (at most N - 1 dimensions for N descriptors; ``dim`` as in
    :func:`learn_lw`)."""
    X = np.asarray(desc, np.float64)
    mean = X.mean(axis=0)
    w, v = _eig_range(np.cov((X - mean).T, bias=True))
    dim = _output_dim(dim, len(w), X.shape[1], f"PCA whitening: {len(X)} centred descriptors")
    return mean, (v[:, :dim] / np.sqrt(w[:dim])).T


def read_whitening(path: str | Path) -> dict:
    path = Path(path)
    f = open_h5(path, "whitening file")
    with f, h5_errors(path, "whitening file"):
        check_schema(f.attrs, path, SCHEMA, SCHEMA_VERSION, "a whitening file", " (sfmpairs whiten writes them)")
        w = {"mean": f["mean"][()], "projection": f["projection"][()], "method": f.attrs.get("method")}
    mean, projection = w["mean"], w["projection"]
    if (
        not isinstance(mean, np.ndarray)
        or not isinstance(projection, np.ndarray)
        or mean.ndim != 1
        or projection.ndim != 2
        or projection.shape[1] != len(mean)
        or mean.dtype.kind not in "fiu"
        or projection.dtype.kind not in "fiu"
        or not (np.all(np.isfinite(mean)) and np.all(np.isfinite(projection)))
    ):
        raise SfmpairsError(f"{path}: corrupt whitening file (mean (D,) and projection (d, D), finite)")
    return w


def whiten(
    descriptors: str | Path, pairs: str | Path, output: str | Path, *, overwrite: bool = False, **options
) -> dict:
    """Learn a whitening from a descriptor file and the train split of a pair file;
    ``options``: the settings of :class:`~.options.WhitenConf`."""
    from sfmpairs.mining.pairfile import read_pair_file
    from sfmpairs.retrieval.descriptors import read_descriptors

    conf = make_conf(WhitenConf, **options)
    method, dim = conf.method, conf.dim
    check_output_path(output, overwrite)  # before the work, not after it
    if method not in METHODS:
        raise SfmpairsError(f"unknown whitening method {method!r} (choose lw or pca)")
    pf = read_pair_file(pairs)
    names, train = pf["names"], pf["splits"].get("train")
    if train is None:
        raise SfmpairsError(f"{pairs}: no train split")
    q, p, images = train["query"], train["positive"], train["images"]
    if conf.all_passing:
        q, p = np.repeat(q, train["pool_passes"].sum(1)), train["pool"][train["pool_passes"]]
    used = np.unique(np.concatenate([images, q, p]))
    desc = read_descriptors(descriptors, names[used])
    row = np.full(len(names), -1)
    row[used] = np.arange(len(used))
    D = desc.shape[1]
    if dim is not None and not 1 <= dim <= D:
        raise SfmpairsError(f"--dim must be between 1 and {D}")
    try:
        if method == "lw":
            if len(q) < 2:
                raise SfmpairsError(f"learned whitening needs matching pairs; the train split has {len(q)}")
            mean, projection = learn_lw(desc, row[q], row[p], dim)
        else:
            mean, projection = learn_pca(desc[row[images]], dim)
    except SfmpairsError as e:
        raise SfmpairsError(f"{pairs}: {e}") from None
    dim = len(projection)  # what is written: at most the rank the pairs span
    with atomic_output(output, overwrite) as tmp:
        with h5_output(tmp) as f:
            f.create_dataset("mean", data=mean)
            f.create_dataset("projection", data=projection)
            parameters = {**conf_dict(conf), "dim": dim}
            f.attrs.update(
                provenance_attrs(
                    SCHEMA,
                    SCHEMA_VERSION,
                    parameters,
                    {
                        "descriptors": str(Path(descriptors).resolve()),
                        "descriptors_sha256": file_sha256(descriptors),
                        "pairs": str(Path(pairs).resolve()),
                    },
                )
            )
            f.attrs["method"] = method
    return {"output": str(output), "method": method, "dim": dim, "pairs": len(q)}
