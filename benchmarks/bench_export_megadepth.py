"""``export --format megadepth`` on one large synthetic model: time and peak memory.

The model is bench_corpus's (cameras on a ring looking at a ball of points, SIMPLE_PINHOLE
projections, about 590 observations per image at the corpus' density; ``--density``
multiplies the points), with an empty file as each photo. It is ingested and mined once
(kept under ``--root``); the export then runs ``--repeats`` times, each in a fresh
process, printing wall time, CPU time (user + sys, the whole child), the child's own
peak memory (VmHWM) and the machine's load average.

    python benchmarks/bench_export_megadepth.py --root /tmp/bench_md --images 8000 [--no-d2net-points]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

CHILD = """
import json, os, sys, time, shutil
from pathlib import Path
from sfmpairs.mining.export import export
root, d2net = Path(sys.argv[1]), sys.argv[2] == "1"
shutil.rmtree(root / "md", ignore_errors=True)
t = time.perf_counter()
r = export(root / "pairs.h5", root / "md", "megadepth", d2net_points=d2net)
wall = time.perf_counter() - t
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
cpu = sum(os.times()[:2])
print(json.dumps({"seconds": wall, "cpu_seconds": cpu, "peak_mib": hwm / 1024, "load": os.getloadavg()[0], **r}))
"""


def build(root: Path, images: int, seed: int) -> dict:
    """The model, its photos (empty files), its store and a pair file, once."""
    import bench_corpus

    from sfmpairs.mining.mine import mine
    from sfmpairs.sfm_io.ingest import ingest

    model = root / "scene" / "sparse"
    if not (root / "pairs.h5").exists():
        shutil.rmtree(root, ignore_errors=True)
        counts = bench_corpus.write_model(model, images, seed, 0, untriangulated=0)
        photos = root / "scene" / "images"
        photos.mkdir(parents=True)
        for i in range(images):
            (photos / f"img{i:05d}.jpg").touch()
        ingest([model], root / "sfm.h5")
        mine(root / "sfm.h5", root / "pairs.h5", queries_per_cluster=30, val_fraction=0)
        (root / "counts.json").write_text(json.dumps(counts))
    return json.loads((root / "counts.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--images", type=int, default=8000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--no-d2net-points", action="store_true")
    a = ap.parse_args()
    t = time.perf_counter()
    counts = build(a.root, a.images, a.seed)
    print(f"model: {counts} (built or found in {time.perf_counter() - t:.1f} s)")
    runs = []
    for _ in range(a.repeats):
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(a.root), "0" if a.no_d2net_points else "1"],
            check=True,
            capture_output=True,
            text=True,
        )
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(runs[-1]))
    print(
        f"median: {np.median([r['seconds'] for r in runs]):.2f} s, "
        f"peak {np.median([r['peak_mib'] for r in runs]):.0f} MiB"
    )


if __name__ == "__main__":
    main()
