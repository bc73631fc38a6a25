"""Truncated and bit-flipped binary models: always either a correct store or a clean
one-line error, never a traceback or a hang."""

from __future__ import annotations

import shutil
import signal

import numpy as np
import pytest

from conftest import COLMAP, needs_real_data
from sfmpairs import SfmpairsError
from sfmpairs.sfm_io import colmap_binary
from sfmpairs.sfm_io.model import camera_centres


def assert_valid_model(m) -> None:
    """The invariants every store row obeys."""
    n, k = m.num_images, len(m.point)
    assert n > 0
    assert m.indptr[0] == 0 and m.indptr[-1] == k and np.all(np.diff(m.indptr) >= 0)
    assert m.point.dtype == np.int32 and (k == 0 or (m.point.min() >= 0 and m.point.max() < m.num_points))
    for i in range(n):  # no point twice in a row
        row = m.point[m.indptr[i] : m.indptr[i + 1]]
        assert len(np.unique(row)) == len(row)
    np.testing.assert_array_equal(m.track_length, np.bincount(m.point, minlength=m.num_points))
    assert np.all(np.diff(m.image_ids.astype(np.int64)) > 0)
    assert np.all(np.diff(m.point_ids) > 0)
    for a in (m.qvec, m.tvec, m.xyz, m.xy, camera_centres(m.qvec, m.tvec)):
        assert np.all(np.isfinite(a))
    assert len(m.names) == len(m.camera_model) == len(m.params) == n


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def mutations(size: int, rng, count: int):
    """(kind, offset) pairs: truncations and byte flips, the headers always included."""
    fixed = [1, 7, 8, 9, 12, 20, 40, 63, 64, 70]
    offsets = sorted(set([o for o in fixed if o < size] + rng.integers(0, size, count).tolist()))
    return [("truncate", o) for o in offsets] + [("flip", o) for o in offsets]


def fuzz_model(src, tmp_path, count: int, seed: int):
    rng = np.random.default_rng(seed)
    work = tmp_path / "m"
    shutil.copytree(src, work)
    outcomes = {"ok": 0, "error": 0}
    files = sorted(p.name for p in src.iterdir() if p.suffix == ".bin")
    old = signal.signal(signal.SIGALRM, _alarm)
    try:
        for name in files:
            original = (src / name).read_bytes()
            for kind, off in mutations(len(original), rng, count):
                data = bytearray(original)
                if kind == "truncate":
                    data = data[:off]
                else:
                    data[off] ^= 1 << int(rng.integers(0, 8)) if rng.random() < 0.5 else 0xFF
                (work / name).write_bytes(bytes(data))
                signal.alarm(20)
                try:
                    model = colmap_binary.read_model(work)
                except SfmpairsError as e:
                    msg = str(e)
                    assert "\n" not in msg and msg.startswith(str(work)), (name, kind, off, msg)
                    outcomes["error"] += 1
                except _Timeout:
                    pytest.fail(f"{name}: {kind} at {off} hangs")
                else:
                    assert_valid_model(model)
                    outcomes["ok"] += 1
                finally:
                    signal.alarm(0)
            (work / name).write_bytes(original)
    finally:
        signal.signal(signal.SIGALRM, old)
    return outcomes


@needs_real_data()
@pytest.mark.parametrize("scene", ["lego-batmobile", "statue-of-liberty"])
def test_fuzz_real_binary_files(scene, tmp_path):
    outcomes = fuzz_model(COLMAP / scene / "sparse" / "0", tmp_path, count=150, seed=1)
    assert outcomes["error"] > 0 and outcomes["ok"] > 0  # both outcomes were exercised


def test_fuzz_synthetic_rig_model(tmp_path):
    import pycolmap

    opts = pycolmap.SyntheticDatasetOptions()
    opts.num_rigs, opts.num_cameras_per_rig, opts.num_frames_per_rig = 2, 2, 3
    opts.num_points3D = 40
    src = tmp_path / "src"
    src.mkdir()
    pycolmap.synthesize_dataset(opts).write_binary(str(src))
    outcomes = fuzz_model(src, tmp_path, count=100, seed=2)
    assert outcomes["error"] > 0 and outcomes["ok"] > 0


def test_fault_benchmark_slice(tmp_path):
    """A slice of benchmarks/bench_faults.py: corrupted COLMAP files (binary and text),
    stores, pair files, descriptor, whitening and ground-truth files, checkpoints and
    photos, and whole but mis-shaped ones (``KIND:shapes``: HDF5 tables of the wrong
    shape or dtype, checkpoints with a weight or setting of the wrong shape or type),
    given to the commands that read them (``info``, ``show``, every export,
    ``load_checkpoint``...); none may end otherwise than with a result or one line (no
    traceback, crash or hang)."""
    import json
    import subprocess
    import sys

    from conftest import REPO

    p = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_faults.py"), "--cases", "250", "--scenes", "1"]
        + ["--quiet", "--json", str(tmp_path / "counts.json"), "--timeout", "120"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    summary = json.loads((tmp_path / "counts.json").read_text())
    total = summary["total"]
    assert total.get("ok", 0) > 0 and total.get("error", 0) > 0 and sum(total.values()) >= 200, total
    ran = set(summary["commands"])
    for kind in ("store", "pairs", "descriptors", "whitening", "checkpoint"):
        assert any(k.startswith(f"{kind}:shapes/") for k in ran), (kind, sorted(ran))
    for case in (
        "checkpoint/load_checkpoint",
        "checkpoint/info",
        "pairs/export-cirtorch",
        "pairs/export-megadepth",
        "pairs/export-hloc-per-model",
        "store/export-megadepth",
        "store/export-hloc-per-model",
        "pairs/show",
    ):
        assert case in ran, (case, sorted(ran))
