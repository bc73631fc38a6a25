"""The readers and the SfM store against pycolmap's own objects (every image and point
of every real model), and the fast and text readers against the pycolmap reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pycolmap
import pytest

from conftest import COLMAP, REAL_IDS, REAL_MODELS, assert_models_equal, needs_real_data
from sfmpairs.sfm_io import colmap_binary, colmap_pycolmap, colmap_text
from sfmpairs.sfm_io.model import camera_centres, camera_models, quat_to_rotmat


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


def _pycolmap_truth(folder) -> dict:
    """Everything a model holds, read by pycolmap's own objects (no sfmpairs code):
    registered images sorted by id, their poses, cameras and observations (the 2D
    points that name a 3D point, in 2D-point order, a repeated 3D point kept at its
    first 2D point), and the 3D points sorted by id with their tracks."""
    rec = pycolmap.Reconstruction(str(folder))
    ids = sorted(rec.reg_image_ids())
    registered = set(ids)
    t = {
        "image_ids": np.array(ids),
        "names": [],
        "camera_ids": [],
        "R": [],
        "t": [],
        "quat": [],
        "centre": [],
        "camera_model": [],
        "params": [],
        "focal": [],
        "width": [],
        "height": [],
        "counts": [],
        "obs_ids": [],
        "obs_xy": [],
    }
    for i in ids:
        im = rec.images[i]
        cam = rec.cameras[im.camera_id]
        pose = im.cam_from_world()
        x, y, z, w = pose.rotation.quat
        idxs = list(cam.focal_length_idxs())
        for key, value in (
            ("names", im.name),
            ("camera_ids", im.camera_id),
            ("R", pose.rotation.matrix()),
            ("t", pose.translation),
            ("quat", [w, x, y, z]),
            ("centre", im.projection_center()),
            ("camera_model", cam.model.name),
            ("params", np.array(cam.params)),
            ("focal", np.mean(cam.params[idxs]) if idxs else np.nan),
            ("width", cam.width),
            ("height", cam.height),
        ):
            t[key].append(value)
        obs = im.get_observation_points2D()
        pid = np.array([p.point3D_id for p in obs], np.uint64)
        xy = np.array([p.xy for p in obs], np.float64).reshape(-1, 2)
        _, first = np.unique(pid, return_index=True)
        keep = np.sort(first)
        t["counts"].append(len(keep))
        t["obs_ids"].append(pid[keep])
        t["obs_xy"].append(xy[keep])
    for key in ("R", "t", "quat", "centre", "focal", "width", "height", "camera_ids", "counts"):
        t[key] = np.array(t[key])
    t["obs_ids"] = np.concatenate(t["obs_ids"]) if ids else np.zeros(0, np.uint64)
    t["obs_xy"] = np.concatenate(t["obs_xy"]) if ids else np.zeros((0, 2))
    pids = sorted(rec.point3D_ids())
    t["point_ids"] = np.array(pids, np.uint64)
    t["xyz"] = np.array([rec.points3D[p].xyz for p in pids]).reshape(-1, 3)
    t["track_length"] = np.array([len({e.image_id for e in rec.points3D[p].track.elements} & registered) for p in pids])
    return t


def _assert_matches_pycolmap(
    t: dict,
    *,
    image_ids,
    names,
    camera_ids,
    qvec,
    tvec,
    rotation,
    centre,
    camera_model,
    params,
    width,
    height,
    indptr,
    obs_point_ids,
    obs_xy,
    point_ids,
    xyz,
    track_length,
    focal=None,
) -> None:
    """What an sfmpairs reader or store gives, against :func:`_pycolmap_truth`."""
    np.testing.assert_array_equal(image_ids, t["image_ids"])
    assert list(names) == t["names"]
    np.testing.assert_array_equal(camera_ids, t["camera_ids"])
    q = qvec / np.linalg.norm(qvec, axis=1, keepdims=True)
    sign = np.where(np.sum(q * t["quat"], axis=1) < 0, -1.0, 1.0)[:, None]  # q and -q: one rotation
    np.testing.assert_allclose(q * sign, t["quat"], atol=1e-12)
    np.testing.assert_allclose(tvec, t["t"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(rotation, t["R"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(centre, t["centre"], rtol=1e-12, atol=1e-9)
    assert list(camera_model) == t["camera_model"]
    assert len(params) == len(t["params"])
    for got, want in zip(params, t["params"]):
        np.testing.assert_array_equal(got, want)
    if focal is not None:
        np.testing.assert_allclose(focal, t["focal"], rtol=1e-15)  # NaN where the model has none
    np.testing.assert_array_equal(width, t["width"])
    np.testing.assert_array_equal(height, t["height"])
    np.testing.assert_array_equal(np.diff(indptr), t["counts"])
    np.testing.assert_array_equal(obs_point_ids, t["obs_ids"])
    np.testing.assert_array_equal(obs_xy, t["obs_xy"].astype(np.float32))  # stored as float32
    np.testing.assert_array_equal(point_ids, t["point_ids"])
    np.testing.assert_array_equal(xyz, t["xyz"])
    np.testing.assert_array_equal(track_length, t["track_length"])


def _check_model_against_pycolmap(folder, model) -> None:
    _assert_matches_pycolmap(
        _pycolmap_truth(folder),
        image_ids=model.image_ids,
        names=model.names,
        camera_ids=model.camera_ids,
        qvec=model.qvec,
        tvec=model.tvec,
        rotation=quat_to_rotmat(model.qvec),
        centre=camera_centres(model.qvec, model.tvec),
        camera_model=model.camera_model,
        params=model.params,
        width=model.width,
        height=model.height,
        indptr=model.indptr,
        obs_point_ids=model.point_ids[model.point],
        obs_xy=model.xy,
        point_ids=model.point_ids,
        xyz=model.xyz,
        track_length=model.track_length,
    )


@pytest.fixture(scope="module")
def real_store(tmp_path_factory):
    from sfmpairs.sfm_io.ingest import ingest
    from sfmpairs.sfm_io.store import read_store

    out = tmp_path_factory.mktemp("real") / "sfm.h5"
    ingest([COLMAP], out)
    return read_store(out)


@needs_real_data()
@pytest.mark.parametrize("folder", REAL_MODELS, ids=REAL_IDS)
def test_store_holds_every_image_and_point_as_pycolmap_reads_them(folder, real_store):
    """Every image and every point of every real model, in the SfM store, against
    pycolmap.Reconstruction: poses, centres, cameras, observations, points, tracks."""
    s = real_store
    m = list(s["models/path"]).index(str(folder.resolve()))
    a, b = s["models/image_range"][m]
    pa, pb = s["models/point_range"][m]
    obs = slice(s["observations/indptr"][a], s["observations/indptr"][b])
    k = s["images/num_params"][a:b]
    params = s["images/params"][a:b]
    assert all(np.isnan(p[n:]).all() for p, n in zip(params, k))
    assert np.all(s["points/model"][s["observations/point"][obs]] == m)  # the model's own points
    t = _pycolmap_truth(folder)
    _assert_matches_pycolmap(
        t,
        image_ids=s["images/colmap_id"][a:b],
        names=s["images/colmap_name"][a:b],
        camera_ids=s["images/camera_colmap_id"][a:b],
        qvec=s["images/qvec"][a:b],
        tvec=s["images/tvec"][a:b],
        rotation=s["images/rotation"][a:b],
        centre=s["images/centre"][a:b],
        camera_model=s["images/camera_model"][a:b],
        params=[p[:n] for p, n in zip(params, k)],
        focal=s["images/focal"][a:b],
        width=s["images/width"][a:b],
        height=s["images/height"][a:b],
        indptr=s["observations/indptr"][a : b + 1],
        obs_point_ids=s["points/colmap_id"][s["observations/point"][obs]],
        obs_xy=s["observations/xy"][obs],
        point_ids=s["points/colmap_id"][pa:pb],
        xyz=s["points/xyz"][pa:pb],
        track_length=s["points/track_length"][pa:pb],
    )
    # the stored name is the COLMAP name under its model's photo folder, and names the photo
    names = s["images/name"][a:b]
    assert all(n.endswith("/" + c) for n, c in zip(names, t["names"]))
    if s["models/images_dir"][m]:
        root = s["attrs"]["images_root"]
        assert all((Path(root) / n).is_file() for n in names)


@needs_real_data()
@pytest.mark.parametrize("folder", REAL_MODELS, ids=REAL_IDS)
def test_fast_reader_matches_pycolmap_objects_on_real_models(folder):
    _check_model_against_pycolmap(folder, colmap_binary.read_model(folder))


@pytest.mark.parametrize("key", ["per-image-cameras", "shared-cameras"])
def test_readers_match_pycolmap_objects_on_synthetic(synthetic_models, key):
    folder = synthetic_models[key]
    _check_model_against_pycolmap(folder / "binary", colmap_binary.read_model(folder / "binary"))
    _check_model_against_pycolmap(folder / "binary", colmap_text.read_model(folder / "text"))


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
    _check_model_against_pycolmap(tmp_path / "binary", colmap_binary.read_model(tmp_path / "binary"))
    _check_model_against_pycolmap(tmp_path / "binary", colmap_text.read_model(tmp_path / "text"))


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
    from sfmpairs.synthetic.models import random_reconstruction, write_model

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


def _edit_first_data_line(path: Path, edit, skip: int = 0) -> int:
    """Apply ``edit`` to the tokens of the first data line (after ``skip`` more data
    lines) of a COLMAP text file; returns its 1-based line number."""
    lines = path.read_text().splitlines()
    data = [k for k, s in enumerate(lines) if s.strip() and not s.startswith("#")]
    k = data[skip]
    lines[k] = " ".join(edit(lines[k].split()))
    path.write_text("\n".join(lines) + "\n")
    return k + 1


@pytest.mark.parametrize(
    "file, skip, column, value",
    [
        ("cameras.txt", 0, 0, str(2**40)),  # camera id: 32 bits
        ("images.txt", 0, 0, str(2**32)),  # image id: 32 bits
        ("images.txt", 0, 8, "9" * 30),  # camera id of an image
        ("images.txt", 1, -1, str(2**63)),  # a 3D point id in the 2D points: signed 64 bits, as pycolmap
        ("images.txt", 1, -1, "9" * 400),
        ("points3D.txt", 0, 0, str(2**64)),  # 3D point id: 64 bits
    ],
)
def test_text_ids_too_large_for_their_column(synthetic_models, tmp_path, file, skip, column, value):
    """An id too large for its column (two numbers run together, appended digits) is one
    line naming the file and line, not an OverflowError."""
    import shutil

    from sfmpairs import SfmpairsError

    folder = tmp_path / "text"
    shutil.copytree(synthetic_models["shared-cameras"] / "text", folder)
    no = _edit_first_data_line(folder / file, lambda tok: tok[:column] + [value] + tok[column:][1:], skip)
    with pytest.raises(SfmpairsError, match=rf"^{folder / file} line {no}: .*too large") as e:
        colmap_text.read_model(folder)
    assert "\n" not in str(e.value)


def test_gathering_2d_points_equals_numpy_on_unaligned_records():
    """The compiled pass over images.bin's 2D points against numpy's own reading of the
    same bytes: records at every alignment, points with no 3D point left out (ids of
    2**63 and more kept), float64 values that float32 rounds, cannot hold (inf), or
    that are NaN, -0.0 or subnormal."""
    rng = np.random.default_rng(3)
    counts = np.array([5, 0, 7, 1, 9, 3, 6, 2], np.int64)
    gaps = np.arange(len(counts)) + 1  # bytes before each image's records: every alignment mod 8
    points, buf, pos = [], bytearray(), 0
    records = []
    for n, gap in zip(counts, gaps):
        buf += bytes(int(gap))
        pos += int(gap)
        rec = np.zeros(n, [("x", "<f8"), ("y", "<f8"), ("id", "<u8")])
        rec["x"] = rng.normal(0, 1e3, n)
        rec["y"] = rng.choice([1e39, -1e39, np.nan, 1e-310, -0.0, 0.1, 2.0**-149, 3.4028235677973366e38], n)
        ids = rng.choice(np.array([1, 2**63, 2**64 - 2], np.uint64), n)  # any id but 2**64 - 1 names a point
        rec["id"] = np.where(rng.random(n) < 0.3, np.uint64(2**64 - 1), ids)
        points.append(pos)
        buf += rec.tobytes()
        pos += rec.nbytes
        records.append(rec)
    per_image, ids, xy = colmap_binary._gather_points2d(
        np.frombuffer(bytes(buf), np.uint8), np.array(points, np.int64), counts
    )
    valid = [r[r["id"] != np.uint64(2**64 - 1)] for r in records]
    assert per_image.tolist() == [len(v) for v in valid]
    assert np.array_equal(ids, np.concatenate([v["id"] for v in valid]))
    with np.errstate(over="ignore"):
        expect = np.concatenate([np.stack([v["x"], v["y"]], 1) for v in valid]).astype(np.float32)
    assert xy.dtype == np.float32 and np.array_equal(xy.view(np.uint32), expect.view(np.uint32))


def test_param_table_pads_each_images_parameters():
    """The store's images/params rows: each image's camera parameters then NaN, for
    cameras of one parameter count (one copy) and of several (row by row)."""
    from sfmpairs.sfm_io.model import param_table

    a, b, c = np.array([1.0, 2.0, 3.0]), np.array([4.0, 5.0, 6.0, 7.0]), np.zeros(0)
    nan = np.nan
    np.testing.assert_array_equal(param_table([a, a, a], 5), [[1, 2, 3, nan, nan]] * 3)
    np.testing.assert_array_equal(param_table([a, b, c], 5), [[1, 2, 3, nan, nan], [4, 5, 6, 7, nan], [nan] * 5])
    np.testing.assert_array_equal(param_table([c, c], 2), [[nan, nan]] * 2)
    assert param_table([], 4).shape == (0, 4)


def test_focal_lengths_of_each_camera_model():
    """images/focal: the mean of a camera's focal parameters, worked by hand for a
    model of one camera model and for one of several (each row its own model's
    parameters); NaN for a camera model without a focal length (EQUIRECTANGULAR)."""
    from sfmpairs.sfm_io.model import focal_lengths, param_table

    simple = np.array([500.0, 320.0, 240.0])  # SIMPLE_PINHOLE: f, cx, cy
    pinhole = np.array([400.0, 600.0, 320.0, 240.0])  # PINHOLE: fx, fy, cx, cy
    radial = np.array([700.0, 320.0, 240.0, 0.1])  # SIMPLE_RADIAL: f, cx, cy, k
    params = param_table([simple, simple], 8)
    np.testing.assert_array_equal(focal_lengths(["SIMPLE_PINHOLE"] * 2, params), [500.0, 500.0])
    models = ["PINHOLE", "SIMPLE_RADIAL", "PINHOLE", "SIMPLE_PINHOLE"]
    params = param_table([pinhole, radial, pinhole * 2, simple], 8)
    np.testing.assert_array_equal(focal_lengths(models, params), [500.0, 700.0, 1000.0, 500.0])
    equirect = np.array([2000.0, 1000.0])  # EQUIRECTANGULAR: two parameters, no focal length
    params = param_table([equirect, equirect], 8)
    np.testing.assert_array_equal(focal_lengths(["EQUIRECTANGULAR"] * 2, params), [np.nan, np.nan])
    params = param_table([radial, equirect, simple], 8)
    models = ["SIMPLE_RADIAL", "EQUIRECTANGULAR", "SIMPLE_PINHOLE"]
    np.testing.assert_array_equal(focal_lengths(models, params), [700.0, np.nan, 500.0])
