"""The pair file (``sfmpairs mine``), schema in docs/formats.md: written and read here."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from sfmpairs.common import SfmpairsError, atomic_output, check_schema, h5_errors, h5_output, open_h5, provenance_attrs

SCHEMA = "sfmpairs/pairs"
SCHEMA_VERSION = 2  # 2: val ground truth (val/gt_*)
SPLITS = ("train", "val")
STR = h5py.string_dtype("utf-8")


def read_pair_file(path: str | Path) -> dict:
    """Every dataset of a pair file: image names and clusters, cluster names, the
    images root, the strategy, and per split (``splits[name]``) its datasets."""
    path = Path(path)
    f = open_h5(path, "pair file")
    with f, h5_errors(path, "pair file"):
        check_schema(f.attrs, path, SCHEMA, SCHEMA_VERSION, "a pair file", " (sfmpairs mine writes them)")
        out = {
            "names": f["images/name"].asstr()[()],
            "cluster": f["images/cluster"][()],
            "cluster_names": f["clusters/name"].asstr()[()],
            "images_root": f.attrs.get("images_root", ""),
            "strategy": f.attrs.get("strategy"),
            "source_store": f.attrs.get("source_store"),
            "min_co_observed": int(f.attrs.get("min_co_observed", 1)),
            "splits": {},
        }
        for split in ("train", "val"):
            if split in f:
                out["splits"][split] = {k: f[f"{split}/{k}"][()] for k in f[split]}
    with h5_errors(path, "pair file"):  # e.g. a name that is not UTF-8
        check_pairs(path, out)
    return out


POOL_DATASETS = {
    "pool_co_observed": "co_observed",
    "pool_inlier_ratio": "inlier_ratio",
    "pool_scale_change": "scale_change",
    "pool_distance": "distance",
    "pool_passes": "passes",
}
# Each split's tables and their number of dimensions (docs/formats.md)
NDIM = {
    **dict.fromkeys(("query", "positive", "images", "gt_indptr", "gt_image", "gt_co_observed"), 1),
    **dict.fromkeys(("pool", *POOL_DATASETS, "negatives", "negative_similarity"), 2),
}
INDEX_TABLES = ("query", "positive", "images", "pool", "negatives", "gt_image")  # image indices, -1 padded in pools


def check_pairs(path, p: dict) -> None:
    """The pair file's tables agree: image names unique, every table of its documented
    number of dimensions, image indices (queries, positives, pools, negatives, ground
    truth) within the images table, clusters within the clusters table, one (Q, K) shape
    for the pool tables (Q the queries) and one (Q, Nn) for the negatives', no padding
    marked as passing, each split's queries and positives among its images, a valid CSR
    index of the val ground truth with both its tables."""

    def fail(what):
        raise SfmpairsError(f"{path}: corrupt pair file ({what})")

    for key, name in (("names", "images/name"), ("cluster", "images/cluster"), ("cluster_names", "clusters/name")):
        if not isinstance(p[key], np.ndarray) or p[key].ndim != 1:
            fail(f"{name} not a list")
    n, clusters = len(p["names"]), len(p["cluster_names"])
    if len(set(p["names"].tolist())) != n:
        names, counts = np.unique(p["names"], return_counts=True)
        fail(f"images/name holds {names[counts > 1][0]!r} more than once")
    if len(p["cluster"]) != n:
        fail("images/cluster and images/name of different lengths")
    if p["cluster"].dtype.kind not in "iu" or (n and (p["cluster"].min() < 0 or p["cluster"].max() >= clusters)):
        fail("images/cluster out of range")
    for split, d in p["splits"].items():
        required = ["query", "positive", "images", "pool", *POOL_DATASETS]
        if "negatives" in d or "negative_similarity" in d:
            required += ["negatives", "negative_similarity"]
        missing = [k for k in required if k not in d]
        if missing:
            fail(f"{split}/{missing[0]} missing")
        for key, v in d.items():
            if not isinstance(v, np.ndarray) or v.dtype.kind not in "biuf" or not v.ndim:
                fail(f"{split}/{key} not a numeric table")
            if v.ndim != NDIM.get(key, v.ndim):
                fail(f"{split}/{key} is {v.ndim}-D, not {NDIM[key]}-D")
        q, pool = d["query"], d["pool"]
        for key, v in d.items():
            if key in ("positive", "pool", "negatives") and len(v) != len(q):
                fail(f"{split}/{key} has {len(v)} rows for {len(q)} queries")
            like = "pool" if key.startswith("pool") else "negatives" if key == "negative_similarity" else None
            if like and v.shape != d[like].shape:
                fail(f"{split}/{key} of shape {v.shape}, {split}/{like} of {d[like].shape}")
            if key in INDEX_TABLES:
                if v.dtype.kind not in "iu" or (v.size and (v.min() < -1 or v.max() >= n)):
                    fail(f"{split}/{key}: image indices out of range")
                if key in ("query", "positive", "images", "gt_image") and v.size and v.min() < 0:
                    fail(f"{split}/{key}: image indices out of range")
        if d["pool_passes"].dtype.kind != "b" or np.any(d["pool_passes"] & (pool < 0)):
            fail(f"{split}/pool_passes not true or false for each pool slot (false for padding)")
        for key in ("query", "positive"):  # each into its split (cirtorch numbers them among its images)
            outside = np.setdiff1d(d[key], d["images"])
            if len(outside):
                fail(f"{split}/{key} holds image {int(outside[0])}, which is not in {split}/images")
        if "gt_indptr" in d:
            missing = [k for k in ("gt_image", "gt_co_observed") if k not in d]
            if missing:
                fail(f"{split}/gt_indptr without {split}/{missing[0]}")
            ip, gi = d["gt_indptr"], d["gt_image"]
            bad = ip.dtype.kind not in "iu" or len(ip) != len(q) + 1 or ip[0] != 0 or ip[-1] != len(gi)
            if bad or np.any(np.diff(ip) < 0):
                fail(f"{split}/gt_indptr is no index of {split}/gt_image")
            if len(d["gt_co_observed"]) != len(gi):
                fail(f"{split}/gt_co_observed and gt_image of different lengths")


def write_pair_file(
    path: str | Path,
    overwrite: bool,
    s: dict,
    split_of_cluster: np.ndarray,
    per_split: dict,
    pools: dict,
    settings: dict,
    parameters: dict,
    inputs: dict,
) -> None:
    """Write a pair file atomically (docs/formats.md). ``s``: the SfM store's arrays
    (:func:`~sfmpairs.sfm_io.store.read_store`); ``per_split[split]``: its ``query``,
    ``positive``, ``images`` and optional ``negatives``, ``negative_similarity`` and
    ``gt_*``; ``pools``: (N, K) arrays over every image (``pool``, ``co_observed``,
    ``inlier_ratio``, ``scale_change``, ``distance``, ``passes``), of which each split
    stores its queries' rows; ``settings``: the mining settings, each also an attribute;
    ``parameters``, ``inputs``: the provenance."""
    with atomic_output(path, overwrite) as tmp, h5_output(tmp) as f:
        f.create_dataset("images/name", data=list(s["images/name"]), dtype=STR)
        f.create_dataset("images/cluster", data=s["images/cluster"].astype(np.int32))
        f.create_dataset("images/model", data=s["images/model"].astype(np.int32))
        f.create_dataset("clusters/name", data=list(s["clusters/name"]), dtype=STR)
        f.create_dataset("clusters/split", data=[SPLITS[i] for i in split_of_cluster], dtype=STR)
        for split, e in per_split.items():
            q, g = e["query"], f.create_group(split)
            for key in ("query", "positive", "images"):
                g.create_dataset(key, data=e[key].astype(np.int32))
            g.create_dataset("pool", data=pools["pool"][q].astype(np.int32))
            for key, source in POOL_DATASETS.items():
                rows = pools[source][q]
                g.create_dataset(key, data=rows.astype(np.int32) if key == "pool_co_observed" else rows)
            if "negatives" in e:
                g.create_dataset("negatives", data=e["negatives"].astype(np.int32))
                g.create_dataset("negative_similarity", data=e["negative_similarity"])
            for key in ("gt_indptr", "gt_image", "gt_co_observed"):
                if key in e:
                    g.create_dataset(key, data=e[key])
        f.attrs.update(provenance_attrs(SCHEMA, SCHEMA_VERSION, parameters, inputs))
        for key, value in settings.items():  # every setting also as its own attribute
            f.attrs[key] = "" if value is None else value
        f.attrs["source_store"] = inputs["store"]
        f.attrs["images_root"] = s["attrs"].get("images_root", "")
        f.attrs["source_store_sha256"] = inputs["store_sha256"]
