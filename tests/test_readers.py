"""The fast binary reader and the text reader against the pycolmap reference reader,
and against pycolmap's own answers (camera centres, tracks)."""

from __future__ import annotations

import numpy as np
import pycolmap
import pytest

from sfmpairs.sfm_io import colmap_binary, colmap_pycolmap, colmap_text
from sfmpairs.sfm_io.model import camera_centres, camera_models, quat_to_rotmat

from conftest import REAL_IDS, REAL_MODELS, assert_models_equal, needs_real_data


@needs_real_data()
@pytest.mark.parametrize("folder", REAL_MODELS, ids=REAL_IDS)
def test_fast_reader_equals_pycolmap_on_real_models(folder):
    assert_models_equal(colmap_binary.read_model(folder), colmap_pycolmap.read_model(folder))


@pytest.mark.parametrize("key", ["per-image-cameras", "shared-cameras"])
def test_readers_agree_on_synthetic_models(synthetic_models, key):
    ref = colmap_pycolmap.read_model(synthetic_models[key] / "binary")
    assert_models_equal(colmap_binary.read_model(synthetic_models[key] / "binary"), ref)
    assert_models_equal(colmap_text.read_model(synthetic_models[key] / "text"), ref)
    assert_models_equal(colmap_pycolmap.read_model(synthetic_models[key] / "text", "text"), ref)


def test_synthetic_models_cover_every_camera_model_and_odd_ids(synthetic_models):
    m = colmap_binary.read_model(synthetic_models["per-image-cameras"] / "binary")
    assert set(m.camera_model) == {name for name, _, _ in camera_models().values()}
    assert len(set(m.camera_ids.tolist())) == m.num_images  # one camera per image
    shared = colmap_binary.read_model(synthetic_models["shared-cameras"] / "binary")
    assert len(set(shared.camera_ids.tolist())) == 3
    assert shared.image_ids[0] == 1000 and np.all(np.diff(shared.image_ids) == 7)
    assert np.any(np.diff(m.point_ids.astype(np.int64)) > 1)  # point ids have gaps


def _check_against_pycolmap_objects(folder, model):
    """Independent checks: pycolmap's own centres, tracks and observations."""
    rec = pycolmap.Reconstruction(str(folder))
    centres = np.array([rec.images[int(i)].projection_center() for i in model.image_ids])
    np.testing.assert_allclose(camera_centres(model.qvec, model.tvec), centres, atol=1e-9)
    for k, i in enumerate(model.image_ids[:5].tolist()):
        R = rec.images[i].cam_from_world().rotation.matrix()
        np.testing.assert_allclose(quat_to_rotmat(model.qvec[k:k + 1])[0], R, atol=1e-12)
        ids = {p.point3D_id for p in rec.images[i].points2D if p.has_point3D()}
        row = model.point[model.indptr[k]:model.indptr[k + 1]]
        assert set(model.point_ids[row].tolist()) == ids
        assert len(row) == len(ids)  # each point once
    for k in range(0, model.num_points, max(1, model.num_points // 50)):
        track = rec.points3D[int(model.point_ids[k])].track
        assert model.track_length[k] == len({e.image_id for e in track.elements})
        np.testing.assert_array_equal(model.xyz[k], rec.points3D[int(model.point_ids[k])].xyz)


@needs_real_data()
@pytest.mark.parametrize("folder", REAL_MODELS[:7], ids=REAL_IDS[:7])
def test_fast_reader_matches_pycolmap_objects_on_real_models(folder):
    _check_against_pycolmap_objects(folder, colmap_binary.read_model(folder))


def test_fast_reader_matches_pycolmap_objects_on_synthetic(synthetic_models):
    folder = synthetic_models["per-image-cameras"] / "binary"
    _check_against_pycolmap_objects(folder, colmap_binary.read_model(folder))


def test_repeated_observations_are_kept_once_at_the_first_2d_point(synthetic_models):
    folder = synthetic_models["shared-cameras"] / "binary"
    rec = pycolmap.Reconstruction(str(folder))
    model = colmap_binary.read_model(folder)
    repeats = 0
    for k, iid in enumerate(model.image_ids.tolist()):
        first = {}
        for idx, p in enumerate(rec.images[iid].points2D):
            if p.has_point3D() and p.point3D_id not in first:
                first[p.point3D_id] = p.xy
        repeats += sum(p.has_point3D() for p in rec.images[iid].points2D) - len(first)
        row = slice(model.indptr[k], model.indptr[k + 1])
        got = dict(zip(model.point_ids[model.point[row]].tolist(), model.xy[row]))
        assert got.keys() == first.keys()
        for pid, xy in first.items():
            np.testing.assert_array_equal(got[pid], np.float32(xy))
    assert repeats > 0  # the generator made some


def test_rig_models_compose_sensor_from_rig(tmp_path):
    """Non-trivial rigs (COLMAP 3.12+): cam_from_world = sensor_from_rig * rig_from_world."""
    opts = pycolmap.SyntheticDatasetOptions()
    opts.num_rigs, opts.num_cameras_per_rig, opts.num_frames_per_rig = 2, 3, 4
    opts.num_points3D = 60
    rec = pycolmap.synthesize_dataset(opts)
    for fmt, write in (("binary", rec.write_binary), ("text", rec.write_text)):
        (tmp_path / fmt).mkdir()
        write(str(tmp_path / fmt))
    ref = colmap_pycolmap.read_model(tmp_path / "binary")
    assert_models_equal(colmap_binary.read_model(tmp_path / "binary"), ref)
    assert_models_equal(colmap_text.read_model(tmp_path / "text"), ref)
    _check_against_pycolmap_objects(tmp_path / "binary", ref)


def test_delete_in_place_equals_np_delete():
    from sfmpairs.sfm_io.model import _delete_in_place

    rng = np.random.default_rng(0)
    for n in (10, 1000, 50_000):
        for k in (0, 1, 3, n // 20, n // 4):
            drop = np.sort(rng.choice(n, k, replace=False))
            a = rng.random((n, 2)).astype(np.float32)
            np.testing.assert_array_equal(_delete_in_place(a.copy(), drop), np.delete(a, drop, axis=0))
            b = rng.integers(0, 100, n).astype(np.int32)
            np.testing.assert_array_equal(_delete_in_place(b.copy(), drop), np.delete(b, drop))


def test_long_tracks_take_the_exact_path(tmp_path):
    """Track lengths of 256 and more defeat the one-byte guess of record offsets."""
    from sfmpairs.sfm_io.synthetic import random_reconstruction, write_model

    rec = random_reconstruction(300, 40, 290, seed=4, duplicate_fraction=0.1)
    write_model(rec, tmp_path / "long")
    model = colmap_binary.read_model(tmp_path / "long")
    assert model.track_length.max() >= 256
    assert_models_equal(model, colmap_pycolmap.read_model(tmp_path / "long"))


def test_rotations_from_quaternions_match_pycolmap_and_normalise():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(20, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    R = quat_to_rotmat(q)
    for qi, Ri in zip(q, R):
        np.testing.assert_allclose(Ri, pycolmap.Rotation3d([qi[1], qi[2], qi[3], qi[0]]).matrix(), atol=1e-12)
    np.testing.assert_allclose(quat_to_rotmat(3.0 * q), R, atol=1e-12)  # scale does not matter
