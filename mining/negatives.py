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
    batch_size: int = 256,
):
    """The ``num`` pool images most similar (inner product) to each query, from
    clusters other than the query's, at most one per cluster, most similar first.

    ``query_desc`` (Q, D) and ``pool_desc`` (P, D) are L2-normalised descriptors;
    ``query_cluster`` (Q,) and ``pool_cluster`` (P,) integer cluster labels. Returns
    ``(index, similarity)``, both (Q, num): indices into the pool (-1 where fewer than
    ``num`` other clusters exist) and their inner products.
    """
    query_desc = np.asarray(query_desc, np.float32)
    pool_desc = np.asarray(pool_desc, np.float32)
    Q, P = len(query_desc), len(pool_desc)
    index = np.full((Q, num), -1, np.int64)
    similarity = np.full((Q, num), -np.inf, np.float32)
    if Q == 0 or P == 0 or num == 0:
        return index, similarity
    # the pool grouped by cluster: columns [starts[c], ends[c]) hold cluster labels[c]
    pool_cluster = np.asarray(pool_cluster)
    grouped = bool(np.all(pool_cluster[1:] >= pool_cluster[:-1]))  # e.g. a store's split
    by_cluster = np.arange(P) if grouped else np.argsort(pool_cluster, kind="stable")
    sorted_cluster = pool_cluster[by_cluster]
    starts = np.flatnonzero(np.r_[True, sorted_cluster[1:] != sorted_cluster[:-1]])
    ends = np.r_[starts[1:], P]
    labels = sorted_cluster[starts]
    widest = int((ends - starts).max())
    k = min(num, len(labels))
    for q0 in range(0, Q, batch_size):
        q1 = min(Q, q0 + batch_size)
        rows = np.arange(q1 - q0)
        sim = query_desc[q0:q1] @ pool_desc.T  # (B, P): the one big product
        if not grouped:
            sim = sim[:, by_cluster]
        best = np.maximum.reduceat(sim, starts, axis=1)  # (B, C) best of each cluster
        own = np.searchsorted(labels, query_cluster[q0:q1])
        own_ok = (own < len(labels)) & (labels[np.minimum(own, len(labels) - 1)] == query_cluster[q0:q1])
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
        cols = starts[top][..., None] + np.arange(widest)  # (B, k, widest)
        inside = cols < ends[top][..., None]
        seg = np.where(inside, sim[rows[:, None, None], np.minimum(cols, P - 1)], -np.inf)
        col = np.take_along_axis(cols, seg.argmax(axis=2)[..., None], axis=2)[..., 0]
        ok = np.isfinite(top_sim)
        index[q0:q1, :k] = np.where(ok, by_cluster[col], -1)
        similarity[q0:q1, :k] = np.where(ok, top_sim, -np.inf)
    return index, similarity


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
