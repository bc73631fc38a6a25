"""Hard negatives: for each query, the most similar images of other clusters, at most
one per cluster (Radenovic et al.).

Training calls :func:`hard_negatives` every epoch with the current network's
descriptors, so it is written as batched matrix products: per batch of queries one
product with the whole negative pool, then per-cluster maxima with ``reduceat``; no
Python loop over the pool.
"""

from __future__ import annotations

import numpy as np


def hard_negatives(
    query_desc: np.ndarray,
    query_cluster: np.ndarray,
    pool_desc: np.ndarray,
    pool_cluster: np.ndarray,
    num: int,
    batch_size: int | None = None,
):
    """The ``num`` pool images most similar (inner product) to each query, from
    clusters other than the query's, at most one per cluster, most similar first.

    ``query_desc`` (Q, D) and ``pool_desc`` (P, D) are L2-normalised descriptors;
    ``query_cluster`` (Q,) and ``pool_cluster`` (P,) integer cluster labels. Returns
    ``(index, similarity)``, both (Q, num): indices into the pool (-1 where fewer than
    ``num`` other clusters exist) and their inner products. Queries go in batches of
    ``batch_size`` (None: :func:`query_batch`).
    """
    query_desc = np.asarray(query_desc, np.float32)
    pool_desc = np.asarray(pool_desc, np.float32)
    Q, P = len(query_desc), len(pool_desc)
    index = np.full((Q, num), -1, np.int64)
    similarity = np.full((Q, num), -np.inf, np.float32)
    if Q == 0 or P == 0 or num == 0:
        return index, similarity
    groups = _cluster_groups(np.asarray(pool_cluster))
    if not groups["grouped"]:  # once, not a gather of every batch's product
        pool_desc = pool_desc[groups["by_cluster"]]
    k = min(num, len(groups["labels"]))
    batch_size = batch_size or query_batch(P)
    for q0 in range(0, Q, batch_size):
        q1 = min(Q, q0 + batch_size)
        sim = query_desc[q0:q1] @ pool_desc.T  # (B, P): the one big product, columns by cluster
        index[q0:q1, :k], similarity[q0:q1, :k] = _best_of_other_clusters(sim, query_cluster[q0:q1], groups, k)
    return index, similarity


def query_batch(pool_size: int, floats: int = 1 << 25) -> int:
    """Queries per matrix product: 256 to 1,024, as many as keep the (batch, pool)
    similarities within ``floats`` (128 MiB). Larger products run closer to the
    bare product's speed (2,000 queries x 20,000 x 2048-d on 2 cores: 1.33x its time
    in batches of 256, 1.11x in batches of 1,024)."""
    return int(np.clip(floats // max(pool_size, 1), 256, 1024))


def _cluster_groups(pool_cluster: np.ndarray) -> dict:
    """The pool grouped by cluster: in the order ``by_cluster``, columns
    ``[starts[c], ends[c])`` hold cluster ``labels[c]`` (sorted); ``grouped``: the pool
    is already in that order (e.g. a store's split)."""
    grouped = bool(np.all(pool_cluster[1:] >= pool_cluster[:-1]))
    by_cluster = np.arange(len(pool_cluster)) if grouped else np.argsort(pool_cluster, kind="stable")
    sorted_cluster = pool_cluster[by_cluster]
    starts = np.flatnonzero(np.r_[True, sorted_cluster[1:] != sorted_cluster[:-1]])
    ends = np.r_[starts[1:], len(pool_cluster)]
    return dict(grouped=grouped, by_cluster=by_cluster, starts=starts, ends=ends, labels=sorted_cluster[starts])


def _best_of_other_clusters(sim: np.ndarray, query_cluster: np.ndarray, groups: dict, k: int):
    """For a batch of queries' similarities ``sim`` (B, P) to the pool, its columns in
    the order ``groups["by_cluster"]`` (the pool grouped by cluster): the pool index
    and similarity of the best image of each of the ``k`` most similar other clusters,
    most similar first (-1 and -inf where there is none)."""
    by_cluster, starts, ends, labels = (groups[key] for key in ("by_cluster", "starts", "ends", "labels"))
    P = sim.shape[1]
    rows = np.arange(len(sim))
    best = np.maximum.reduceat(sim, starts, axis=1)  # (B, C) best of each cluster
    own = np.searchsorted(labels, query_cluster)
    own_ok = (own < len(labels)) & (labels[np.minimum(own, len(labels) - 1)] == query_cluster)
    best[rows[own_ok], own[own_ok]] = -np.inf
    top = (
        np.argpartition(-best, k - 1, axis=1)[:, :k]
        if k < best.shape[1]
        else np.broadcast_to(np.arange(best.shape[1]), best.shape)
    )
    top_sim = np.take_along_axis(best, top, axis=1)
    order = np.lexsort((top, -top_sim), axis=1)  # most similar first, ties by cluster
    top = np.take_along_axis(top, order, axis=1)
    top_sim = np.take_along_axis(top_sim, order, axis=1)
    # within each chosen cluster, the first column that reaches its best
    cols = starts[top][..., None] + np.arange(int((ends - starts).max()))  # (B, k, widest)
    inside = cols < ends[top][..., None]
    seg = np.where(inside, sim[rows[:, None, None], np.minimum(cols, P - 1)], -np.inf)
    col = np.take_along_axis(cols, seg.argmax(axis=2)[..., None], axis=2)[..., 0]
    ok = np.isfinite(top_sim)
    return np.where(ok, by_cluster[col], -1), np.where(ok, top_sim, -np.inf)


def random_negatives(query_cluster: np.ndarray, pool_cluster: np.ndarray, num: int, rng) -> np.ndarray:
    """The control of :func:`hard_negatives`: for each query, ``num`` pool images of
    other clusters drawn at random, at most one per cluster. Returns (Q, num) indices
    into the pool, -1 where fewer than ``num`` other clusters exist."""
    query_cluster, pool_cluster = np.asarray(query_cluster), np.asarray(pool_cluster)
    index = np.full((len(query_cluster), num), -1, np.int64)
    for i, c in enumerate(query_cluster):  # queries per epoch: thousands at most
        order = rng.permutation(np.flatnonzero(pool_cluster != c))
        _, first = np.unique(pool_cluster[order], return_index=True)  # each cluster's first image in the order
        chosen = order[np.sort(first)][:num]  # the clusters, too, in a random order
        index[i, : len(chosen)] = chosen
    return index
