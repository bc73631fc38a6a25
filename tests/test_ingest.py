"""``ingest``: the SfM store, its names, clusters, provenance and the documented schema."""

from __future__ import annotations

import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import REPO, doc_example, needs_real_data
from sfmpairs import SfmpairsError
from sfmpairs.sfm_io import colmap_binary
from sfmpairs.sfm_io.ingest import ingest
from sfmpairs.sfm_io.model import camera_centres
from sfmpairs.sfm_io.store import SCHEMA, SCHEMA_VERSION, read_store


def _datasets(path):
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda n, o: out.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) else None)
    return out


@pytest.mark.parametrize("group", ["models written together", "each model written alone"])
def test_store_holds_each_model_exactly(synthetic_models, tmp_path, monkeypatch, group):
    folders = [synthetic_models[k] / "binary" for k in ("per-image-cameras", "shared-cameras")]
    if group == "each model written alone":
        monkeypatch.setattr("sfmpairs.sfm_io.ingest.APPEND_OBSERVATIONS", 1)
    ingest(folders, tmp_path / "sfm.h5")
    s = read_store(tmp_path / "sfm.h5")
    models = [colmap_binary.read_model(f) for f in folders]
    n = [m.num_images for m in models]
    m_pts = [m.num_points for m in models]
    assert len(s["images/name"]) == sum(n)
    np.testing.assert_array_equal(s["images/model"], np.repeat([0, 1], n))
    np.testing.assert_array_equal(s["images/colmap_id"], np.concatenate([m.image_ids for m in models]))
    np.testing.assert_array_equal(s["points/colmap_id"], np.concatenate([m.point_ids for m in models]))
    np.testing.assert_array_equal(s["models/image_range"], [[0, n[0]], [n[0], sum(n)]])
    np.testing.assert_array_equal(s["models/point_range"], [[0, m_pts[0]], [m_pts[0], sum(m_pts)]])
    # the second model's observations index its own points, after the first model's
    second = models[1]
    rows = s["observations/indptr"][n[0] :]
    np.testing.assert_array_equal(rows - rows[0], second.indptr)
    np.testing.assert_array_equal(s["observations/point"][rows[0] :], second.point + m_pts[0])
    np.testing.assert_array_equal(s["observations/xy"][rows[0] :], second.xy)
    np.testing.assert_array_equal(s["points/track_length"][m_pts[0] :], second.track_length)
    # every observation is of a point of the image's own model
    img_of_obs = np.repeat(np.arange(sum(n)), np.diff(s["observations/indptr"]))
    assert np.array_equal(s["points/model"][s["observations/point"]], s["images/model"][img_of_obs])
    # derived geometry: centre = -R^T t, and R is a rotation
    R = s["images/rotation"]
    np.testing.assert_allclose(np.einsum("nij,nkj->nik", R, R), np.broadcast_to(np.eye(3), R.shape), atol=1e-12)
    np.testing.assert_allclose(s["images/centre"], -np.einsum("nji,nj->ni", R, s["images/tvec"]), atol=1e-12)
    np.testing.assert_array_equal(s["images/centre"], camera_centres(s["images/qvec"], s["images/tvec"]))
    # track length = distinct images observing the point
    np.testing.assert_array_equal(s["points/track_length"], np.bincount(s["observations/point"], minlength=sum(m_pts)))
    assert np.all(np.isfinite(s["images/focal"]) | np.isin(s["images/camera_model"], ["EQUIRECTANGULAR"]))
    k = s["images/num_params"]
    assert all(np.isnan(p[j:]).all() and np.isfinite(p[:j]).all() for p, j in zip(s["images/params"], k))


def test_store_records_how_it_was_made(synthetic_models, tmp_path):
    ingest([synthetic_models["shared-cameras"] / "binary"], tmp_path / "sfm.h5", cluster_by="scene")
    attrs = read_store(tmp_path / "sfm.h5")["attrs"]
    assert attrs["schema"] == SCHEMA and attrs["schema_version"] == SCHEMA_VERSION
    assert attrs["tool"] == "sfmpairs" and attrs["tool_version"]
    assert re.match(r"\d{4}-\d\d-\d\dT", attrs["created"])
    assert attrs["parameters"]["cluster_by"] == "scene"
    (entry,) = attrs["inputs"]
    assert entry["format"] == "binary" and "points3D.bin" in entry["files"]


def test_pycolmap_reader_gives_the_identical_store(synthetic_models, tmp_path):
    folders = [synthetic_models[k] / "binary" for k in ("per-image-cameras", "shared-cameras")]
    ingest(folders, tmp_path / "fast.h5")
    ingest(folders, tmp_path / "ref.h5", reader="pycolmap")
    ingest([synthetic_models[k] / "text" for k in ("per-image-cameras", "shared-cameras")], tmp_path / "text.h5")
    fast, ref, text = (_datasets(tmp_path / f) for f in ("fast.h5", "ref.h5", "text.h5"))
    assert fast.keys() == ref.keys() == text.keys()
    for key in fast:
        a, b, c = fast[key], ref[key], text[key]
        assert a.dtype == b.dtype == c.dtype, key
        assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), key
        if key not in (
            "models/format",
            "models/path",
            "clusters/source",
            "models/name",
            "clusters/name",
            "images/name",
        ):  # these name the text folders
            assert np.array_equal(a, c, equal_nan=a.dtype.kind == "f"), key


@needs_real_data()
def test_real_models_give_identical_stores_with_both_readers(colmap_root, tmp_path):
    ingest([colmap_root], tmp_path / "fast.h5")
    ingest([colmap_root], tmp_path / "ref.h5", reader="pycolmap")
    fast, ref = _datasets(tmp_path / "fast.h5"), _datasets(tmp_path / "ref.h5")
    assert fast.keys() == ref.keys()
    for key in fast:
        assert np.array_equal(fast[key], ref[key], equal_nan=fast[key].dtype.kind == "f"), key


@needs_real_data()
def test_tree_of_real_models_names_clusters_and_photos(colmap_root, tmp_path):
    ingest([colmap_root], tmp_path / "sfm.h5")
    s = read_store(tmp_path / "sfm.h5", observations=False)
    clusters = list(s["clusters/name"])
    assert "statue-of-liberty/sparse/0" in clusters
    assert sum(c.startswith("video-submodels-no-photos/") for c in clusters) == 10
    names = s["images/name"]
    assert len(set(names)) == len(names)
    root = Path(s["attrs"]["images_root"])
    assert root == colmap_root.resolve()
    has_photos = s["models/images_dir"] != ""
    for model in np.flatnonzero(has_photos):
        a, b = s["models/image_range"][model]
        for name in names[a:b]:
            assert (root / name).is_file(), name
    # a model whose photos are unknown gets its model name as prefix
    video = np.flatnonzero(s["images/model"] == clusters.index("video-submodels-no-photos/sparse/0"))
    assert names[video[0]].startswith("video-submodels-no-photos/sparse/0/")


@needs_real_data()
def test_cluster_by_scene_merges_a_scenes_models(colmap_root, tmp_path):
    ingest(
        [colmap_root / "video-submodels-no-photos", colmap_root / "statue-of-liberty"],
        tmp_path / "sfm.h5",
        cluster_by="scene",
    )
    s = read_store(tmp_path / "sfm.h5", observations=False)
    assert list(s["clusters/name"]) == ["video-submodels-no-photos", "statue-of-liberty"]
    assert s["models/name"][3] == "video-submodels-no-photos/sparse/3"
    assert len(s["models/name"]) == 11
    assert set(s["models/cluster"][:10]) == {0}
    # models stay separate: every image keeps its own model, 10 distinct for the video
    assert len(set(s["images/model"][s["images/cluster"] == 0])) == 10


@needs_real_data()
def test_manifest_for_shared_data(colmap_root, tmp_path):
    manifest = REPO / "data_manifests" / "shared_colmap.toml"
    ingest(None, tmp_path / "sfm.h5", manifest=manifest)
    s = read_store(tmp_path / "sfm.h5", observations=False)
    assert list(s["clusters/name"]) == [
        "statue-of-liberty",
        "fountain-p11",
        "computer-mouse",
        "drinks-can",
        "eyedrop-box",
        "lego-batmobile",
        "video-submodels",
        "many-cameras",
    ]
    assert np.sum(s["models/cluster"] == 6) == 10
    assert s["attrs"]["parameters"]["manifest"] == str(manifest.resolve())
    root = Path(s["attrs"]["images_root"])
    statue = s["images/cluster"] == 0
    assert all((root / n).is_file() for n in s["images/name"][statue])


def test_formats_doc_example_runs_without_sfmpairs(synthetic_models, tmp_path, monkeypatch, capsys):
    """The h5py example in docs/formats.md, run as written on a real store."""
    ingest([synthetic_models["shared-cameras"] / "binary"], tmp_path / "sfm.h5")
    example = doc_example("Reading it without sfmpairs:")
    monkeypatch.chdir(tmp_path)
    exec(compile(example, "formats.md", "exec"), {})
    s = read_store(tmp_path / "sfm.h5")
    out = capsys.readouterr().out
    assert out.startswith(s["images/name"][0])
    assert f"{s['observations/indptr'][1]} points" in out


def test_formats_doc_lists_every_dataset(synthetic_models, tmp_path):
    ingest([synthetic_models["shared-cameras"] / "binary"], tmp_path / "sfm.h5")
    doc = (REPO / "docs" / "formats.md").read_text()
    for name in _datasets(tmp_path / "sfm.h5"):
        assert f"`{name}`" in doc, name


def test_json_attrs_are_valid(synthetic_models, tmp_path):
    ingest([synthetic_models["shared-cameras"] / "text"], tmp_path / "sfm.h5")
    with h5py.File(tmp_path / "sfm.h5") as f:
        json.loads(f.attrs["parameters"])
        assert json.loads(f.attrs["inputs"])[0]["format"] == "text"


def test_existing_output_is_kept_without_overwrite(synthetic_models, tmp_path):
    from sfmpairs import SfmpairsError

    out = tmp_path / "sfm.h5"
    out.write_text("mine")
    with pytest.raises(SfmpairsError, match="exists"):
        ingest([synthetic_models["shared-cameras"] / "binary"], out)
    assert out.read_text() == "mine"
    ingest([synthetic_models["shared-cameras"] / "binary"], out, overwrite=True)
    assert h5py.is_hdf5(out)
    assert list(tmp_path.iterdir()) == [out]  # no temporary files left


def test_one_path_str_or_path_is_one_path(synthetic_models, tmp_path, monkeypatch):
    """``ingest("models/", ...)`` takes the string as one path (a tree of two models),
    as ``ingest(["models/"], ...)`` does; so does one Path. Relative names, so that a
    regression that iterates the characters fails at once instead of walking ``/``."""
    import shutil

    for key in ("per-image-cameras", "shared-cameras"):
        shutil.copytree(synthetic_models[key] / "binary", tmp_path / "models" / key)
    monkeypatch.chdir(tmp_path)
    ingest(["models/"], "list.h5")
    ingest("models/", "str.h5")
    ingest(Path("models"), "path.h5")
    want = _datasets("list.h5")
    assert len(want["images/name"]) == sum(
        colmap_binary.read_model(tmp_path / "models" / k).num_images for k in ("per-image-cameras", "shared-cameras")
    )
    for out in ("str.h5", "path.h5"):
        got = _datasets(out)
        assert sorted(got) == sorted(want), out
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=f"{out}: {name}")
        attrs = read_store(out, observations=False)["attrs"]
        assert [e["path"] for e in attrs["inputs"]] == [
            str((tmp_path / "models" / k).resolve()) for k in ("per-image-cameras", "shared-cameras")
        ]


def test_python_floor_has_tomllib():
    """Manifests are read with tomllib (Python 3.11+): requires-python says 3.11, or a
    lower floor comes with tomli for the older Pythons and every import falls back."""
    import tomllib

    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    floor = re.fullmatch(r">=\s*(\d+)\.(\d+)", meta["requires-python"])
    assert floor, meta["requires-python"]
    users = [
        p
        for d in ("pipeline", "sfm_io", "mining", "train")
        for p in (REPO / d).glob("*.py")
        if re.search(r"^\s*import tomllib", p.read_text(), re.M)
    ]
    assert users  # the manifest reader
    if (int(floor[1]), int(floor[2])) < (3, 11):
        assert any(
            re.fullmatch(r"""tomli>=[\d.]+;python_version<["']3\.11["']""", d.replace(" ", ""))
            for d in meta["dependencies"]
        ), meta["dependencies"]
        for p in users:
            assert "import tomli as tomllib" in p.read_text(), p


# ------------------------------------------------------------------ photos in several models
def _overlapping_models(root: Path, duplicate_fraction: float = 0.0):
    """One scene whose photo folder two models share: ``sparse/0`` the random model
    without its images 25..39, ``sparse/1`` without its images 0..9 (images 10..24 in
    both)."""
    from sfmpairs.synthetic.models import random_reconstruction, write_model

    def without(index_range):
        rec = random_reconstruction(40, 1500, track_length=5, duplicate_fraction=duplicate_fraction, seed=3)
        ids = sorted(rec.reg_image_ids())
        for i in index_range:
            rec.deregister_frame(rec.image(ids[i]).frame_id)  # COLMAP drops points left with < 2 observations
        return rec

    (root / "scene" / "images").mkdir(parents=True)
    write_model(without(range(25, 40)), root / "scene" / "sparse" / "0")  # 25 images: 0..24
    write_model(without(range(0, 10)), root / "scene" / "sparse" / "1")  # 30 images: 10..39
    return root / "scene"


def test_shared_names_refused_by_default(tmp_path):
    from sfmpairs import SfmpairsError

    scene = _overlapping_models(tmp_path)
    with pytest.raises(SfmpairsError, match=r"is also in model scene/sparse/.*--shared-names largest"):
        ingest([scene], tmp_path / "sfm.h5")
    assert not (tmp_path / "sfm.h5").exists()


def test_names_seen_in_an_earlier_model_or_twice_in_one():
    """check_addition: a name of an earlier model, or one a model holds twice (a corrupt
    images.bin), is refused naming the first such name and the model that had it; the
    names of a model that passes are remembered."""
    from sfmpairs.sfm_io.discover import ModelSource
    from sfmpairs.sfm_io.ingest import check_addition

    a, b = (ModelSource(Path(f"/m/{x}"), "binary", x, x, None) for x in "ab")
    seen: dict[str, str] = {}
    check_addition(a, ["1.jpg", "2.jpg"], seen, 10)
    assert seen == {"1.jpg": "a", "2.jpg": "a"}
    with pytest.raises(SfmpairsError, match=r"^/m/b: image name '2.jpg' is also in model a;"):
        check_addition(b, ["3.jpg", "2.jpg", "1.jpg"], seen, 10)
    with pytest.raises(SfmpairsError, match=r"^/m/b: image name '4.jpg' is also in model b;"):
        check_addition(b, ["3.jpg", "4.jpg", "5.jpg", "4.jpg", "3.jpg"], {"1.jpg": "a"}, 10)


def test_shared_names_largest_keeps_each_photo_in_its_largest_model(tmp_path):
    """sparse/1 (30 images) keeps images 10..24; sparse/0 (25) keeps 0..9, as pycolmap's
    deregistration of 10..24 leaves it (its observations, points seen by < 2 images)."""
    import shutil

    import pycolmap

    scene = _overlapping_models(tmp_path)
    ingest([scene], tmp_path / "sfm.h5", shared_names="largest")
    got = read_store(tmp_path / "sfm.h5")
    names = got["images/name"]
    assert len(names) == len(set(names)) == 40
    # the reference: sparse/1 whole, and sparse/0 as pycolmap leaves it without 10..24
    ref_rec = pycolmap.Reconstruction(str(scene / "sparse" / "0"))
    for img in list(ref_rec.images.values()):
        if img.name in set(colmap_binary.read_model(scene / "sparse" / "1").names):
            ref_rec.deregister_frame(img.frame_id)
    ref = tmp_path / "ref" / "scene"
    (ref / "images").mkdir(parents=True)
    (ref / "sparse" / "0").mkdir(parents=True)
    ref_rec.write_binary(str(ref / "sparse" / "0"))
    shutil.copytree(scene / "sparse" / "1", ref / "sparse" / "1")
    ingest([ref], tmp_path / "ref.h5")
    want = read_store(tmp_path / "ref.h5")
    for key in (
        "images/name",
        "images/colmap_id",
        "images/model",
        "images/qvec",
        "points/colmap_id",
        "points/xyz",
        "points/track_length",
        "points/model",
        "observations/indptr",
        "observations/point",
        "observations/xy",
    ):
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert json.loads(h5py.File(tmp_path / "sfm.h5").attrs["parameters"])["shared_names"] == "largest"


def test_shared_names_largest_leaves_out_a_model_inside_another(tmp_path):
    """A model whose every photo is in a larger one is left out: the store is the
    larger model's alone."""
    from sfmpairs.synthetic.models import random_reconstruction, write_model

    rec = random_reconstruction(20, 600, track_length=4, seed=4)
    (tmp_path / "scene" / "images").mkdir(parents=True)
    write_model(rec, tmp_path / "scene" / "sparse" / "1")
    for image_id in sorted(rec.reg_image_ids())[:12]:
        rec.deregister_frame(rec.image(image_id).frame_id)
    write_model(rec, tmp_path / "scene" / "sparse" / "0")  # 8 images, all in sparse/1
    out = ingest([tmp_path / "scene"], tmp_path / "sfm.h5", shared_names="largest")
    assert out["models"] == 1 and out["images"] == 20
    s = read_store(tmp_path / "sfm.h5")
    assert list(s["models/name"]) == ["scene/sparse/1"]
    left_out = json.loads(h5py.File(tmp_path / "sfm.h5").attrs["parameters"])["left_out_models"]
    assert left_out == [str((tmp_path / "scene" / "sparse" / "0").resolve())]


def test_dropping_images_drops_points_seen_by_fewer_than_two(tmp_path):
    """drop_images against a brute force over the observations, with tracks that list
    an image twice (kept once per image by the readers)."""
    from sfmpairs.sfm_io.shared_names import drop_images
    from sfmpairs.synthetic.models import random_reconstruction, write_model

    write_model(random_reconstruction(15, 400, track_length=3, duplicate_fraction=0.2, seed=5), tmp_path / "m")
    model = colmap_binary.read_model(tmp_path / "m")
    keep = np.random.default_rng(0).random(model.num_images) < 0.6
    got = drop_images(model, keep)
    obs = {}  # point id -> {image id: xy}
    for i in np.flatnonzero(keep):
        for o in range(model.indptr[i], model.indptr[i + 1]):
            obs.setdefault(int(model.point_ids[model.point[o]]), {})[int(model.image_ids[i])] = tuple(model.xy[o])
    points = sorted(p for p, seen in obs.items() if len(seen) >= 2)
    assert got.point_ids.tolist() == points
    assert got.image_ids.tolist() == model.image_ids[keep].tolist()
    assert got.track_length.tolist() == [len(obs[p]) for p in points]
    for r, image_id in enumerate(got.image_ids.tolist()):
        rows = range(got.indptr[r], got.indptr[r + 1])
        assert {int(got.point_ids[got.point[o]]): tuple(got.xy[o]) for o in rows} == {
            p: seen[image_id] for p, seen in obs.items() if image_id in seen and len(seen) >= 2
        }


def test_more_points_than_the_store_can_number_is_one_line(synthetic_models, tmp_path, monkeypatch):
    folders = [synthetic_models[k] / "binary" for k in ("per-image-cameras", "shared-cameras")]
    first = colmap_binary.read_model(folders[0]).num_points
    monkeypatch.setattr("sfmpairs.sfm_io.store.MAX_POINTS", first + 1)  # the second model passes it
    with pytest.raises(SfmpairsError, match=r"shared-cameras/binary: the store numbers points with int32"):
        ingest(folders, tmp_path / "sfm.h5")
    assert not (tmp_path / "sfm.h5").exists()


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_track_lengths_count_each_image_once(dtype):
    """Each image adds one to the track length of each point it observes, however many
    times its row names the point (a repeat in a broken file): against np.unique per row."""
    from sfmpairs.sfm_io.model import _count_track_lengths

    rng = np.random.default_rng(7)
    counts = rng.integers(0, 40, 300)
    idx = rng.integers(0, 50, counts.sum()).astype(dtype)  # 50 points: many repeats within rows
    track = rng.integers(0, 5, 50).astype(np.int32)  # earlier batches' counts
    expect = track.copy()
    for row in np.split(idx, np.cumsum(counts)[:-1]):
        expect[np.unique(row)] += 1
    _count_track_lengths(track, idx, counts)
    np.testing.assert_array_equal(track, expect)
    assert (expect > 0).all() and (np.bincount(idx, minlength=50) > expect).any()  # repeats were there


def test_track_lengths_refuse_counts_that_do_not_add_up():
    """The compiled count trusts that the rows' lengths add up to the observations
    given (it would read past them): the wrapper checks it first."""
    from sfmpairs.sfm_io.model import _count_track_lengths

    track = np.zeros(5, np.int32)
    with pytest.raises(ValueError, match="4 observations counted per image, 3 given"):
        _count_track_lengths(track, np.array([0, 1, 2], np.int32), np.array([2, 2]))
    assert not track.any()


def test_a_folder_name_that_is_not_utf8_is_one_line(tmp_path):
    """A model folder whose name has a byte that is not UTF-8 (the file system's names
    are bytes): one line naming it, before anything is written; the store holds UTF-8."""
    import os

    from conftest import make_models

    make_models(tmp_path / "src", scenes=1, images=8, points=200)
    bad = Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9"))
    os.rename(tmp_path / "src", bad)
    with pytest.raises(SfmpairsError, match=r"caf\\xe9/scene_00/sparse/0'?: the path is not UTF-8 text"):
        ingest([bad], tmp_path / "sfm.h5")
    assert not (tmp_path / "sfm.h5").exists()


def test_models_read_ahead_come_in_order_and_the_first_bad_one_stops_them(tmp_path, monkeypatch):
    """Two models read ahead on threads: the models in the given order, the largest
    read on a few threads and those of at most half its size on one, the first
    corrupt model's one-line error where its turn comes (not a later one's, read
    beside it), and a reader closed midway returns."""
    from sfmpairs.sfm_io import ingest as ingest_module
    from sfmpairs.sfm_io.ingest import _read_ahead, gather_sources, reading_tasks
    from sfmpairs.synthetic.models import random_reconstruction, write_model

    sizes = (12, 5, 30, 8, 9, 6)
    for k, n in enumerate(sizes):
        write_model(random_reconstruction(n, 20 * n, 3, seed=k), tmp_path / f"m{k}")
    sources, _ = gather_sources([tmp_path / f"m{k}" for k in range(len(sizes))], None, "model")
    tasks = reading_tasks(sources, [""] * len(sources), [s.cluster for s in sources], "auto")
    threads, real = {}, ingest_module.read_model

    def spy(folder, fmt, reader, threads_given):
        threads[Path(folder).name] = threads_given
        return real(folder, fmt, reader, threads_given)

    monkeypatch.setattr(ingest_module, "read_model", spy)
    assert [counts[0][0] for _, counts in _read_ahead(tasks)] == list(sizes)
    assert threads == {"m0": 1, "m1": 1, "m2": None, "m3": 1, "m4": 1, "m5": 1}
    threads.clear()  # ingest itself, the sizes from the files it records
    ingest([tmp_path / f"m{k}" for k in range(len(sizes))], tmp_path / "sfm.h5")
    assert threads == {"m0": 1, "m1": 1, "m2": None, "m3": 1, "m4": 1, "m5": 1}
    for k in (3, 4):  # both truncated: model 3's error comes first
        data = (tmp_path / f"m{k}" / "images.bin").read_bytes()
        (tmp_path / f"m{k}" / "images.bin").write_bytes(data[: len(data) // 2])
    got = []
    with pytest.raises(SfmpairsError, match=r"m3/images\.bin: truncated"):
        for _, counts in _read_ahead(tasks):
            got.append(counts[0][0])
    assert got == list(sizes[:3])
    reader = _read_ahead(tasks)
    assert next(reader)[1][0][0] == sizes[0]  # the first model's images
    reader.close()
