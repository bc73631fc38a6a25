"""``reconstruct``: photos to COLMAP models that ingest and mine read."""

from __future__ import annotations

import re
import shutil

import numpy as np
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
    """20 rendered photos and a file COLMAP cannot read, which is listed as not registered."""
    synth(tmp_path / "w", clusters=1, images_per_cluster=20, seed=0)
    (tmp_path / "w" / "cluster_00" / "images" / "broken.jpg").write_bytes(b"not a photo")
    out = reconstruct(tmp_path / "w" / "cluster_00" / "images", tmp_path / "models")
    _check(out, 21, tmp_path, 0.7)
    assert "broken.jpg" in out["unregistered"] and len(out["unregistered"]) == 21 - out["registered"]


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


# ----------------------------------------------------------- each photo in one model
def _mapper_models(tmp_path, sizes_and_drops, duplicate_fraction=0.0, seen_by_one=False):
    """pycolmap models as the mapper might leave them: copies of one random model
    (40 images; a ``duplicate_fraction`` of its tracks list an image twice), each
    without the images whose indices are given, and without the points then seen by
    one image only (with ``seen_by_one``, with them: pycolmap deletes a point left
    with one observation, not one left with two of one image)."""
    import pycolmap

    from sfmpairs.synthetic.models import random_reconstruction, write_model

    full = tmp_path / f"full-{duplicate_fraction}"
    if not full.is_dir():
        write_model(random_reconstruction(40, 1500, 5, duplicate_fraction=duplicate_fraction, seed=7), full)
    models = []
    for drop in sizes_and_drops:
        rec = pycolmap.Reconstruction(str(full))
        ids = sorted(rec.reg_image_ids())
        for i in drop:
            rec.deregister_frame(rec.image(ids[i]).frame_id)
        for pid in [] if seen_by_one else _seen_by_one(rec):
            rec.delete_point3D(pid)
        models.append(rec)
    return models


def _names(rec):
    return {img.name for img in rec.images.values() if img.has_pose}


def _seen_by_one(rec):
    """The 3D points of ``rec`` seen by fewer than two distinct images."""
    return [pid for pid, p in rec.points3D.items() if len({e.image_id for e in p.track.elements}) < 2]


def _check_as_drop_images(tmp_path, rec, before):
    """``rec``, read back, is what sfmpairs' own removal (numpy, on the model as read:
    :func:`drop_images`) leaves of ``before`` without the images ``rec`` lacks."""
    from sfmpairs.sfm_io import colmap_binary
    from sfmpairs.sfm_io.shared_names import drop_images

    for name, r in (("after", rec), ("before", before)):
        shutil.rmtree(tmp_path / name, ignore_errors=True)
        (tmp_path / name).mkdir()
        r.write_binary(str(tmp_path / name))
    got, m = colmap_binary.read_model(tmp_path / "after"), colmap_binary.read_model(tmp_path / "before")
    want = drop_images(m, np.array([n in _names(rec) for n in m.names]))
    assert got.names == want.names and got.point_ids.tolist() == want.point_ids.tolist()
    np.testing.assert_array_equal(got.indptr, want.indptr)
    np.testing.assert_array_equal(got.point, want.point)


def test_each_photo_stays_in_its_largest_model_and_small_models_go(tmp_path):
    """Mapper models: a 2-photo start inside the large one (as issue 16 saw), the large
    one (images 0..29), and one of images 24..39 (6 shared). The 2-photo model goes
    (all in the larger), the last keeps 10 photos (30..39) and stays at the default
    minimum of 10; the points of the large model are untouched."""
    from sfmpairs.sfm_io.reconstruct import clean_models

    small, large, late = _mapper_models(tmp_path, [range(2, 40), range(30, 40), range(0, 24)])
    large_points = large.num_points3D()
    kept, dropped = clean_models([small, large, late], min_model_size=10)
    assert kept == [large, late] and [d["mapper_model"] for d in dropped] == [0]
    assert dropped[0]["in_larger_model"] == 2 and "larger model" in dropped[0]["why"]
    assert _names(large).isdisjoint(_names(late)) and len(_names(late)) == 10
    assert large.num_points3D() == large_points
    _check_as_drop_images(tmp_path, late, _mapper_models(tmp_path, [range(0, 24)])[0])


def test_tracks_that_list_a_photo_twice_lose_the_points_left_seen_by_one(tmp_path):
    """A fifth of the tracks list their first photo twice, as COLMAP's may. The late
    model (images 0..19) leaves 10..19 to the large one (10..39): COLMAP's
    deregistration keeps a point whose track is left with one photo listed twice (one
    first seen by image 9, twice, then by 10..13); sfmpairs deletes it, and leaves the
    model that its own removal on the model as read leaves."""
    from sfmpairs.sfm_io.reconstruct import clean_models

    large, late = _mapper_models(tmp_path, [range(0, 10), range(20, 40)], duplicate_fraction=0.2)
    before = _mapper_models(tmp_path, [range(20, 40)], duplicate_fraction=0.2)[0]
    assert not _seen_by_one(late)
    kept, dropped = clean_models([large, late], min_model_size=10)
    assert kept == [large, late] and not dropped and len(_names(late)) == 10
    assert not _seen_by_one(late) and not _seen_by_one(large)
    _check_as_drop_images(tmp_path, late, before)


def test_every_kept_model_loses_its_points_seen_by_one_photo(tmp_path):
    """A model that loses no photo is cleaned as one that does: its points seen by one
    photo only (tracks listing a photo twice, whose other photos the mapper took out)
    are deleted, so that every point reconstruct writes is seen by two photos at least."""
    from sfmpairs.sfm_io.reconstruct import clean_models

    (rec,) = _mapper_models(tmp_path, [range(0, 20)], duplicate_fraction=0.2, seen_by_one=True)
    lonely, points = _seen_by_one(rec), rec.num_points3D()
    assert len(lonely) == 5
    kept, dropped = clean_models([rec], min_model_size=10)
    assert kept == [rec] and not dropped and len(_names(rec)) == 20
    assert not _seen_by_one(rec) and rec.num_points3D() == points - len(lonely)


def test_a_photo_of_a_dropped_model_stays_in_a_smaller_one(tmp_path):
    """A chain of three mapper models: the large one (images 0..29), a middle one
    (20..34) and a late one (30..39). The middle one keeps 5 photos after the large one
    has taken its share, under the minimum of 10, and goes; the late one then keeps all
    of 30..39 rather than losing 30..34 to the dropped model: no photo is lost."""
    from sfmpairs.sfm_io.reconstruct import clean_models

    large, middle, late = _mapper_models(tmp_path, [range(30, 40), [*range(0, 20), *range(35, 40)], range(0, 30)])
    kept, dropped = clean_models([large, middle, late], min_model_size=10)
    assert kept == [large, late] and [d["mapper_model"] for d in dropped] == [1]
    assert dropped[0]["in_larger_model"] == 10 and "5 of its photos kept by a smaller model" in dropped[0]["why"]
    assert len(_names(large)) == 30 and len(_names(late)) == 10 and _names(large).isdisjoint(_names(late))


def test_keepers_follow_the_rule_on_random_models():
    """The rule, checked on random overlapping name sets: models from the most photos to
    the fewest each keep the photos no model before it kept, when at least min_size."""
    from sfmpairs.sfm_io.shared_names import keepers

    rng = np.random.default_rng(0)
    for _ in range(300):
        names = [sorted({f"p{i}" for i in rng.integers(0, 30, rng.integers(0, 20))}) for _ in range(rng.integers(1, 6))]
        min_size = int(rng.integers(1, 6))
        keeper = keepers(names, min_size)
        counts = np.bincount(list(keeper.values()), minlength=len(names))
        taken: set = set()
        for k in sorted(range(len(names)), key=lambda k: (-len(names[k]), k)):  # brute force, model by model
            free = set(names[k]) - taken
            if len(free) >= min_size:
                assert {n for n, m in keeper.items() if m == k} == free
                taken |= free
            else:
                assert counts[k] == 0
        assert set(keeper) == taken


def test_models_under_the_minimum_are_dropped_and_said(tmp_path, caplog):
    from sfmpairs.sfm_io.reconstruct import clean_models

    large, late = _mapper_models(tmp_path, [range(30, 40), range(0, 24)])
    kept, dropped = clean_models([large, late], min_model_size=11)
    assert kept == [large] and dropped[0]["photos"] == 16 and dropped[0]["in_larger_model"] == 6
    assert "fewer than --min-model-size 11" in dropped[0]["why"] and "dropped mapper model 1" in caplog.text
    large, late = _mapper_models(tmp_path, [range(30, 40), range(0, 24)])
    kept, dropped = clean_models([large, late], min_model_size=1)
    assert kept == [large, late] and not dropped


def test_a_failed_reconstruct_leaves_nothing(tmp_path, monkeypatch):
    from sfmpairs.sfm_io import reconstruct as module

    synth(tmp_path / "w", clusters=1, images_per_cluster=2, image_size=(64, 48))

    def fail(*args, **kwargs):
        raise SfmpairsError("mapping failed")

    monkeypatch.setattr(module, "map_models", fail)
    with pytest.raises(SfmpairsError, match="mapping failed"):
        reconstruct(tmp_path / "w" / "cluster_00" / "images", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]  # no output, no temporary folder


def test_a_full_disk_is_one_line(tmp_path):
    """pycolmap's C++ errors (here: its database cannot be written under a 100 kB file
    size limit) become one line naming the output and the stage, exit 2, nothing left."""
    import resource
    import signal
    import subprocess
    import sys

    synth(tmp_path / "w", clusters=1, images_per_cluster=3, image_size=(64, 48))

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    out = subprocess.run(
        [sys.executable, "-m", "sfmpairs", "reconstruct", str(tmp_path / "w" / "cluster_00" / "images"), "-o",
         str(tmp_path / "models"), "-q"],
        capture_output=True, text=True, preexec_fn=limit, timeout=300,
    )  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert re.search(r"models: pycolmap stopped in the \w+ stage: ", out.stderr)
    assert not (tmp_path / "models").exists()


def test_the_mapper_may_make_a_model_per_place_and_keeps_every_model():
    """COLMAP's mapper stops at 50 models: 2,000 photos of 100 places gave exactly 50
    (benchmarks/bench_reconstruct.py). sfmpairs lets it make as many as the photos allow
    (each model it keeps starts from two photos of no other) and asks it to keep every
    model: --min-model-size is applied by clean_models, which says what it drops."""
    from sfmpairs.sfm_io.reconstruct import mapper_options

    many = mapper_options(2_000)
    assert many.max_num_models == 1_000 and many.min_model_size == 1
    # each start tried counts against init_num_trials (COLMAP's 200), models kept or not:
    # at COLMAP's 200, a collection of more places lost the rest whatever max_num_models said
    assert many.init_num_trials >= 2 * many.max_num_models
    few = mapper_options(30)
    assert few.max_num_models == 50 and few.init_num_trials == 200  # never fewer than COLMAP's
    # seeded (COLMAP's -1 seeds from the clock: no two runs alike)
    assert few.random_seed == 0 and mapper_options(30, seed=7).random_seed == 7


@pytest.fixture(scope="module")
def two_places(tmp_path_factory):
    """One folder of photos of two places: 14 photos in a/, 5 in b/ (320 x 240)."""
    root = tmp_path_factory.mktemp("two_places")
    for name, count, seed in (("a", 14, 2), ("b", 5, 5)):
        synth(root / name, clusters=1, images_per_cluster=count, seed=seed, image_size=(320, 240))
        shutil.copytree(root / name / "cluster_00" / "images", root / "photos" / name)
    return root / "photos"


def _model_names(folder):
    from sfmpairs.sfm_io import colmap_binary

    return [sorted(colmap_binary.read_model(m).names) for m in sorted((folder / "sparse").iterdir())]


def test_a_small_place_is_kept_with_a_small_minimum(two_places, tmp_path, monkeypatch):
    """--min-model-size 2 keeps the 5-photo place as a model of its own: the mapper is
    asked to keep every model (with COLMAP's options, its minimum of 10 dropped the
    place inside the mapper, whatever --min-model-size said)."""
    import pycolmap

    given, checks = [], []
    mapping, matching = pycolmap.incremental_mapping, pycolmap.match_exhaustive

    def spy_mapping(*args, **kwargs):
        given.append(kwargs.get("options", args[3] if len(args) > 3 else None))
        return mapping(*args, **kwargs)

    def spy_matching(*args, **kwargs):
        checks.append(kwargs.get("verification_options"))
        return matching(*args, **kwargs)

    monkeypatch.setattr(pycolmap, "incremental_mapping", spy_mapping)
    monkeypatch.setattr(pycolmap, "match_exhaustive", spy_matching)
    out = reconstruct(two_places, tmp_path / "models", min_model_size=2, seed=3)
    # the options reach the mapper: COLMAP's defaults are 10, 50, 200 and -1 (a seed from the clock)
    assert [(o.min_model_size, o.max_num_models, o.init_num_trials, o.random_seed) for o in given] == [(1, 50, 200, 3)]
    assert [c.ransac.random_seed for c in checks] == [3]  # and the geometric check's RANSAC is seeded
    models = _model_names(tmp_path / "models")
    assert len(models) == 2 and not out["dropped"], (out["models"], out["dropped"])
    places = sorted({n.split("/")[0] for n in names} for names in models)
    assert places == [{"a"}, {"b"}] and min(map(len, models)) >= 2


def test_a_small_place_under_the_minimum_is_dropped_and_said(two_places, tmp_path, caplog):
    """The default --min-model-size 10: the 5-photo place's model is made by the mapper
    and then dropped by sfmpairs, in the log and in reconstruct.json, not left out
    inside the mapper without a word."""
    import json

    out = reconstruct(two_places, tmp_path / "models")
    assert [{n.split("/")[0] for n in names} for names in _model_names(tmp_path / "models")] == [{"a"}]
    assert {n for n in out["unregistered"] if n.startswith("b/")} == {f"b/img_{k:03d}.jpg" for k in range(5)}
    small = [d for d in out["dropped"] if d["in_larger_model"] == 0]  # a place of its own
    assert len(small) == 1 and 2 <= small[0]["photos"] <= 5, out["dropped"]
    assert "fewer than --min-model-size 10 photos" in small[0]["why"]
    assert f"dropped mapper model {small[0]['mapper_model']} of {small[0]['photos']} photos" in caplog.text
    assert json.loads((tmp_path / "models" / "reconstruct.json").read_text())["summary"]["dropped"] == out["dropped"]
