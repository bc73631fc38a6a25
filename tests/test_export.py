"""Pair files for other frameworks, the PyTorch dataset, and info's histograms."""

from __future__ import annotations

import csv
import hashlib
import os
import pickle

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import doc_example, synth_and_mine
from sfmpairs import SfmpairsError
from sfmpairs.cli import main
from sfmpairs.mining.export import CIRTORCH_NAME, cid_of, export
from sfmpairs.train.dataset import PairTuples


@pytest.fixture(scope="module")
def mined(tmp_path_factory):
    root = synth_and_mine(
        tmp_path_factory.mktemp("export"),
        clusters=4,
        image_size=(64, 48),
        seed=2,
        points=400,
        descriptor_seed=1,
        negatives=2,
        queries_per_cluster=0,
        val_clusters=["cluster_03/sparse/0"],
        max_scale_change=3,
    )
    with h5py.File(root / "pairs.h5") as f:
        p = {
            k: f[k][()]
            for k in (
                "train/query",
                "train/positive",
                "val/query",
                "val/positive",
                "train/images",
                "val/images",
                "images/cluster",
                "train/pool",
                "train/pool_passes",
                "train/negatives",
                "val/pool",
                "val/pool_passes",
            )
        }
        p["names"] = f["images/name"].asstr()[()]
        p["images_root"] = f.attrs["images_root"]
    return root, p


def test_cirtorch_export_follows_its_reader_conventions(mined, tmp_path):
    root, p = mined
    export(root / "pairs.h5", tmp_path / "data", "cirtorch")
    db_root = tmp_path / "data" / "train" / CIRTORCH_NAME  # data_root/train/<name>
    with open(db_root / f"{CIRTORCH_NAME}.pkl", "rb") as fh:  # <name>.pkl, read with [mode]
        db = pickle.load(fh)
    assert set(db) == {"train", "val", "provenance"}  # extra keys: its readers take [mode]
    assert db["provenance"]["schema"] == "sfmpairs/export"
    for split in ("train", "val"):
        d = db[split]
        assert set(d) >= {"cids", "cluster", "qidxs", "pidxs"}
        assert len(d["cluster"]) == len(d["cids"]) and len(d["qidxs"]) == len(d["pidxs"])
        images = p[f"{split}/images"]
        # cids: the SHA-1 of each name (as docs say), in the split's image order
        assert d["cids"] == [hashlib.sha1(p["names"][i].encode()).hexdigest() for i in images]
        assert d["cids"] == [cid_of(p["names"][i]) for i in images]
        assert len(set(d["cids"])) == len(images)
        assert d["cluster"] == [int(p["images/cluster"][i]) for i in images]
        # qidxs / pidxs index cids: they name our queries and positives
        assert [d["cids"][k] for k in d["qidxs"]] == [cid_of(p["names"][q]) for q in p[f"{split}/query"]]
        assert [d["cids"][k] for k in d["pidxs"]] == [cid_of(p["names"][q]) for q in p[f"{split}/positive"]]
        assert all(d["cluster"][a] == d["cluster"][b] for a, b in zip(d["qidxs"], d["pidxs"]))
        for cid, i in zip(d["cids"], images):  # cid2filename: ims/cid[-2:]/cid[-4:-2]/cid[-6:-4]/cid
            path = db_root / "ims" / cid[-2:] / cid[-4:-2] / cid[-6:-4] / cid
            photo = os.path.join(p["images_root"], p["names"][i])
            assert os.path.realpath(path) == os.path.realpath(photo)  # the link leads to its photo
    assert set(db["train"]["cluster"]).isdisjoint(db["val"]["cluster"])
    # links point at the photos; --copy copies them
    first = db_root / "ims" / db["train"]["cids"][0][-2:]
    assert any(os.path.islink(x) for x in first.rglob("*") if x.is_file())
    with pytest.raises(SfmpairsError, match="exists"):
        export(root / "pairs.h5", tmp_path / "data", "cirtorch")
    export(root / "pairs.h5", tmp_path / "data", "cirtorch", copy=True, overwrite=True)
    files = [x for x in db_root.joinpath("ims").rglob("*") if x.is_file()]
    assert files and not any(os.path.islink(x) for x in files)
    assert len(files) == len(db["train"]["cids"]) + len(db["val"]["cids"])
    for split in ("train", "val"):  # each copy holds its photo's bytes
        for cid, i in zip(db[split]["cids"], p[f"{split}/images"]):
            with open(os.path.join(p["images_root"], p["names"][i]), "rb") as fh:
                assert (db_root / "ims" / cid[-2:] / cid[-4:-2] / cid[-6:-4] / cid).read_bytes() == fh.read()
    assert not [x for x in (tmp_path / "data").iterdir() if x.name.startswith(".sfmpairs-export")]


def test_hloc_and_csv_exports(mined, tmp_path):
    root, p = mined
    export(root / "pairs.h5", tmp_path / "pairs.txt", "hloc")
    lines = (tmp_path / "pairs.txt").read_text().splitlines()
    expect = [
        f"{p['names'][q]} {p['names'][j]}"
        for split in ("train", "val")
        for q, j in zip(p[f"{split}/query"], p[f"{split}/positive"])
    ]
    assert lines == expect
    export(root / "pairs.h5", tmp_path / "all.txt", "hloc", all_passing=True)
    expect_all = [
        f"{p['names'][q]} {p['names'][j]}"
        for split in ("train", "val")
        for q, pool, ok in zip(p[f"{split}/query"], p[f"{split}/pool"], p[f"{split}/pool_passes"])
        for j, passes in zip(pool, ok)
        if j >= 0 and passes
    ]
    assert len(expect_all) > len(expect)  # pools hold more passing pairs than the positives
    assert (tmp_path / "all.txt").read_text().splitlines() == expect_all
    export(root / "pairs.h5", tmp_path / "pairs.csv", "csv")
    with open(tmp_path / "pairs.csv") as fh:
        rows = list(csv.DictReader(fh))
    with h5py.File(root / "pairs.h5") as f:
        ratio = f["train/pool_inlier_ratio"][()]
        scale = f["train/pool_scale_change"][()]
    r0 = [r for r in rows if r["split"] == "train" and r["query"] == p["names"][p["train/query"][0]]]
    assert len(r0) == int((p["train/pool"][0] >= 0).sum())
    for r in r0:
        s = int(r["slot"])
        assert float(r["inlier_ratio"]) == ratio[0, s]
        assert float(r["scale_change"]) == scale[0, s] or (np.isnan(scale[0, s]) and r["scale_change"] == "nan")
    assert sum(int(r["is_positive"]) for r in rows) == len(p["train/query"]) + len(p["val/query"])
    assert len(rows) == int((p["train/pool"] >= 0).sum() + (p["val/pool"] >= 0).sum())


def test_dataset_equals_the_plain_h5py_tuples(mined, monkeypatch, tmp_path):
    root, p = mined
    ds = PairTuples(root / "pairs.h5", root / "w", split="train")
    assert len(ds) == len(p["train/query"])
    q, pos, negs = ds[0]
    assert q.dtype.is_floating_point and q.shape[0] == 3 and len(negs) == 2
    # the example in docs/formats.md, run as written
    example = doc_example("### Building the training tuples without sfmpairs")
    monkeypatch.chdir(root)
    scope = {}
    exec(compile(example, "formats.md", "exec"), scope)
    assert [ds.tuple_names(i)[0] for i in range(len(ds))] == [t[0] for t in scope["tuples"]]
    assert [ds.tuple_names(i) for i in range(len(ds))] == [(a, b, c) for a, b, c in scope["tuples"]]
    np.testing.assert_allclose(q.permute(1, 2, 0).numpy(), scope["query"] / 255.0, atol=1e-6)
    np.testing.assert_allclose(negs[1].permute(1, 2, 0).numpy(), scope["negatives"][1] / 255.0, atol=1e-6)
    small = PairTuples(root / "pairs.h5", split="val", image_size=32)  # images root from the file
    assert max(small[0][0].shape[1:]) == 32


def test_info_histograms(mined):
    root, p = mined
    r = CliRunner().invoke(main, ["info", str(root / "pairs.h5")])
    assert r.exit_code == 0
    out = r.stdout
    assert "inlier ratio of candidates sharing points" in out and "pool size per query" in out
    counts = [int(line.split()[-1]) for line in out.split("pool size per query")[1].splitlines()[1:] if line.strip()]
    assert sum(counts) == len(p["train/query"]) + len(p["val/query"])


def test_export_cli_errors(mined, tmp_path):
    root, _ = mined
    r = CliRunner().invoke(main, ["export", str(root / "sfm.h5"), "--format", "csv", "-o", str(tmp_path / "x.csv")])
    assert r.exit_code == 2 and "not a pair file" in r.stderr and not (tmp_path / "x.csv").exists()
