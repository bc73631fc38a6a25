"""``sfmpairs export``: pair files for other frameworks.

- ``cirtorch``: the training database of the authors' PyTorch code
  (cnnimageretrieval-pytorch): ``DIR/train/retrieval-SfM-120k/retrieval-SfM-120k.pkl``
  with ``train`` and ``val``, each holding ``cids``, ``cluster``, ``qidxs``, ``pidxs``,
  and the photos under ``DIR/train/retrieval-SfM-120k/ims`` in its layout
  (``ims/cid[-2:]/cid[-4:-2]/cid[-6:-4]/cid``), as links or copies. Its ``train.py``
  accepts only that dataset name, and finds it under its data root (``data/`` in its
  checkout): export there, or link ``data/train/retrieval-SfM-120k`` to the export.
- ``hloc``: ``pairs.txt``, one ``name0 name1`` line per query-positive pair (all passing
  pool pairs with ``all_passing``), image names relative to the images root, as hloc's
  matching step reads them.
- ``csv``: one row per (query, candidate) pair with every statistic.
"""

from __future__ import annotations

import csv
import hashlib
import os
import pickle
import shutil
from pathlib import Path

import numpy as np

from ..common import SfmpairsError
from .pairfile import read_pair_file

FORMATS = ("cirtorch", "hloc", "csv")
CIRTORCH_NAME = "retrieval-SfM-120k"  # the one training set name cirtorch's train.py accepts


def cid_of(name: str) -> str:
    """A cirtorch image id for an image name: 40 hex digits of its SHA-1."""
    return hashlib.sha1(name.encode("utf-8")).hexdigest()


def cid2filename(cid: str, prefix: Path) -> Path:
    """Where cirtorch looks for an image id (its ``datahelpers.cid2filename``)."""
    return prefix / cid[-2:] / cid[-4:-2] / cid[-6:-4] / cid


def export_cirtorch(p: dict, images_root: Path, output: Path, copy: bool = False) -> dict:
    db_root = output / "train" / CIRTORCH_NAME
    ims = db_root / "ims"
    db = {}
    linked = 0
    for split in ("train", "val"):
        s = p["splits"].get(split)
        images = s["images"] if s is not None else np.zeros(0, np.int64)
        position = {int(i): k for k, i in enumerate(images)}
        cids = [cid_of(p["names"][i]) for i in images]
        db[split] = {
            "cids": cids,
            "cluster": [int(p["cluster"][i]) for i in images],
            "qidxs": [position[int(q)] for q in s["query"]] if s is not None else [],
            "pidxs": [position[int(q)] for q in s["positive"]] if s is not None else [],
        }
        for i, cid in zip(images, cids):
            src, dst = (images_root / p["names"][i]).resolve(), cid2filename(cid, ims)
            if not src.is_file():
                raise SfmpairsError(f"{src}: image not found (give --images-root)")
            dst.parent.mkdir(parents=True, exist_ok=True)
            if dst.exists() or dst.is_symlink():
                dst.unlink()
            (shutil.copyfile if copy else os.symlink)(src, dst)
            linked += 1
    with open(db_root / f"{CIRTORCH_NAME}.pkl", "wb") as fh:
        pickle.dump(db, fh)
    with open(db_root / "cids.tsv", "w", encoding="utf-8") as fh:  # cid -> our image name
        for split in ("train", "val"):
            s = p["splits"].get(split)
            for i in (s["images"] if s is not None else []):
                fh.write(f"{cid_of(p['names'][i])}\t{p['names'][i]}\n")
    return {"database": str(db_root / f"{CIRTORCH_NAME}.pkl"), "images": linked}


def export_hloc(p: dict, output: Path, all_passing: bool = False) -> dict:
    lines = []
    for split, s in p["splits"].items():
        if all_passing:
            for q, pool, ok in zip(s["query"], s["pool"], s["pool_passes"]):
                lines += [f"{p['names'][q]} {p['names'][j]}" for j in pool[ok]]
        else:
            lines += [f"{p['names'][q]} {p['names'][j]}" for q, j in zip(s["query"], s["positive"])]
    if any(" " in n for n in p["names"]):
        raise SfmpairsError("an image name holds a space: hloc's pairs format cannot carry it")
    output.write_text("\n".join(lines) + ("\n" if lines else ""), encoding="utf-8")
    return {"pairs": len(lines)}


CSV_COLUMNS = ["split", "query", "candidate", "query_cluster", "slot", "is_positive", "passes",
               "co_observed", "inlier_ratio", "scale_change", "distance"]


def export_csv(p: dict, output: Path) -> dict:
    rows = 0
    with open(output, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(CSV_COLUMNS)
        for split, s in p["splits"].items():
            for r, q in enumerate(s["query"]):
                for slot, j in enumerate(s["pool"][r]):
                    if j < 0:
                        continue
                    w.writerow([split, p["names"][q], p["names"][j], p["cluster_names"][p["cluster"][q]], slot,
                                int(j == s["positive"][r]), int(s["pool_passes"][r, slot]),
                                int(s["pool_co_observed"][r, slot]), repr(float(s["pool_inlier_ratio"][r, slot])),
                                repr(float(s["pool_scale_change"][r, slot])), repr(float(s["pool_distance"][r, slot]))])
                    rows += 1
    return {"rows": rows}


def export(pairs: str | Path, output: str | Path, fmt: str, *, images_root: str | Path | None = None,
           copy: bool = False, all_passing: bool = False, overwrite: bool = False) -> dict:
    """Export a pair file as ``fmt`` (cirtorch: a folder; hloc and csv: a file)."""
    from ..common import atomic_output

    if fmt not in FORMATS:
        raise SfmpairsError(f"unknown format {fmt!r} (choose {', '.join(FORMATS)})")
    p = read_pair_file(pairs)
    output = Path(output)
    if fmt == "cirtorch":
        import tempfile

        root = Path(images_root or p["images_root"] or ".")
        target = output / "train" / CIRTORCH_NAME
        if target.exists() and any(target.iterdir()) and not overwrite:
            raise SfmpairsError(f"{target}: exists; pass --overwrite")
        output.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".sfmpairs-export-", dir=output))
        try:  # build beside the target, move it into place at the end: no partial export
            result = export_cirtorch(p, root, scratch, copy)
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                shutil.rmtree(target)
            os.replace(scratch / "train" / CIRTORCH_NAME, target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        result["database"] = str(target / f"{CIRTORCH_NAME}.pkl")
        return result
    with atomic_output(output, overwrite) as tmp:
        return export_hloc(p, tmp, all_passing) if fmt == "hloc" else export_csv(p, tmp)
