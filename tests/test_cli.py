"""The command line as a user meets it: --version, --help, -v/-q, info, demo, synth."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from sfmpairs import __version__
from sfmpairs.cli import main


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_version():
    r = invoke("--version")
    assert r.exit_code == 0 and __version__ in r.stdout
    assert re.match(r"\d+\.\d+", __version__)


def test_help_on_every_command():
    r = invoke("--help")
    assert r.exit_code == 0
    commands = list(main.commands)
    assert {"ingest", "info", "demo", "mine"} <= set(commands)
    for name in commands:
        r = invoke(name, "--help")
        assert r.exit_code == 0 and "Usage: " in r.stdout, name
        assert "--verbose" in r.stdout and "--quiet" in r.stdout, name


def test_ingest_logs_unless_quiet(synthetic_models, tmp_path):
    model = synthetic_models["shared-cameras"] / "binary"
    r = invoke("ingest", model, "-o", tmp_path / "a.h5")
    assert r.exit_code == 0 and "wrote" in r.stderr
    r = invoke("ingest", "-q", model, "-o", tmp_path / "b.h5")
    assert r.exit_code == 0 and r.stderr == ""
    r = invoke("-q", "ingest", model, "-o", tmp_path / "c.h5")
    assert r.exit_code == 0 and r.stderr == ""


def test_info_summarises_a_store(synthetic_models, tmp_path):
    model = synthetic_models["shared-cameras"] / "binary"
    assert invoke("ingest", "-q", model, "-o", tmp_path / "s.h5").exit_code == 0
    r = invoke("info", tmp_path / "s.h5")
    assert r.exit_code == 0
    out = r.stdout
    assert "1 clusters, 1 models, 30 images, 600 points" in out
    assert "schema      sfmpairs/sfm-store v1" in out
    assert f"sfmpairs {__version__}" in out and "cluster_by=model" in out
    assert "\nbinary " in out  # the cluster, named after the model folder


@pytest.mark.parametrize(
    "content,expect",
    [(None, "no such file"), (b"not hdf5", "not an HDF5 file"), (b"PK\x03\x04 a zip, not torch's", "not a checkpoint")],
)
def test_info_on_bad_files(tmp_path, content, expect):
    path = tmp_path / "x.h5"
    if content is not None:
        path.write_bytes(content)
    r = invoke("info", path)
    assert r.exit_code == 2 and expect in r.stderr and "x.h5" in r.stderr
    assert "signature" not in r.stderr  # HDF5's own wording means little to a user


def test_info_on_foreign_hdf5(tmp_path):
    import h5py

    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = [1, 2]
    r = invoke("info", tmp_path / "other.h5")
    assert r.exit_code == 2 and "not a file written by sfmpairs" in r.stderr


def test_synth_with_depth_maps(tmp_path):
    """``sfmpairs synth --hard --distractors N --depth-maps``: a depth map per photo (of
    each cluster and of the distractors) where a COLMAP dense workspace keeps it."""
    from PIL import Image

    from sfmpairs.sfm_io.colmap_depth import read_depth_map

    out = tmp_path / "w"
    args = ["--clusters", 2, "--images-per-cluster", 2, "--image-size", "40x30", "--points", 100]
    r = invoke("synth", "-q", "-o", out, *args, "--hard", "--distractors", 1, "--depth-maps")
    assert r.exit_code == 0, r.output
    photos = sorted(out.glob("*/images/*.jpg"))
    assert len(photos) == 5 and sorted(p.parent.parent.name for p in photos)[-1] == "distractors"
    for photo in photos:
        depth = read_depth_map(photo.parent.parent / "stereo" / "depth_maps" / f"{photo.name}.geometric.bin")
        with Image.open(photo) as im:
            assert depth.shape == (im.height, im.width) and (depth > 0).any()
    assert invoke("synth", "-q", "-o", tmp_path / "e", *args).exit_code == 0
    assert not list((tmp_path / "e").glob("*/stereo"))  # only when asked


SMALL_DEMO = {
    "epochs": 2,
    "clusters": 9,
    "val_clusters": 3,
    "distractors": 4,
    "images_per_cluster": 6,
    "image_size": (96, 72),
    "points": 600,
    "train_size": 64,
    "test_size": 64,
    "query_size": 20,
    "pool_size": 30,
}


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    """The demo's pipeline on a tiny world (the README test runs the full one): its
    folder, what run_demo returned and what it printed."""
    import contextlib
    import io

    from sfmpairs.demo import run_demo

    work = tmp_path_factory.mktemp("demo") / "demo"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        r = run_demo(work, **SMALL_DEMO)
    return work, r, out.getvalue()


def test_small_demo_runs_every_stage(small_demo):
    """Every stage's output is there; its mAPs are those of its reports, over the val
    split of the pair file (3 places and the distractors' model)."""
    import json

    import h5py
    import numpy as np

    from sfmpairs.retrieval.network import read_checkpoint

    work, r, _ = small_demo
    for name in (
        "sfm.h5",
        "pairs.h5",
        "pairs_negatives.h5",
        "descriptors.h5",
        "tuples.png",
        "retrieval.png",
        "eval_before.json",
        "eval_after.json",
        "run/best.pt",
        "run/last.pt",
        "run/metrics.jsonl",
        "run/metrics.png",
        "world/world.json",
    ):
        assert (work / name).exists(), name
    with h5py.File(work / "pairs.h5") as f:
        cluster, split = f["images/cluster"][()], f["clusters/split"].asstr()[()]
        names = f["clusters/name"].asstr()[()]
        queries, database = f["val/query"][()], f["val/images"][()]
    with h5py.File(work / "sfm.h5") as f:
        indptr, point = f["observations/indptr"][()], f["observations/point"][()]
    points = [set(point[a:b].tolist()) for a, b in zip(indptr[:-1], indptr[1:])]
    with_positives = sum(any(j != q and points[q] & points[j] for j in database) for q in queries)
    # three places and the distractors in val: other clusters' images are negatives, so the mAP is not 1 by construction
    val_names = sorted(n.split("/")[0] for n, sp in zip(names, split) if sp == "val")
    assert len(val_names) == 4 and val_names[-1] == "distractors", val_names
    assert len(set(cluster[database].tolist())) == 4 and r["val"]["places"] == 3
    assert r["val"]["queries"] == len(queries)
    for key, report in (("before", "eval_before.json"), ("after", "eval_after.json")):
        rep = json.loads((work / report).read_text())
        assert r[key] == rep["mAP"], key
        assert rep["queries"] == len(queries) and rep["database"] == len(database), key
        assert rep["queries_with_positives"] == with_positives > 0, key
        aps = [a for a in rep["per_query_ap"].values() if a is not None]
        assert len(aps) == with_positives and rep["mAP"] == pytest.approx(np.mean(aps), abs=1e-12), key
        assert rep["image_size"] == 64, key  # the test size
    assert 0.1 < r["before"] < 0.95  # 3 places and distractors: neither chance nor perfect
    epochs = [json.loads(line) for line in (work / "run/metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [-1, 0, 1]  # -1: the val mAP before training
    assert r["per_epoch"] == [e["val_map"] for e in epochs[1:]]
    # after: the network as trained (last.pt); training's own val mAP of its last epoch
    # differs from evaluate's by up to a few tenths of a point (0.1 seen)
    assert json.loads((work / "eval_after.json").read_text())["model"] == str(work / "run" / "last.pt")
    assert r["after"] == pytest.approx(epochs[-1]["val_map"], abs=0.01)
    best = read_checkpoint(work / "run/best.pt")
    top = max(epochs, key=lambda e: e["val_map"])  # the first of equals: the starting weights stay unless beaten
    assert (best["val_map"], best["epoch"]) == (top["val_map"], top["epoch"])
    res = invoke("demo", "--workdir", work)
    assert res.exit_code == 2 and "--overwrite" in res.stderr


def test_small_demo_ends_with_a_summary(small_demo):
    """The demo's last lines: val mAP before and after (the reports' numbers), per epoch
    (the run's), and the pictures (PNG files that exist); not a dump of every file."""
    import json

    from PIL import Image

    work, r, printed = small_demo
    summary = printed.rstrip().split("\n\n")[-1]
    lines = summary.splitlines()
    assert len(lines) <= 12, summary
    before = json.loads((work / "eval_before.json").read_text())["mAP"]
    after = json.loads((work / "eval_after.json").read_text())["mAP"]
    assert f"val mAP before training {100 * before:.2f}, after {100 * after:.2f} " in summary
    assert f"{100 * (after - before):+.2f} points" in summary
    assert "3 places never trained on and 4 distractor photos" in summary
    epochs = [json.loads(line) for line in (work / "run/metrics.jsonl").read_text().splitlines()]
    per_epoch = " ".join(f"{100 * e['val_map']:.1f}" for e in epochs if e["epoch"] >= 0)
    assert f"val mAP per epoch: {per_epoch}\n" in summary
    for picture in ("run/metrics.png", "retrieval.png", "tuples.png"):
        assert str(work / picture) in summary, picture
        with Image.open(work / picture) as im:
            assert im.format == "PNG" and min(im.size) > 100, picture
    assert "schema" not in printed and "sfmpairs info" in summary  # the detail is info's


def test_demo_refuses_too_few_places(tmp_path):
    from sfmpairs.common import SfmpairsError
    from sfmpairs.demo import run_demo

    with pytest.raises(SfmpairsError, match="val places"):
        run_demo(tmp_path / "d", clusters=9, val_clusters=8)
    assert not (tmp_path / "d").exists()
