"""Mining speed: against pycolmap loading the same model, and hard-negative mining
against the bare matrix product of the same shapes, each pair in one run.

1. On the synthetic 10,000-image model of ``bench_ingest.py`` (built once, cached):
   ``pycolmap.Reconstruction(path)`` and ``sfmpairs mine --strategy relaxed`` with
   k = 100 and every image a query, each in a fresh process (each its own peak memory,
   VmHWM). Target: mining <= 1 x load.
2. Hard negatives for 2,000 queries over a pool of 20,000 random 2048-d descriptors
   from 500 clusters, against the bare float32 product of the same shapes.
   Target: <= 1.2 x the bare product.

    python benchmarks/bench_mine.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_ingest import CHILD_PYCOLMAP, PEAK_MB, build_model, run_child  # noqa: E402

CHILD_MINE = (
    PEAK_MB
    + """
import json, sys, time
import h5py, numpy, scipy.spatial
from sfmpairs.mining.mine import mine
t, c = time.perf_counter(), time.process_time()
r = mine(sys.argv[1], sys.argv[2], overwrite=True, strategy="relaxed", pool_size=100,
         queries_per_cluster=0)
dt, cpu = time.perf_counter() - t, time.process_time() - c
print(json.dumps({"seconds": dt, "cpu_seconds": cpu, "maxrss_mb": peak_mb(),
                  "queries": r["train_queries"] + r["val_queries"]}))
"""
)


def bench_negatives(repeats: int) -> None:
    import numpy as np

    from sfmpairs.mining.negatives import hard_negatives

    rng = np.random.default_rng(0)
    Q, P, D, C = 2000, 20000, 2048, 500
    q = rng.normal(size=(Q, D)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    p = rng.normal(size=(P, D)).astype(np.float32)
    p /= np.linalg.norm(p, axis=1, keepdims=True)
    qc, pc = rng.integers(0, C, Q), rng.integers(0, C, P)
    bare, ours, bare_cpu, ours_cpu = [], [], [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        _ = q @ p.T
        bare.append(time.perf_counter() - t)
        bare_cpu.append(time.process_time() - c)
        del _
        t, c = time.perf_counter(), time.process_time()
        hard_negatives(q, qc, p, pc, 5)
        ours.append(time.perf_counter() - t)
        ours_cpu.append(time.process_time() - c)
    b, o = statistics.median(bare), statistics.median(ours)
    bc, oc = statistics.median(bare_cpu), statistics.median(ours_cpu)
    print(f"hard negatives, {Q} queries x {P} pool x {D}-d, {C} clusters (load average {os.getloadavg()[0]:.1f}):")
    print(
        f"  bare float32 product: median {b:.3f} s ({bc:.3f} CPU s); hard_negatives: median {o:.3f} s ({oc:.3f} CPU s)"
    )
    print(f"  ratio hard_negatives / product: {o / b:.2f}, CPU seconds {oc / bc:.2f}  (target <= 1.20)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=Path(__file__).parent / ".cache")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    folder = args.cache / "synthetic-10000-1000000-10"
    if not (folder / "points3D.bin").exists():
        build_model(folder, 10_000, 1_000_000, 10)
    loads, mines = [], []
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "sfm.h5"
        subprocess.run(
            [sys.executable, "-m", "sfmpairs.cli", "-q", "ingest", str(folder), "-o", str(store)], check=True
        )
        for r in range(args.repeats):
            loads.append(run_child(CHILD_PYCOLMAP, str(folder)))
            mines.append(run_child(CHILD_MINE, str(store), str(Path(tmp) / "pairs.h5")))
            print(
                f"  run {r + 1}: pycolmap load {loads[-1]['seconds']:.2f} s, "
                f"mine {mines[-1]['seconds']:.2f} s ({mines[-1]['queries']} queries)",
                flush=True,
            )
    t_load = statistics.median(x["seconds"] for x in loads)
    t_mine = statistics.median(x["seconds"] for x in mines)
    c_load = statistics.median(x["cpu_seconds"] for x in loads)
    c_mine = statistics.median(x["cpu_seconds"] for x in mines)
    load = statistics.median(x["load"] for x in loads + mines)
    print(
        f"pycolmap.Reconstruction(path): median {t_load:.2f} s ({c_load:.2f} CPU s), "
        f"peak memory {max(x['maxrss_mb'] for x in loads):.0f} MB"
    )
    print(
        f"sfmpairs mine --strategy relaxed, k = 100, every image a query: median {t_mine:.2f} s "
        f"({c_mine:.2f} CPU s), peak memory {max(x['maxrss_mb'] for x in mines):.0f} MB"
    )
    print(f"ratio mine / load: {t_mine / t_load:.2f}  (target <= 1.00), load average {load:.1f}")
    bench_negatives(args.repeats)


if __name__ == "__main__":
    main()
