"""The synthetic world: photos, models, and the ground truth that ingest and mine must
reproduce exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sfmpairs import SfmpairsError
from sfmpairs.mining.mine import mine
from sfmpairs.sfm_io.ingest import ingest
from sfmpairs.sfm_io.store import read_store
from sfmpairs.synthetic.world import synth


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    synth(root / "w", clusters=2, images_per_cluster=8, image_size=(120, 90), seed=3, points=800)
    ingest([root / "w"], root / "sfm.h5")
    mine(root / "sfm.h5", root / "pairs.h5", queries_per_cluster=0, val_fraction=0.5, strategy="max-inliers")
    return root


def test_layout_and_photos(world):
    from PIL import Image

    w = json.loads((world / "w" / "world.json").read_text())
    assert sorted(w["clusters"]) == ["cluster_00", "cluster_01"]
    for c in w["clusters"]:
        photos = sorted((world / "w" / c / "images").glob("*.jpg"))
        assert len(photos) == 8
        with Image.open(photos[0]) as img:
            assert img.size == (120, 90)
        assert (world / "w" / c / "sparse" / "0" / "points3D.bin").exists()


def test_store_equals_the_ground_truth(world):
    w = json.loads((world / "w" / "world.json").read_text())
    s = read_store(world / "sfm.h5")
    names = list(s["images/name"])
    for c, truth in w["clusters"].items():
        for k, cam in enumerate(truth["cameras"]):
            i = names.index(f"{c}/images/img_{k:03d}.jpg")
            R, t = np.array(cam["R"]), np.array(cam["t"])
            np.testing.assert_allclose(s["images/rotation"][i], R, atol=1e-12)
            np.testing.assert_allclose(s["images/centre"][i], -R.T @ t, atol=1e-12)
            assert s["images/focal"][i] == pytest.approx(cam["f"])
            row = s["observations/point"][s["observations/indptr"][i] : s["observations/indptr"][i + 1]]
            assert set(s["points/colmap_id"][row].tolist()) == set(truth["visible"][k])
            # every observation is the exact projection of its point
            xyz = s["points/xyz"][row]
            Xc = xyz @ R.T + t
            xy = cam["f"] * Xc[:, :2] / Xc[:, 2:] + np.array([60, 45])
            a, b = s["observations/indptr"][i], s["observations/indptr"][i + 1]
            np.testing.assert_allclose(s["observations/xy"][a:b], xy, atol=1e-3)


def test_mined_statistics_equal_the_ground_truth(world):
    """co-observed points = shared visible points; scale change from exact depths."""
    import h5py

    w = json.loads((world / "w" / "world.json").read_text())
    s = read_store(world / "sfm.h5", observations=False)
    names = list(s["images/name"])
    with h5py.File(world / "pairs.h5") as f:
        for split in ("train", "val"):
            g = {k: f[f"{split}/{k}"][()] for k in ("query", "pool", "pool_co_observed", "pool_scale_change")}
            for r, q in enumerate(g["query"]):
                c, k = names[q].split("/")[0], int(names[q].split("_")[-1][:3])
                truth = w["clusters"][c]
                for slot, j in enumerate(g["pool"][r]):
                    if j < 0:
                        continue
                    kj = int(names[j].split("_")[-1][:3])
                    shared = sorted(set(truth["visible"][k]) & set(truth["visible"][kj]))
                    assert g["pool_co_observed"][r, slot] == len(shared)
                    if not shared:
                        continue
                    logs = []
                    for pid in shared:
                        X = np.array(truth["points"][str(pid)])
                        zq = (np.array(truth["cameras"][k]["R"]) @ X + truth["cameras"][k]["t"])[2]
                        zj = (np.array(truth["cameras"][kj]["R"]) @ X + truth["cameras"][kj]["t"])[2]
                        fq, fj = truth["cameras"][k]["f"] / 120, truth["cameras"][kj]["f"] / 120
                        logs.append(np.log((fq / zq) / (fj / zj)))
                    assert g["pool_scale_change"][r, slot] == pytest.approx(np.exp(abs(np.median(logs))), abs=1e-6)


def test_same_seed_same_world(tmp_path):
    synth(tmp_path / "a", clusters=1, images_per_cluster=3, image_size=(64, 48), seed=9, points=200)
    synth(tmp_path / "b", clusters=1, images_per_cluster=3, image_size=(64, 48), seed=9, points=200)
    assert (tmp_path / "a" / "world.json").read_text() == (tmp_path / "b" / "world.json").read_text()
    for k in range(3):
        name = f"cluster_00/images/img_{k:03d}.jpg"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_bad_synth_options(tmp_path):
    with pytest.raises(SfmpairsError, match="image-size"):
        synth(tmp_path / "x", image_size=(4, 4))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(SfmpairsError, match="not empty"):
        synth(tmp_path / "full", clusters=1, images_per_cluster=2)
