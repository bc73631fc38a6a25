"""A corpus shaped like SfM-120k, and ingest and mine timed on parts of it.

The corpus (Radenovic et al.'s SfM-120k, as the paper describes it): 713 models of 20
to 5,664 images, heavy-tailed (log-normal, median about 102), about 163,000 images,
8.6M points and 95.7M observations, and 256 untriangulated 2D points per image (about
4.5 GB of COLMAP binaries). It is written by its own numpy writer of COLMAP binaries
(cameras.bin, images.bin, points3D.bin), not through pycolmap objects (far too slow
at this size), model by model on every core, seeded (model k from the seed and k
alone). The geometry is consistent: cameras on a ring (radius 8 to 12) look at a ball
of points (radius 3); a point is seen by a run of ring-consecutive cameras (2 + a
Poisson track length), and its 2D points are its exact SIMPLE_PINHOLE projections.

The models are numbered in the order parts take them: model 0 is the largest, the
others in a seeded random order, and ``--fraction f`` is models 0 .. ceil(713 f) - 1
(every part holds the largest model, so that memory bounded by the largest model
shows as flat).

Timing: for each fraction, each step in a fresh process, alternating, ``--repeats``
times: pycolmap loading and freeing each model in turn, ``sfmpairs ingest`` of the
part's models into one store, and ``sfmpairs mine --strategy relaxed`` of that store.
Each step prints its wall time, peak memory (the child's own VmHWM: never the
parent's; and the peak of its largest child process, if any), CPU use ((user + sys,
child processes included) / wall, 2.0 = both cores busy) and the load average
of the machine when it started; the summary gives medians and the ratio (ingest +
mine) / pycolmap.

    python benchmarks/bench_corpus.py --root /work/corpus [--fraction 0.125 0.5 1] [--repeats 3]
    python benchmarks/bench_corpus.py --root /work/corpus --build-only --fraction 1
    python benchmarks/bench_corpus.py --root /work/corpus --baseline /tmp/old  # and an older version
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import struct
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

MODELS, IMAGES, POINTS, OBSERVATIONS = 713, 163_000, 8_600_000, 95_700_000
SMALLEST, LARGEST, MEDIAN = 20, 5_664, 102
UNTRIANGULATED = 256  # 2D points per image without a 3D point
WIDTH, HEIGHT = 1024, 768
INVALID = np.uint64(2**64 - 1)
_P2D = np.dtype([("x", "<f8"), ("y", "<f8"), ("id", "<u8")])
_IMAGE_HEAD = struct.Struct("<I4d3dI")


# ---------------------------------------------------------------------------- shape


def model_sizes(seed: int = 0) -> np.ndarray:
    """Images of each of the 713 models, in the order parts take them: a log-normal
    with SfM-120k's median and total (deterministic quantiles), clipped to 20..5,664;
    the largest first, the others in a seeded order."""
    from scipy.stats import norm

    sigma = math.sqrt(2 * math.log(IMAGES / MODELS / MEDIAN))
    q = norm.ppf((np.arange(MODELS) + 0.5) / MODELS)
    sizes = np.clip(np.exp(math.log(MEDIAN) + sigma * q), SMALLEST, LARGEST)
    sizes[-1] = LARGEST
    middle = slice(MODELS // 2 + 1, MODELS - 1)  # scale the upper half to hit the total
    rest = IMAGES - sizes[: MODELS // 2 + 1].sum() - LARGEST
    sizes[middle] *= rest / sizes[middle].sum()
    sizes = np.clip(np.round(sizes), SMALLEST, LARGEST).astype(np.int64)
    order = np.random.default_rng(seed).permutation(MODELS - 1)
    return np.concatenate([[LARGEST], sizes[:-1][order]])


def part(fraction: float) -> int:
    """How many models (the first ones) a fraction of the corpus holds."""
    return max(1, min(MODELS, math.ceil(MODELS * fraction - 1e-9)))


# ---------------------------------------------------------------------------- geometry


def rotmat_to_quat(R: np.ndarray) -> np.ndarray:
    """(n, 4) unit quaternions (w, x, y, z), w >= 0, of rotation matrices (n, 3, 3)."""
    tr = np.trace(R, axis1=1, axis2=2)
    d = np.stack([tr, R[:, 0, 0], R[:, 1, 1], R[:, 2, 2]], axis=1)
    k = d.argmax(axis=1)
    q = np.empty((len(R), 4))
    for c in range(4):
        m = k == c
        r = R[m]
        if c == 0:
            s = np.sqrt(1 + tr[m]) * 2
            q[m] = np.stack(
                [s / 4, (r[:, 2, 1] - r[:, 1, 2]) / s, (r[:, 0, 2] - r[:, 2, 0]) / s, (r[:, 1, 0] - r[:, 0, 1]) / s], 1
            )
        else:
            i, j, h = c - 1, c % 3, (c + 1) % 3
            s = np.sqrt(1 + r[:, i, i] - r[:, j, j] - r[:, h, h]) * 2
            v = np.empty((len(r), 4))
            v[:, 0] = (r[:, h, j] - r[:, j, h]) / s
            v[:, 1 + i] = s / 4
            v[:, 1 + j] = (r[:, j, i] + r[:, i, j]) / s
            v[:, 1 + h] = (r[:, h, i] + r[:, i, h]) / s
            q[m] = v
    q *= np.where(q[:, :1] < 0, -1.0, 1.0)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def ring_cameras(n: int, rng):
    """(qvec, tvec, focal): n cameras on a ring around the origin, looking at it."""
    from sfmpairs.sfm_io.model import quat_to_rotmat

    angle = 2 * np.pi * (np.arange(n) + rng.uniform(-0.3, 0.3, n)) / n
    radius = rng.uniform(8, 12, n)
    centre = np.stack([radius * np.cos(angle), radius * np.sin(angle), rng.normal(0, 0.5, n)], 1)
    z = rng.normal(0, 0.3, (n, 3)) - centre
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    x = np.cross(z, [0.0, 0.0, 1.0])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    R = np.stack([x, np.cross(z, x), z], axis=1)
    qvec = rotmat_to_quat(R)
    R = quat_to_rotmat(qvec)  # the rotation the file's quaternion stands for
    tvec = -np.einsum("nij,nj->ni", R, centre)
    return qvec, tvec, R, rng.uniform(0.9, 1.3, n) * WIDTH


def synthetic_model(n: int, seed: int, model: int, untriangulated: int = UNTRIANGULATED) -> dict:
    """The arrays of model ``model`` (``n`` images) of the corpus of ``seed``."""
    rng = np.random.default_rng([seed, model])
    qvec, tvec, R, focal = ring_cameras(n, rng)
    m = max(1, round(n * POINTS / IMAGES))
    mean_track = OBSERVATIONS / POINTS
    length = np.sort(np.minimum(n, 2 + rng.poisson(mean_track - 2, m)))  # sorted: records of one size together
    xyz = rng.normal(size=(m, 3))
    xyz *= (3 * rng.uniform(0, 1, m) ** (1 / 3) / np.linalg.norm(xyz, axis=1))[:, None]
    # point j is seen by images start[j], start[j] + 1, ... (around the ring)
    start = rng.integers(0, n, m)
    obs_point = np.repeat(np.arange(m), length)
    obs_image = (
        np.repeat(start, length) + np.arange(len(obs_point)) - np.repeat(np.cumsum(length) - length, length)
    ) % n
    cam = np.einsum("oij,oj->oi", R[obs_image], xyz[obs_point]) + tvec[obs_image]
    f = focal[obs_image]
    uv = np.stack([f * cam[:, 0] / cam[:, 2] + WIDTH / 2, f * cam[:, 1] / cam[:, 2] + HEIGHT / 2], 1)
    # each image's 2D points: its observations (by point), then the untriangulated ones
    by_image = np.argsort(obs_image, kind="stable")
    seen = np.bincount(obs_image, minlength=n)
    total = seen + untriangulated
    first = np.cumsum(total) - total
    rank = np.arange(len(by_image)) - np.repeat(np.cumsum(seen) - seen, seen)
    slot = np.repeat(first, seen) + rank  # where each observation (by image) goes
    p2d = np.empty(int(total.sum()), _P2D)
    p2d["x"] = rng.uniform(0, WIDTH, len(p2d))
    p2d["y"] = rng.uniform(0, HEIGHT, len(p2d))
    p2d["id"] = INVALID
    p2d["x"][slot], p2d["y"][slot] = uv[by_image, 0], uv[by_image, 1]
    p2d["id"][slot] = obs_point[by_image] + 1
    point2d_idx = np.empty(len(obs_point), np.uint32)
    point2d_idx[by_image] = rank
    return {
        "qvec": qvec,
        "tvec": tvec,
        "focal": focal,
        "xyz": xyz,
        "length": length,
        "track_image": (obs_image + 1).astype(np.uint32),
        "track_idx": point2d_idx,
        "p2d": p2d,
        "p2d_count": total,
        "rgb": rng.integers(0, 256, (m, 3), dtype=np.uint8),
        "error": rng.uniform(0.1, 2.0, m),
    }


# ---------------------------------------------------------------------------- writer


def write_cameras(path: Path, focal: np.ndarray) -> None:
    """One SIMPLE_PINHOLE (model id 0: f, cx, cy) camera per image, ids 1..n."""
    rec = np.dtype([("id", "<u4"), ("model", "<i4"), ("w", "<u8"), ("h", "<u8"), ("params", "<f8", 3)])
    cams = np.zeros(len(focal), rec)
    cams["id"] = np.arange(1, len(focal) + 1)
    cams["w"], cams["h"] = WIDTH, HEIGHT
    cams["params"] = np.stack([focal, np.full(len(focal), WIDTH / 2), np.full(len(focal), HEIGHT / 2)], 1)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(cams)))
        cams.tofile(f)


def write_images(path: Path, m: dict) -> None:
    """images.bin: image i has id i + 1, camera i + 1 and the name img#####.jpg."""
    ends = np.cumsum(m["p2d_count"])
    with open(path, "wb", buffering=1 << 22) as f:
        f.write(struct.pack("<Q", len(ends)))
        begin = 0
        for i, end in enumerate(ends.tolist()):
            f.write(_IMAGE_HEAD.pack(i + 1, *m["qvec"][i], *m["tvec"][i], i + 1))
            f.write(b"img%05d.jpg\x00" % i + struct.pack("<Q", end - begin))
            f.write(m["p2d"][begin:end].data)
            begin = end


def write_points(path: Path, m: dict) -> None:
    """points3D.bin: point j has id j + 1; one packed record array per track length."""
    length, ends = m["length"], np.cumsum(m["length"])
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(length)))
        for L in np.unique(length).tolist():
            j = np.flatnonzero(length == L)
            rec = np.dtype(
                [
                    ("id", "<u8"),
                    ("xyz", "<f8", 3),
                    ("rgb", "u1", 3),
                    ("error", "<f8"),
                    ("L", "<u8"),
                    ("track", "<u4", (L, 2)),
                ]
            )
            out = np.empty(len(j), rec)
            out["id"], out["xyz"], out["rgb"], out["error"], out["L"] = (
                j + 1,
                m["xyz"][j],
                m["rgb"][j],
                m["error"][j],
                L,
            )
            obs = (ends[j] - L)[:, None] + np.arange(L)
            out["track"][..., 0], out["track"][..., 1] = m["track_image"][obs], m["track_idx"][obs]
            out.tofile(f)


def write_model(folder: Path, n: int, seed: int, model: int, untriangulated: int = UNTRIANGULATED) -> dict:
    """Write model ``model`` of the corpus into ``folder`` (made atomically: a
    temporary folder renamed). Returns its counts."""
    m = synthetic_model(n, seed, model, untriangulated)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_cameras(tmp / "cameras.bin", m["focal"])
    write_images(tmp / "images.bin", m)
    write_points(tmp / "points3D.bin", m)
    counts = {"images": n, "points": len(m["xyz"]), "observations": int(m["length"].sum())}
    (tmp / "counts.json").write_text(json.dumps(counts))
    tmp.rename(folder)
    return counts


def model_folder(root: Path, k: int) -> Path:
    return root / f"model{k:03d}"


def build(root: Path, models: int, seed: int, workers: int) -> list[dict]:
    """Models 0..models-1 of the corpus under ``root`` (those already there kept)."""
    sizes = model_sizes(seed)
    todo = [k for k in range(models) if not (model_folder(root, k) / "counts.json").exists()]
    if todo:
        t = time.perf_counter()
        print(f"writing {len(todo)} models ({sizes[todo].sum()} images) under {root} ...", flush=True)
        with ProcessPoolExecutor(workers) as ex:
            futures = [ex.submit(write_model, model_folder(root, k), int(sizes[k]), seed, k) for k in todo]
            for fut in futures:
                fut.result()
        print(f"  written in {time.perf_counter() - t:.0f} s", flush=True)
    return [json.loads((model_folder(root, k) / "counts.json").read_text()) for k in range(models)]


# ---------------------------------------------------------------------------- timing

_MEASURE = """
import json, os, resource, sys, time
def _hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
def _report(t0, r0, **extra):
    wall = time.perf_counter() - t0
    r = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)  # child processes, once ended
    cpu = (r.ru_utime - r0.ru_utime) + (r.ru_stime - r0.ru_stime) + c.ru_utime + c.ru_stime
    print(json.dumps({"seconds": wall, "peak_mib": _hwm(), "children_peak_mib": c.ru_maxrss / 1024,
                      "cpu": cpu / wall, **extra}))
"""

CHILD_PYCOLMAP = (
    _MEASURE
    + """
import pycolmap
folders = sys.argv[1:]
t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
for p in folders:
    rec = pycolmap.Reconstruction(p)
    del rec
_report(t0, r0, models=len(folders))
"""
)

CHILD_INGEST = (
    _MEASURE
    + """
import h5py, numpy, pycolmap
from sfmpairs.sfm_io.ingest import ingest
t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
s = ingest(sys.argv[2:], sys.argv[1], overwrite=True)
_report(t0, r0, images=s["images"], points=s["points"], observations=s["observations"])
"""
)

CHILD_MINE = (
    _MEASURE
    + """
import h5py, numpy, scipy.spatial
from sfmpairs.mining.mine import mine
t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
r = mine(sys.argv[1], sys.argv[2], overwrite=True, strategy="relaxed")
_report(t0, r0, queries=r["train_queries"] + r["val_queries"])
"""
)


def run_child(code: str, *args, pythonpath: Path | None = None) -> dict:
    load = os.getloadavg()[0]
    env = dict(os.environ)
    if pythonpath is not None:  # an older sfmpairs first on the path
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), *filter(None, [env.get("PYTHONPATH")])])
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env)
    if out.returncode:
        sys.exit(f"a benchmark step failed:\n{out.stderr[-3000:]}")
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "load": load}


def time_fraction(root: Path, work: Path, fraction: float, repeats: int, steps: list[str], baseline=None) -> dict:
    """Each step of one fraction ``repeats`` times, alternating; a step ``X@base``
    runs step X with the sfmpairs package found under ``baseline``."""
    folders = [model_folder(root, k) for k in range(part(fraction))]
    runs = {s: [] for s in steps}
    for r in range(repeats):
        for step in steps:
            name, _, base = step.partition("@")
            path = baseline if base else None
            tag = "@base" if base else ""  # the older version writes files of its own, compared at the end
            store, pairs = work / f"sfm-{fraction}{tag}.h5", work / f"pairs-{fraction}{tag}.h5"
            if name == "pycolmap":
                runs[step].append(run_child(CHILD_PYCOLMAP, *folders))
            elif name == "ingest":
                runs[step].append(run_child(CHILD_INGEST, store, *folders, pythonpath=path))
            else:
                runs[step].append(run_child(CHILD_MINE, store, pairs, pythonpath=path))
            x = runs[step][-1]
            print(
                f"  {fraction:g} run {r + 1} {step}: {x['seconds']:.2f} s, {x['peak_mib']:.0f} MiB"
                f"{children(x)}, cpu {x['cpu']:.2f}, load {x['load']:.2f}",
                flush=True,
            )
    if baseline is not None:
        for kind in ("sfm", "pairs"):
            ours, theirs = work / f"{kind}-{fraction}.h5", work / f"{kind}-{fraction}@base.h5"
            if ours.exists() and theirs.exists():
                verdict = compare_datasets(ours, theirs)
                print(f"  {fraction:g} {ours.name} against the baseline's: {verdict}", flush=True)
    return runs


def compare_datasets(a: Path, b: Path) -> str:
    """Whether two HDF5 files hold the same datasets, value for value and bit for bit
    (their attributes, which record when, by which version and how each was made, left
    out; a dataset of one that is a group of the other differs)."""
    import h5py

    with h5py.File(a, "r") as x, h5py.File(b, "r") as y:
        names = []
        x.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        extra = []
        y.visititems(lambda n, o: extra.append(n) if isinstance(o, h5py.Dataset) and n not in x else None)
        differ = [n for n in names if not isinstance(y.get(n), h5py.Dataset) or not _same(x[n][()], y[n][()])]
    if differ or extra:
        return f"DIFFERENT: {', '.join(differ + extra)}"
    return f"all {len(names)} datasets identical"


def _same(u, v) -> bool:
    u, v = np.asarray(u), np.asarray(v)
    if u.shape != v.shape or u.dtype != v.dtype:
        return False
    if u.dtype.kind in "fciub":
        return u.tobytes() == v.tobytes()
    return bool(np.array_equal(u, v))


def children(run: dict) -> str:
    """The peak of the step's largest child process (any helper process a library starts),
    where it had any."""
    peak = run.get("children_peak_mib", 0)
    return f" (+ {peak:.0f} MiB its largest child process)" if peak else ""


def _cpu_seconds(runs: list) -> float:
    """Median CPU seconds (user + sys) of a step's runs: on a shared machine the wall
    time measures the other users too, the CPU time much less so."""
    return statistics.median(r["seconds"] * r["cpu"] for r in runs)


def summary(results: dict, counts: dict) -> None:
    print("\n| step | " + " | ".join(f"{f:g} ({counts[f] / 1e6:.1f}M obs)" for f in results) + " |")
    print("|---|" + "---|" * len(results))
    steps = next(iter(results.values())).keys()
    for step in steps:
        cells = []
        for runs in results.values():
            x = runs[step]
            cells.append(
                f"{statistics.median(r['seconds'] for r in x):.2f} s, {max(r['peak_mib'] for r in x):.0f} MiB"
                f"{children(max(x, key=lambda r: r.get('children_peak_mib', 0)))}, "
                f"cpu {statistics.median(r['cpu'] for r in x):.2f} ({_cpu_seconds(x):.1f} CPU s), "
                f"load {statistics.median(r['load'] for r in x):.1f}"
            )
        print(f"| {step} | " + " | ".join(cells) + " |")
    for f, runs in results.items():
        cpu = {s: _cpu_seconds(x) for s, x in runs.items()}
        for tag in ("", "@base"):
            if {"pycolmap", "ingest" + tag, "mine" + tag} <= cpu.keys():
                i, m, p = cpu["ingest" + tag], cpu["mine" + tag], cpu["pycolmap"]
                print(
                    f"{f:g}{tag} CPU seconds: (ingest + mine) / pycolmap {(i + m) / p:.2f}, mine / pycolmap {m / p:.2f}"
                )
        med = {s: statistics.median(r["seconds"] for r in x) for s, x in runs.items()}
        for tag in ("", "@base"):
            if {"pycolmap", "ingest" + tag, "mine" + tag} <= med.keys():
                i, m, p = med["ingest" + tag], med["mine" + tag], med["pycolmap"]
                print(
                    f"{f:g}{tag}: ingest / pycolmap {i / p:.2f}, mine / pycolmap {m / p:.2f}, "
                    f"(ingest + mine) / pycolmap {(i + m) / p:.2f} (target <= 1.00)"
                )
    for step in ("mine", "mine@base"):
        if step in steps and len(results) > 1:
            peaks = {f: max(r["peak_mib"] for r in runs[step]) for f, runs in results.items()}
            lo, hi = min(peaks), max(peaks)
            print(f"{step} peak memory {hi:g} / {lo:g}: {peaks[hi] / peaks[lo]:.2f} (target <= 1.50)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, required=True, help="where the corpus is (or will be) written")
    ap.add_argument("--fraction", type=float, nargs="+", default=[0.125, 0.5, 1.0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--steps", nargs="+", default=["pycolmap", "ingest", "mine"], choices=["pycolmap", "ingest", "mine"]
    )
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes writing the corpus")
    ap.add_argument(
        "--baseline",
        type=Path,
        help="a folder holding an older sfmpairs package (e.g. a git archive of a commit, pipeline/ copied to "
        "sfmpairs/ and the stage folders under it): ingest@base and mine@base run with it, in the same run",
    )
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--work", type=Path, help="folder of the stores and pair files (default: ROOT/work)")
    args = ap.parse_args()

    counts = build(args.root, part(max(args.fraction)), args.seed, args.workers)
    obs = {f: sum(c["observations"] for c in counts[: part(f)]) for f in args.fraction}
    for f in args.fraction:
        c = counts[: part(f)]
        print(
            f"fraction {f:g}: {len(c)} models, {sum(x['images'] for x in c)} images, "
            f"{sum(x['points'] for x in c)} points, {obs[f]} observations"
        )
    if args.build_only:
        return
    work = args.work or args.root / "work"
    work.mkdir(parents=True, exist_ok=True)
    steps = args.steps + ([f"{s}@base" for s in args.steps if s != "pycolmap"] if args.baseline else [])
    results = {f: time_fraction(args.root, work, f, args.repeats, steps, args.baseline) for f in args.fraction}
    summary(results, obs)


if __name__ == "__main__":
    main()
