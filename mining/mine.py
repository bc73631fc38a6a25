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

import h5py
import numpy as np

from sfmpairs.common import SfmpairsError, atomic_output, check_output_path, file_sha256, progress, provenance_attrs
from sfmpairs.retrieval.descriptors import read_descriptors
from sfmpairs.sfm_io.store import read_store

from .negatives import hard_negatives
from .pairfile import SCHEMA, SCHEMA_VERSION, SPLITS, STR
from .pools import SCALE_MEASURES, pair_statistics, pool_members, unordered_pairs

logger = logging.getLogger("sfmpairs.mine")

STRATEGIES = ("relaxed", "max-inliers", "mac")

DEFAULTS = {
    "strategy": "relaxed",
    "pool_size": 100,  # k: images in M(q)
    "min_inlier_ratio": 0.2,  # relaxed: |P(i) ∩ P(q)| / |P(q)| at least this
    "max_scale_change": 1.5,  # relaxed: scale change at most this
    "scale_measure": "depth",  # or "bbox"
    "min_co_observed": 1,  # a positive shares at least this many 3D points with q
    "queries_per_cluster": None,  # None: the paper's rule; 0: every eligible image
    "val_fraction": 0.2,
    "val_clusters": None,  # list of cluster names, instead of val_fraction
    "negatives": 5,  # hard negatives per query, when descriptors are given
    "seed": 0,
}


def paper_queries_per_cluster(cluster_size: int) -> int:
    """The paper's rule: 10 % of a cluster of up to 300 images, 30 for larger clusters."""
    return 30 if cluster_size > 300 else max(1, int(round(0.1 * cluster_size)))


def check_options(opts: dict) -> None:
    if opts["strategy"] not in STRATEGIES:
        raise SfmpairsError(f"unknown strategy {opts['strategy']!r} (choose {', '.join(STRATEGIES)})")
    if opts["scale_measure"] not in SCALE_MEASURES:
        raise SfmpairsError(f"unknown scale measure {opts['scale_measure']!r} "
                            f"(choose {', '.join(SCALE_MEASURES)})")
    checks = [
        (opts["pool_size"] >= 1, "--pool-size must be at least 1"),
        (0 <= opts["min_inlier_ratio"] <= 1, "--min-inlier-ratio must be in [0, 1]"),
        (opts["max_scale_change"] >= 1, "--max-scale-change must be at least 1"),
        (opts["min_co_observed"] >= 1, "--min-co-observed must be at least 1"),
        (opts["queries_per_cluster"] is None or opts["queries_per_cluster"] >= 0,
         "--queries-per-cluster must be 0 (all) or more"),
        (0 <= opts["val_fraction"] < 1, "--val-fraction must be in [0, 1)"),
        (opts["negatives"] >= 0, "--negatives must be 0 or more"),
    ]
    for ok, message in checks:
        if not ok:
            raise SfmpairsError(message)
    unknown = set(opts) - set(DEFAULTS)
    if unknown:
        raise SfmpairsError(f"unknown option {sorted(unknown)[0]!r}")


def compute_pools(s: dict, pool_size: int, measure: str) -> dict:
    """M(q) of every image of the store and each candidate's statistics, (N, K) arrays
    (K the largest pool; shorter pools padded with -1 / 0 / NaN)."""
    N = len(s["images/model"])
    ranges, point_ranges = s["models/image_range"], s["models/point_range"]
    K = int(max((min(pool_size, b - a - 1) for a, b in ranges), default=0))
    out = {"pool": np.full((N, K), -1, np.int64), "distance": np.full((N, K), np.nan),
           "co_observed": np.zeros((N, K), np.int64), "scale_change": np.full((N, K), np.nan)}
    indptr = s["observations/indptr"]
    longer = np.maximum(s["images/width"], s["images/height"]).astype(np.float64)
    for (a, b), (pa, pb) in progress(list(zip(ranges, point_ranges)), desc="pools", unit="model"):
        n = int(b - a)
        if n < 2:
            continue
        pool, dist = pool_members(s["images/centre"][a:b], pool_size)
        k = pool.shape[1]
        ia, ib = indptr[a], indptr[b]
        local_indptr = indptr[a:b + 1] - ia
        local_point = s["observations/point"][ia:ib] - pa
        pairs = unordered_pairs(pool, n)
        count, scale = pair_statistics(
            local_indptr, local_point, s["points/xyz"][pa:pb], s["images/rotation"][a:b],
            s["images/tvec"][a:b], s["images/focal"][a:b], longer[a:b], pairs, n, measure,
            xy=s["observations/xy"][ia:ib].astype(np.float64) if measure == "bbox" else None)
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


def split_clusters(names: np.ndarray, opts: dict, rng) -> np.ndarray:
    """0 (train) or 1 (val) for each cluster."""
    C = len(names)
    split = np.zeros(C, np.int64)
    if opts["val_clusters"]:
        index = {n: i for i, n in enumerate(names)}
        for name in opts["val_clusters"]:
            if name not in index:
                more = f" and {len(names) - 10} more" if len(names) > 10 else ""
                raise SfmpairsError(f"--val-clusters: no cluster named {name!r} in the store; "
                                    f"its clusters: {', '.join(names[:10])}{more}")
            split[index[name]] = 1
    elif opts["val_fraction"] > 0 and C >= 2:
        # at least two val clusters where four or more leave two to train on: with one,
        # every val image is a positive or junk and val mAP is 100 whatever the network
        n_val = min(C - 1, max(2 if C >= 4 else 1, int(round(opts["val_fraction"] * C))))
        split[rng.permutation(C)[:n_val]] = 1
    return split


def positive_slots(strategy: str, passes: np.ndarray, candidate: np.ndarray, co_observed: np.ndarray,
                   rng, similarity: np.ndarray | None = None) -> np.ndarray:
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
        out[a:a + chunk] = np.einsum("qkd,qd->qk", desc[pool[a:a + chunk]], desc[queries[a:a + chunk]])
    return out


def co_observing_images(queries: np.ndarray, indptr: np.ndarray, point: np.ndarray,
                     cluster: np.ndarray) -> dict:
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
            cols = shared.indices[shared.indptr[row]:shared.indptr[row + 1]]
            vals = shared.data[shared.indptr[row]:shared.indptr[row + 1]]
            other = members[cols] != queries[k]
            images[k], counts[k] = members[cols[other]], vals[other]
    sizes = [len(x) for x in images]
    def cat(xs):
        return np.concatenate(xs) if xs else np.zeros(0, np.int64)

    return {"gt_indptr": np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
            "gt_image": cat(images).astype(np.int32), "gt_co_observed": cat(counts).astype(np.int32)}


def mine(store: str | Path, output: str | Path, *, descriptors: str | Path | None = None,
         overwrite: bool = False, **options) -> dict:
    """Mine training pairs from the SfM store ``store`` into the pair file ``output``.

    ``options`` override :data:`DEFAULTS`. Returns a summary. Raises
    :class:`SfmpairsError` on bad input, leaving no output.
    """
    t0 = time.perf_counter()
    check_output_path(output, overwrite)  # before the work, not after it
    opts = {**DEFAULTS, **{k: v for k, v in options.items() if v is not None or k == "queries_per_cluster"}}
    check_options(opts)
    strategy = opts["strategy"]
    if strategy == "mac" and descriptors is None:
        raise SfmpairsError("--strategy mac needs --descriptors")
    store = Path(store)
    # the store's checksum, for the provenance: hashlib releases the GIL, so it runs
    # beside the mining on another core
    checksum = ThreadPoolExecutor(1).submit(file_sha256, store) if store.is_file() else None
    keys = ["images/name", "images/cluster", "images/model", "images/centre",
            "images/rotation", "images/tvec", "images/focal", "images/width", "images/height",
            "models/image_range", "models/point_range", "points/xyz", "observations/indptr",
            "observations/point", "clusters/name"]
    if opts["scale_measure"] == "bbox":
        keys.append("observations/xy")
    s = read_store(store, keys=keys)
    images_root = s["attrs"].get("images_root", "")
    names, cluster_names, cluster = s["images/name"], s["clusters/name"], s["images/cluster"]
    want_negatives = descriptors is not None and opts["negatives"] > 0
    if want_negatives and len(cluster_names) < 2:
        raise SfmpairsError(f"{store}: hard negatives need at least two clusters, the store has one")
    desc = read_descriptors(descriptors, names) if descriptors is not None else None

    logger.info("pools of %d images (k = %d, scale measure %s)", len(names), opts["pool_size"],
                opts["scale_measure"])
    pools = compute_pools(s, opts["pool_size"], opts["scale_measure"])
    candidate = pools["co_observed"] >= opts["min_co_observed"]
    with np.errstate(invalid="ignore"):
        passes = (candidate & (pools["inlier_ratio"] >= opts["min_inlier_ratio"])
                  & (pools["scale_change"] <= opts["max_scale_change"]))
    eligible = (passes if strategy == "relaxed" else candidate).any(axis=1)

    rng = np.random.default_rng(opts["seed"])
    split_of_cluster = split_clusters(cluster_names, opts, rng)
    cluster_size = np.bincount(cluster, minlength=len(cluster_names))
    result = {"output": str(output), "strategy": strategy}
    per_split = {}
    for sp, split in enumerate(SPLITS):
        queries = []
        for c in np.flatnonzero(split_of_cluster == sp):
            elig = np.flatnonzero(eligible & (cluster == c))
            want = opts["queries_per_cluster"]
            n_q = paper_queries_per_cluster(int(cluster_size[c])) if want is None else (want or len(elig))
            n_q = min(n_q, len(elig))
            if n_q:
                queries.append(np.sort(rng.choice(elig, n_q, replace=False)))
        queries = np.concatenate(queries) if queries else np.zeros(0, np.int64)
        rows = pools["pool"][queries]
        similarity = pool_similarity(desc, queries, rows) if strategy == "mac" else None
        slots = positive_slots(strategy, passes[queries], candidate[queries], pools["co_observed"][queries], rng,
                               similarity)
        positives = rows[np.arange(len(queries)), slots]
        images = np.flatnonzero(split_of_cluster[cluster] == sp)
        entry = {"query": queries, "positive": positives, "images": images}
        if want_negatives:
            idx, sim = hard_negatives(desc[queries], cluster[queries], desc[images],
                                      cluster[images], opts["negatives"])
            entry["negatives"] = np.where(idx >= 0, images[np.maximum(idx, 0)], -1)
            entry["negative_similarity"] = sim
            given = (idx >= 0).sum(axis=1)
            if len(queries) and given.min() < opts["negatives"]:
                spread = f"{given.min()}" if given.min() == given.max() else f"{given.min()} to {given.max()}"
                logger.warning("%s split: %d clusters and at most one negative from each other cluster: "
                               "%s hard negatives per query, not %d", split, len(np.unique(cluster[images])),
                               spread, opts["negatives"])
        if split == "val":
            entry.update(co_observing_images(queries, s["observations/indptr"], s["observations/point"], cluster))
        per_split[split] = entry
        result[f"{split}_queries"] = len(queries)
        logger.info("%s: %d clusters, %d images, %d queries", split,
                    int((split_of_cluster == sp).sum()), len(images), len(queries))
        if len(queries):
            logger.debug("%s: per query %.1f pool images, %.1f candidates sharing points, %.1f passing", split,
                         (pools["pool"][queries] >= 0).sum(1).mean(), candidate[queries].sum(1).mean(),
                         passes[queries].sum(1).mean())

    parameters = {**opts, "descriptors": str(Path(descriptors).resolve()) if descriptors else None}
    inputs = {"store": str(store.resolve()), "store_sha256": checksum.result()}
    if descriptors:
        inputs["descriptors_sha256"] = file_sha256(descriptors)
    with atomic_output(output, overwrite) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("images/name", data=list(names), dtype=STR)
            f.create_dataset("images/cluster", data=cluster.astype(np.int32))
            f.create_dataset("images/model", data=s["images/model"].astype(np.int32))
            f.create_dataset("clusters/name", data=list(cluster_names), dtype=STR)
            f.create_dataset("clusters/split", data=[SPLITS[i] for i in split_of_cluster], dtype=STR)
            for split, e in per_split.items():
                q = e["query"]
                g = f.create_group(split)
                g.create_dataset("query", data=q.astype(np.int32))
                g.create_dataset("positive", data=e["positive"].astype(np.int32))
                g.create_dataset("images", data=e["images"].astype(np.int32))
                g.create_dataset("pool", data=pools["pool"][q].astype(np.int32))
                g.create_dataset("pool_co_observed", data=pools["co_observed"][q].astype(np.int32))
                g.create_dataset("pool_inlier_ratio", data=pools["inlier_ratio"][q])
                g.create_dataset("pool_scale_change", data=pools["scale_change"][q])
                g.create_dataset("pool_distance", data=pools["distance"][q])
                g.create_dataset("pool_passes", data=passes[q])
                if "negatives" in e:
                    g.create_dataset("negatives", data=e["negatives"].astype(np.int32))
                    g.create_dataset("negative_similarity", data=e["negative_similarity"])
                for key in ("gt_indptr", "gt_image", "gt_co_observed"):
                    if key in e:
                        g.create_dataset(key, data=e[key])
            f.attrs.update(provenance_attrs(SCHEMA, SCHEMA_VERSION, parameters, inputs))
            for key, value in opts.items():  # every parameter also as its own attribute
                f.attrs[key] = "" if value is None else (list(value) if isinstance(value, (list, tuple)) else value)
            f.attrs["source_store"] = str(store.resolve())
            f.attrs["images_root"] = images_root
            f.attrs["source_store_sha256"] = inputs["store_sha256"]
    result["seconds"] = time.perf_counter() - t0
    logger.info("wrote %s in %.1f s", output, result["seconds"])
    return result
