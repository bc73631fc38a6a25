"""``sfmpairs mine``: an SfM store to training pairs (Radenovic et al., ECCV 2016, TPAMI 2018).

For each query q: the pool M(q) (the ``pool_size`` images of q's model with the
nearest camera centres), each candidate's co-observed points, inlier ratio and scale
change (:mod:`.pools`); a positive by the chosen strategy; hard negatives from other
clusters when descriptors are given (:mod:`.negatives`). Clusters, never images, go to
the ``train`` or ``val`` split.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from sfmpairs.common import SfmpairsError, check_output_path, file_sha256, progress
from sfmpairs.config import conf_dict, make_conf
from sfmpairs.retrieval.descriptors import read_descriptors
from sfmpairs.sfm_io.store import read_store

from .negatives import hard_negatives
from .options import MineConf
from .pairfile import SPLITS, write_pair_file
from .pools import pair_statistics, pool_members, unordered_pairs

logger = logging.getLogger("sfmpairs.mine")


def paper_queries_per_cluster(cluster_size: int) -> int:
    """The paper's rule: 10 % of a cluster of up to 300 images, 30 for larger clusters."""
    return 30 if cluster_size > 300 else max(1, int(round(0.1 * cluster_size)))


def compute_pools(s: dict, pool_size: int, measure: str) -> dict:
    """M(q) of every image of the store and each candidate's statistics, (N, K) arrays
    (K the largest pool; shorter pools padded with -1 / 0 / NaN)."""
    N = len(s["images/model"])
    ranges, point_ranges = s["models/image_range"], s["models/point_range"]
    K = int(max((min(pool_size, b - a - 1) for a, b in ranges), default=0))
    out = {
        "pool": np.full((N, K), -1, np.int64),
        "distance": np.full((N, K), np.nan),
        "co_observed": np.zeros((N, K), np.int64),
        "scale_change": np.full((N, K), np.nan),
    }
    indptr = s["observations/indptr"]
    longer = np.maximum(s["images/width"], s["images/height"]).astype(np.float64)
    for (a, b), (pa, pb) in progress(list(zip(ranges, point_ranges)), desc="pools", unit="model"):
        n = int(b - a)
        if n < 2:
            continue
        pool, dist = pool_members(s["images/centre"][a:b], pool_size)
        k = pool.shape[1]
        ia, ib = indptr[a], indptr[b]
        local_indptr = indptr[a : b + 1] - ia
        local_point = s["observations/point"][ia:ib] - pa
        pairs = unordered_pairs(pool, n)
        count, scale = pair_statistics(
            local_indptr,
            local_point,
            s["points/xyz"][pa:pb],
            s["images/rotation"][a:b],
            s["images/tvec"][a:b],
            s["images/focal"][a:b],
            longer[a:b],
            pairs,
            n,
            measure,
            xy=s["observations/xy"][ia:ib].astype(np.float64) if measure == "bbox" else None,
        )
        q = np.repeat(np.arange(n), k).reshape(n, k)
        which = np.searchsorted(pairs, np.minimum(q, pool) * n + np.maximum(q, pool))
        out["pool"][a:b, :k] = pool + a
        out["distance"][a:b, :k] = dist
        out["co_observed"][a:b, :k] = count[which]
        out["scale_change"][a:b, :k] = scale[which]
    size = np.diff(indptr)  # |P(q)|: distinct 3D points of each image
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = out["co_observed"] / size[:, None]
    ratio[size == 0] = 0.0
    ratio[out["pool"] < 0] = np.nan
    out["inlier_ratio"] = ratio
    return out


def split_clusters(names: np.ndarray, conf: MineConf, rng) -> np.ndarray:
    """0 (train) or 1 (val) for each cluster."""
    C = len(names)
    split = np.zeros(C, np.int64)
    if conf.val_clusters:
        index = {n: i for i, n in enumerate(names)}
        for name in conf.val_clusters:
            if name not in index:
                more = f" and {len(names) - 10} more" if len(names) > 10 else ""
                raise SfmpairsError(
                    f"--val-clusters: no cluster named {name!r} in the store; "
                    f"its clusters: {', '.join(names[:10])}{more}"
                )
            split[index[name]] = 1
    elif conf.val_fraction > 0 and C >= 2:
        # at least two val clusters where four or more leave two to train on: with one,
        # every val image is a positive or junk and val mAP is 100 whatever the network
        n_val = min(C - 1, max(2 if C >= 4 else 1, int(round(conf.val_fraction * C))))
        split[rng.permutation(C)[:n_val]] = 1
    return split


def positive_slots(
    strategy: str,
    passes: np.ndarray,
    candidate: np.ndarray,
    co_observed: np.ndarray,
    rng,
    similarity: np.ndarray | None = None,
) -> np.ndarray:
    """The positive of each query, as a slot of its pool row, by the strategy.

    Rows are queries, columns pool slots (nearest camera first): ``passes``, the relaxed
    filter; ``candidate``, at least ``min_co_observed`` co-observed points;
    ``similarity``, descriptor similarity to the query (``mac`` only). ``relaxed``
    draws among the passing slots; ``max-inliers`` takes the candidate with the most
    co-observed points (ties: the nearest); ``mac`` the most similar candidate. Used by
    ``mine`` and, every epoch, by ``train``.
    """
    slots = np.empty(len(passes), np.int64)
    for k in range(len(passes)):
        if strategy == "relaxed":
            slots[k] = rng.choice(np.flatnonzero(passes[k]))
        elif strategy == "max-inliers":
            slots[k] = int(np.argmax(np.where(candidate[k], co_observed[k], -1)))
        else:  # mac
            cand = np.flatnonzero(candidate[k])
            slots[k] = cand[int(np.argmax(similarity[k][cand]))]
    return slots


def pool_similarity(desc: np.ndarray, queries: np.ndarray, pool: np.ndarray, chunk: int = 256) -> np.ndarray:
    """(Q, K) inner products of each query's descriptor with its pool members' (padding
    slots, -1, get whatever row -1 is: they are never candidates), in chunks of queries."""
    out = np.empty(pool.shape, np.float32)
    for a in range(0, len(queries), chunk):
        out[a : a + chunk] = np.einsum("qkd,qd->qk", desc[pool[a : a + chunk]], desc[queries[a : a + chunk]])
    return out


def co_observing_images(queries: np.ndarray, indptr: np.ndarray, point: np.ndarray, cluster: np.ndarray) -> dict:
    """For each val query q, every other image of q's cluster that shares 3D points
    with it and how many (``gt_indptr``, ``gt_image``, ``gt_co_observed``: CSR rows by
    query, images ascending), so that evaluation needs the pair file alone. One
    cluster at a time: memory is bounded by the largest cluster."""
    from scipy import sparse

    n_points = int(point.max()) + 1 if len(point) else 0
    A = sparse.csr_matrix((np.ones(len(point), np.int32), point, indptr), shape=(len(indptr) - 1, n_points))
    images, counts = [None] * len(queries), [None] * len(queries)
    for c in np.unique(cluster[queries]):
        members = np.flatnonzero(cluster == c)
        qk = np.flatnonzero(cluster[queries] == c)
        shared = (A[queries[qk]] @ A[members].T).tocsr()  # co-observed points
        shared.sort_indices()
        for row, k in enumerate(qk):
            cols = shared.indices[shared.indptr[row] : shared.indptr[row + 1]]
            vals = shared.data[shared.indptr[row] : shared.indptr[row + 1]]
            other = members[cols] != queries[k]
            images[k], counts[k] = members[cols[other]], vals[other]
    sizes = [len(x) for x in images]

    def cat(xs):
        return np.concatenate(xs) if xs else np.zeros(0, np.int64)

    return {
        "gt_indptr": np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
        "gt_image": cat(images).astype(np.int32),
        "gt_co_observed": cat(counts).astype(np.int32),
    }


def passing_candidates(pools: dict, conf: MineConf) -> tuple[np.ndarray, np.ndarray]:
    """(candidate, passes), (N, K) booleans over the pools: a candidate shares at least
    ``min_co_observed`` 3D points with q; it passes the relaxed filter where its inlier
    ratio is high enough and its scale change small enough."""
    candidate = pools["co_observed"] >= conf.min_co_observed
    with np.errstate(invalid="ignore"):
        passes = (
            candidate
            & (pools["inlier_ratio"] >= conf.min_inlier_ratio)
            & (pools["scale_change"] <= conf.max_scale_change)
        )
    return candidate, passes


def draw_queries(clusters: np.ndarray, eligible: np.ndarray, cluster: np.ndarray, want: int | None, rng) -> np.ndarray:
    """The queries of the given clusters: ``want`` eligible images drawn per cluster
    (None: the paper's number; 0: every eligible image), ascending within a cluster."""
    cluster_size = np.bincount(cluster)
    queries = []
    for c in clusters:
        elig = np.flatnonzero(eligible & (cluster == c))
        n_q = paper_queries_per_cluster(int(cluster_size[c])) if want is None else (want or len(elig))
        n_q = min(n_q, len(elig))
        if n_q:
            queries.append(np.sort(rng.choice(elig, n_q, replace=False)))
    return np.concatenate(queries) if queries else np.zeros(0, np.int64)


def mine_negatives(
    split: str, queries: np.ndarray, images: np.ndarray, cluster: np.ndarray, desc: np.ndarray, count: int
) -> dict:
    """Each query's ``count`` hard negatives among the split's images, at most one per
    other cluster (-1 where fewer clusters are left), and their similarities."""
    idx, sim = hard_negatives(desc[queries], cluster[queries], desc[images], cluster[images], count)
    given = (idx >= 0).sum(axis=1)
    if len(queries) and given.min() < count:
        spread = f"{given.min()}" if given.min() == given.max() else f"{given.min()} to {given.max()}"
        logger.warning(
            "%s split: %d clusters and at most one negative from each other cluster: "
            "%s hard negatives per query, not %d",
            split,
            len(np.unique(cluster[images])),
            spread,
            count,
        )
    return {"negatives": np.where(idx >= 0, images[np.maximum(idx, 0)], -1), "negative_similarity": sim}


def mine_split(
    split: str,
    in_split: np.ndarray,
    s: dict,
    pools: dict,
    candidate: np.ndarray,
    passes: np.ndarray,
    conf: MineConf,
    desc: np.ndarray | None,
    want_negatives: bool,
    rng,
) -> dict:
    """One split's queries, positives, images, hard negatives (with descriptors) and,
    for val, the ground truth: the paper's steps for the clusters ``in_split``."""
    cluster = s["images/cluster"]
    eligible = (passes if conf.strategy == "relaxed" else candidate).any(axis=1)
    queries = draw_queries(np.flatnonzero(in_split), eligible, cluster, conf.queries_per_cluster, rng)
    rows = pools["pool"][queries]
    similarity = pool_similarity(desc, queries, rows) if conf.strategy == "mac" else None
    slots = positive_slots(
        conf.strategy, passes[queries], candidate[queries], pools["co_observed"][queries], rng, similarity
    )
    images = np.flatnonzero(in_split[cluster])
    entry = {"query": queries, "positive": rows[np.arange(len(queries)), slots], "images": images}
    if want_negatives:
        entry.update(mine_negatives(split, queries, images, cluster, desc, conf.negatives))
    if split == "val":
        entry.update(co_observing_images(queries, s["observations/indptr"], s["observations/point"], cluster))
    logger.info("%s: %d clusters, %d images, %d queries", split, int(in_split.sum()), len(images), len(queries))
    if len(queries):
        logger.debug(
            "%s: per query %.1f pool images, %.1f candidates sharing points, %.1f passing",
            split,
            (rows >= 0).sum(1).mean(),
            candidate[queries].sum(1).mean(),
            passes[queries].sum(1).mean(),
        )
    return entry


def store_keys(conf: MineConf) -> list[str]:
    """The SfM store's datasets that mining reads."""
    keys = [
        "images/name",
        "images/cluster",
        "images/model",
        "images/centre",
        "images/rotation",
        "images/tvec",
        "images/focal",
        "images/width",
        "images/height",
        "models/image_range",
        "models/point_range",
        "points/xyz",
        "observations/indptr",
        "observations/point",
        "clusters/name",
    ]
    return keys + (["observations/xy"] if conf.scale_measure == "bbox" else [])


def mine(
    store: str | Path, output: str | Path, *, descriptors: str | Path | None = None, overwrite: bool = False, **options
) -> dict:
    """Mine training pairs from the SfM store ``store`` into the pair file ``output``.

    ``options``: the settings of :class:`~.options.MineConf` (its defaults for the
    rest). Returns a summary. Raises :class:`SfmpairsError` on bad input, leaving no
    output.
    """
    t0 = time.perf_counter()
    check_output_path(output, overwrite)  # before the work, not after it
    conf = make_conf(MineConf, **options)
    conf.check()
    if conf.strategy == "mac" and descriptors is None:
        raise SfmpairsError("--strategy mac needs --descriptors")
    store = Path(store)
    # the store's checksum, for the provenance: hashlib releases the GIL, so it runs
    # beside the mining on another core
    checksum = ThreadPoolExecutor(1).submit(file_sha256, store) if store.is_file() else None
    s = read_store(store, keys=store_keys(conf))
    names, cluster_names = s["images/name"], s["clusters/name"]
    want_negatives = descriptors is not None and conf.negatives > 0
    if want_negatives and len(cluster_names) < 2:
        raise SfmpairsError(f"{store}: hard negatives need at least two clusters, the store has one")
    desc = read_descriptors(descriptors, names) if descriptors is not None else None

    logger.info("pools of %d images (k = %d, scale measure %s)", len(names), conf.pool_size, conf.scale_measure)
    pools = compute_pools(s, conf.pool_size, conf.scale_measure)
    candidate, passes = passing_candidates(pools, conf)
    rng = np.random.default_rng(conf.seed)
    split_of_cluster = split_clusters(cluster_names, conf, rng)
    per_split = {
        split: mine_split(split, split_of_cluster == sp, s, pools, candidate, passes, conf, desc, want_negatives, rng)
        for sp, split in enumerate(SPLITS)
    }

    inputs = {"store": str(store.resolve()), "store_sha256": checksum.result()}
    if descriptors:
        inputs["descriptors_sha256"] = file_sha256(descriptors)
    parameters = {**conf_dict(conf), "descriptors": str(Path(descriptors).resolve()) if descriptors else None}
    write_pair_file(
        output,
        overwrite,
        s,
        split_of_cluster,
        per_split,
        {**pools, "passes": passes},
        conf_dict(conf),
        parameters,
        inputs,
    )
    result = {
        "output": str(output),
        "strategy": conf.strategy,
        **{f"{split}_queries": len(e["query"]) for split, e in per_split.items()},
        "seconds": time.perf_counter() - t0,
    }
    logger.info("wrote %s in %.1f s", output, result["seconds"])
    return result
