"""Retrieval against exhaustive matching in ``sfmpairs reconstruct``, on the same photos.

A rendered world (``sfmpairs.synthetic.world.synth``, its default easy look) of
``--clusters`` places x ``--images-per-cluster`` photos, all reconstructed from the
world's folder at once by each matcher. For each: pairs matched and verified, models,
photos registered, models holding photos of more than one place (should be none),
places recovered (with a model of their own), seconds per stage and in all, and the
machine's load (other work on it slows every stage alike, so compare runs made together).

    python benchmarks/bench_reconstruct.py --clusters 10 --images-per-cluster 20
    python benchmarks/bench_reconstruct.py --clusters 40 --matchers retrieval --num-neighbours 10,20
    python benchmarks/bench_reconstruct.py --clusters 100 --matchers retrieval --descriptor network --workdir w
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def purity(models: Path) -> dict:
    """Models holding photos of more than one place, and places with a model."""
    import pycolmap

    mixed, places = 0, set()
    for folder in sorted((models / "sparse").iterdir()):
        rec = pycolmap.Reconstruction(str(folder))
        seen = {img.name.split("/")[0] for img in rec.images.values() if img.has_pose}
        mixed += len(seen) > 1
        places |= seen
    return {"mixed_models": mixed, "places_recovered": len(places)}


def retrieved_same_place(models: Path) -> float | None:
    """The fraction of retrieved pairs (pairs-retrieval.txt) whose photos are of one place."""
    path = models / "pairs-retrieval.txt"
    if not path.is_file():
        return None
    pairs = [line.split(" ") for line in path.read_text().splitlines()]
    return sum(a.split("/")[0] == b.split("/")[0] for a, b in pairs) / max(len(pairs), 1)


def run_matcher(world: Path, out: Path, matcher: str, k: int, args) -> dict:
    from sfmpairs.sfm_io.reconstruct import reconstruct

    options = {"matcher": matcher}
    if matcher == "retrieval":
        options.update(num_neighbours=k, checkpoint=args.checkpoint, expand=args.expand, descriptor=args.descriptor)
    before = load()
    t0 = time.perf_counter()
    r = reconstruct(world, out, overwrite=True, **options)
    wall = time.perf_counter() - t0
    return {
        "matcher": matcher if matcher != "retrieval" else f"{args.descriptor} k={k} x{args.expand}",
        "photos": r["photos"],
        "pairs_matched": r["pairs_matched"],
        "pairs_verified": r["pairs_verified"],
        "models": len(r["models"]),
        "registered": r["registered"],
        **purity(out),
        "retrieved_same_place": retrieved_same_place(out),
        "stages": r["stages"],
        "seconds": round(wall, 1),
        "load_before": before,
        "load_after": load(),
    }


def report(rows: list[dict], clusters: int) -> None:
    print(
        f"{'matcher':<11}{'photos':>7}{'pairs':>8}{'verified':>9}{'models':>7}{'registered':>11}"
        f"{'mixed':>6}{'places':>7}{'seconds':>9}  retrieved of one place; stages (s); load 1/5/15 min before -> after"
    )
    for r in rows:
        stages = ", ".join(f"{k} {v:.0f}" for k, v in r["stages"].items())
        print(
            f"{r['matcher']:<11}{r['photos']:>7}{r['pairs_matched']:>8}{r['pairs_verified']:>9}{r['models']:>7}"
            f"{r['registered']:>11}{r['mixed_models']:>6}{r['places_recovered']:>5}/{clusters:<2}{r['seconds']:>8.0f}"
            f"  {'-' if r['retrieved_same_place'] is None else format(r['retrieved_same_place'], '.0%')}; {stages};"
            f" load {r['load_before']} -> {r['load_after']}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clusters", type=int, default=10)
    parser.add_argument("--images-per-cluster", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--matchers", default="retrieval,exhaustive", help="comma-separated, run in this order")
    parser.add_argument("--num-neighbours", default="10", help="retrieval: comma-separated, one run each")
    parser.add_argument("--expand", type=int, default=1, help="retrieval: rounds of expansion (reconstruct --expand)")
    parser.add_argument(
        "--descriptor", default="auto", help="retrieval: bow, network or auto (reconstruct --descriptor)"
    )
    parser.add_argument("--checkpoint", default=None, help="sfmpairs checkpoint for retrieval (--descriptor network)")
    parser.add_argument("--workdir", default=None, help="keep the world and models here (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="write the rows here too")
    parser.add_argument("-v", "--verbose", action="store_true", help="the stages' log")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")

    from sfmpairs.synthetic.world import synth

    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench_reconstruct_"))
    try:
        t0 = time.perf_counter()
        world = root / "world"
        if not world.is_dir():
            synth(world, clusters=args.clusters, images_per_cluster=args.images_per_cluster, seed=args.seed)
        print(f"world: {args.clusters} x {args.images_per_cluster} photos in {time.perf_counter() - t0:.0f} s")
        rows = []
        runs = [
            (m, int(k))
            for m in args.matchers.split(",")
            for k in (args.num_neighbours.split(",") if m == "retrieval" else [0])
        ]
        for matcher, k in runs:
            rows.append(run_matcher(world, root / f"models_{matcher}_{k}", matcher, k, args))
            report(rows[-1:], args.clusters)
        print()
        report(rows, args.clusters)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
