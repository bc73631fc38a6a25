"""``reconstruct``: photos to COLMAP models that ingest and mine read."""

from __future__ import annotations

import pytest

from conftest import COLMAP, needs_real_data
from sfmpairs import SfmpairsError
from sfmpairs.mining.mine import mine
from sfmpairs.sfm_io.ingest import ingest
from sfmpairs.sfm_io.reconstruct import reconstruct
from sfmpairs.sfm_io.store import read_store
from sfmpairs.synthetic.world import synth


def _check(out, photos, tmp_path, min_fraction):
    registered = sum(out["models"].values())
    assert out["photos"] == photos and registered >= min_fraction * photos
    ingest([tmp_path / "models"], tmp_path / "sfm.h5")
    s = read_store(tmp_path / "sfm.h5", observations=False)
    assert len(s["images/name"]) == registered
    assert (tmp_path / "models" / "images").is_dir()  # photos found through the link
    mine(tmp_path / "sfm.h5", tmp_path / "pairs.h5", val_fraction=0, queries_per_cluster=0)


def test_reconstruct_a_rendered_cluster(tmp_path):
    synth(tmp_path / "w", clusters=1, images_per_cluster=20, seed=0)
    out = reconstruct(tmp_path / "w" / "cluster_00" / "images", tmp_path / "models")
    _check(out, 20, tmp_path, 0.7)


@needs_real_data()
def test_reconstruct_real_photos(tmp_path):
    out = reconstruct(COLMAP / "fountain-p11" / "images", tmp_path / "models", max_image_size=800)
    _check(out, 11, tmp_path, 0.8)


def test_bad_reconstruct_input(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SfmpairsError, match="at least two photos"):
        reconstruct(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(SfmpairsError, match="not a folder"):
        reconstruct(tmp_path / "nope", tmp_path / "out")
    synth(tmp_path / "w", clusters=1, images_per_cluster=2, image_size=(64, 48))
    with pytest.raises(SfmpairsError, match="vocabulary tree"):
        reconstruct(tmp_path / "w" / "cluster_00" / "images", tmp_path / "out", matcher="vocab-tree")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("mine")
    with pytest.raises(SfmpairsError, match="not empty"):
        reconstruct(tmp_path / "w" / "cluster_00" / "images", tmp_path / "busy")
