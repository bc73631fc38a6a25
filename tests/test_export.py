"""Pair files for other frameworks, the PyTorch dataset, and info's histograms."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import pickle
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import doc_example, synth_and_mine
from sfmpairs import SfmpairsError
from sfmpairs.cli import main
from sfmpairs.mining.export import CIRTORCH_NAME, cid_of, export
from sfmpairs.mining.export_megadepth import scene_name
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
    assert not [x for x in (tmp_path / "data").rglob("*") if x.name.endswith(".tmp")]  # no scratch left


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


@pytest.mark.parametrize("char", ["\n", "\r", "\t", " ", "\u00a0", "\u2028", "\x0b", "\x1f", "\x7f"])
def test_hloc_refuses_names_that_break_its_lines(mined, tmp_path, char):
    """hloc splits its pairs files into lines, and lines at whitespace: a name holding
    whitespace or a control character is refused in one line naming the pair file."""
    root, p = mined
    pairs = tmp_path / "pairs.h5"
    pairs.write_bytes((root / "pairs.h5").read_bytes())
    names = list(p["names"])
    names[p["train/query"][0]] += f"{char}foo.jpg"
    with h5py.File(pairs, "r+") as f:
        del f["images/name"]
        f["images/name"] = np.array(names, dtype=h5py.string_dtype())
    out = tmp_path / "p.txt"
    r = CliRunner().invoke(main, ["export", str(pairs), "--format", "hloc", "-o", str(out)])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"{pairs}: image name {names[p['train/query'][0]]!r} holds whitespace" in r.stderr
    assert sorted(x.name for x in tmp_path.iterdir()) == ["pairs.h5"]  # no pairs file, no provenance


def _renamed(mined, tmp_path, suffix: str):
    """A copy of the pair file whose first train query's name ends with ``suffix``, and
    a photo folder where every name (that one too) is a photo: (pairs, photos, name)."""
    root, p = mined
    pairs = tmp_path / "pairs.h5"
    pairs.write_bytes((root / "pairs.h5").read_bytes())
    names = list(p["names"])
    k = p["train/query"][0]
    names[k] += suffix
    with h5py.File(pairs, "r+") as f:
        del f["images/name"]
        f["images/name"] = np.array(names, dtype=h5py.string_dtype())
    photos = tmp_path / "photos"
    for old, new in zip(p["names"], names):
        (photos / new).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(Path(p["images_root"]) / old, photos / new)
    return pairs, photos, names[k]


@pytest.mark.parametrize("char", ["\t", "\n", "\r", "\u2028", "\x0b", "\x1f", "\x7f", "\x85"])
def test_cirtorch_refuses_names_that_break_cids_tsv(mined, tmp_path, char):
    """cids.tsv is one ``cid<TAB>name`` line per image: a name holding a tab, a line
    break or a control character is refused in one line naming the pair file and the
    name, before any output is written (its photo exists: only the name is at fault)."""
    pairs, photos, name = _renamed(mined, tmp_path, f"{char}foo.jpg")
    out = tmp_path / "db"
    r = CliRunner().invoke(
        main, ["export", str(pairs), "--format", "cirtorch", "-o", str(out), "--images-root", str(photos)]
    )
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"{pairs}: image name {name!r} holds a tab, a line break or a control character" in r.stderr
    assert "cids.tsv" in r.stderr and not out.exists()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["pairs.h5", "photos"]


def test_cirtorch_keeps_names_with_spaces(mined, tmp_path):
    """A space is no field separator of cids.tsv: such a name is exported, its line whole."""
    pairs, photos, name = _renamed(mined, tmp_path, " foo\u00a0bar.jpg")
    out = tmp_path / "db"
    r = CliRunner().invoke(
        main, ["export", str(pairs), "--format", "cirtorch", "-o", str(out), "--images-root", str(photos)]
    )
    assert r.exit_code == 0, r.stderr
    rows = [line.split("\t") for line in (out / "train" / CIRTORCH_NAME / "cids.tsv").read_text().splitlines()]
    assert [cid_of(name), name] in rows and all(len(row) == 2 for row in rows)


@pytest.mark.parametrize("split, keep", [("train", 0), ("val", 0), ("train", -1)])
def test_cirtorch_refuses_queries_outside_their_split(mined, tmp_path, split, keep):
    """cirtorch numbers queries and positives by their place among their split's
    images: a pair file (valid HDF5) whose split's images lack one of them is one line
    naming the pair file and the table (a KeyError before; found by bench_faults),
    and nothing is written. ``keep``: how many of the images are left (-1: all but the
    first query)."""
    root, p = mined
    pairs = tmp_path / "pairs.h5"
    pairs.write_bytes((root / "pairs.h5").read_bytes())
    with h5py.File(pairs, "r+") as f:
        images = f[f"{split}/images"][()]
        images = images[images != f[f"{split}/query"][0]] if keep < 0 else images[:keep]
        del f[f"{split}/images"]
        f[f"{split}/images"] = images
    out = tmp_path / "db"
    r = CliRunner().invoke(main, ["export", str(pairs), "--format", "cirtorch", "-o", str(out), "--neg-num", "1"])
    errors = [line for line in r.stderr.splitlines() if line.startswith("sfmpairs: error:")]
    assert r.exit_code == 2 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"{pairs}: corrupt pair file ({split}/query holds image" in errors[0], errors[0]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["pairs.h5"]


@pytest.mark.parametrize(
    "table, change",
    [
        ("observations/xy", lambda a: a[:-1]),  # a row fewer than observations/point
        ("observations/xy", lambda a: a[None]),  # an axis more
        ("observations/point", lambda a: np.stack([a, a], 1)),  # a column more
        ("points/xyz", lambda a: a[:, :2]),  # a column fewer
        ("points/colmap_id", lambda a: a[:-1]),
    ],
)
def test_megadepth_refuses_mis_shaped_store_tables(mined, tmp_path, table, change):
    """The megadepth export reads each model's observations and points from the store by
    hand: a store that is valid HDF5 but one of whose tables has the wrong rows or
    columns is one line naming the store and the table (found by bench_faults' mis-shaped
    files: an IndexError or a broadcast error before), and nothing is written."""
    root, _ = mined
    store = tmp_path / "sfm.h5"
    store.write_bytes((root / "sfm.h5").read_bytes())
    with h5py.File(store, "r+") as f:
        data = change(f[table][()])
        del f[table]
        f[table] = data
    out = tmp_path / "md"
    args = ["export", str(root / "pairs.h5"), "--format", "megadepth", "--store", str(store), "-o", str(out)]
    r = CliRunner().invoke(main, args)
    errors = [line for line in r.stderr.splitlines() if line.startswith("sfmpairs: error:")]
    assert r.exit_code == 2 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"{store}: " in errors[0] and table in errors[0], errors[0]  # the store's check, or the model's
    assert sorted(x.name for x in tmp_path.iterdir()) == ["sfm.h5"]


def test_hloc_per_model_folders_are_unique_and_stay_inside(mined, tmp_path):
    """Model names from a crafted store: one escaping its folder ('../../escape'), one
    equal to another's made-up folder name, two that differ in case only (one file on
    macOS disks) and one with a NUL: a folder each, inside the export, none replaced."""
    root, _ = mined
    store = tmp_path / "sfm.h5"
    store.write_bytes((root / "sfm.h5").read_bytes())
    names = ["../../escape", "model_0", "Model_0", "a\0b"]
    with h5py.File(store, "r+") as f:
        del f["models/name"]
        f["models/name"] = np.array([n.encode() for n in names], dtype="S20")
    out = tmp_path / "deep" / "out"
    r = export(root / "pairs.h5", out, "hloc", per_model=True, store=store)
    entries = json.loads((out / "models.json").read_text())
    assert [e["model"] for e in entries] == names and r["models"] == 4
    folders = [e["pairs_file"].removesuffix("/pairs.txt") for e in entries]
    assert len({x.lower() for x in folders}) == 4  # distinct, also where case is ignored
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+", x) for x in folders)  # one plain word each
    assert sorted(x.name for x in out.iterdir()) == sorted([*folders, "export.json", "models.json"])
    for e in entries:  # every model's own pairs, none replaced by another's
        assert len((out / e["pairs_file"]).read_text().splitlines()) == e["pairs"] > 0
    assert sum(e["pairs"] for e in entries) == r["pairs"]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["deep", "sfm.h5"]  # nothing escaped


def test_megadepth_scene_names_differ_in_more_than_case():
    taken = set()
    assert [scene_name(n, taken) for n in ("Scene/0", "scene_0", "SCENE-0", "scene-0")] == [
        "Scene_0",
        "scene_0_2",
        "SCENE-0",
        "scene-0_2",
    ]


def test_hloc_provenance_is_published_after_the_pairs_file_and_never_replaced(mined, tmp_path, monkeypatch):
    root, _ = mined
    out, side = tmp_path / "pairs.txt", tmp_path / "pairs.txt.provenance.json"
    side.write_text("the user's file")  # refused before the work, without --overwrite
    with pytest.raises(SfmpairsError, match=r"pairs.txt.provenance.json: output exists; pass --overwrite"):
        export(root / "pairs.h5", out, "hloc")
    assert side.read_text() == "the user's file" and not out.exists()
    export(root / "pairs.h5", out, "hloc", overwrite=True)
    assert json.loads(side.read_text())["schema"] == "sfmpairs/export" and out.read_text()
    # another run publishes its pairs file and provenance while this one works: it keeps both
    import sfmpairs.mining.export as E

    real = E.write_pairs

    def other_run_finishes_first(*args, **kwargs):
        other.write_text("OTHER RUN\n")
        Path(f"{other}.provenance.json").write_text("OTHER RUN'S PROVENANCE")
        return real(*args, **kwargs)

    other = tmp_path / "race.txt"
    monkeypatch.setattr(E, "write_pairs", other_run_finishes_first)
    with pytest.raises(SfmpairsError, match="written meanwhile by another run"):
        export(root / "pairs.h5", other, "hloc")
    assert other.read_text() == "OTHER RUN\n"
    assert Path(f"{other}.provenance.json").read_text() == "OTHER RUN'S PROVENANCE"
