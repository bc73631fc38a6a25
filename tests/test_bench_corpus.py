"""benchmarks/bench_corpus.py: its COLMAP writer read back through pycolmap, and the
corpus's shape."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_corpus  # noqa: E402


def test_written_model_reads_back_through_pycolmap(tmp_path):
    import pycolmap

    n, untriangulated = 25, 4
    m = bench_corpus.synthetic_model(n, seed=3, model=7, untriangulated=untriangulated)
    counts = bench_corpus.write_model(tmp_path / "m", n, 3, 7, untriangulated)
    rec = pycolmap.Reconstruction(str(tmp_path / "m"))
    assert (rec.num_reg_images(), rec.num_points3D()) == (n, counts["points"])
    assert rec.compute_num_observations() == counts["observations"] == m["length"].sum()
    for i in range(n):
        im, cam = rec.images[i + 1], rec.cameras[i + 1]
        assert im.name == f"img{i:05d}.jpg" and im.camera_id == i + 1
        assert cam.model.name == "SIMPLE_PINHOLE" and (cam.width, cam.height) == (1024, 768)
        np.testing.assert_array_equal(cam.params, [m["focal"][i], 512, 384])
        pose = im.cam_from_world()
        q = np.asarray(pose.rotation.quat)  # x y z w
        np.testing.assert_allclose(np.r_[q[3], q[:3]] * np.sign(q[3]), m["qvec"][i], atol=1e-12)
        np.testing.assert_array_equal(pose.translation, m["tvec"][i])
        xy = np.array([p.xy for p in im.points2D])
        ids = np.array([p.point3D_id if p.has_point3D() else -1 for p in im.points2D])
        assert (ids == -1).sum() == untriangulated
        # every triangulated 2D point is the projection of its 3D point by the image's camera
        world = np.array([rec.points3D[int(j)].xyz for j in ids[ids >= 0]])
        projected = np.array([cam.img_from_cam(pose * x) for x in world])
        np.testing.assert_allclose(projected, xy[ids >= 0], rtol=0, atol=1e-9)
    for j in range(counts["points"]):
        p = rec.points3D[j + 1]
        np.testing.assert_array_equal(p.xyz, m["xyz"][j])
        for el in p.track.elements:  # each track element names the 2D point that sees it
            assert rec.images[el.image_id].points2D[el.point2D_idx].point3D_id == j + 1


def test_fast_reader_equals_pycolmap_reader_on_a_written_model(tmp_path):
    from sfmpairs.sfm_io import colmap_binary, colmap_pycolmap

    bench_corpus.write_model(tmp_path / "m", 40, 0, 1, 2)
    a, b = colmap_binary.read_model(tmp_path / "m"), colmap_pycolmap.read_model(tmp_path / "m")
    for key in ("names", "image_ids", "qvec", "tvec", "xyz", "point_ids", "indptr", "point", "xy"):
        np.testing.assert_array_equal(np.asarray(getattr(a, key)), np.asarray(getattr(b, key)), err_msg=key)


def test_corpus_shape_is_sfm120k():
    sizes = bench_corpus.model_sizes(0)
    assert len(sizes) == 713 and sizes.min() == 20 and sizes.max() == sizes[0] == 5664
    assert abs(sizes.sum() - 163_000) < 100 and np.median(sizes) == 102
    assert bench_corpus.part(0.125) == 90 and bench_corpus.part(1) == 713
    assert not np.array_equal(sizes, bench_corpus.model_sizes(1))


def test_outputs_compared_with_the_baseline_bit_for_bit(tmp_path):
    """The check that a faster version writes what the older one wrote: identical files
    pass whatever their attributes; a value changed in its last bit, a dtype changed,
    a dataset missing on either side are each named."""
    import h5py

    def write(path, scale, dtype=np.float64, extra=False, stamp="a"):
        with h5py.File(path, "w") as f:
            f["train/scale_change"] = np.array(scale, dtype)
            f["train/query"] = np.arange(3)
            f.attrs["created"] = stamp
            if extra:
                f["val/query"] = np.arange(2)

    write(tmp_path / "a.h5", [1.0, 2.0, np.nan])
    write(tmp_path / "same.h5", [1.0, 2.0, np.nan], stamp="b")
    write(tmp_path / "bit.h5", [1.0, np.nextafter(2.0, 3.0), np.nan])
    write(tmp_path / "type.h5", np.array([1.0, 2.0, np.nan]).view(np.int64), np.int64)  # the same bytes
    write(tmp_path / "more.h5", [1.0, 2.0, np.nan], extra=True)
    assert bench_corpus.compare_datasets(tmp_path / "a.h5", tmp_path / "same.h5") == "all 2 datasets identical"
    for other in ("bit", "type"):
        assert bench_corpus.compare_datasets(tmp_path / "a.h5", tmp_path / f"{other}.h5") == (
            "DIFFERENT: train/scale_change"
        )
    assert bench_corpus.compare_datasets(tmp_path / "a.h5", tmp_path / "more.h5") == "DIFFERENT: val/query"
    assert bench_corpus.compare_datasets(tmp_path / "more.h5", tmp_path / "a.h5") == "DIFFERENT: val/query"
    with h5py.File(tmp_path / "group.h5", "w") as f:  # a group where the other has a dataset
        f["train/scale_change/x"] = np.arange(2)
        f["train/query"] = np.arange(3)
    assert bench_corpus.compare_datasets(tmp_path / "a.h5", tmp_path / "group.h5") == (
        "DIFFERENT: train/scale_change, train/scale_change/x"
    )
