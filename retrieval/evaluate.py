"""``sfmpairs evaluate``: does fine-tuning help? mAP and mean precision at k.

Two protocols:

- a pair file's ``val`` split: every val query against every val image; an image is
  *positive* when it shares at least ``min_covisible`` 3D points with the query (or,
  with ``positives="relaxed"``, when it passes the relaxed filter in the query's
  pool), *junk* (ignored) when it is in the query's cluster but not positive (and the
  query itself), *negative* otherwise;
- the revisited Oxford and Paris ground truth (``gnd_*.pkl``: ``imlist``, ``qimlist``,
  ``gnd`` with ``easy``, ``hard``, ``junk``, ``bbx``), queries cropped to their box,
  Easy, Medium and Hard exactly as the revisited protocol defines them (Radenovic et
  al., CVPR 2018).

AP follows that protocol: junk images are removed from the ranking, and precision is
interpolated between the ranks before and at each positive.
"""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import numpy as np

from sfmpairs.common import SfmpairsError, atomic_output, check_output_path, now_iso
from sfmpairs.config import conf_dict, make_conf

from .options import EvaluateConf

logger = logging.getLogger("sfmpairs.evaluate")

KAPPAS = (1, 5, 10)


def average_precision(positive_ranks: np.ndarray, num_positives: int) -> float:
    """AP from the 0-based ranks of the positives (junk already removed), sorted."""
    ap = 0.0
    step = 1.0 / num_positives
    for j, rank in enumerate(positive_ranks):
        precision_before = 1.0 if rank == 0 else j / rank
        precision_at = (j + 1) / (rank + 1)
        ap += (precision_before + precision_at) * step / 2
    return ap


def mean_average_precision(ranks: np.ndarray, positives: list, junk: list, kappas=KAPPAS):
    """mAP, per-query AP, mP@k and per-query P@k.

    ``ranks`` (Q, N): database indices of each query, most similar first.
    ``positives[i]``, ``junk[i]``: database indices. Queries without positives are
    left out of the means (their AP is NaN).
    """
    Q = len(ranks)
    aps = np.full(Q, np.nan)
    prs = np.full((Q, len(kappas)), np.nan)
    for i in range(Q):
        ok = np.asarray(positives[i], np.int64)
        if len(ok) == 0:
            continue
        pos = np.flatnonzero(np.isin(ranks[i], ok))
        jk = np.flatnonzero(np.isin(ranks[i], np.asarray(junk[i], np.int64)))
        pos = pos - np.searchsorted(jk, pos)  # ranks once the junk is removed
        aps[i] = average_precision(pos, len(ok))
        pos1 = pos + 1
        for j, k in enumerate(kappas):
            kq = min(pos1.max(), k)
            prs[i, j] = (pos1 <= kq).sum() / kq
    valid = ~np.isnan(aps)
    mean_ap = float(aps[valid].mean()) if valid.any() else float("nan")
    mean_pr = prs[valid].mean(axis=0) if valid.any() else np.full(len(kappas), np.nan)
    return mean_ap, aps, mean_pr, prs


def alpha_query_expansion(query: np.ndarray, database: np.ndarray, n: int, alpha: float):
    """αQE: each query becomes the normalised sum of itself and its n nearest database
    vectors weighted by similarity^alpha."""
    if n <= 0:
        return query
    sim = query @ database.T
    top = np.argsort(-sim, axis=1)[:, :n]
    w = np.clip(np.take_along_axis(sim, top, 1), 0, None) ** alpha
    q = query + np.einsum("qn,qnd->qd", w, database[top])
    return q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)


def rank(query: np.ndarray, database: np.ndarray) -> np.ndarray:
    """Database indices by decreasing inner product, per query (stable on ties)."""
    return np.argsort(-(query @ database.T), axis=1, kind="stable")


def val_ground_truth(
    pairs: str | Path,
    min_covisible: int = 1,
    positives: str = "covisible",
    store: str | Path | None = None,
    contents: dict | None = None,
):
    """(names, queries, database, positives, junk) of a pair file's val split.

    The database is every val image. ``covisible``: a positive shares at least
    ``min_covisible`` 3D points with the query (the pair file's ``val/gt_*``, written by
    ``mine``); ``relaxed``: it passes the relaxed filter in the query's pool. Junk: the
    other images of the query's cluster, and the query itself. Pair files of schema
    version 1 lack ``val/gt_*``: for them give the SfM store they were mined from.
    ``contents``: the pair file already read (:func:`~sfmpairs.mining.pairfile.read_pair_file`).
    """
    from sfmpairs.mining.pairfile import read_pair_file

    p = read_pair_file(pairs) if contents is None else contents
    names, cluster, val = p["names"], p["cluster"], p["splits"].get("val")
    if val is None or len(val["query"]) == 0:
        raise SfmpairsError(f"{pairs}: the val split has no queries (mine with --val-fraction or --val-clusters)")
    queries, database = val["query"].astype(np.int64), val["images"].astype(np.int64)
    if len(np.unique(cluster[database])) < 2:
        raise SfmpairsError(
            f"{pairs}: the val split has one cluster, so every val image is a positive or junk "
            f"of each val query and mAP is 100 whatever the descriptors; mine with two or more "
            f"val clusters (--val-clusters A,B)"
        )
    if positives == "covisible":
        if "gt_indptr" in val:  # with gt_image and gt_co_observed (check_pairs)
            indptr, image, count = val["gt_indptr"], val["gt_image"], val["gt_co_observed"]
            ok = [image[a:b][count[a:b] >= min_covisible] for a, b in zip(indptr[:-1], indptr[1:])]
        else:
            ok = _covisible_from_store(pairs, store, names, queries, min_covisible)
        pos_lists = [np.searchsorted(database, o).astype(np.int64) for o in ok]  # database is sorted
    elif positives == "relaxed":
        pos_lists = [
            np.searchsorted(database, pool[passes]).astype(np.int64)
            for pool, passes in zip(val["pool"], val["pool_passes"])
        ]
    else:
        raise SfmpairsError(f"unknown positives {positives!r} (covisible or relaxed)")
    junk_lists = [
        np.setdiff1d(np.flatnonzero(cluster[database] == cluster[q]), pos)  # the query too
        for q, pos in zip(queries, pos_lists)
    ]
    return names, queries, database, pos_lists, junk_lists


def _covisible_from_store(pairs, store, names, queries, min_covisible: int) -> list:
    """Images sharing points with each query, from the SfM store (pair files of schema
    version 1, which lack val/gt_*)."""
    from sfmpairs.mining.mine import co_observing_images
    from sfmpairs.sfm_io.store import read_store

    if not store:
        raise SfmpairsError(
            f"{pairs}: an older pair file without val ground truth; mine it again "
            f"with this sfmpairs, or give --store with the SfM store it was mined from"
        )
    s = read_store(store, keys=["observations/indptr", "observations/point", "images/name", "images/cluster"])
    if len(s["images/name"]) != len(names) or np.any(s["images/name"] != names):
        raise SfmpairsError(f"{store}: not the store the pair file was mined from")
    gt = co_observing_images(queries, s["observations/indptr"], s["observations/point"], s["images/cluster"])
    a, b = gt["gt_indptr"][:-1], gt["gt_indptr"][1:]
    return [gt["gt_image"][i:j][gt["gt_co_observed"][i:j] >= min_covisible] for i, j in zip(a, b)]


# What the revisited Oxford and Paris ground-truth pickles hold (dicts, lists, strings,
# numbers and numpy arrays, from numpy 1 or 2, pickled by Python 2 or 3): the only
# globals their unpickling may name. Anything else (os.system, eval, a class whose
# __reduce__ runs code) is refused before it is called.
_GND_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),  # arrays pickled with protocol 5
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),  # bytes pickled with protocol 2 by Python 3
}
_GND_GLOBALS |= {(m, n) for m in ("builtins", "__builtin__") for n in ("set", "frozenset", "bytes", "bytearray")}


class _GroundTruthUnpickler(pickle.Unpickler):
    """An unpickler that builds only containers, scalars and numpy arrays."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _GND_GLOBALS:
            raise pickle.UnpicklingError(f"refuses to load {(module + '.' + name)[:80]!r}")
        return super().find_class(module, name)


def _check_gnd(path: Path, cfg) -> None:
    """The ground truth's shape: imlist and qimlist lists of names, one gnd entry (a dict
    with easy, hard and junk indices into imlist, and bbx if given) per query."""
    if not isinstance(cfg, dict) or not {"imlist", "qimlist", "gnd"} <= set(cfg):
        raise SfmpairsError(f"{path}: ground truth needs imlist, qimlist and gnd")
    for key in ("imlist", "qimlist"):
        if not isinstance(cfg[key], (list, tuple)) or not all(isinstance(n, str) for n in cfg[key]):
            raise SfmpairsError(f"{path}: {key} must be a list of image names")
    gnd = cfg["gnd"]
    if not isinstance(gnd, (list, tuple)) or len(gnd) != len(cfg["qimlist"]):
        raise SfmpairsError(f"{path}: gnd must be a list with one entry per query of qimlist")
    for k, g in enumerate(gnd):
        if not isinstance(g, dict) or not {"easy", "hard", "junk"} <= set(g):
            raise SfmpairsError(f"{path}: gnd entry {k} needs easy, hard and junk")
        for key in ("easy", "hard", "junk"):
            try:
                idx = np.asarray(g[key], np.float64).reshape(-1)
            except (TypeError, ValueError):
                idx = np.array([np.nan])
            if not np.all((idx == np.round(idx)) & (idx >= 0) & (idx < len(cfg["imlist"]))):
                raise SfmpairsError(f"{path}: gnd entry {k}: {key} must be indices into imlist")
        if "bbx" in g and g["bbx"] is not None:
            try:
                box = np.asarray(g["bbx"], np.float64)
            except (TypeError, ValueError):
                box = np.zeros(0)
            if box.shape != (4,) or not np.all(np.isfinite(box)):
                raise SfmpairsError(f"{path}: gnd entry {k}: bbx must be 4 numbers (x1, y1, x2, y2)")


def load_gnd(path: str | Path) -> dict:
    """Revisited Oxford/Paris ground truth (``gnd_roxford5k.pkl``...), unpickled with
    :class:`_GroundTruthUnpickler`: a file that names anything but containers, numbers,
    strings and numpy arrays is refused, and nothing in it runs."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            cfg = _GroundTruthUnpickler(fh, encoding="latin1").load()
    except FileNotFoundError:
        raise SfmpairsError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise SfmpairsError(f"{path}: is a directory, not a ground-truth pickle") from None
    except pickle.UnpicklingError as e:
        raise SfmpairsError(f"{path}: not a ground-truth pickle ({e})") from None
    except Exception as e:  # noqa: BLE001 - any malformed pickle: one line
        raise SfmpairsError(f"{path}: not a ground-truth pickle ({type(e).__name__})") from None
    _check_gnd(path, cfg)
    return cfg


def revisited_protocols(gnd: list) -> dict:
    """Positives and junk of the revisited protocol's Easy, Medium and Hard setups."""
    out = {}
    for name, ok_keys, junk_keys in (
        ("easy", ["easy"], ["junk", "hard"]),
        ("medium", ["easy", "hard"], ["junk"]),
        ("hard", ["hard"], ["junk", "easy"]),
    ):
        out[name] = (
            [np.concatenate([np.asarray(g[k], np.int64) for k in ok_keys]) for g in gnd],
            [np.concatenate([np.asarray(g[k], np.int64) for k in junk_keys]) for g in gnd],
        )
    return out


def _table(rows: list[tuple[str, float, np.ndarray, int]], kappas) -> str:
    """The printed result: one row per setup, with the number of queries it averages."""
    head = f"{'':<10} {'queries':>7} {'mAP':>7} " + " ".join(f"{'mP@' + str(k):>7}" for k in kappas)
    lines = [head]
    for name, m, pr, n in rows:
        lines.append(f"{name:<10} {n:>7d} {100 * m:>7.2f} " + " ".join(f"{100 * v:>7.2f}" for v in pr))
    return "\n".join(lines)


FEW_QUERIES = 20  # below this many val queries, say that the mAP is noisy


TOP_K = 10  # the top of each val query's ranking the report keeps (and pictures show)


def _check_sources(pairs, gnd, descriptors, model, arch, pool, pretrained, conf: EvaluateConf) -> None:
    if (pairs is None) == (gnd is None):
        raise SfmpairsError("give one of --pairs or --gnd")
    if (descriptors is None) == (model is None and arch is None):
        raise SfmpairsError("give one of --descriptors, --model or --arch")
    if descriptors is not None and (pool is not None or pretrained not in (None, False)):
        raise SfmpairsError("--pool and --pretrained go with --arch, not with --descriptors")
    if conf.min_covisible < 1:
        raise SfmpairsError("--min-covisible must be at least 1")


def describer(descriptors, net, device, conf: EvaluateConf, whitening):
    """``describe(names, root, boxes=None)``: the descriptors of images, read from the
    descriptor file or extracted now with ``net``, whitened with the whitening file."""
    from .extract import apply_whitening, extract_descriptors
    from .whiten import read_whitening

    wh = read_whitening(whitening) if whitening is not None else None

    def describe(names, root, boxes=None):
        if descriptors is not None:
            from sfmpairs.retrieval.descriptors import read_descriptors

            d = read_descriptors(descriptors, np.asarray(names, dtype=object))
        else:
            if root is None:
                raise SfmpairsError("extracting needs --images-root (or a pair file that records one)")
            d, _ = extract_descriptors(
                net,
                root,
                list(names),
                image_size=conf.image_size,
                scales=conf.scales,
                device=device,
                precision=conf.precision,
                batch_size=conf.batch_size,
                workers=conf.workers,
                boxes=boxes,
            )
        if wh is not None:
            if wh["mean"].shape[-1] != d.shape[1]:
                raise SfmpairsError(
                    f"{whitening}: whitening of {wh['mean'].shape[-1]}-d descriptors, these are {d.shape[1]}-d"
                )
            d = apply_whitening(d, wh)
        return d

    return describe


def top_results(
    ranks: np.ndarray, positives: list, junk: list, own: np.ndarray, k: int = TOP_K
) -> list[list[tuple[int, str]]]:
    """Each query's first ``k`` database indices, the query itself (``own[i]``, its
    index in the database, -1 if absent) left out, with their ground truth: "positive",
    "junk" or "negative"."""
    out = []
    for row, pos, jk, me in zip(ranks[:, : k + 1], positives, junk, own):
        pos, jk = set(np.asarray(pos).tolist()), set(np.asarray(jk).tolist())
        out.append(
            [(int(i), "positive" if i in pos else "junk" if i in jk else "negative") for i in row if i != me][:k]
        )
    return out


def check_val_queries(pairs, counted: int, min_covisible: int) -> int:
    """The number of val queries with a positive: none is an error (mAP would be
    undefined), fewer than :data:`FEW_QUERIES` a warning (it would be noisy)."""
    if counted == 0:
        raise SfmpairsError(
            f"{pairs}: no val query has a positive (an image sharing at least "
            f"{min_covisible} 3D points with it); lower --min-covisible"
        )
    if counted < FEW_QUERIES:
        logger.warning("the val split has %d queries with positives: its mAP is noisy", counted)
    return counted


def evaluate_val(pairs, store, images_root, describe, conf: EvaluateConf, extracting: bool):
    """The pair file's val split: the table's row and the report's entries (with each
    query's AP and top :data:`TOP_K` results)."""
    from sfmpairs.mining.pairfile import read_pair_file

    contents = read_pair_file(pairs)
    names, queries, database, pos, junk = val_ground_truth(pairs, conf.min_covisible, conf.positives, store, contents)
    root = images_root
    if root is None and extracting:  # the photos the pair file records
        root = contents["images_root"] or None
    logger.debug(
        "val: %d queries, %d database images, %.1f positives and %.1f junk per query",
        len(queries),
        len(database),
        np.mean([len(x) for x in pos]),
        np.mean([len(x) for x in junk]),
    )
    used = np.unique(np.concatenate([queries, database]))
    desc = describe(names[used], root)
    qd = desc[np.searchsorted(used, queries)]  # used is sorted
    dd = desc[np.searchsorted(used, database)]
    qd = alpha_query_expansion(qd, dd, conf.qe, conf.qe_alpha)
    ranks = rank(qd, dd)
    m, aps, mpr, _ = mean_average_precision(ranks, pos, junk)
    counted = check_val_queries(pairs, int(np.isfinite(aps).sum()), conf.min_covisible)
    own = np.searchsorted(database, queries)  # the database is sorted and holds the val queries
    top = top_results(ranks, pos, junk, np.where(database[np.minimum(own, len(database) - 1)] == queries, own, -1))
    report = {
        "protocol": "pairs-val",
        "pairs": str(pairs),
        "positives": conf.positives,
        "min_covisible": conf.min_covisible,
        "queries": len(queries),
        "queries_with_positives": counted,
        "database": len(database),
        "mAP": m,
        "mP@k": mpr.tolist(),
        "images_root": str(images_root or contents["images_root"] or ""),
        "per_query_ap": {names[q]: (None if np.isnan(a) else a) for q, a in zip(queries, aps)},
        "per_query_top": {names[q]: [[names[database[i]], label] for i, label in t] for q, t in zip(queries, top)},
    }
    return [("val", m, mpr, counted)], report


def evaluate_revisited(gnd, images_root, describe, descriptors, extracting: bool, conf: EvaluateConf):
    """The revisited Oxford and Paris protocol: the table's rows (Easy, Medium, Hard)
    and the report's entries."""
    cfg = load_gnd(gnd)

    def with_ext(n):
        return n if Path(n).suffix else n + ".jpg"

    db_names = [with_ext(n) for n in cfg["imlist"]]
    q_names = [with_ext(n) for n in cfg["qimlist"]]
    boxes = [g.get("bbx") for g in cfg["gnd"]]
    cropped = sum(b is not None for b in boxes)  # queries without a box are used whole
    if descriptors is not None and cropped:
        raise SfmpairsError(
            f"{gnd}: the revisited protocol crops each query to its box, which "
            f"precomputed --descriptors cannot do; give --model or --arch so that "
            f"evaluate extracts the cropped queries"
        )
    if extracting and images_root is None:
        raise SfmpairsError("--gnd with --model or --arch needs --images-root")
    dd = describe(db_names, images_root)
    qd = describe(q_names, images_root, boxes if cropped else None)
    if 0 < cropped < len(boxes):
        logger.warning(
            "%s: %d of %d queries have no box (bbx) and are used whole", gnd, len(boxes) - cropped, len(boxes)
        )
    ranks = rank(alpha_query_expansion(qd, dd, conf.qe, conf.qe_alpha), dd)
    report = {
        "protocol": "revisited",
        "gnd": str(gnd),
        "queries": len(q_names),
        "queries_cropped": cropped,
        "database": len(db_names),
    }
    rows = []
    for setup, (pos, junk) in revisited_protocols(cfg["gnd"]).items():
        m, aps, mpr, _ = mean_average_precision(ranks, pos, junk)
        rows.append((setup, m, mpr, int(np.isfinite(aps).sum())))
        report[setup] = {"mAP": m, "mP@k": mpr.tolist(), "queries": rows[-1][3]}
    return rows, report


def _report_head(descriptors, model, net, whitening, conf: EvaluateConf) -> dict:
    """What the report says of the inputs and settings."""
    network = None if net is None else {k: net.config.get(k) for k in ("arch", "pool", "whitening", "pretrained")}
    return {
        "created": now_iso(),
        "descriptors": str(descriptors) if descriptors else None,
        "model": str(model) if model else None,
        "network": network,
        "image_size": None if net is None else conf.image_size or net.config["image_size"],
        "whitening": str(whitening) if whitening else None,
        "settings": conf_dict(conf),
        "precision": conf.precision if net is not None else None,
        "qe": conf.qe,
        "qe_alpha": conf.qe_alpha,
        "kappas": list(KAPPAS),
    }


def evaluate(
    output: str | Path,
    *,
    pairs=None,
    gnd=None,
    descriptors=None,
    model=None,
    arch: str | None = None,
    pool: str | None = None,
    pretrained=None,
    whitening=None,
    store=None,
    images_root=None,
    picture=None,
    overwrite: bool = False,
    **options,
) -> dict:
    """Evaluate descriptors on a pair file's val split (``pairs``) or on revisited
    ground truth (``gnd``); print a table and write a JSON report.

    The descriptors come from a descriptor file (``descriptors``), or are extracted now
    with a checkpoint (``model``) or an off-the-shelf network (``arch``, ``pool``,
    ``pretrained``: True for torchvision's ImageNet weights or a local weights file), at
    ``image_size`` (default: the network's test size). ``whitening``: a whitening file
    (``sfmpairs whiten``) applied to the descriptors. ``picture``: a PNG of a few val
    queries and their top results, framed by ground truth. ``options``: the settings of
    :class:`~.options.EvaluateConf`.
    """
    from sfmpairs.plot import check_png

    conf = make_conf(EvaluateConf, **options)
    conf.check()
    check_output_path(output, overwrite)  # before the work, not after it
    if picture is not None:
        if gnd is not None:
            raise SfmpairsError("--picture shows a pair file's val queries; not with --gnd")
        check_output_path(check_png(picture), overwrite)
    _check_sources(pairs, gnd, descriptors, model, arch, pool, pretrained, conf)
    net = dev = None
    if descriptors is None:
        from .extract import resolve_device
        from .network import open_network

        dev = resolve_device(conf.device)
        net = open_network(model, arch=arch, pool=pool, pretrained=pretrained, device=dev)
    describe = describer(descriptors, net, dev, conf, whitening)
    report = _report_head(descriptors, model, net, whitening, conf)
    if pairs is not None:
        rows, found = evaluate_val(pairs, store, images_root, describe, conf, extracting=net is not None)
    else:
        rows, found = evaluate_revisited(gnd, images_root, describe, descriptors, net is not None, conf)
    report.update(found)
    print(_table(rows, KAPPAS))
    _write_outputs(
        report, output, picture, Path(model or descriptors or f"{arch} (off the shelf)").name, images_root, overwrite
    )
    return report


def _write_outputs(report: dict, output, picture, title: str, images_root, overwrite: bool) -> None:
    """The report, and the picture if asked: both or neither. The picture is drawn and
    published while the report is still a temporary file, which is published last; a
    failure of either (a full disk, an output written meanwhile) leaves neither."""
    from sfmpairs.plot import retrieval_figure, retrieval_rows

    drawn = None
    try:
        with atomic_output(output, overwrite) as tmp:
            Path(tmp).write_text(json.dumps(report, indent=2, default=float))
            if picture is not None:
                drawn = retrieval_figure(retrieval_rows({title: report}, images_root), picture, overwrite=overwrite)
    except BaseException:
        if drawn is not None:  # the report was not published: nor is the picture
            drawn.unlink(missing_ok=True)
        raise
    if drawn is not None:
        logger.info("wrote %s: top results of a few val queries", picture)
