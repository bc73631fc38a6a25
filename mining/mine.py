"""``sfmpairs mine``: an SfM store to training pairs (Radenovic et al., ECCV 2016, TPAMI 2018).

For each query q: the pool M(q) (the ``pool_size`` images of q's model with the
nearest camera centres), each candidate's co-observed points, inlier ratio and scale
change (:mod:`.pools`); a positive by the chosen strategy; hard negatives from other
clusters when descriptors are given (:mod:`.negatives`). Clusters, never images, go to
the ``train`` or ``val`` split.
"""

from __future__ import annotations

import ctypes
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from sfmpairs.common import SfmpairsError, check_output_path, file_sha256, progress, threads_by_size
from sfmpairs.config import conf_dict, make_conf
from sfmpairs.retrieval.descriptors import read_descriptors
from sfmpairs.sfm_io.store import open_store, read_store

from .negatives import hard_negatives
from .options import MineConf
from .pairfile import SPLITS, write_pair_file
from .pools import load_kernels, pair_index, pair_statistics, pool_members, unordered_pairs, worker_threads

logger = logging.getLogger("sfmpairs.mine")


def paper_queries_per_cluster(cluster_size: int) -> int:
    """The paper's rule: 10 % of a cluster of up to 300 images, 30 for larger clusters."""
    return 30 if cluster_size > 300 else max(1, int(round(0.1 * cluster_size)))


def pool_width(image_range: np.ndarray, pool_size: int) -> int:
    """K, the width of the pool tables: the largest pool of any model (a model of n
    images has pools of min(pool_size, n - 1))."""
    return int(max((min(pool_size, int(b - a) - 1) for a, b in image_range), default=0))


IMAGE_KEYS = ("centre", "rotation", "tvec", "focal", "width", "height")  # the images/ tables pooling needs


def model_arrays(h5, s: dict, a: int, b: int, pa: int, pb: int, measure: str) -> dict:
    """What pooling needs of one model (images a..b-1, points pa..pb-1): its rows of
    the tables ``s`` (read whole, :func:`store_keys`: one read per table rather than
    one per model, each of which holds Python's lock), observations/indptr among them,
    and its observations and points, read from the open store ``h5``, local to the
    model."""
    indptr = s["observations/indptr"][a : b + 1]
    ia, ib = int(indptr[0]), int(indptr[-1])
    out = {key: s[f"images/{key}"][a:b] for key in IMAGE_KEYS}
    out["indptr"] = indptr - ia
    out["point"] = h5["observations/point"][ia:ib] - pa
    if len(out["point"]) != ib - ia:  # the file is not the one ``s`` was read from (replaced meanwhile)
        raise SfmpairsError(f"{h5.filename}: changed while mining (observations {ia}..{ib - 1} are not there)")
    if len(out["point"]) and (out["point"].min() < 0 or out["point"].max() >= pb - pa):
        raise SfmpairsError(f"{h5.filename}: corrupt store: images {a}..{b - 1} observe points of another model")
    out["xyz"] = h5["points/xyz"][pa:pb]
    out["xy"] = h5["observations/xy"][ia:ib].astype(np.float64) if measure == "bbox" else None
    return out


def model_pools(m: dict, first: int, pool_size: int, measure: str, K: int, threads: int | None = None) -> dict:
    """M(q) of every image of one model and each candidate's statistics, (n, K) arrays
    (K from :func:`pool_width`; shorter pools padded with -1 / 0 / NaN): ``pool``
    (global image indices: ``first`` is the model's first image), ``distance``,
    ``co_observed``, ``scale_change``, ``inlier_ratio``. ``m``: :func:`model_arrays`."""
    indptr = m["indptr"]
    n = len(indptr) - 1
    out = {
        "pool": np.full((n, K), -1, np.int64),
        "distance": np.full((n, K), np.nan),
        "co_observed": np.zeros((n, K), np.int64),
        "scale_change": np.full((n, K), np.nan),
    }
    if n >= 2:
        pool, dist = pool_members(m["centre"], pool_size, workers=threads)
        k = pool.shape[1]
        pairs = unordered_pairs(pool, n)
        longer = np.maximum(m["width"], m["height"]).astype(np.float64)
        count, scale = pair_statistics(
            indptr, m["point"], m["xyz"], m["rotation"], m["tvec"], m["focal"], longer, pairs, n, measure,
            xy=m["xy"], threads=threads,
        )  # fmt: skip
        which = pair_index(pool, pairs, n)
        out["pool"][:, :k] = pool + first
        out["distance"][:, :k] = dist
        out["co_observed"][:, :k] = count[which]
        out["scale_change"][:, :k] = scale[which]
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
    """For each query q, every other image of q's cluster that shares 3D points with it
    and how many (``gt_indptr``, ``gt_image``, ``gt_co_observed``: CSR rows by query,
    images ascending), from a whole store's co-observation table (``indptr``, ``point``)
    and image clusters; one cluster at a time (:func:`cluster_co_observations`)."""
    images, counts = [None] * len(queries), [None] * len(queries)
    for c in np.unique(cluster[queries]):
        members = np.flatnonzero(cluster == c)
        qk = np.flatnonzero(cluster[queries] == c)
        rows = [np.arange(indptr[i], indptr[i + 1]) for i in members]
        local_ptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])])
        gt = cluster_co_observations(queries[qk], members, local_ptr, point[_cat(rows, np.int64)])
        for row, k in enumerate(qk):
            images[k] = gt["gt_image"][gt["gt_indptr"][row] : gt["gt_indptr"][row + 1]]
            counts[k] = gt["gt_co_observed"][gt["gt_indptr"][row] : gt["gt_indptr"][row + 1]]
    return {
        "gt_indptr": np.concatenate([[0], np.cumsum([len(x) for x in images])]).astype(np.int64),
        "gt_image": _cat(images, np.int32),
        "gt_co_observed": _cat(counts, np.int32),
    }


def cluster_co_observations(queries: np.ndarray, members: np.ndarray, indptr: np.ndarray, point: np.ndarray) -> dict:
    """For val queries q of one cluster, every other image of the cluster that shares
    3D points with q and how many (``gt_indptr``, ``gt_image``, ``gt_co_observed``:
    CSR rows by query, images ascending), so that evaluation needs the pair file alone.

    ``members``: the cluster's images, ascending; ``indptr``, ``point``: their
    co-observation table (CSR by member, point indices of the store)."""
    from scipy import sparse

    base = int(point.min()) if len(point) else 0
    n_points = int(point.max()) + 1 - base if len(point) else 0
    A = sparse.csr_matrix((np.ones(len(point), np.int32), point - base, indptr), shape=(len(members), n_points))
    shared = (A[np.searchsorted(members, queries)] @ A.T).tocsr()  # co-observed points
    shared.sort_indices()
    images, counts = [], []
    for row, q in enumerate(queries):
        cols = shared.indices[shared.indptr[row] : shared.indptr[row + 1]]
        vals = shared.data[shared.indptr[row] : shared.indptr[row + 1]]
        other = members[cols] != q
        images.append(members[cols[other]])
        counts.append(vals[other])
    return {
        "gt_indptr": np.concatenate([[0], np.cumsum([len(x) for x in images])]).astype(np.int64),
        "gt_image": _cat(images, np.int32),
        "gt_co_observed": _cat(counts, np.int32),
    }


def _cat(parts: list, dtype) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)


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


def draw_cluster_queries(eligible: np.ndarray, cluster_size: int, want: int | None, rng) -> np.ndarray:
    """The queries of one cluster: ``want`` of its ``eligible`` images (ascending)
    drawn (None: the paper's number; 0: every eligible image), ascending."""
    n_q = paper_queries_per_cluster(cluster_size) if want is None else (want or len(eligible))
    n_q = min(n_q, len(eligible))
    return np.sort(rng.choice(eligible, n_q, replace=False)) if n_q else np.zeros(0, np.int64)


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


ROW_KEYS = ("pool", "distance", "co_observed", "scale_change", "inlier_ratio", "candidate", "passes")


def pool_model(
    h5, s: dict, model: int, conf: MineConf, K: int, with_observations: bool, threads: int | None = None
) -> dict:
    """One model's pool rows (:func:`model_pools`, on ``threads`` threads: None, every
    core) with ``candidate`` and ``passes``, ``image`` (its global image indices) and
    ``eligible`` (images with a candidate that the strategy may take); with its
    observations where asked (``indptr``, ``point``: store point indices), for the val
    ground truth."""
    (a, b), (pa, pb) = s["models/image_range"][model], s["models/point_range"][model]
    m = model_arrays(h5, s, int(a), int(b), int(pa), int(pb), conf.scale_measure)
    rows = model_pools(m, int(a), conf.pool_size, conf.scale_measure, K, threads)
    rows["candidate"], rows["passes"] = passing_candidates(rows, conf)
    rows["image"] = np.arange(a, b)
    rows["eligible"] = (rows["passes"] if conf.strategy == "relaxed" else rows["candidate"]).any(axis=1)
    if with_observations:
        rows["indptr"], rows["point"] = m["indptr"], m["point"] + pa
    return rows


def in_order(fn, items: list, weights, workers: int):
    """``fn(item)`` of each item, yielded in order, computed on ``workers`` threads a
    few items ahead: as many as fit in the weight of the heaviest item (at least one),
    so that memory holds about one heaviest item, however many items there are."""
    budget = max(weights, default=0)
    with ThreadPoolExecutor(workers) as ex:
        pending, held, nxt = deque(), 0, 0
        try:
            while nxt < len(items) or pending:
                while (
                    nxt < len(items) and len(pending) < 2 * workers and (not pending or held + weights[nxt] <= budget)
                ):
                    pending.append((ex.submit(fn, items[nxt]), weights[nxt]))
                    held += weights[nxt]
                    nxt += 1
                future, weight = pending.popleft()
                done = future.result()
                held -= weight
                yield done
        finally:
            for future, _ in pending:
                future.cancel()


def _libc():
    """glibc, or None (another C library: the memory calls below then do nothing)."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim, _LIBC.mallopt  # noqa: B018 (glibc has both)
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC


_LIBC = None
_M_ARENA_MAX = -8  # glibc's mallopt parameter


def release_freed_memory() -> None:
    """Give freed memory back to the system (glibc's malloc_trim).

    numpy's arrays of up to 32 MB come from malloc's heaps, which keep what was freed:
    after many models of different sizes the process would hold far more than the one
    model it works on."""
    if _libc():
        _libc().malloc_trim(0)


def limit_heaps(threads: int) -> None:
    """At most ``threads`` malloc heaps (arenas) from now on, instead of one per thread
    up to eight per core: each heap keeps its own freed memory, and the pooling threads
    come and go (measured: the peak of mining half the SfM-120k-like corpus 20 % lower)."""
    if _libc():
        _libc().mallopt(_M_ARENA_MAX, max(2, threads))


def _join(parts: list[dict]) -> dict:
    """The rows of a cluster's models, one table (images ascending)."""
    if len(parts) == 1:
        return parts[0]
    out = {key: np.concatenate([p[key] for p in parts]) for key in (*ROW_KEYS, "image", "eligible")}
    if "indptr" in parts[0]:
        ends = np.cumsum([p["indptr"][-1] for p in parts])
        out["indptr"] = np.concatenate([[0]] + [p["indptr"][1:] + e - p["indptr"][-1] for p, e in zip(parts, ends)])
        out["point"] = np.concatenate([p["point"] for p in parts])
    return out


class Tidy:
    """Freed memory given back (:func:`release_freed_memory`) each time work of
    ``every`` observations has been done since the last time: often enough that the
    process holds about one largest model's garbage, seldom enough that its pages are
    not faulted in again model after model (a trim after each model cost 15 % more CPU)."""

    def __init__(self, every: int):
        self.every, self.done = every, 0

    def __call__(self, observations: int) -> None:
        self.done += observations
        if self.done >= self.every:
            release_freed_memory()
            self.done = 0


def split_queries(split: str, clusters, models_of: list, results, conf: MineConf, K: int, cluster_size, rng, tidy):
    """One split's queries, cluster by cluster in order, each cluster's drawn as soon
    as its models' pools (``results``, in the order of ``clusters``) are in; only the
    queries' rows are kept. Returns ``(queries, rows, gt)`` (``gt``: val only)."""
    queries, rows, gt = [], [], []
    for c in clusters:
        t = _join([next(results) for _ in models_of[c]])
        q = draw_cluster_queries(t["image"][t["eligible"]], int(cluster_size[c]), conf.queries_per_cluster, rng)
        if split == "val" and len(q):
            gt.append(cluster_co_observations(q, t["image"], t["indptr"], t["point"]))
        if len(q):
            queries.append(q)
            at = np.searchsorted(t["image"], q)
            rows.append({key: t[key][at] for key in ROW_KEYS})
        del t
        tidy(c)
    return _cat(queries, np.int64), _stack_rows(rows, K), _join_gt(gt) if split == "val" else {}


_ROW_EMPTY = {"pool": np.int64, "co_observed": np.int64, "candidate": bool, "passes": bool}


def _stack_rows(rows: list[dict], K: int) -> dict:
    if not rows:
        return {key: np.zeros((0, K), _ROW_EMPTY.get(key, np.float64)) for key in ROW_KEYS}
    return {key: np.concatenate([r[key] for r in rows]) for key in ROW_KEYS}


def _join_gt(parts: list[dict]) -> dict:
    sizes = np.concatenate([np.diff(p["gt_indptr"]) for p in parts]) if parts else np.zeros(0, np.int64)
    return {
        "gt_indptr": np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
        "gt_image": _cat([p["gt_image"] for p in parts], np.int32),
        "gt_co_observed": _cat([p["gt_co_observed"] for p in parts], np.int32),
    }


def finish_split(split, in_split, queries, rows, gt, s, conf, desc, want_negatives, rng) -> dict:
    """One split's positives (by the strategy, drawing from ``rng`` for relaxed),
    images, hard negatives (with descriptors) and, for val, the ground truth."""
    cluster = s["images/cluster"]
    similarity = pool_similarity(desc, queries, rows["pool"]) if conf.strategy == "mac" else None
    slots = positive_slots(conf.strategy, rows["passes"], rows["candidate"], rows["co_observed"], rng, similarity)
    images = np.flatnonzero(in_split[cluster])
    entry = {"query": queries, "positive": rows["pool"][np.arange(len(queries)), slots], "images": images, **gt}
    if want_negatives:
        entry.update(mine_negatives(split, queries, images, cluster, desc, conf.negatives))
    logger.info("%s: %d clusters, %d images, %d queries", split, int(in_split.sum()), len(images), len(queries))
    if len(queries):
        logger.debug(
            "%s: per query %.1f pool images, %.1f candidates sharing points, %.1f passing",
            split,
            (rows["pool"] >= 0).sum(1).mean(),
            rows["candidate"].sum(1).mean(),
            rows["passes"].sum(1).mean(),
        )
    return entry


class QueryRows:
    """The pool rows of the queries alone, looked up by global image index as the
    (N, K) table over every image would be (``rows[q]``): what the pair file takes."""

    def __init__(self, queries: np.ndarray, rows: np.ndarray):
        order = np.argsort(queries, kind="stable")
        self.queries, self.rows = queries[order], rows[order]

    def __getitem__(self, q):
        return self.rows[np.searchsorted(self.queries, q)]


def mine_all(h5, s: dict, split_of_cluster, conf: MineConf, desc, want_negatives: bool, rng, workers: int):
    """Each split's entry, the models pooled on ``workers`` threads in the order the
    queries are drawn (train clusters, then val clusters), only the queries' rows kept;
    and those rows (:class:`QueryRows`) for the pair file."""
    image_range = s["models/image_range"]
    model_cluster = s["images/cluster"][image_range[:, 0]] if len(image_range) else np.zeros(0, np.int64)
    models_of = [[] for _ in range(len(split_of_cluster))]
    for model, c in enumerate(model_cluster):
        models_of[c].append(model)
    clusters = [np.flatnonzero(split_of_cluster == sp) for sp in range(len(SPLITS))]
    todo = [(m, sp == 1) for sp in range(len(SPLITS)) for c in clusters[sp] for m in models_of[c]]
    K = pool_width(image_range, conf.pool_size)
    size = np.diff(s["observations/indptr"][image_range], axis=1)[:, 0]  # observations of each model
    cluster_obs = np.bincount(model_cluster, weights=size, minlength=len(split_of_cluster))
    trim = Tidy(int(size.max(initial=0)))
    tidy = lambda c: trim(int(cluster_obs[c]))  # noqa: E731
    # a model of at most half the largest's observations is pooled beside others
    # (in_order): on one thread, rather than on threads of its own that start and stop
    # for each model and compete with the others' (measured on the SfM-120k-shaped
    # corpus, 6 runs each: 16.1 CPU s against 16.6, the same pair file); larger ones on
    # every core
    threads = threads_by_size(size)
    pool = lambda x: pool_model(h5, s, x[0], conf, K, x[1], threads[x[0]])  # noqa: E731
    results = in_order(pool, todo, [size[m] for m, _ in todo], workers)
    results = iter(progress(results, total=len(todo), desc="pools", unit="model"))
    cluster_size = np.bincount(s["images/cluster"], minlength=len(split_of_cluster))
    per_split, kept = {}, []
    for sp, split in enumerate(SPLITS):
        queries, rows, gt = split_queries(split, clusters[sp], models_of, results, conf, K, cluster_size, rng, tidy)
        in_split = split_of_cluster == sp
        per_split[split] = finish_split(split, in_split, queries, rows, gt, s, conf, desc, want_negatives, rng)
        kept.append((queries, rows))
    queries = np.concatenate([q for q, _ in kept])
    table = {key: QueryRows(queries, np.concatenate([r[key] for _, r in kept])) for key in ROW_KEYS}
    return per_split, table


def store_keys() -> list[str]:
    """The SfM store's datasets that mining reads whole (the rest model by model)."""
    return [
        "images/name",
        "images/cluster",
        "images/model",
        "models/image_range",
        "models/point_range",
        "observations/indptr",
        "clusters/name",
        *(f"images/{key}" for key in IMAGE_KEYS),
    ]


def mine(
    store: str | Path,
    output: str | Path,
    *,
    descriptors: str | Path | None = None,
    overwrite: bool = False,
    workers: int | None = None,
    **options,
) -> dict:
    """Mine training pairs from the SfM store ``store`` into the pair file ``output``.

    ``options``: the settings of :class:`~.options.MineConf` (its defaults for the
    rest); ``workers``: threads pooling models at once (None: one per core and one
    more, as part of each model's work, reading the store, holds Python's lock). Memory
    holds a few models and the queries' rows, not the pools of every image. Returns a
    summary. Raises :class:`SfmpairsError` on bad input, leaving no output.
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
    ThreadPoolExecutor(1).submit(load_kernels)  # beside reading the store
    s = read_store(store, keys=store_keys())
    names, cluster_names = s["images/name"], s["clusters/name"]
    want_negatives = descriptors is not None and conf.negatives > 0
    if want_negatives and len(cluster_names) < 2:
        raise SfmpairsError(f"{store}: hard negatives need at least two clusters, the store has one")
    desc = read_descriptors(descriptors, names) if descriptors is not None else None

    logger.info("pools of %d images (k = %d, scale measure %s)", len(names), conf.pool_size, conf.scale_measure)
    rng = np.random.default_rng(conf.seed)
    split_of_cluster = split_clusters(cluster_names, conf, rng)
    threads = worker_threads(workers) + (workers is None)  # measured: 5 to 10 % faster on 2 cores than one per core
    limit_heaps(threads)
    with open_store(store) as h5:
        per_split, rows = mine_all(h5, s, split_of_cluster, conf, desc, want_negatives, rng, threads)

    inputs = {"store": str(store.resolve()), "store_sha256": checksum.result()}
    if descriptors:
        inputs["descriptors_sha256"] = file_sha256(descriptors)
    parameters = {**conf_dict(conf), "descriptors": str(Path(descriptors).resolve()) if descriptors else None}
    write_pair_file(output, overwrite, s, split_of_cluster, per_split, rows, conf_dict(conf), parameters, inputs)
    result = {
        "output": str(output),
        "strategy": conf.strategy,
        **{f"{split}_queries": len(e["query"]) for split, e in per_split.items()},
        "seconds": time.perf_counter() - t0,
    }
    logger.info("wrote %s in %.1f s", output, result["seconds"])
    return result
