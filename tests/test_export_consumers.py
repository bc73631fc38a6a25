"""Exports as their consumers read them (issue 15): hloc's names against the pycolmap
models, cirtorch's cluster check and whitening file, the Dataset under spawned
DataLoader workers with batches of tuples, and every docs example on pair files mined
with and without descriptors."""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil

import h5py
import numpy as np
import pycolmap
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import REPO, make_models, synth_and_mine
from sfmpairs import SfmpairsError
from sfmpairs.mining.export import CIRTORCH_NAME, export
from sfmpairs.mining.mine import mine
from sfmpairs.mining.pairfile import read_pair_file
from sfmpairs.sfm_io.ingest import ingest
from sfmpairs.sfm_io.store import read_store
from sfmpairs.train.dataset import PairTuples, ToTensor, collate_tuples


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A rendered world of 4 models with photos: pairs mined with descriptors
    (``pairs.h5``, 2 negatives) and without (``plain.h5``)."""
    root = synth_and_mine(
        tmp_path_factory.mktemp("consumers"),
        clusters=4,
        image_size=(64, 48),
        seed=3,
        points=400,
        descriptor_seed=1,
        negatives=2,
        queries_per_cluster=0,
        val_clusters=["cluster_03/sparse/0"],
        max_scale_change=3,
    )
    mine(
        root / "sfm.h5",
        root / "plain.h5",
        queries_per_cluster=0,
        val_clusters=["cluster_03/sparse/0"],
        max_scale_change=3,
    )
    return root


@pytest.fixture(scope="module")
def no_photos(tmp_path_factory):
    """Three models without photos (store-wide names get the model name as a prefix)."""
    root = tmp_path_factory.mktemp("nophotos")
    make_models(root / "m", seed=5, scenes=3, images=20, points=500)
    ingest([root / "m"], root / "sfm.h5")
    mine(root / "sfm.h5", root / "pairs.h5", queries_per_cluster=0, val_fraction=0)
    return root


def _pairs(path):
    return [tuple(line.split()) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("which", ["world", "no_photos"])
def test_hloc_per_model_names_are_those_of_the_pycolmap_models(which, request, tmp_path):
    root = request.getfixturevalue(which)
    pairs = root / "pairs.h5"
    p, s = read_pair_file(pairs), read_store(root / "sfm.h5", observations=False)
    export(pairs, tmp_path / "default.txt", "hloc")
    default = _pairs(tmp_path / "default.txt")
    r = export(pairs, tmp_path / "hloc", "hloc", per_model=True)
    entries = json.loads((tmp_path / "hloc" / "models.json").read_text())
    assert json.loads((tmp_path / "hloc" / "export.json").read_text())["schema"] == "sfmpairs/export"
    assert r["models"] == len(entries) == len(s["models/name"]) and r["pairs"] == len(default)
    seen = 0
    for e in entries:
        rec = pycolmap.Reconstruction(e["model_path"])  # the model itself, read by pycolmap
        model_names = {img.name for img in rec.images.values()}
        lines = _pairs(tmp_path / "hloc" / e["pairs_file"])
        assert len(lines) == e["pairs"] > 0
        assert {n for line in lines for n in line} <= model_names  # hloc's image_ids[name] finds each
        for (a, b), (store_a, store_b) in zip(lines, default[seen : seen + len(lines)]):
            for colmap, store_name in ((a, store_a), (b, store_b)):  # the same photo, two names
                if e["image_dir"]:
                    assert os.path.samefile(
                        os.path.join(e["image_dir"], colmap), os.path.join(p["images_root"], store_name)
                    )
                else:
                    assert store_name == f"{e['model']}/{colmap}"
        seen += len(lines)
    assert seen == len(default)
    # the store-wide names are not the models' (the bug this export fixes)
    all_names = {img.name for e in entries for img in pycolmap.Reconstruction(e["model_path"]).images.values()}
    assert not {n for line in default for n in line} <= all_names


def test_hloc_names_relative_to_an_image_dir(world, tmp_path):
    p = read_pair_file(world / "pairs.h5")
    export(world / "pairs.h5", tmp_path / "pairs.txt", "hloc", image_dir=world)
    lines = _pairs(tmp_path / "pairs.txt")
    export(world / "pairs.h5", tmp_path / "store.txt", "hloc")
    default = _pairs(tmp_path / "store.txt")
    assert [(f"w/{a}", f"w/{b}") for a, b in default] == lines
    for a, b in lines:
        assert os.path.samefile(world / a, os.path.join(p["images_root"], a[2:]))
    assert (tmp_path / "pairs.txt.provenance.json").is_file()
    with pytest.raises(SfmpairsError, match="outside"):
        export(world / "pairs.h5", tmp_path / "x.txt", "hloc", image_dir=world / "w" / "cluster_00")
    assert not (tmp_path / "x.txt").exists()


def test_hloc_per_model_needs_the_store_it_was_mined_from(world, no_photos, tmp_path):
    with pytest.raises(SfmpairsError, match="not those of"):
        export(world / "pairs.h5", tmp_path / "h", "hloc", per_model=True, store=no_photos / "sfm.h5")
    moved = tmp_path / "moved.h5"
    shutil.copy(world / "pairs.h5", moved)
    with h5py.File(moved, "a") as f:
        f.attrs["source_store"] = str(tmp_path / "gone.h5")
    with pytest.raises(SfmpairsError, match="--store"):
        export(moved, tmp_path / "h", "hloc", per_model=True)
    export(moved, tmp_path / "h", "hloc", per_model=True, store=world / "sfm.h5")
    assert not [x for x in tmp_path.iterdir() if x.name.startswith(".sfmpairs-export")]


def test_cirtorch_warns_of_too_few_clusters_and_refuses_when_strict(world, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, "sfmpairs.export"):
        export(world / "pairs.h5", tmp_path / "data", "cirtorch")
    text = caplog.text
    assert "train split has 3 clusters" in text and "--neg-num 5 needs 6" in text and "--neg-num 2" in text
    assert "val split has 1 clusters" in text and "--no-val" in text
    caplog.clear()
    with pytest.raises(SfmpairsError, match="train split has 3 clusters"):
        export(world / "pairs.h5", tmp_path / "strict", "cirtorch", strict=True)
    assert not (tmp_path / "strict" / "train" / CIRTORCH_NAME).exists()
    with pytest.raises(SfmpairsError, match="val split has 1 clusters"):
        export(world / "pairs.h5", tmp_path / "strict", "cirtorch", strict=True, neg_num=2)
    with caplog.at_level(logging.WARNING, "sfmpairs.export"):
        export(world / "pairs.h5", tmp_path / "strict", "cirtorch", strict=True, neg_num=0)
    assert not caplog.text


def test_cirtorch_whitening_file_learns_what_sfmpairs_whiten_learns(world, tmp_path):
    from sfmpairs.retrieval.descriptors import read_descriptors
    from sfmpairs.retrieval.whiten import learn_lw

    export(world / "pairs.h5", tmp_path / "data", "cirtorch")
    db_root = tmp_path / "data" / "train" / CIRTORCH_NAME
    with open(db_root / f"{CIRTORCH_NAME}-whiten.pkl", "rb") as fh:  # test.py: <name>-whiten.pkl
        w = pickle.load(fh)
    back = dict(line.split("\t") for line in (db_root / "cids.tsv").read_text().splitlines())
    p = read_pair_file(world / "pairs.h5")
    train = p["splits"]["train"]
    names = [back[c] for c in w["cids"]]
    assert len(set(w["cids"])) == len(w["cids"])
    assert [(names[a], names[b]) for a, b in zip(w["qidxs"], w["pidxs"])] == [
        (p["names"][q], p["names"][j]) for q, j in zip(train["query"], train["positive"])
    ]
    for cid in w["cids"]:  # test.py reads cid2filename(cid, db_root/ims)
        assert (db_root / "ims" / cid[-2:] / cid[-4:-2] / cid[-6:-4] / cid).is_file()
    # what test.py learns from them equals Lw learned on the same images and pairs, found from the pair file
    m, proj = learn_lw(read_descriptors(world / "d.h5", names), np.array(w["qidxs"]), np.array(w["pidxs"]))
    used = np.unique(np.concatenate([train["query"], train["positive"]]))
    row = np.searchsorted(used, np.arange(len(p["names"])))
    assert names == list(p["names"][used])
    m2, proj2 = learn_lw(
        read_descriptors(world / "d.h5", list(p["names"][used])), row[train["query"]], row[train["positive"]]
    )
    np.testing.assert_allclose(m, m2, atol=1e-12)
    np.testing.assert_allclose(proj, proj2, atol=1e-8)
    export(world / "pairs.h5", tmp_path / "all", "cirtorch", all_passing=True)
    with open(tmp_path / "all" / "train" / CIRTORCH_NAME / f"{CIRTORCH_NAME}-whiten.pkl", "rb") as fh:
        assert len(pickle.load(fh)["qidxs"]) == int(train["pool_passes"].sum())


@pytest.mark.parametrize("pairs", ["pairs.h5", "plain.h5"])
def test_dataloader_batches_tuples_in_spawned_workers(world, pairs):
    ds = PairTuples(world / pairs, split="train", image_size=40)
    pickle.loads(pickle.dumps(ds))  # what spawn and forkserver do to it
    pickle.loads(pickle.dumps(ToTensor(40)))
    loader = DataLoader(ds, batch_size=3, num_workers=2, multiprocessing_context="spawn", collate_fn=collate_tuples)
    k = 0
    for inputs, targets in loader:
        assert len(inputs) == len(targets) <= 3
        for images, target in zip(inputs, targets):
            q, pos, negs = ds[k]
            assert len(images) == 2 + len(negs) == len(target)
            assert target.tolist() == [-1, 1] + [0] * len(negs)
            for got, want in zip(images, [q, pos, *negs]):
                assert got.shape == (1, *want.shape) and torch.equal(got[0], want)
            k += 1
    assert k == len(ds) and len(ds[0][2]) == (2 if pairs == "pairs.h5" else 0)
    shapes = {tuple(x.shape) for i in range(len(ds)) for x in ds[i][:2]}
    assert len(shapes) > 1 or max(s[2] for s in shapes) == 40  # aspect kept: no stacking by torch's collate


def _python_blocks(path, after: str = "") -> list[str]:
    text = path.read_text()
    return re.findall(r"```python\n(.*?)```", text[text.index(after) :] if after else text, re.S)


@pytest.mark.parametrize("pairs", ["pairs.h5", "plain.h5"])
def test_every_docs_example_runs_on_files_mined_both_ways(world, pairs, tmp_path, monkeypatch, capsys):
    (tmp_path / "pairs.h5").symlink_to(world / pairs)
    (tmp_path / "sfm.h5").symlink_to(world / "sfm.h5")
    monkeypatch.chdir(tmp_path)
    blocks = _python_blocks(REPO / "docs" / "formats.md")
    readme = _python_blocks(REPO / "README.md")
    assert len(blocks) >= 3 and readme
    for code in blocks:
        assert "sfmpairs" not in code  # the formats doc reads files without sfmpairs
    for code in blocks + readme:
        scope = {"__name__": "__doc_example__"}
        exec(compile(code, "docs example", "exec"), scope)
    assert capsys.readouterr().out
