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


def check_pairs(path, p: dict) -> None:
    """The pair file's tables agree: image indices (queries, positives, pools, negatives,
    ground truth) within the images table, clusters within the clusters table, one row
    per query in every per-query table, a valid CSR index of the val ground truth."""
    n, clusters = len(p["names"]), len(p["cluster_names"])

    def fail(what):
        raise SfmpairsError(f"{path}: corrupt pair file ({what})")

    if len(p["cluster"]) != n:
        fail("images/cluster and images/name of different lengths")
    if n and (p["cluster"].min() < 0 or p["cluster"].max() >= clusters):
        fail("images/cluster out of range")
    for split, d in p["splits"].items():
        missing = [k for k in ("query", "positive", "images", "pool") if k not in d]
        if missing:
            fail(f"{split}/{missing[0]} missing")
        q = d["query"]
        if not isinstance(q, np.ndarray) or q.ndim != 1:
            fail(f"{split}/query not a list of images")
        for key, v in d.items():
            if not isinstance(v, np.ndarray) or v.dtype.kind not in "biuf" or not v.ndim:
                fail(f"{split}/{key} not a numeric table")
            if key.startswith("pool") or key in ("positive", "negatives", "negative_similarity"):
                if len(v) != len(q):
                    fail(f"{split}/{key} has {len(v)} rows for {len(q)} queries")
            if key in ("query", "positive", "images", "pool", "negatives", "gt_image"):
                if v.dtype.kind not in "iu" or (v.size and (v.min() < -1 or v.max() >= n)):
                    fail(f"{split}/{key}: image indices out of range")
                if key in ("query", "positive", "images", "gt_image") and v.size and v.min() < 0:
                    fail(f"{split}/{key}: image indices out of range")
        if "gt_indptr" in d:
            ip, gi = d["gt_indptr"], d.get("gt_image", np.zeros(0))
            if len(ip) != len(q) + 1 or ip[0] != 0 or ip[-1] != len(gi) or np.any(np.diff(ip) < 0):
                fail(f"{split}/gt_indptr is no index of {split}/gt_image")
            if len(d.get("gt_co_observed", gi)) != len(gi):
                fail(f"{split}/gt_co_observed and gt_image of different lengths")


POOL_DATASETS = {
    "pool_co_observed": "co_observed",
    "pool_inlier_ratio": "inlier_ratio",
    "pool_scale_change": "scale_change",
    "pool_distance": "distance",
    "pool_passes": "passes",
}


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
