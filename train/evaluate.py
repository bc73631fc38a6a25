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

from ..common import SfmpairsError, atomic_output, now_iso

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


def val_ground_truth(pairs: str | Path, store: str | Path | None, min_covisible: int,
                     positives: str = "covisible"):
    """Queries, database, positives and junk of a pair file's val split."""
    from scipy import sparse

    from ..mining.pairfile import read_pair_file

    p = read_pair_file(pairs)
    names, cluster, val = p["names"], p["cluster"], p["splits"].get("val")
    if val is None or len(val["query"]) == 0:
        raise SfmpairsError(f"{pairs}: the val split has no queries")
    queries, database, pool, passes = val["query"], val["images"], val["pool"], val["pool_passes"]
    store = store or p["source_store"]
    where = {int(img): k for k, img in enumerate(database)}
    pos_lists, junk_lists = [], []
    if positives == "covisible":
        from ..sfm_io.store import read_store

        if not store or not Path(store).is_file():
            raise SfmpairsError(f"{pairs}: its SfM store {store} is missing; give --store")
        s = read_store(store, keys=["observations/indptr", "observations/point", "images/name"])
        if len(s["images/name"]) != len(names) or np.any(s["images/name"] != names):
            raise SfmpairsError(f"{store}: not the store the pair file was mined from")
        indptr, point = s["observations/indptr"], s["observations/point"]
        A = sparse.csr_matrix((np.ones(len(point), np.int32), point, indptr),
                              shape=(len(indptr) - 1, int(point.max()) + 1 if len(point) else 0))
        shared = (A[queries] @ A[database].T).toarray()  # (Q, M) co-observed points
        for i, q in enumerate(queries):
            ok = np.flatnonzero(shared[i] >= min_covisible)
            ok = ok[database[ok] != q]
            pos_lists.append(ok)
    elif positives == "relaxed":
        for i, q in enumerate(queries):
            pos_lists.append(np.array([where[int(j)] for j in pool[i][passes[i]]], np.int64))
    else:
        raise SfmpairsError(f"unknown positives {positives!r} (covisible or relaxed)")
    for i, q in enumerate(queries):
        same = np.flatnonzero(cluster[database] == cluster[q])
        junk_lists.append(np.setdiff1d(same, pos_lists[i]))  # includes the query itself
    return names, queries, database, pos_lists, junk_lists


def load_gnd(path: str | Path) -> dict:
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            cfg = pickle.load(fh)
    except FileNotFoundError:
        raise SfmpairsError(f"{path}: no such file") from None
    except Exception as e:
        raise SfmpairsError(f"{path}: not a ground-truth pickle ({type(e).__name__})") from None
    if not isinstance(cfg, dict) or not {"imlist", "qimlist", "gnd"} <= set(cfg):
        raise SfmpairsError(f"{path}: ground truth needs imlist, qimlist and gnd")
    for k, g in enumerate(cfg["gnd"]):
        if not {"easy", "hard", "junk"} <= set(g):
            raise SfmpairsError(f"{path}: gnd entry {k} needs easy, hard and junk")
    return cfg


def revisited_protocols(gnd: list) -> dict:
    """Positives and junk of the revisited protocol's Easy, Medium and Hard setups."""
    out = {}
    for name, ok_keys, junk_keys in (("easy", ["easy"], ["junk", "hard"]),
                                     ("medium", ["easy", "hard"], ["junk"]),
                                     ("hard", ["hard"], ["junk", "easy"])):
        out[name] = ([np.concatenate([np.asarray(g[k], np.int64) for k in ok_keys]) for g in gnd],
                     [np.concatenate([np.asarray(g[k], np.int64) for k in junk_keys]) for g in gnd])
    return out


def _table(rows: list[tuple[str, float, np.ndarray]], kappas) -> str:
    head = f"{'':<10} {'mAP':>7} " + " ".join(f"{'mP@' + str(k):>7}" for k in kappas)
    lines = [head]
    for name, m, pr in rows:
        lines.append(f"{name:<10} {100 * m:>7.2f} " + " ".join(f"{100 * v:>7.2f}" for v in pr))
    return "\n".join(lines)


def evaluate(output: str | Path, *, pairs=None, gnd=None, descriptors=None, model=None,
             store=None, images_root=None, min_covisible: int = 1, positives: str = "covisible",
             qe: int = 0, qe_alpha: float = 3.0, image_size: int | None = None,
             scales=(1.0,), device: str = "auto", precision: str = "auto",
             workers: int | None = None, overwrite: bool = False) -> dict:
    """Evaluate descriptors (a file, or extracted now with ``model``) on a pair file's
    val split (``pairs``) or on revisited ground truth (``gnd``); write a JSON report."""
    if (pairs is None) == (gnd is None):
        raise SfmpairsError("give one of --pairs or --gnd")
    if (descriptors is None) == (model is None):
        raise SfmpairsError("give one of --descriptors or --model")
    if min_covisible < 1:
        raise SfmpairsError("--min-covisible must be at least 1")

    def describe(names, root, boxes=None):
        if descriptors is not None:
            from ..mining.pairfile import read_descriptors

            return read_descriptors(descriptors, np.asarray(names, dtype=object))
        from .extract import extract_descriptors, resolve_device
        from .network import load_checkpoint

        if root is None:
            raise SfmpairsError("--model needs --images-root (or a store with an images root)")
        dev = resolve_device(device)
        net, _ = load_checkpoint(model, dev)
        d, _ = extract_descriptors(net, root, list(names), image_size=image_size, scales=scales,
                                   device=dev, precision=precision, workers=workers, boxes=boxes)
        return d

    report = {"created": now_iso(), "descriptors": str(descriptors) if descriptors else None,
              "model": str(model) if model else None,
              "precision": precision if model else None, "qe": qe, "qe_alpha": qe_alpha, "kappas": list(KAPPAS)}
    rows = []
    if pairs is not None:
        names, queries, database, pos, junk = val_ground_truth(pairs, store, min_covisible, positives)
        root = images_root
        if root is None and model is not None:
            from ..mining.pairfile import read_pair_file

            root = read_pair_file(pairs)["images_root"] or None
        used = np.unique(np.concatenate([queries, database]))
        desc = describe(names[used], root)
        qd = desc[np.searchsorted(used, queries)]  # used is sorted
        dd = desc[np.searchsorted(used, database)]
        qd = alpha_query_expansion(qd, dd, qe, qe_alpha)
        m, aps, mpr, _ = mean_average_precision(rank(qd, dd), pos, junk)
        rows.append(("val", m, mpr))
        report.update({"protocol": "pairs-val", "pairs": str(pairs), "positives": positives,
                       "min_covisible": min_covisible, "queries": len(queries),
                       "database": len(database), "mAP": m, "mP@k": mpr.tolist(),
                       "per_query_ap": {names[q]: (None if np.isnan(a) else a) for q, a in zip(queries, aps)}})
    else:
        cfg = load_gnd(gnd)
        if model is not None and images_root is None:
            raise SfmpairsError("--gnd with --model needs --images-root")

        def with_ext(n):
            return n if Path(n).suffix else n + ".jpg"
        db_names = [with_ext(n) for n in cfg["imlist"]]
        q_names = [with_ext(n) for n in cfg["qimlist"]]
        boxes = [g.get("bbx") for g in cfg["gnd"]]
        if descriptors is not None:
            dd, qd = describe(db_names, None), describe(q_names, None)
        else:
            dd = describe(db_names, images_root)
            qd = describe(q_names, images_root, boxes if all(b is not None for b in boxes) else None)
        qd = alpha_query_expansion(qd, dd, qe, qe_alpha)
        ranks = rank(qd, dd)
        report.update({"protocol": "revisited", "gnd": str(gnd), "queries": len(q_names),
                       "database": len(db_names)})
        for setup, (pos, junk) in revisited_protocols(cfg["gnd"]).items():
            m, aps, mpr, _ = mean_average_precision(ranks, pos, junk)
            rows.append((setup, m, mpr))
            report[setup] = {"mAP": m, "mP@k": mpr.tolist()}
    table = _table(rows, KAPPAS)
    print(table)
    with atomic_output(output, overwrite) as tmp:
        Path(tmp).write_text(json.dumps(report, indent=2, default=float))
    return report
