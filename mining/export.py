"""``sfmpairs export``: pair files for other frameworks.

- ``cirtorch``: the training database of the authors' PyTorch code
  (cnnimageretrieval-pytorch): ``DIR/train/retrieval-SfM-120k/retrieval-SfM-120k.pkl``
  with ``train`` and ``val``, each holding ``cids``, ``cluster``, ``qidxs``, ``pidxs``,
  the learned-whitening file its ``test.py --whitening`` reads
  (``retrieval-SfM-120k-whiten.pkl``: ``cids``, ``qidxs``, ``pidxs`` of the train
  split's pairs), and the photos under ``DIR/train/retrieval-SfM-120k/ims`` in its
  layout (``ims/cid[-2:]/cid[-4:-2]/cid[-6:-4]/cid``), as links or copies. Its
  ``train.py`` accepts only that dataset name, and finds it under its data root
  (``data/`` in its checkout): export there, or link ``data/train/retrieval-SfM-120k``
  to the export.
- ``hloc``: pairs files, one ``name0 name1`` line per query-positive pair (all passing
  pool pairs with ``all_passing``), see :mod:`.export_hloc` for the names.
- ``csv``: one row per (query, candidate) pair with every statistic.
- ``megadepth``: per model of the SfM store, a scene file for local-feature matchers
  (LoFTR, D2-Net), LoFTR's index files and scene lists, the photos and, from a COLMAP
  dense workspace, depth files: see :mod:`.export_megadepth`.

Every export gets its provenance beside it (``export.json`` in a folder,
``<file>.provenance.json`` beside a file): the formats themselves have no room for it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import pickle
from pathlib import Path

import numpy as np

from sfmpairs.common import SfmpairsError, atomic_folder, atomic_output, check_output_path, provenance_attrs
from sfmpairs.config import conf_dict, make_conf
from sfmpairs.paths import check_relative_names, place_photo

from .export_hloc import TSV, check_line_names, names_under, pair_indices, write_pairs, write_per_model
from .options import EXPORT_FORMATS, ExportConf
from .pairfile import read_pair_file

logger = logging.getLogger("sfmpairs.export")

FORMATS = EXPORT_FORMATS
CIRTORCH_NAME = "retrieval-SfM-120k"  # the one training set name cirtorch's train.py accepts
EXPORT_SCHEMA = "sfmpairs/export"
EXPORT_SCHEMA_VERSION = 1


def cid_of(name: str) -> str:
    """A cirtorch image id for an image name: 40 hex digits of its SHA-1."""
    return hashlib.sha1(name.encode("utf-8")).hexdigest()


def cid2filename(cid: str, prefix: Path) -> Path:
    """Where cirtorch looks for an image id (its ``datahelpers.cid2filename``)."""
    return prefix / cid[-2:] / cid[-4:-2] / cid[-6:-4] / cid


def check_cirtorch_clusters(p: dict, pairs, neg_num: int = 5, strict: bool = False) -> list[str]:
    """cirtorch's ``create_epoch_tuples`` takes each query's ``--neg-num`` negatives
    from distinct clusters other than the query's, and runs past its pool (IndexError)
    when a split has fewer than ``neg_num + 1`` clusters. A warning per such split with
    queries (an error with ``strict``); returns the messages."""
    problems = []
    for split, s in p["splits"].items():
        clusters = len(np.unique(p["cluster"][s["images"]]))
        if len(s["query"]) and clusters < neg_num + 1:
            problems.append(
                f"{pairs}: the {split} split has {clusters} clusters; cirtorch's train.py with "
                f"--neg-num {neg_num} needs {neg_num + 1} (its create_epoch_tuples fails with an "
                f"IndexError): pass it --neg-num {max(clusters - 1, 0)} or fewer"
                + (" or --no-val" if split == "val" else "")
            )
    if problems and strict:
        raise SfmpairsError(problems[0])
    for message in problems:
        logger.warning("%s", message)
    return problems


def _cirtorch_split(p: dict, split: str) -> dict:
    s = p["splits"].get(split)
    images = s["images"] if s is not None else np.zeros(0, np.int64)
    position = {int(i): k for k, i in enumerate(images)}
    return {
        "cids": [cid_of(p["names"][i]) for i in images],
        "cluster": [int(p["cluster"][i]) for i in images],
        "qidxs": [position[int(q)] for q in s["query"]] if s is not None else [],
        "pidxs": [position[int(q)] for q in s["positive"]] if s is not None else [],
    }


def cirtorch_whitening(p: dict, all_passing: bool = False) -> dict:
    """What cirtorch's ``test.py --whitening`` reads (``<name>-whiten.pkl``): the images
    of the train split's query-positive pairs (``all_passing``: every passing pool
    pair), as ``cids``, and each pair as indices into them (``qidxs``, ``pidxs``)."""
    q, j = pair_indices(p, all_passing, splits=("train",))
    used = np.unique(np.concatenate([q, j]))
    row = {int(i): k for k, i in enumerate(used)}
    return {
        "cids": [cid_of(p["names"][i]) for i in used],
        "qidxs": [row[int(i)] for i in q],
        "pidxs": [row[int(i)] for i in j],
    }


def _cirtorch_images(p: dict) -> np.ndarray:
    """The images of the splits (those ``cids.tsv`` lists and whose photos are placed)."""
    return np.concatenate([s["images"] for s in p["splits"].values()] or [np.zeros(0, np.int64)]).astype(np.int64)


def check_cirtorch_names(p: dict, pairs) -> None:
    """``cids.tsv`` holds one ``cid<TAB>name`` line per image: a name holding a tab, a
    line break or a control character is refused, in one line naming the pair file."""
    check_line_names(p["names"], _cirtorch_images(p), pairs, TSV, "cids.tsv (cid<TAB>name, one image a line)")


def _place_photos(p: dict, images_root: Path, ims: Path, copy: bool) -> int:
    used = np.unique(_cirtorch_images(p))
    for i in used:
        place_photo(images_root / p["names"][i], cid2filename(cid_of(p["names"][i]), ims), copy)
    return len(used)


def export_cirtorch(
    p: dict, images_root: Path, db_root: Path, provenance: dict, copy: bool = False, all_passing: bool = False
) -> dict:
    """The database, the whitening file, ``cids.tsv`` and the photos, into ``db_root``."""
    db_root.mkdir(parents=True)
    db = {split: _cirtorch_split(p, split) for split in ("train", "val")}
    whitening = cirtorch_whitening(p, all_passing)
    linked = _place_photos(p, images_root, db_root / "ims", copy)
    for name, data in ((f"{CIRTORCH_NAME}.pkl", db), (f"{CIRTORCH_NAME}-whiten.pkl", whitening)):
        with open(db_root / name, "wb") as fh:  # extra keys are ignored by its readers
            pickle.dump({**data, "provenance": provenance}, fh)
    with open(db_root / "cids.tsv", "w", encoding="utf-8") as fh:  # cid -> our image name
        for split in ("train", "val"):
            s = p["splits"].get(split)
            for i in s["images"] if s is not None else []:
                fh.write(f"{cid_of(p['names'][i])}\t{p['names'][i]}\n")
    _write_json(db_root / "export.json", provenance)
    return {
        "database": str(db_root / f"{CIRTORCH_NAME}.pkl"),
        "images": linked,
        "whitening_pairs": len(whitening["qidxs"]),
    }


CSV_COLUMNS = [
    "split",
    "query",
    "candidate",
    "query_cluster",
    "slot",
    "is_positive",
    "passes",
    "co_observed",
    "inlier_ratio",
    "scale_change",
    "distance",
]


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
                    w.writerow(
                        [
                            split,
                            p["names"][q],
                            p["names"][j],
                            p["cluster_names"][p["cluster"][q]],
                            slot,
                            int(j == s["positive"][r]),
                            int(s["pool_passes"][r, slot]),
                            int(s["pool_co_observed"][r, slot]),
                            repr(float(s["pool_inlier_ratio"][r, slot])),
                            repr(float(s["pool_scale_change"][r, slot])),
                            repr(float(s["pool_distance"][r, slot])),
                        ]
                    )
                    rows += 1
    return {"rows": rows}


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def _model_names(p: dict, pairs, store) -> dict:
    """The SfM store's model and COLMAP names of the pair file's images (``store``, or
    the store the pair file was mined from), checked to be the same images."""
    from sfmpairs.sfm_io.store import read_store

    path = Path(store or p["source_store"] or "")
    if not path.is_file():
        raise SfmpairsError(f"{pairs}: its SfM store {path} is not found; give it (--store)")
    s = read_store(
        path,
        observations=False,
        keys=["images/name", "images/colmap_name", "images/model", "models/name", "models/path", "models/images_dir"],
    )
    if "images/colmap_name" not in s:
        raise SfmpairsError(f"{path}: the store lacks images/colmap_name; ingest the models again")
    if len(s["images/name"]) != len(p["names"]) or np.any(s["images/name"] != p["names"]):
        raise SfmpairsError(f"{path}: its images are not those of {pairs}; give the store it was mined from")
    check_relative_names(s["images/colmap_name"], path, "COLMAP image name")
    s["path"] = path
    return s


def _export_folder(p: dict, pairs, output: Path, fmt: str, options: dict, provenance: dict) -> dict:
    overwrite = options["overwrite"]
    if fmt == "cirtorch":
        check_cirtorch_names(p, pairs)  # before any output
        check_cirtorch_clusters(p, pairs, options["neg_num"], options["strict"])
        root = Path(options["images_root"] or p["images_root"] or ".")
        target = output / "train" / CIRTORCH_NAME
        with atomic_folder(target, overwrite, output, inputs=[pairs, root]) as tmp:  # built beside the target
            result = export_cirtorch(p, root, tmp, provenance, options["copy"], options["all_passing"])
        result["database"] = str(target / f"{CIRTORCH_NAME}.pkl")
        return result
    store = _model_names(p, pairs, options["store"])
    if fmt == "megadepth":
        from .export_megadepth import export_megadepth

        root = Path(options["images_root"] or p["images_root"] or ".")
        with atomic_folder(output, overwrite, output.parent, inputs=[pairs, root, store["path"]]) as tmp:
            result = export_megadepth(p, Path(store["path"]), root, tmp, options["conf"], provenance, output)
            _write_json(tmp / "export.json", {**provenance, "scenes": result.pop("manifest")})
        return result
    with atomic_folder(output, overwrite, output.parent, inputs=[pairs, store["path"]]) as tmp:
        tmp.mkdir()
        result = write_per_model(p, tmp, store, options["all_passing"])
        _write_json(tmp / "export.json", provenance)
    return result


def _check_export_options(fmt: str, conf: ExportConf, image_dir) -> None:
    conf.check()
    if fmt not in FORMATS:
        raise SfmpairsError(f"unknown format {fmt!r} (choose {', '.join(FORMATS)})")
    if (conf.per_model or image_dir is not None) and fmt != "hloc":
        raise SfmpairsError("--per-model and --image-dir are options of the hloc export")
    if conf.per_model and image_dir is not None:
        raise SfmpairsError("--per-model writes names as each model has them; it takes no --image-dir")


def export(
    pairs: str | Path,
    output: str | Path,
    fmt: str,
    *,
    images_root: str | Path | None = None,
    image_dir: str | Path | None = None,
    store: str | Path | None = None,
    overwrite: bool = False,
    **settings,
) -> dict:
    """Export a pair file as ``fmt``: cirtorch into a data folder; hloc into a file
    (``per_model``: a folder of one pairs file per model, names as the COLMAP models
    have them, read from ``store``; ``image_dir``: names relative to that folder); csv
    into a file; megadepth into a folder, one scene per model of ``store`` (default:
    the store the pair file was mined from). ``settings``: those of :class:`~.options.ExportConf` (``neg_num``,
    ``strict``: cirtorch's ``--neg-num`` to check the splits' clusters against, and
    whether too few is an error rather than a warning)."""
    conf = make_conf(ExportConf, **settings)
    _check_export_options(fmt, conf, image_dir)
    paths = {"images_root": images_root, "image_dir": image_dir, "store": store}
    options = {**paths, "overwrite": overwrite, **conf_dict(conf)}
    p = read_pair_file(pairs)
    check_relative_names(p["names"], pairs)  # they become paths: photos, links, hloc's image names
    output = Path(output)
    provenance = provenance_attrs(
        EXPORT_SCHEMA, EXPORT_SCHEMA_VERSION, {"format": fmt, **options}, {"pairs": str(Path(pairs).resolve())}
    )
    provenance.update({k: json.loads(provenance[k]) for k in ("parameters", "inputs")})
    if fmt in ("cirtorch", "megadepth") or conf.per_model:
        return _export_folder(p, pairs, output, fmt, {**options, "conf": conf}, provenance)
    side = output.with_name(output.name + ".provenance.json")
    check_output_path(output, overwrite)  # both before the work
    check_output_path(side, overwrite)
    with atomic_output(output, overwrite) as tmp:
        if fmt == "hloc":
            names = p["names"] if image_dir is None else names_under(p, images_root or p["images_root"], image_dir)
            result = write_pairs(p, tmp, names, conf.all_passing, pairs)
        else:
            result = export_csv(p, tmp)
    with atomic_output(side, overwrite) as tmp:  # once the output is this run's, not a run that won a race
        _write_json(tmp, provenance)
    return result
