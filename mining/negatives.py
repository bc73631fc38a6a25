"""Hard negatives: for each query, the most similar images of other clusters, at most
one per cluster (Radenovic et al.).

Training calls :func:`hard_negatives` every epoch with the current network's
descriptors, so it is written as batched matrix products: per batch of queries one
product with the whole negative pool (BLAS), then one compiled pass over it that
keeps each cluster's best image and the best clusters (:func:`_best_of_other_clusters`,
the batch's rows split over the cores).
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from sfmpairs.compiled import compiled

from .pools import worker_threads


def hard_negatives(
    query_desc: np.ndarray,
    query_cluster: np.ndarray,
    pool_desc: np.ndarray,
    pool_cluster: np.ndarray,
    num: int,
    batch_size: int | None = None,
    workers: int | None = None,
):
    """The ``num`` pool images most similar (inner product) to each query, from
    clusters other than the query's, at most one per cluster, most similar first.

    ``query_desc`` (Q, D) and ``pool_desc`` (P, D) are L2-normalised descriptors;
    ``query_cluster`` (Q,) and ``pool_cluster`` (P,) integer cluster labels. Returns
    ``(index, similarity)``, both (Q, num): indices into the pool (-1 where fewer than
    ``num`` other clusters exist) and their inner products. Within a cluster the first
    pool image of the best similarity is taken; clusters of equal similarity come in
    the order of their labels. Similarities that are not finite count as no match.
    Queries go in batches of ``batch_size`` (None: :func:`query_batch`); each batch's
    selection runs on ``workers`` threads (None: every core, at most 8; training
    passes its ranks' share).
    """
    query_desc = np.asarray(query_desc, np.float32)
    pool_desc = np.asarray(pool_desc, np.float32)
    query_cluster, pool_cluster = np.asarray(query_cluster), np.asarray(pool_cluster)
    Q, P = len(query_desc), len(pool_desc)
    if query_cluster.shape != (Q,) or pool_cluster.shape != (P,):  # the compiled pass reads them unchecked
        raise ValueError(
            f"hard_negatives: {Q} queries with cluster labels of shape {query_cluster.shape}, "
            f"{P} pool images with cluster labels of shape {pool_cluster.shape}: one label per image"
        )
    index = np.full((Q, num), -1, np.int64)
    similarity = np.full((Q, num), -np.inf, np.float32)
    if Q == 0 or P == 0 or num == 0:
        return index, similarity
    labels, pool_label = np.unique(pool_cluster, return_inverse=True)  # dense, in label order
    own = np.minimum(np.searchsorted(labels, query_cluster), len(labels) - 1)
    query_label = np.where(labels[own] == query_cluster, own, -1)  # -1: a cluster the pool lacks
    k = min(num, len(labels))
    batch_size = batch_size or query_batch(P)
    sim = np.empty((min(batch_size, Q), P), np.float32)  # one buffer for every batch's product

    def best(a: int, b: int) -> None:  # queries a..b of the batch at q0
        _best_of_other_clusters(
            sim[a - q0 : b - q0], pool_label, len(labels), query_label[a:b], k, index[a:b], similarity[a:b]
        )

    splits = min(worker_threads(workers), len(sim))
    with ThreadPoolExecutor(splits) if splits > 1 else contextlib.nullcontext() as ex:
        for q0 in range(0, Q, batch_size):
            q1 = min(Q, q0 + batch_size)
            np.matmul(query_desc[q0:q1], pool_desc.T, out=sim[: q1 - q0])
            if ex is None:
                best(q0, q1)
                continue
            rows = np.linspace(q0, q1, splits + 1).astype(np.int64)
            list(ex.map(best, rows[:-1], rows[1:]))  # the compiled pass releases Python's lock
    return index, similarity


def query_batch(pool_size: int, floats: int = 1 << 25) -> int:
    """Queries per matrix product: 256 to 1,024, as many as keep the (batch, pool)
    similarities within ``floats`` (128 MiB). Larger products run closer to the
    bare product's speed (2,000 queries x 20,000 x 2048-d on 2 cores, three runs:
    :func:`hard_negatives` took a median 1.27x its time in batches of 256, 1.14x in
    batches of 1,024)."""
    return int(np.clip(floats // max(pool_size, 1), 256, 1024))


@compiled
def _best_of_other_clusters(sim, pool_label, num_labels, query_label, k, index, similarity):
    """For each query's similarities to the pool (a row of ``sim``, (B, P)), the pool
    index and similarity of the best image of each of the ``k`` most similar clusters
    other than its own (``query_label``, -1: none), most similar first, into the first
    k columns of ``index`` and ``similarity`` (B, >= k), left as they are (-1, -inf)
    where fewer clusters have a finite similarity (compiled). ``pool_label`` (P,):
    each pool image's cluster as 0..num_labels-1, in the order of the labels; a
    cluster's best is its first image of the highest finite similarity, and clusters
    of equal similarity go by label."""
    best = np.empty(num_labels, np.float32)
    arg = np.empty(num_labels, np.int64)
    for i in range(sim.shape[0]):
        best[:] = -np.inf
        arg[:] = -1
        row = sim[i]
        for j in range(row.shape[0]):
            c = pool_label[j]
            if best[c] < row[j] < np.inf:  # NaN never is
                best[c] = row[j]
                arg[c] = j
        if query_label[i] >= 0:
            best[query_label[i]] = -np.inf
        n = 0  # the clusters kept so far, most similar first
        for c in range(num_labels):
            v = best[c]
            if v == -np.inf or (n == k and v <= similarity[i, k - 1]):
                continue
            t = min(n, k - 1)  # where it goes: after every kept one at least as similar
            while t > 0 and similarity[i, t - 1] < v:
                similarity[i, t] = similarity[i, t - 1]
                index[i, t] = index[i, t - 1]
                t -= 1
            similarity[i, t] = v
            index[i, t] = arg[c]
            n = min(n + 1, k)


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
