"""The command line as a user meets it: --version, --help, -v/-q, info, demo."""

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


def test_info_on_foreign_hdf5(tmp_path):
    import h5py

    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = [1, 2]
    r = invoke("info", tmp_path / "other.h5")
    assert r.exit_code == 2 and "not a file written by sfmpairs" in r.stderr


def test_small_demo_runs_every_stage(tmp_path):
    """The demo's pipeline on a tiny world (the README test runs the full one); its
    mAPs are those of its reports, over the val split of the pair file."""
    import json

    import h5py
    import numpy as np

    from sfmpairs.demo import run_demo
    from sfmpairs.retrieval.network import read_checkpoint

    work = tmp_path / "demo"
    r = run_demo(
        work,
        epochs=1,
        clusters=9,
        images_per_cluster=6,
        image_size=(96, 72),
        points=600,
        train_size=64,
        test_size=64,
        query_size=20,
        pool_size=30,
    )
    for name in (
        "sfm.h5",
        "pairs.h5",
        "pairs_negatives.h5",
        "descriptors.h5",
        "tuples.png",
        "eval_before.json",
        "eval_after.json",
        "run/best.pt",
        "run/metrics.jsonl",
        "world/world.json",
    ):
        assert (work / name).exists(), name
    with h5py.File(work / "pairs.h5") as f:
        cluster, split = f["images/cluster"][()], f["clusters/split"].asstr()[()]
        queries, database = f["val/query"][()], f["val/images"][()]
    with h5py.File(work / "sfm.h5") as f:
        indptr, point = f["observations/indptr"][()], f["observations/point"][()]
    points = [set(point[a:b].tolist()) for a, b in zip(indptr[:-1], indptr[1:])]
    with_positives = sum(any(j != q and points[q] & points[j] for j in database) for q in queries)
    # two val clusters: other clusters' images are negatives, so the mAP is not 1 by construction
    assert len(set(cluster[database].tolist())) == list(split).count("val") >= 2
    for key, report in (("before", "eval_before.json"), ("after", "eval_after.json")):
        rep = json.loads((work / report).read_text())
        assert r[key] == rep["mAP"], key
        assert rep["queries"] == len(queries) and rep["database"] == len(database), key
        assert rep["queries_with_positives"] == with_positives > 0, key
        aps = [a for a in rep["per_query_ap"].values() if a is not None]
        assert len(aps) == with_positives and rep["mAP"] == pytest.approx(np.mean(aps), abs=1e-12), key
        assert rep["image_size"] == 64, key  # the test size
    assert 0.1 < r["before"] < 0.95  # 9 clusters: neither chance nor perfect
    epochs = [json.loads(line) for line in (work / "run/metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [-1, 0]  # -1: the val mAP before training
    best = read_checkpoint(work / "run/best.pt")
    top = max(epochs, key=lambda e: e["val_map"])  # the first of equals: the starting weights stay unless beaten
    assert (best["val_map"], best["epoch"]) == (top["val_map"], top["epoch"])
    res = invoke("demo", "--workdir", work)
    assert res.exit_code == 2 and "--overwrite" in res.stderr
