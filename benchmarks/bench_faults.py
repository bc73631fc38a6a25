"""Fault benchmark (issue 17 items 5 and 6): corrupted inputs given to every command that
reads them, and (``--kill``) runs killed with SIGKILL at random moments.

Fuzzing: byte flips, truncations, appended junk and extreme values written over numbers,
in every COLMAP file kind (binary: cameras, images, points3D, rigs, frames; text: the
same) of several real models (../shared/data/colmap) and a synthetic rig model, in an
SfM store, a pair file, a descriptor file, a whitening file, a checkpoint, a revisited
ground-truth pickle and a photo; and files that are whole but mis-shaped (kinds
``KIND:shapes``, :func:`reshape`): valid HDF5 one of whose datasets has the wrong shape,
length, dtype or an extreme value (a pair file whose pool has a column too few, a store
whose observation arrays differ in length...), a valid checkpoint one of whose weights
or settings has the wrong shape or type. Each is given to the commands that read it
(``info``, ``show``, every export, ``load_checkpoint``...), in-process
(``sfmpairs.cli.main`` or the Python API) in forked worker processes. Each case is one of

- ``ok``: the command finished (its output is removed for the next case);
- ``error``: exit 2 with one ``sfmpairs: error:`` line (an ``SfmpairsError`` from the
  API) and no output or temporary file left;
- ``failure``: anything else (a traceback, several lines, output left behind);
- ``crash``: the worker died (a segmentation fault, killed for memory);
- ``hang``: no answer within ``--timeout`` seconds.

Prints counts per file kind and outcome, and the first few failures of each kind with
how to reproduce them; exits 1 if any case is a failure, crash or hang.

    python benchmarks/bench_faults.py                 # >= 10,000 cases, about 5 min on 2 cores
    python benchmarks/bench_faults.py --cases 400     # a quick slice (tests/test_fuzz.py)
    python benchmarks/bench_faults.py --cases 60000 --kind pairs:shapes   # one kind's share of 60,000
    python benchmarks/bench_faults.py --kill          # kill -9 trials, see kill_trials()
    python benchmarks/bench_faults.py --command ingest --processes   # ingest's reading processes
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

# One BLAS and OpenMP thread per worker: the workers are the parallelism, and BLAS
# threads that wait for a busy core made one whitening's eigh 50 times slower.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
COLMAP = Path(os.environ.get("SFMPAIRS_DATA", REPO.parent / "shared" / "data")) / "colmap"
REAL_SCENES = ("lego-batmobile", "robotics-lab", "video-submodels-no-photos", "buddha-head")
OUTCOMES = ("ok", "error", "failure", "crash", "hang")


# ----------------------------------------------------------------------------- inputs
def _synthetic_rig_model(folder: Path, text: bool) -> None:
    import pycolmap

    opts = pycolmap.SyntheticDatasetOptions()
    opts.num_rigs, opts.num_cameras_per_rig, opts.num_frames_per_rig = 2, 2, 3
    opts.num_points3D = 60
    folder.mkdir(parents=True)
    rec = pycolmap.synthesize_dataset(opts)
    (rec.write_text if text else rec.write_binary)(str(folder))


def build_inputs(root: Path, scenes) -> None:
    """Every file the benchmark corrupts, made once: COLMAP models (binary and text), a
    small rendered world's store, pair file, descriptors, whitening, a checkpoint, a
    ground-truth pickle."""
    import pycolmap
    import torch

    from sfmpairs.mining.mine import mine
    from sfmpairs.retrieval.extract import extract
    from sfmpairs.retrieval.network import build_network, save_checkpoint
    from sfmpairs.retrieval.whiten import whiten
    from sfmpairs.sfm_io.ingest import ingest
    from sfmpairs.synthetic.world import synth

    # the files record the command line (provenance): one whatever this run's options, so
    # that a case's offsets, and --seed-of-case, are the same in every run
    sys.argv = [sys.argv[0]]
    for scene in scenes:
        shutil.copytree(COLMAP / scene / "sparse" / "0", root / "bin" / scene)
    _synthetic_rig_model(root / "bin" / "synthetic-rig", text=False)
    _synthetic_rig_model(root / "txt" / "synthetic-rig", text=True)
    if scenes:  # one real model as text (the text reader is slower: the smallest)
        (root / "txt" / scenes[0]).mkdir(parents=True)
        pycolmap.Reconstruction(str(COLMAP / scenes[0] / "sparse" / "0")).write_text(str(root / "txt" / scenes[0]))
    synth(root / "w", clusters=6, images_per_cluster=5, image_size=(48, 36), seed=0, points=200)
    ingest([root / "w"], root / "sfm.h5")
    mine(root / "sfm.h5", root / "pairs.h5", val_clusters=[f"cluster_0{k}/sparse/0" for k in (4, 5)])
    torch.manual_seed(0)
    net = build_network({"arch": "resnet18", "pool": "gem", "image_size": 32})
    save_checkpoint(root / "model.pt", net)
    extract(root / "model.pt", root / "d.h5", store=root / "sfm.h5", image_size=32, workers=0)
    whiten(root / "d.h5", root / "pairs.h5", root / "wh.h5", method="pca", dim=4)
    rng = np.random.default_rng(0)
    gnd = [
        {"bbx": np.array([1.0, 2.0, 30.0, 20.0]), "easy": rng.choice(20, 3), "hard": np.array([4, 5]), "junk": []}
        for _ in range(3)
    ]
    with open(root / "gnd.pkl", "wb") as fh:
        pickle.dump({"imlist": [f"im{k}" for k in range(20)], "qimlist": ["q0", "q1", "q2"], "gnd": gnd}, fh, 2)
    photo = sorted((root / "w").glob("cluster_00/images/*.jpg"))[0]
    shutil.copy(photo, root / "photo.jpg")


# ----------------------------------------------------------------------------- commands
def _api_read_model(fmt):
    def run(folder: Path, out: Path):
        from sfmpairs.sfm_io.ingest import read_model

        read_model(folder, fmt)

    return run


def _api(fn_name):
    def run(path: Path, out: Path):
        if fn_name == "load_gnd":
            from sfmpairs.retrieval.evaluate import load_gnd

            load_gnd(path)
        elif fn_name == "load_image":
            from sfmpairs.retrieval.data import load_image

            load_image(path, 32)
        elif fn_name == "read_checkpoint":
            from sfmpairs.retrieval.network import read_checkpoint

            read_checkpoint(path)
        elif fn_name == "load_checkpoint":
            from sfmpairs.retrieval.network import load_checkpoint

            load_checkpoint(path)

    return run


def commands(w: Path, out: Path) -> dict:
    """Each corruptible input -> [(command name, weight, runner)]; a runner is a list of
    CLI arguments or a function (target, out). ``w``: the worker's copy of the inputs."""
    eva = ["evaluate", "--pairs", f"{w}/pairs.h5", "--descriptors", f"{w}/d.h5", "-o", f"{out}/r.json", "-q"]
    whi = ["whiten", "--descriptors", f"{w}/d.h5", "--pairs", f"{w}/pairs.h5", "-o", f"{out}/wh.h5", "-q"]
    whi += ["--method", "pca", "--dim", "4"]
    mine = ["mine", f"{w}/sfm.h5", "-o", f"{out}/p.h5", "-q"]
    train = ["train", "--pairs", f"{w}/pairs.h5", "-o", f"{out}/run", "--weights", f"{w}/model.pt", "--epochs", "1"]
    train += ["--query-size", "4", "--pool-size", "8", "--neg-num", "1", "--image-size", "32", "--test-image-size"]
    train += ["32", "--workers", "0", "--device", "cpu", "-q"]
    # the exports that read the store too are given the worker's copy (the pair file names
    # the store it was mined from, the original)
    export = ["export", f"{w}/pairs.h5", "-q", "--format"]
    per_model = [*export, "hloc", "--per-model", "--store", f"{w}/sfm.h5", "-o", f"{out}/pm"]
    megadepth = [*export, "megadepth", "--store", f"{w}/sfm.h5", "-o", f"{out}/md"]
    extract = ["extract", "--model", f"{w}/model.pt", "--store", f"{w}/sfm.h5", "-o", f"{out}/d.h5", "-q"]
    extract += ["--image-size", "32", "--workers", "0"]
    table = {
        "store": [
            ("mine", 6, mine),
            ("info", 2, ["info", f"{w}/sfm.h5"]),
            ("export-hloc-per-model", 1.5, per_model),
            ("export-megadepth", 1.5, megadepth),
        ],
        "pairs": [
            ("whiten", 3, whi),
            ("evaluate", 3, eva),
            ("export-hloc", 3, [*export, "hloc", "-o", f"{out}/p.txt"]),
            ("export-csv", 2, [*export, "csv", "-o", f"{out}/p.csv"]),
            ("export-cirtorch", 2, [*export, "cirtorch", "-o", f"{out}/cirtorch"]),
            ("export-hloc-per-model", 1.5, per_model),
            ("export-megadepth", 1.5, megadepth),
            ("show", 1.5, ["show", f"{w}/pairs.h5", "-o", f"{out}/tuples.png", "--count", "2", "-q"]),
            ("show-html", 1, ["show", f"{w}/pairs.h5", "-o", f"{out}/tuples.html", "--split", "val", "-q"]),
            ("info", 1, ["info", f"{w}/pairs.h5"]),
            ("train", 0.15, train),
        ],
        "descriptors": [
            ("mine", 3, [*mine, "--descriptors", f"{w}/d.h5"]),
            ("whiten", 3, whi),
            ("evaluate", 3, eva),
            ("info", 1, ["info", f"{w}/d.h5"]),
        ],
        "whitening": [("evaluate", 4, [*eva, "--whitening", f"{w}/wh.h5"]), ("info", 1, ["info", f"{w}/wh.h5"])],
        "checkpoint": [
            ("read_checkpoint", 1.5, _api("read_checkpoint")),
            ("load_checkpoint", 1.5, _api("load_checkpoint")),
            ("info", 1, ["info", f"{w}/model.pt"]),
            ("extract", 0.3, extract),
        ],
        "gnd": [("load_gnd", 6, _api("load_gnd"))],
        "photo": [("load_image", 6, _api("load_image"))],
    }
    return table


def targets(w: Path) -> list[tuple[str, str, float]]:
    """(file kind, file relative to the inputs, weight): every file that is corrupted."""
    out = []
    for fmt in ("bin", "txt"):
        for model in sorted((w / fmt).iterdir()) if (w / fmt).is_dir() else []:
            for f in sorted(model.iterdir()):
                real = model.name != "synthetic-rig"
                weight = 1.0 if fmt == "bin" else (3.0 if not real else 0.25)
                out.append((f"colmap-{fmt}:{f.stem}", f"{fmt}/{model.name}/{f.name}", weight))
    tables = (("store", "sfm.h5"), ("pairs", "pairs.h5"), ("descriptors", "d.h5"), ("whitening", "wh.h5"))
    tables += (("checkpoint", "model.pt"),)
    out += [(kind, rel, 1.0) for kind, rel in (*tables, ("gnd", "gnd.pkl"), ("photo", "photo.jpg"))]
    out += [(f"{kind}:shapes", rel, 1.0) for kind, rel in tables]  # whole files, mis-shaped (reshape)
    return out


def plan(w: Path, total: int, seed: int) -> list[dict]:
    """``total`` cases, spread over the files and their commands by weight."""
    rows = []
    for kind, rel, weight in targets(w):
        base = kind.split(":")[0]
        if base.startswith("colmap"):
            fmt = base.split("-")[1]
            cmds = [("read_model", 6.0, None), ("ingest", 0.3, None)]
            rows += [(kind, rel, name, weight * wt, fmt) for name, wt, _ in cmds]
        else:
            rows += [(kind, rel, name, weight * wt, None) for name, wt, _ in commands(w, w)[base]]
    weights = np.array([r[3] for r in rows])
    counts = np.maximum(1, np.floor(weights / weights.sum() * total)).astype(int)
    rng = np.random.default_rng(seed)
    cases = []
    for (kind, rel, name, _, fmt), n in zip(rows, counts):
        for _ in range(n):
            cases.append({"kind": kind, "file": rel, "command": name, "seed": int(rng.integers(1 << 62))})
    return cases


# ----------------------------------------------------------------------------- mutations
EXTREMES = [b"\xff" * 8, b"\x7f\xff\xff\xff\xff\xff\xff\xff", b"\x00" * 8, b"\xff\xff\xff\x7f", b"\x00\x00\xf0\x7f"]
TEXT_TOKENS = [b"nan", b"inf", b"-1", b"1e308", b"99999999999999999999", b"", b"x", b"0", b"#", b"\n", b" "]


def hdf5_metadata(path: Path) -> np.ndarray | None:
    """The byte offsets of an HDF5 file that are not the raw data of a dataset (the
    superblock, object headers, B-trees, heaps, attributes): where corruption reaches
    HDF5 itself; None for a file that is not HDF5."""
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError:
        return None
    raw = np.zeros(path.stat().st_size, bool)
    with f:

        def visit(name, obj):
            if not isinstance(obj, h5py.Dataset):
                return
            if obj.chunks is None:
                off = obj.id.get_offset()
                if off is not None:
                    raw[off : off + obj.id.get_storage_size()] = True
                return
            for i in range(obj.id.get_num_chunks()):
                c = obj.id.get_chunk_info(i)
                raw[c.byte_offset : c.byte_offset + c.size] = True

        f.visititems(visit)
    return np.flatnonzero(~raw)


def mutate(data: bytes, seed: int, text: bool, metadata: np.ndarray | None = None) -> tuple[bytes, str]:
    """One corruption of ``data``: (corrupted bytes, what was done). ``metadata``: the
    offsets where most corruptions of an HDF5 file are aimed (:func:`hdf5_metadata`)."""
    rng = np.random.default_rng(seed)
    n = len(data)
    op = rng.choice(["flip", "truncate", "append", "extreme"] + (["token"] if text else []))
    head = rng.random() < 0.4 and n > 0  # headers and counts come first: hit them often
    off = int(rng.integers(0, min(n, 256) if head else max(n, 1))) if n else 0
    if metadata is not None and len(metadata) and rng.random() < 0.8:
        off, head = int(metadata[rng.integers(len(metadata))]), True
    b = bytearray(data)
    if op == "flip" and n:
        for _ in range(int(rng.integers(1, 4))):
            k = int(rng.integers(0, n)) if not head else min(n - 1, off + int(rng.integers(0, 8)))
            b[k] ^= int(rng.integers(1, 256))
        return bytes(b), f"flip near {off}"
    if op == "truncate":
        return bytes(b[:off]), f"truncate at {off}"
    if op == "append":
        junk = rng.integers(0, 256, int(rng.integers(1, 200)), dtype=np.uint8).tobytes()
        return bytes(b) + junk, f"append {len(junk)} bytes"
    if op == "extreme" and n:
        v = EXTREMES[int(rng.integers(len(EXTREMES)))]
        b[off : off + len(v)] = v
        return bytes(b[:n]) if len(b) > n else bytes(b), f"extreme {v.hex()} at {off}"
    if op == "token" and n:  # a number of a text file replaced
        tokens = data.split(b" ")
        k = int(rng.integers(0, len(tokens)))
        tokens[k] = TEXT_TOKENS[int(rng.integers(len(TEXT_TOKENS)))] + (b"\n" if tokens[k].endswith(b"\n") else b"")
        return b" ".join(tokens), f"token {k}"
    return bytes(b[: max(0, n - 1)]), "truncate last byte"


# Mis-shaped but whole files: one dataset (or a checkpoint's weight or setting) replaced
RESHAPES = ("drop-row", "add-row", "columns", "scalar", "empty", "extra-axis", "transpose", "dtype", "value")
EXTREME_VALUES = (-1, -(2**31), 2**31 - 1, 2**62, np.nan, np.inf, -np.inf, 1e300)


def _filler(data: np.ndarray, shape: tuple) -> np.ndarray:
    """An array of ``shape`` of ``data``'s dtype, where ``data`` has no element to copy."""
    return np.full(shape, b"x", dtype=object) if data.dtype == object else np.zeros(shape, data.dtype)


def _reshaped(data: np.ndarray, op: str, rng) -> np.ndarray:
    """``data`` changed by ``op`` (one of :data:`RESHAPES`)."""
    if data.ndim == 0:  # a scalar: made an array, or of another type
        op = "empty" if op in ("drop-row", "columns", "transpose") else op
        data = data.reshape(1) if op in ("add-row", "extra-axis", "empty") else data
    if op == "drop-row":
        return data[:-1] if len(data) else data[:0]
    if op == "add-row":
        return np.concatenate([data, data[-1:] if len(data) else _filler(data, (1, *data.shape[1:]))])
    if op == "columns":  # a column fewer or more; a table of one column made two
        if data.ndim == 1:
            return np.stack([data, data], axis=1)
        k = data.shape[1]
        return data[:, : k - 1] if k > 1 and rng.random() < 0.5 else np.concatenate([data, data[:, -1:]], axis=1)
    if op == "scalar":  # a 0-d array of the same dtype
        return np.array(data.reshape(-1)[0], dtype=data.dtype) if data.size else _filler(data, ())
    if op == "empty":
        return data[:0]
    if op == "extra-axis":
        return data[..., None] if rng.random() < 0.5 else data[None]
    if op == "transpose":
        return data.T if data.ndim > 1 else data.reshape(1, -1)
    if op == "dtype":
        if data.dtype.kind in "OSU":  # text as numbers
            return np.zeros(data.shape, np.int64)
        to = rng.choice(["float", "text", "bool", "int8", "uint"])
        if to == "text":
            return np.array([str(x).encode() for x in data.reshape(-1)], dtype="S").reshape(data.shape)
        if to == "float":
            return data.astype(np.float64) + (0.5 if data.dtype.kind in "iub" else 0.0)
        return data.astype({"bool": np.bool_, "int8": np.int8, "uint": np.uint64}[str(to)])
    # "value": an extreme value at a random place (an index past the end, a NaN...)
    if not data.size or data.dtype.kind not in "iufb":
        return data[:0]
    data = data.copy()
    v = EXTREME_VALUES[int(rng.integers(len(EXTREME_VALUES)))]
    flat = data.reshape(-1)
    k = int(rng.integers(flat.size))
    if data.dtype.kind == "f":
        flat[k] = v
    elif data.dtype.kind in "iu":
        info = np.iinfo(data.dtype)
        flat[k] = min(max(int(v) if np.isfinite(v) else info.max, info.min), info.max)
    else:
        flat[k] = not flat[k]
    return data


def reshape(path: Path, seed: int) -> str:
    """Make the whole file ``path`` mis-shaped, in place: an HDF5 file (still valid
    HDF5) one of whose datasets is given the wrong length, column count, rank or dtype,
    or an extreme value; a checkpoint (still a valid torch file) one of whose weights is
    so changed, or one of whose settings or entries is of another type. Returns what was
    done."""
    rng = np.random.default_rng(seed)
    op = str(rng.choice(RESHAPES))
    if path.suffix == ".pt":
        return _reshape_checkpoint(path, op, rng)
    import h5py

    with h5py.File(path, "r+") as f:
        names = []
        f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        name = names[int(rng.integers(len(names)))]
        old = f[name]
        attrs, data = dict(old.attrs), old[()]
        if isinstance(data, (bytes, str)):
            data = np.array(data, dtype=object)
        new = _reshaped(np.asarray(data), op, rng)
        del f[name]
        kw = {"dtype": h5py.string_dtype()} if new.dtype == object else {}
        f.create_dataset(name, data=new, **kw)
        f[name].attrs.update(attrs)
    return f"{op} {name}: {np.shape(data)} {np.asarray(data).dtype} -> {new.shape} {new.dtype}"


def _reshape_checkpoint(path: Path, op: str, rng) -> str:
    import torch

    state = torch.load(path, weights_only=True)
    if rng.random() < 0.6:  # a weight
        key = sorted(state["state_dict"])[int(rng.integers(len(state["state_dict"])))]
        old = state["state_dict"][key]
        new = _reshaped(old.numpy(), op, rng)
        state["state_dict"][key] = torch.from_numpy(np.ascontiguousarray(new)) if new.dtype.kind != "S" else new
        how = f"{op} state_dict {key}: {tuple(old.shape)} -> {np.shape(new)} {new.dtype}"
    else:  # a setting or an entry, of another type or value
        where = state["config"] if rng.random() < 0.7 else state
        key = sorted(where)[int(rng.integers(len(where)))]
        values = [None, "x", -1, 0, 10**12, 2.5, float("nan"), True, [1, 2], {"a": 1}, torch.zeros(2)]
        where[key] = values[int(rng.integers(len(values)))]
        how = f"{'config ' if where is state['config'] else ''}{key} = {where[key]!r}"
    torch.save(state, path)
    return how


# ----------------------------------------------------------------------------- a case
def _run_cli(args) -> tuple[int | str, str]:
    from sfmpairs.cli import main

    err, old_err, old_out = io.StringIO(), sys.stderr, sys.stdout
    sys.stderr, sys.stdout = err, io.StringIO()
    try:
        main([str(a) for a in args], prog_name="sfmpairs", standalone_mode=False)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException as e:  # noqa: BLE001 - classified by the caller
        import traceback

        traceback.print_exc(file=err)
        code = f"{type(e).__name__}"
    finally:
        sys.stderr, sys.stdout = old_err, old_out
    return code, err.getvalue()


def _run_api(fn, target: Path, out: Path) -> tuple[int | str, str]:
    from sfmpairs.common import SfmpairsError

    try:
        fn(target, out)
        return 0, ""
    except SfmpairsError as e:
        return 2, f"sfmpairs: error: {e}"
    except BaseException as e:  # noqa: BLE001
        import traceback

        return type(e).__name__, traceback.format_exc()


def classify(code, stderr: str, out: Path) -> tuple[str, str]:
    left = sorted(p.name for p in out.iterdir())
    lines = [ln for ln in stderr.splitlines() if ln.startswith("sfmpairs: error:")]
    if code == 0:
        return "ok", ""
    if code == 2 and len(lines) == 1 and "Traceback" not in stderr and not left and "\n" not in lines[0].strip():
        return "error", lines[0][:300]
    detail = f"exit {code}; left {left}; " + stderr.strip()[-1500:]
    return "failure", detail


def run_case(case: dict, w: Path, out: Path, originals: dict) -> tuple[str, str, str]:
    rel, kind = case["file"], case["kind"]
    if kind.endswith(":shapes"):
        (w / rel).write_bytes(originals[rel])
        how = reshape(w / rel, case["seed"])
    else:
        data, how = mutate(originals[rel], case["seed"], rel.startswith("txt/"), originals.get((rel, "metadata")))
        (w / rel).write_bytes(data)
    try:
        if kind.startswith("colmap"):
            folder = (w / rel).parent
            if case["command"] == "read_model":
                fmt = "binary" if kind.startswith("colmap-bin") else "text"
                code, err = _run_api(_api_read_model(fmt), folder, out)
            else:
                code, err = _run_cli(["ingest", folder, "-o", out / "sfm.h5", "-q"])
        else:
            runner = {n: r for n, _, r in commands(w, out)[kind.split(":")[0]]}[case["command"]]
            code, err = _run_cli(runner) if isinstance(runner, list) else _run_api(runner, w / rel, out)
        outcome, detail = classify(code, err, out)
    finally:
        (w / rel).write_bytes(originals[rel])
        for p in out.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    return outcome, how, detail


# ----------------------------------------------------------------------------- workers
def _worker(cases, start: int, inputs: Path, scratch: Path, wfd: int) -> None:
    """Runs cases[start:] in this forked process, one line per case on ``wfd``."""
    import resource
    import warnings

    import torch

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)  # HDF5's and torch's own prints
    resource.setrlimit(resource.RLIMIT_DATA, (4 << 30, 4 << 30))  # a memory bomb fails, not the machine
    w, out = scratch / "w", scratch / "out"
    if not w.exists():
        shutil.copytree(inputs, w)
    out.mkdir(exist_ok=True)
    originals = {c["file"]: (inputs / c["file"]).read_bytes() for c in cases}
    for rel in [r for r in originals if r.endswith(".h5")]:
        originals[(rel, "metadata")] = hdf5_metadata(inputs / rel)
    pipe = os.fdopen(wfd, "w", buffering=1)
    for i in range(start, len(cases)):
        pipe.write(json.dumps({"start": i}) + "\n")
        t = time.perf_counter()
        outcome, how, detail = run_case(cases[i], w, out, originals)
        msg = {"done": i, "outcome": outcome, "how": how, "detail": detail, "seconds": time.perf_counter() - t}
        pipe.write(json.dumps(msg) + "\n")
    pipe.close()
    os._exit(0)


def _spawn(cases, start, inputs, scratch):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            _worker(cases, start, inputs, scratch, w)
        finally:
            os._exit(3)
    os.close(w)
    return pid, os.fdopen(r, "r")


def run_cases(cases, inputs: Path, work: Path, jobs: int, timeout: float, progress: bool) -> list[dict]:
    """Every case, in ``jobs`` forked workers (each its own slice and copy of the
    inputs); a worker that dies or hangs is replaced, its case recorded."""
    results = [None] * len(cases)
    slices = [list(range(k, len(cases), jobs)) for k in range(jobs)]
    live = {}
    for k, idx in enumerate(slices):
        if idx:
            sub = [cases[i] for i in idx]
            live[k] = [*_spawn(sub, 0, inputs, work / f"job{k}"), sub, idx, None, time.monotonic()]
    done, t0 = 0, time.monotonic()
    while live:
        fds = {st[1].fileno(): k for k, st in live.items()}
        ready, _, _ = select.select(list(fds), [], [], 1.0)
        for fd in ready:
            k = fds[fd]
            pid, fh, sub, idx, current, _ = live[k]
            line = fh.readline()
            if line:
                msg = json.loads(line)
                live[k][5] = time.monotonic()
                if "start" in msg:
                    live[k][4] = msg["start"]
                else:
                    results[idx[msg["done"]]] = {**cases[idx[msg["done"]]], **msg}
                    done += 1
                    if progress and done % 500 == 0:
                        print(f"  {done}/{len(cases)} cases, {time.monotonic() - t0:.0f} s", flush=True)
                continue
            _, status = os.waitpid(pid, 0)  # the worker ended
            fh.close()
            del live[k]
            if current is not None and results[idx[current]] is None:  # it died in a case
                code = os.waitstatus_to_exitcode(status)  # a signal, or an error of the worker's own
                died = f"signal {-code}" if code < 0 else f"the worker exited {code} (an error of the benchmark's)"
                results[idx[current]] = {**cases[idx[current]], "outcome": "crash", "detail": died}
                done += 1
                if current + 1 < len(sub):
                    live[k] = [*_spawn(sub, current + 1, inputs, work / f"job{k}"), sub, idx, None, time.monotonic()]
        for k, st in list(live.items()):
            if st[4] is not None and results[st[3][st[4]]] is None and time.monotonic() - st[5] > timeout:
                os.kill(st[0], signal.SIGKILL)
                os.waitpid(st[0], 0)
                st[1].close()
                i = st[3][st[4]]
                results[i] = {**cases[i], "outcome": "hang", "detail": f"no answer in {timeout} s"}
                done += 1
                del live[k]
                if st[4] + 1 < len(st[2]):
                    live[k] = [
                        *_spawn(st[2], st[4] + 1, inputs, work / f"job{k}"),
                        st[2],
                        st[3],
                        None,
                        time.monotonic(),
                    ]
    return results


def report(results: list[dict], seconds: float, show: int = 3) -> dict:
    table = defaultdict(Counter)
    for r in results:
        table[r["kind"]][r["outcome"]] += 1
    total = Counter(r["outcome"] for r in results)
    print(f"{'file kind':<24}" + "".join(f"{o:>9}" for o in OUTCOMES))
    for kind in sorted(table):
        print(f"{kind:<24}" + "".join(f"{table[kind][o]:>9}" for o in OUTCOMES))
    print(f"{'all':<24}" + "".join(f"{total[o]:>9}" for o in OUTCOMES))
    print(f"{len(results)} cases in {seconds:.0f} s")
    per = defaultdict(list)
    for r in results:
        per[(r["kind"].split(":")[0], r["command"])].append(r.get("seconds", np.nan))
    print("mean seconds per case: " + ", ".join(f"{k[0]}/{k[1]} {np.nanmean(v):.3f}" for k, v in sorted(per.items())))
    bad = [r for r in results if r["outcome"] in ("failure", "crash", "hang")]
    seen = Counter()
    for r in bad:
        key = (r["kind"], r["command"], r["outcome"])
        seen[key] += 1
        if seen[key] <= show:
            print(f"\n{r['outcome'].upper()} {r['kind']} ({r['file']}) via {r['command']}: {r.get('how')}")
            which = f"--only {r['file']} --kind {r['kind']} --command {r['command']}"
            print(f"  reproduce: {which} --seed-of-case {r['seed']}")
            print("  " + r.get("detail", "")[-800:].replace("\n", "\n  "))
    commands = defaultdict(Counter)  # per file kind and command: what the new kinds and commands did
    for r in results:
        commands[f"{r['kind']}/{r['command']}"][r["outcome"]] += 1
    return {
        "counts": {k: dict(v) for k, v in table.items()},
        "commands": {k: dict(v) for k, v in sorted(commands.items())},
        "total": dict(total),
        "cases": len(results),
    }


def fuzz(args) -> int:
    import torch  # noqa: F401 - imported before forking, once

    import sfmpairs.cli  # noqa: F401
    import sfmpairs.mining.export  # noqa: F401
    import sfmpairs.mining.mine  # noqa: F401
    import sfmpairs.retrieval.evaluate  # noqa: F401
    import sfmpairs.sfm_io.ingest  # noqa: F401
    import sfmpairs.train.train  # noqa: F401

    if args.processes:  # ingest's forked reading processes, one model a batch, on every input
        from sfmpairs.sfm_io import reading_processes

        reading_processes.PROCESS_INPUT_BYTES = 0
        reading_processes.BATCH_BYTES = 1
    scenes = [s for s in REAL_SCENES[: args.scenes] if (COLMAP / s).is_dir()]
    if not scenes:
        print(f"real COLMAP models not found at {COLMAP}: synthetic models only", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="bench_faults.") as tmp:
        tmp = Path(tmp)
        t0 = time.monotonic()
        build_inputs(tmp / "inputs", scenes)
        print(f"inputs built in {time.monotonic() - t0:.0f} s ({', '.join(scenes) or 'no real models'})", flush=True)
        cases = plan(tmp / "inputs", args.cases, args.seed)
        if args.exclude:
            cases = [c for c in cases if c["command"] not in args.exclude.split(",")]
        if args.kind:
            cases = [c for c in cases if c["kind"] == args.kind]
        if args.command:
            cases = [c for c in cases if c["command"] == args.command]
        if args.only:
            cases = [c for c in cases if c["file"] == args.only]
            if args.seed_of_case is not None:
                cases = [dict(c, seed=args.seed_of_case) for c in cases[:1]]
        t0 = time.monotonic()
        results = run_cases(cases, tmp / "inputs", tmp, args.jobs, args.timeout, not args.quiet)
        summary = report(results, time.monotonic() - t0)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    if args.failures:
        bad = [r for r in results if r["outcome"] in ("failure", "crash", "hang")]
        Path(args.failures).write_text(json.dumps(bad, indent=1))
    return 0 if all(summary["total"].get(o, 0) == 0 for o in ("failure", "crash", "hang")) else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=10400, help="corrupted inputs (spread by weight)")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds before a case is a hang")
    ap.add_argument("--scenes", type=int, default=len(REAL_SCENES), help="real models used (of %s)" % (REAL_SCENES,))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", help="only cases of this input file (as printed)")
    ap.add_argument("--exclude", help="leave out these commands (comma-separated, e.g. info)")
    ap.add_argument("--kind", help="only cases of this file kind (as printed, e.g. pairs:shapes)")
    ap.add_argument("--command", help="only cases of this command (as printed, e.g. export-cirtorch)")
    ap.add_argument("--seed-of-case", type=int, help="with --only: run the case of this seed")
    ap.add_argument("--json", help="write the counts here")
    ap.add_argument("--failures", help="write every failure, crash and hang here (JSON)")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--processes", action="store_true", help="ingest reads in forked processes on every input")
    ap.add_argument("--kill", action="store_true", help="kill -9 trials instead of fuzzing")
    ap.add_argument("--trials", type=int, default=20, help="--kill: trials per command")
    ap.add_argument("--commands", help="--kill: only these commands (comma-separated)")
    args = ap.parse_args(argv)
    if args.kill:
        return kill_trials(args)
    return fuzz(args)


# ----------------------------------------------------------------------------- kill -9
def kill_commands(w: Path, out: Path) -> dict:
    """name -> (CLI arguments writing ``out/...``, the output path, its checker)."""
    train = ["train", "--pairs", f"{w}/pairs.h5", "--weights", f"{w}/model.pt", "--epochs", "3", "--query-size", "8"]
    train += ["--pool-size", "16", "--neg-num", "2", "--image-size", "32", "--test-image-size", "32"]
    train += ["--workers", "0", "--device", "cpu", "-q"]
    return {
        "ingest": (["ingest", *sorted(str(p) for p in (w / "bin").iterdir()), "-o", f"{out}/sfm.h5"], "sfm.h5"),
        # the store written by a child process, as inputs of 1 GiB or more read on threads are (_sfmpairs)
        "ingest-child": (["ingest", *sorted(str(p) for p in (w / "bin").iterdir()), "-o", f"{out}/sfm.h5"], "sfm.h5"),
        # the models read by other processes, one a batch, as inputs of 512 MiB or more are (_sfmpairs)
        "ingest-processes": (
            ["ingest", *sorted(str(p) for p in (w / "bin").iterdir()), "-o", f"{out}/sfm.h5"],
            "sfm.h5",
        ),
        "mine": (["mine", f"{w}/sfm.h5", "-o", f"{out}/pairs.h5", "--descriptors", f"{w}/d.h5"], "pairs.h5"),
        "extract": (
            ["extract", "--model", f"{w}/model.pt", "--store", f"{w}/sfm.h5", "-o", f"{out}/d.h5"]
            + ["--image-size", "32", "--workers", "0"],
            "d.h5",
        ),
        "whiten": (
            ["whiten", "--descriptors", f"{w}/d.h5", "--pairs", f"{w}/pairs.h5", "-o", f"{out}/wh.h5"]
            + ["--method", "pca", "--dim", "4"],
            "wh.h5",
        ),
        "export-hloc": (["export", f"{w}/pairs.h5", "--format", "hloc", "-o", f"{out}/pairs.txt"], "pairs.txt"),
        "export-cirtorch": (["export", f"{w}/pairs.h5", "--format", "cirtorch", "-o", f"{out}/cirtorch"], "cirtorch"),
        "train": ([*train, "-o", f"{out}/run"], "run"),
    }


def check_output(name: str, path: Path) -> str | None:
    """None if ``path`` is a whole, readable output of command ``name``; else why not."""
    from sfmpairs.common import SfmpairsError

    try:
        if name.startswith("ingest"):
            from sfmpairs.sfm_io.store import read_store

            read_store(path)
        elif name == "mine":
            from sfmpairs.mining.pairfile import read_pair_file

            read_pair_file(path)
        elif name == "extract":
            import h5py

            with h5py.File(path) as f:
                assert len(f["names"]) == len(f["descriptors"]) > 0
        elif name == "whiten":
            from sfmpairs.retrieval.whiten import read_whitening

            read_whitening(path)
        elif name == "export-hloc":
            lines = path.read_text().splitlines()
            assert lines and all(len(x.split()) == 2 for x in lines)
        elif name == "export-cirtorch":
            files = sorted(p.name for p in path.rglob("*") if p.is_file())
            assert files, "empty folder"
        elif name == "train":
            from sfmpairs.retrieval.network import read_checkpoint

            if (path / "last.pt").exists():
                read_checkpoint(path / "last.pt")
            for line in (path / "metrics.jsonl").read_text().splitlines() if (path / "metrics.jsonl").exists() else []:
                json.loads(line)
    except (SfmpairsError, AssertionError, OSError, ValueError, KeyError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".tmp") or ".tmp" in p.name)


# the command lines with the SfM store written by a child process, and with the models
# read by other processes, whatever the input's size
_STARTS = {
    "ingest-child": (
        "import sfmpairs.sfm_io.reading_processes as r; r.PROCESS_INPUT_BYTES = 1 << 62; "
        "import sfmpairs.sfm_io.store_writer as w; w.CHILD_INPUT_BYTES = 0; "
        "from sfmpairs.cli import main; main(prog_name='sfmpairs')"
    ),
    "ingest-processes": (
        "import sfmpairs.sfm_io.reading_processes as r; r.PROCESS_INPUT_BYTES = 0; r.BATCH_BYTES = 1; "
        "from sfmpairs.cli import main; main(prog_name='sfmpairs')"
    ),
}


def _sfmpairs(name: str) -> list[str]:
    """How command ``name`` of :func:`kill_commands` starts sfmpairs."""
    return [sys.executable, "-c", _STARTS[name]] if name in _STARTS else [sys.executable, "-m", "sfmpairs"]


def _cli(args, timeout=600, name: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([*_sfmpairs(name), *map(str, args)], capture_output=True, text=True, timeout=timeout)


def _weights(run: Path):
    from sfmpairs.retrieval.network import read_checkpoint

    state = read_checkpoint(run / "last.pt")
    return {k: v for k, v in state.items() if k in ("state_dict", "epoch")}


def _same_weights(a, b) -> bool:
    import torch

    sa, sb = a["state_dict"], b["state_dict"]
    return a["epoch"] == b["epoch"] and sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def kill_trials(args) -> int:
    """Each command run ``--trials`` times and killed (SIGKILL) at a random moment of its
    uninterrupted duration; then the output must be absent or whole, and a second run
    (``--overwrite`` where the output exists; ``train --resume``) must succeed and leave
    no temporary file. Train's resumed run is compared with an uninterrupted one."""
    import subprocess  # noqa: F401 - used by _cli

    rng = np.random.default_rng(args.seed)
    scenes = [s for s in REAL_SCENES[: args.scenes] if (COLMAP / s).is_dir()]
    problems, rows = [], []
    with tempfile.TemporaryDirectory(prefix="bench_kill.") as tmp:
        tmp = Path(tmp)
        build_inputs(tmp / "inputs", scenes)
        w = tmp / "inputs"
        for name in args.commands.split(",") if args.commands else kill_commands(w, w):
            ref = tmp / f"ref-{name}"
            ref.mkdir()
            cmd, output = kill_commands(w, ref)[name]
            t0 = time.monotonic()
            r = _cli(cmd, name=name)
            duration = time.monotonic() - t0
            if r.returncode:
                problems.append(f"{name}: the uninterrupted run failed: {r.stderr[-500:]}")
                continue
            reference = _weights(ref / output) if name == "train" else None
            counts = Counter()
            for trial in range(args.trials):
                out = tmp / f"{name}-{trial}"
                out.mkdir()
                cmd, output = kill_commands(w, out)[name]
                p = subprocess.Popen(
                    [*_sfmpairs(name), *map(str, cmd)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                delay = float(duration * rng.uniform(0.3, 1.0))  # most of the start is imports
                try:
                    p.wait(timeout=delay)
                    counts["finished first"] += 1
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
                    counts["killed"] += 1
                target = out / output
                left = _temps(out)
                if target.exists():
                    why = check_output(name, target)
                    counts["output whole" if why is None else "output BROKEN"] += 1
                    if why:
                        problems.append(f"{name} trial {trial} killed at {delay:.2f} s: {output} broken: {why}")
                else:
                    counts["no output"] += 1
                counts["temporary files left"] += bool(left)
                if name == "train" and (target / "last.pt").exists():
                    again = _cli(["train", "--resume", target, "--epochs", "3", "-q"])
                else:
                    again = _cli([*cmd, "--overwrite"] if target.exists() else cmd, name=name)
                if again.returncode and name == "train" and "the run is finished" in again.stderr:
                    counts["had finished"] += 1  # killed after its last epoch: nothing to resume
                elif again.returncode:
                    problems.append(f"{name} trial {trial}: the run after the kill failed: {again.stderr[-400:]}")
                    counts["rerun FAILED"] += 1
                    continue
                why = check_output(name, target)
                if why:
                    problems.append(f"{name} trial {trial}: the rerun's output is broken: {why}")
                if _temps(out):
                    counts["temporary files after the rerun"] += 1
                    problems.append(f"{name} trial {trial}: temporary files stay after the rerun: {_temps(out)}")
                if name == "train":
                    same = _same_weights(_weights(target), reference)
                    counts["resumed bit-identical" if same else "resumed DIFFERENT"] += 1
                shutil.rmtree(out)
            rows.append((name, duration, counts))
            print(f"{name:<16} {duration:5.1f} s uninterrupted; " + ", ".join(f"{k} {v}" for k, v in counts.items()))
            sys.stdout.flush()
    for p in problems:
        print("PROBLEM", p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
