"""The photo pairs worth matching, from global descriptors (as hloc's pairs_from_retrieval,
and as the paper's bag of words chose the pairs to match): each photo with its ``k``
most similar photos, and, for photos taken in order (video frames), with the next few
in name order. Matching these instead of every pair grows linearly with the collection.
The descriptors: a bag of visual words (:mod:`.bag_of_words`, needs no weights) or a
network of sfmpairs' extraction (:func:`global_descriptors`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from scipy import sparse

from sfmpairs.common import SfmpairsError

logger = logging.getLogger("sfmpairs.reconstruct")

# the off-the-shelf network where no checkpoint is given: no pretrained weights are
# needed (none may be at hand), and an untrained ResNet with GeM pooling already
# separates places well (benchmarks/bench_quality.py)
OFF_THE_SHELF = {"arch": "resnet18", "pool": "gem"}


def global_descriptors(images_dir: Path, names: list[str], checkpoint, image_size: int, device: str) -> np.ndarray:
    """L2-normalised global descriptors (N, D) of ``images_dir/names``: with the
    sfmpairs checkpoint ``checkpoint``, or the off-the-shelf network with random weights."""
    from sfmpairs.retrieval.extract import extract_descriptors, resolve_device
    from sfmpairs.retrieval.network import open_network

    torch_device = resolve_device("auto" if device not in ("cpu", "cuda") else device)
    if checkpoint is not None:
        net = open_network(checkpoint, device=torch_device)
        what = f"checkpoint {checkpoint}"
    else:
        net = open_network(**OFF_THE_SHELF, device=torch_device)
        what = f"{OFF_THE_SHELF['arch']} + {OFF_THE_SHELF['pool']} with random weights (--checkpoint for a trained one)"
    logger.info("global descriptors of %d photos at %d px: %s on %s", len(names), image_size, what, torch_device)
    desc, _ = extract_descriptors(net, images_dir, names, image_size=image_size, device=torch_device, desc="describe")
    return desc


def most_similar(desc, k: int, chunk: int = 1024) -> np.ndarray:
    """(N, min(k, N - 1)) indices of each row's most similar other rows of ``desc``
    (dense or scipy.sparse) by dot product, most similar first; in chunks of rows, so memory stays chunk x N."""
    n = desc.shape[0]
    k = min(k, n - 1)
    out = np.empty((n, k), np.int64)
    for a in range(0, n, chunk):
        sim = desc[a : a + chunk] @ desc.T
        sim = sim.toarray() if sparse.issparse(sim) else sim
        rows = np.arange(len(sim))
        sim[rows, a + rows] = -np.inf  # never itself
        top = np.argpartition(-sim, k - 1, axis=1)[:, :k] if k < n - 1 else np.argsort(-sim, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sim, top, axis=1), axis=1, kind="stable")
        out[a : a + chunk] = np.take_along_axis(top, order, axis=1)
    return out


def sequential_pairs(n: int, overlap: int) -> np.ndarray:
    """(M, 2) pairs of each index with the next ``overlap`` ones."""
    if overlap <= 0 or n < 2:
        return np.empty((0, 2), np.int64)
    i = np.repeat(np.arange(n), overlap)
    j = i + np.tile(np.arange(1, overlap + 1), n)
    keep = j < n
    return np.stack([i[keep], j[keep]], axis=1)


def unique_pairs(*pair_sets: np.ndarray) -> np.ndarray:
    """The union of (M, 2) index pairs as unordered pairs (i < j), sorted, no repeats."""
    pairs = np.concatenate([p.reshape(-1, 2) for p in pair_sets])
    pairs = np.sort(pairs, axis=1)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    return np.unique(pairs, axis=0)


def retrieval_pairs(desc: np.ndarray, k: int, sequential: int = 0) -> np.ndarray:
    """(M, 2) unordered pairs: each photo with its ``k`` most similar, and with the next
    ``sequential`` photos in order (rows of ``desc`` are in name order)."""
    n = desc.shape[0]
    if n < 2:
        raise SfmpairsError("retrieval pairs need at least two photos")
    top = most_similar(desc, k)
    nearest = np.stack([np.repeat(np.arange(n), top.shape[1]), top.ravel()], axis=1)
    return unique_pairs(nearest, sequential_pairs(n, sequential))


def write_pair_list(path: Path, names: list[str], pairs: np.ndarray) -> None:
    """COLMAP's match list: one pair of image names per line, separated by a space."""
    for name in names:
        if " " in name:
            raise SfmpairsError(f"{name}: a photo name with a space cannot go in COLMAP's pair list; rename it")
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(f"{names[i]} {names[j]}\n" for i, j in pairs.tolist())


def two_hop_pairs(verified: np.ndarray, matched: np.ndarray, n: int, k: int) -> np.ndarray:
    """(M, 2) unordered pairs not yet matched of photos that share a verified
    neighbour, at most ``k`` per photo, those with the most shared neighbours first.

    A verified pair is one whose matches passed the two-view geometry check, so its
    photos see the same place; two photos verified with a third most likely see it too,
    even where their global descriptors are far apart (COLMAP's transitive matcher
    follows the same idea)."""

    def adjacency(pairs: np.ndarray) -> sparse.csr_matrix:
        pairs = pairs.reshape(-1, 2)
        a = sparse.coo_matrix((np.ones(len(pairs), np.int32), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
        return ((a + a.T) > 0).astype(np.int32).tocsr()

    adj = adjacency(verified)
    common = (adj @ adj).tocsr()
    done = adjacency(matched) + sparse.identity(n, np.int32, format="csr")
    common = (common - common.multiply(done > 0)).tocsr()
    common.eliminate_zeros()
    out = []
    for i in range(n):
        cols, counts = (
            common.indices[common.indptr[i] : common.indptr[i + 1]],
            common.data[common.indptr[i] : common.indptr[i + 1]],
        )
        best = np.lexsort((cols, -counts))[:k]  # most shared neighbours first, then by index
        out.append(np.stack([np.full(len(best), i), cols[best]], axis=1))
    return unique_pairs(*out) if out else np.empty((0, 2), np.int64)
