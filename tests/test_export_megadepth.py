"""The MegaDepth export (LoFTR, D2-Net): checked against pycolmap's models, a brute-force
overlap and scale ratio written here from D2-Net's definitions, the depth maps written,
and the loading steps of LoFTR's and D2-Net's own dataset code."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from sfmpairs import SfmpairsError
from sfmpairs.mining.export import export
from sfmpairs.sfm_io.colmap_depth import write_depth_map


def _plane_depth(width: int, height: int, k: int) -> np.ndarray:
    """A depth map with a slope, a hole (0: no depth) and a negative value."""
    y, x = np.mgrid[0:height, 0:width]
    d = 2.0 + 0.01 * x + 0.02 * y + 0.1 * k
    d[:3, :3] = 0
    d[-1, -1] = -5
    return d


EXPORT_WARNINGS: list[str] = []  # what the world fixture's export warned of


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Three rendered clusters (pinhole, 64 x 48) as COLMAP dense workspaces: cluster_00
    with depth maps for all but img_005 (a photometric one only), cluster_01 with
    half-size maps, cluster_02 without a workspace; ingested and mined."""
    from sfmpairs.mining.mine import mine
    from sfmpairs.sfm_io.ingest import ingest
    from sfmpairs.synthetic.world import synth

    root = tmp_path_factory.mktemp("megadepth")
    synth(root / "w", clusters=3, images_per_cluster=6, image_size=(64, 48), seed=3, points=400)
    for cluster, size, skip in (("cluster_00", (64, 48), {"img_005.jpg"}), ("cluster_01", (32, 24), set())):
        maps = root / "w" / cluster / "stereo" / "depth_maps"
        maps.mkdir(parents=True)
        for k, photo in enumerate(sorted(os.listdir(root / "w" / cluster / "images"))):
            kind = "photometric" if photo in skip else "geometric"
            write_depth_map(maps / f"{photo}.{kind}.bin", _plane_depth(*size, k))
    ingest([root / "w"], root / "sfm.h5")
    mine(root / "sfm.h5", root / "pairs.h5", queries_per_cluster=0, val_clusters=["cluster_02/sparse/0"])
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: EXPORT_WARNINGS.append(record.getMessage())
    logging.getLogger("sfmpairs.export").addHandler(handler)
    try:
        export(root / "pairs.h5", root / "md", "megadepth")
    finally:
        logging.getLogger("sfmpairs.export").removeHandler(handler)
    return root


def _scene(root: Path, name: str) -> dict:
    return np.load(root / "md" / "scene_info" / f"{name}.npz", allow_pickle=True)


def _brute_force(rec, names: list[str], valid: np.ndarray):
    """D2-Net's overlap and scale ratio, pair by pair from the pycolmap model: distinct
    point ids, the first 2D point of each (the store keeps an image's first); and for
    each pair (i, j), i < j, the centres of the two boxes (x_i, y_i, x_j, y_j)."""
    by_name = {im.name: im for im in rec.images.values()}
    seen = []
    for name in names:
        first = {}
        for p in by_name[name].points2D:
            if p.has_point3D() and p.point3D_id not in first:
                first[p.point3D_id] = (p.xy[0], p.xy[1])
        seen.append(first)
    n = len(names)
    overlap, scale, centres = np.full((n, n), -1.0), np.full((n, n), -1.0), {}
    for i in range(n):
        for j in range(i + 1, n):
            if not (valid[i] and valid[j]):
                continue
            shared = seen[i].keys() & seen[j].keys()
            overlap[i, j] = overlap[j, i] = len(shared) / min(len(seen[i]), len(seen[j]))
            if not shared:
                continue
            areas, centres[i, j] = [], []
            for s in (seen[i], seen[j]):
                xs, ys = [s[p][0] for p in shared], [s[p][1] for p in shared]
                areas.append((max(xs) - min(xs)) * (max(ys) - min(ys)))
                centres[i, j] += [(max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2]
            if areas[0] > 0 and areas[1] > 0:
                scale[i, j], scale[j, i] = (areas[0] / areas[1]) ** 0.5, (areas[1] / areas[0]) ** 0.5
    return overlap, scale, centres


def _has_map(root: Path, cluster: str, names) -> np.ndarray:
    """Which images have a geometric depth map in the cluster's workspace (what the
    export should use), read from the workspace, not from the export."""
    maps = root / "w" / cluster / "stereo" / "depth_maps"
    return np.array([(maps / f"{name}.geometric.bin").is_file() for name in names])


@pytest.mark.parametrize("cluster", ["cluster_00", "cluster_01", "cluster_02"])
def test_scene_matches_pycolmap_and_brute_force(world, cluster):
    import pycolmap

    info = _scene(world, f"{cluster}_sparse_0")
    rec = pycolmap.Reconstruction(str(world / "w" / cluster / "sparse" / "0"))
    names = list(info["image_names"])
    assert sorted(names) == sorted(im.name for im in rec.images.values())
    valid = _has_map(world, cluster, names)
    assert [d is not None for d in info["depth_paths"]] == valid.tolist()
    assert valid.sum() == {"cluster_00": 5, "cluster_01": 6, "cluster_02": 0}[cluster]
    if not valid.any():
        valid[:] = True  # no depth at all: every image counts (pose-estimation test mode)
    overlap, scale, centres = _brute_force(rec, names, valid)
    assert info["overlap_matrix"].dtype == np.float32 and info["overlap_matrix"].shape == (len(names),) * 2
    np.testing.assert_allclose(info["overlap_matrix"], overlap, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(info["scale_ratio_matrix"], scale, rtol=1e-5)
    assert (overlap > 0).sum() > 4 and (scale > 0).sum() > 4  # not a vacuous comparison
    by_name = {im.name: im for im in rec.images.values()}
    for k, name in enumerate(names):
        im = by_name[name]
        np.testing.assert_allclose(info["intrinsics"][k], rec.cameras[im.camera_id].calibration_matrix())
        np.testing.assert_allclose(info["poses"][k], np.vstack([im.cam_from_world().matrix(), [0, 0, 0, 1]]))
        assert info["n_points3D"][k] == len({p.point3D_id for p in im.points2D if p.has_point3D()})
        # the conventions LoFTR's warping assumes: x ~ K (T X)[:3], T world-to-camera
        ids = list(info["points3D_id_to_2D"][k])
        X = np.array([[*rec.points3D[i].xyz, 1] for i in ids])
        cam = (info["poses"][k] @ X.T)[:3]
        uv = (info["intrinsics"][k] @ cam)[:2] / cam[2]
        np.testing.assert_allclose(uv.T, [info["points3D_id_to_2D"][k][i] for i in ids], atol=1e-6)
        f = (info["intrinsics"][k][0, 0] + info["intrinsics"][k][1, 1]) / 2
        np.testing.assert_allclose([info["points3D_id_to_ndepth"][k][i] for i in ids], cam[2] / f, rtol=1e-9)
    axes = [by_name[n].cam_from_world().rotation.matrix()[2] for n in names]
    angles = [[np.degrees(np.arccos(np.clip(np.dot(a, b), -1, 1))) for b in axes] for a in axes]
    np.testing.assert_allclose(info["angles"], angles, atol=1e-3)
    # LoFTR's pair_infos: every pair with overlap in [0.1, 0.7], once, in either order
    want = {(i, j) for i in range(len(names)) for j in range(i + 1, len(names)) if 0.1 <= overlap[i, j] <= 0.7}
    got = [(int(a), int(b)) for (a, b), _, _ in info["pair_infos"]]
    assert len(got) == len(set(got)) and {(min(p), max(p)) for p in got} == want
    for (a, b), ov, central in info["pair_infos"]:
        assert ov == np.float32(overlap[a, b]) == info["overlap_matrix"][a, b]
        assert central.dtype == np.float64 and central.shape == (4,)
        c = centres[min(a, b), max(a, b)]
        np.testing.assert_allclose(central, c if a < b else c[2:] + c[:2], atol=1e-4)  # xy: float32


def test_depth_files_hold_the_maps_written(world):
    from sfmpairs.sfm_io.colmap_depth import read_depth_map

    for cluster, half in (("cluster_00", False), ("cluster_01", True)):
        info = _scene(world, f"{cluster}_sparse_0")
        maps = world / "w" / cluster / "stereo" / "depth_maps"
        for name, path in zip(info["image_names"], info["depth_paths"]):
            src = maps / f"{name}.geometric.bin"
            if not src.exists():
                assert path is None
                continue
            with h5py.File(world / "md" / path) as f:
                depth = f["depth"][()]
            assert depth.dtype == np.float32 and depth.shape == (48, 64)
            want = np.maximum(read_depth_map(src), 0)
            if half:  # a 32 x 24 map: each pixel of the 64 x 48 image takes the map's pixel it lies in
                want = np.array([[want[r // 2, c // 2] for c in range(64)] for r in range(48)])
            np.testing.assert_array_equal(depth, want)
    info = _scene(world, "cluster_02_sparse_0")
    assert all(p is None for p in info["depth_paths"])


def test_loftr_and_d2net_loading_steps(world):
    """What LoFTR's MegaDepthDataset and D2-Net's MegaDepthDataset do with a scene file,
    step by step (their code is not a dependency)."""
    from PIL import Image

    root = world / "md"
    lists = root / "index" / "trainvaltest_list"
    train = (lists / "train_list.txt").read_text().split()
    assert train  # the lists themselves: test_bins_and_lists_from_brute_force
    assert (root / "train_scenes.txt").read_text().split() == ["cluster_00_sparse_0", "cluster_01_sparse_0"]
    config = (root / "loftr_data_config.py").read_text()
    assert (
        f"TRAIN_DATA_ROOT = cfg.DATASET.VAL_DATA_ROOT = cfg.DATASET.TEST_DATA_ROOT = {str(root.resolve())!r}" in config
    )
    npz_root = root / "index" / "scene_info_0.1_0.7"
    total = 0
    for name in train:  # LoFTR: npz_names -> f"{n}.npz" under the npz root; root_dir joined to the paths
        scene_info = np.load(os.path.join(npz_root, f"{name}.npz"), allow_pickle=True)
        pair_infos = scene_info["pair_infos"].copy()
        del scene_info["pair_infos"]
        pair_infos = [p for p in pair_infos if p[1] > 0.0]
        total += len(pair_infos)
        for (idx0, idx1), overlap_score, _central in pair_infos:
            img = Image.open(os.path.join(root, scene_info["image_paths"][idx0]))
            with h5py.File(os.path.join(root, scene_info["depth_paths"][idx1]), "r") as f:
                depth = np.array(f["depth"])
            assert depth.shape == (img.height, img.width)
            K0 = np.asarray(scene_info["intrinsics"][idx0].copy(), np.float32).reshape(3, 3)
            T0, T1 = scene_info["poses"][idx0], scene_info["poses"][idx1]
            T_0to1 = np.matmul(T1, np.linalg.inv(T0))[:4, :4]
            assert K0[2, 2] == 1 and np.allclose(T_0to1[3], [0, 0, 0, 1])
    full = np.load(root / "scene_info" / "cluster_00_sparse_0.npz", allow_pickle=True)
    assert total == len(full["pair_infos"]) + len(_scene(world, "cluster_01_sparse_0")["pair_infos"])
    # D2-Net: pairs by overlap and scale ratio, a common point's 2D positions, '/depth'
    valid = (full["overlap_matrix"] >= 0.5) & (full["overlap_matrix"] <= 1) & (full["scale_ratio_matrix"] <= np.inf)
    pairs = np.vstack(np.where(valid))
    assert pairs.shape[1] > 0
    for idx1, idx2 in pairs.T:
        common = full["points3D_id_to_2D"][idx1].keys() & full["points3D_id_to_2D"][idx2].keys()
        assert common and full["points3D_id_to_ndepth"][idx1].keys() >= common
        assert full["depth_paths"][idx1] is not None and full["depth_paths"][idx2] is not None
        with h5py.File(os.path.join(root, full["depth_paths"][idx1]), "r") as f:
            assert not np.min(np.array(f["/depth"])) < 0
    provenance = json.loads(full["sfmpairs"])
    assert provenance["schema"] == "sfmpairs/export" and provenance["scene"] == "cluster_00_sparse_0"
    manifest = json.loads((root / "export.json").read_text())
    assert [s["scene"] for s in manifest["scenes"]] == [
        "cluster_00_sparse_0",
        "cluster_01_sparse_0",
        "cluster_02_sparse_0",
    ]
    assert [s["depth_maps"] for s in manifest["scenes"]] == [5, 6, 0]


def _expected_bins(world: Path, edges=(0.1, 0.3, 0.5, 0.7)) -> dict:
    """Per scene (cluster_0c_sparse_0): each LoFTR bin's stem and its pairs (i < j),
    from the brute-force overlap (float32, as the matrix holds it), [a, b) and the
    last [a, b]; images without a map in the workspace left out where it has maps."""
    import pycolmap

    out = {}
    for c in range(3):
        cluster = f"cluster_0{c}"
        info = _scene(world, f"{cluster}_sparse_0")
        names = list(info["image_names"])
        valid = _has_map(world, cluster, names)
        overlap = _brute_force(
            pycolmap.Reconstruction(str(world / "w" / cluster / "sparse" / "0")),
            names,
            valid if valid.any() else ~valid,
        )[0].astype(np.float32)
        bins = {}
        for a, b in zip(edges[:-1], edges[1:]):
            top = (lambda v: v <= np.float32(b)) if b == edges[-1] else (lambda v: v < np.float32(b))
            bins[f"{cluster}_sparse_0_{a:g}_{b:g}"] = {
                (i, j)
                for i in range(len(names))
                for j in range(i + 1, len(names))
                if overlap[i, j] >= np.float32(a) and top(overlap[i, j])
            }
        out[f"{cluster}_sparse_0"] = bins
    return out


def test_bins_and_lists_from_brute_force(world):
    """Each index file holds the pairs of its overlap bin; LoFTR's lists name exactly the
    non-empty bins (its RandomConcatSampler draws from each listed file: an empty one
    stops training) of the scenes with depth maps of each split (test: every scene)."""
    root, want = world / "md", _expected_bins(world)
    manifest = {x["scene"]: x for x in json.loads((root / "export.json").read_text())["scenes"]}
    for scene, bins in want.items():
        assert manifest[scene]["bins"] == {stem: len(pairs) for stem, pairs in bins.items()}
        for stem, pairs in bins.items():
            got = np.load(root / "index" / "scene_info_0.1_0.7" / f"{stem}.npz", allow_pickle=True)["pair_infos"]
            assert sorted((min(int(i), int(j)), max(int(i), int(j))) for (i, j), _, _ in got) == sorted(pairs)
    assert sum(map(len, want["cluster_01_sparse_0"].values())) > 2  # not a vacuous comparison
    assert any(not pairs for bins in want.values() for pairs in bins.values())  # an empty bin is left out
    lists = root / "index" / "trainvaltest_list"
    non_empty = {scene: [s for s, pairs in bins.items() if pairs] for scene, bins in want.items()}
    # cluster_00 and _01 (train) have depth maps; cluster_02 (val) none: test list only
    assert (lists / "train_list.txt").read_text().split() == non_empty["cluster_00_sparse_0"] + non_empty[
        "cluster_01_sparse_0"
    ]
    assert (lists / "val_list.txt").read_text() == "" and (root / "valid_scenes.txt").read_text() == ""
    assert (lists / "test_list.txt").read_text().split() == sum(non_empty.values(), [])
    for split in ("train", "val", "test"):  # LoFTR's sampler: torch.randint(low, high) per listed file
        for stem in (lists / f"{split}_list.txt").read_text().split():
            assert len(np.load(root / "index" / "scene_info_0.1_0.7" / f"{stem}.npz", allow_pickle=True)["pair_infos"])
    config = (root / "loftr_data_config.py").read_text()
    assert "cfg.DATASET.TRAIN_LIST_PATH = " in config and "cfg.DATASET.VAL_LIST_PATH = " not in config
    assert [w for w in EXPORT_WARNINGS if "val list is empty" in w] == [
        "LoFTR's val list is empty (1 scenes of that split, 0 with depth maps, 0 with depth maps and pairs in "
        "[0.1, 0.7]): VAL_LIST_PATH left out of loftr_data_config.py; LoFTR's train.py needs train and val lists "
        "(mine with --val-fraction > 0, scenes with depth maps)"
    ]


def _crafted(world, tmp_path, store_name=None, colmap_name=None) -> Path:
    shutil.copy(world / "sfm.h5", tmp_path / "sfm.h5")
    shutil.copy(world / "pairs.h5", tmp_path / "pairs.h5")
    with h5py.File(tmp_path / "pairs.h5", "r+") as p, h5py.File(tmp_path / "sfm.h5", "r+") as s:
        p.attrs["source_store"] = str(tmp_path / "sfm.h5")
        if store_name is not None:
            p["images/name"][2] = store_name
            s["images/name"][2] = store_name
        if colmap_name is not None:
            s["images/colmap_name"][2] = colmap_name
    return tmp_path / "pairs.h5"


@pytest.mark.parametrize(
    "fmt,store_name,colmap_name,bad",
    [
        ("megadepth", None, "../../escape.jpg", "../../escape.jpg"),
        ("megadepth", "/etc/escape.jpg", None, "/etc/escape.jpg"),
        ("cirtorch", "a/../../escape.jpg", None, "a/../../escape.jpg"),
        ("hloc", "..\\escape.jpg", None, "..\\escape.jpg"),
    ],
)
def test_names_that_leave_the_folder_are_refused(world, tmp_path, fmt, store_name, colmap_name, bad):
    pairs = _crafted(world, tmp_path, store_name, colmap_name)
    out = tmp_path / "out"
    options = {"per_model": True} if fmt == "hloc" else {}
    with pytest.raises(SfmpairsError) as e:
        export(pairs, out, fmt, images_root=world / "w", **options)
    message = str(e.value)
    assert "\n" not in message and repr(bad) in message
    assert str(tmp_path / ("sfm.h5" if colmap_name else "pairs.h5")) in message
    assert not out.exists() and not (tmp_path.parent / "escape.jpg").exists()
    assert not [x for x in os.listdir(tmp_path) if x.endswith(".tmp")]  # no scratch left behind


def test_megadepth_options_and_no_overwrite(world, tmp_path):
    with pytest.raises(SfmpairsError, match="--loftr-overlaps"):
        export(world / "pairs.h5", tmp_path / "o", "megadepth", loftr_overlaps="0.5,0.2")
    with pytest.raises(SfmpairsError, match="exists"):
        export(world / "pairs.h5", world / "md", "megadepth")
    r = export(world / "pairs.h5", tmp_path / "o", "megadepth", loftr_overlaps="0.2,1", d2net_points=False, copy=True)
    info = np.load(tmp_path / "o" / "scene_info" / "cluster_00_sparse_0.npz", allow_pickle=True)
    assert "points3D_id_to_2D" not in info and r["scenes"] == 3
    assert all(0.2 <= ov <= 1 for _, ov, _ in info["pair_infos"])
    assert (tmp_path / "o" / "index" / "scene_info_0.2_1" / "cluster_00_sparse_0_0.2_1.npz").is_file()
    photo = tmp_path / "o" / info["image_paths"][0]
    assert photo.is_file() and not photo.is_symlink()


def test_dense_workspace_layouts(tmp_path):
    from sfmpairs.sfm_io.colmap_depth import dense_workspace

    (tmp_path / "W" / "sparse" / "0").mkdir(parents=True)
    (tmp_path / "V" / "sparse").mkdir(parents=True)
    assert dense_workspace(tmp_path / "W" / "sparse" / "0") is None
    for w in ("W", "V"):
        (tmp_path / w / "stereo" / "depth_maps").mkdir(parents=True)
    assert dense_workspace(tmp_path / "W" / "sparse" / "0") == tmp_path / "W"  # a model at W/sparse/N
    assert dense_workspace(tmp_path / "V" / "sparse") == tmp_path / "V"  # image_undistorter's W/sparse
    assert dense_workspace(tmp_path / "W") == tmp_path / "W"


def test_cli_export_megadepth(world, tmp_path):
    from click.testing import CliRunner

    from sfmpairs.cli import main

    args = ["export", str(world / "pairs.h5"), "--format", "megadepth", "-o", str(tmp_path / "md")]
    r = CliRunner().invoke(main, [*args, "--no-d2net-points", "--loftr-overlaps", "0.2,0.6"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "md" / "index" / "scene_info_0.2_0.6" / "cluster_00_sparse_0_0.2_0.6.npz").is_file()
    bad = _crafted(world, tmp_path, None, "../../escape.jpg")
    r = CliRunner().invoke(main, ["export", str(bad), "--format", "megadepth", "-o", str(tmp_path / "bad")])
    assert r.exit_code == 2 and "'../../escape.jpg'" in r.output and not (tmp_path / "bad").exists()


def test_scene_matrices_small_cases_by_hand():
    from sfmpairs.mining.export_megadepth import scene_matrices

    def run(indptr, point, xy, valid=None):
        n = len(indptr) - 1
        valid = np.ones(n, bool) if valid is None else np.array(valid)
        xy = np.array(xy, float).reshape(-1, 2)
        return scene_matrices(
            np.array(indptr, np.int64), np.array(point, np.int64), xy, max(point, default=-1) + 1, valid
        )

    o, s, *_ = run([0, 0], [], [])  # one image without points
    assert o.tolist() == [[-1]] and s.tolist() == [[-1]]
    o, s, *_ = run([0, 1, 2], [0, 0], [[1, 1], [5, 5]])  # one shared point: overlap 1, a box of no area
    assert o.tolist() == [[-1, 1], [1, -1]] and s.tolist() == [[-1, -1], [-1, -1]]
    # image 0 sees points 0, 1, 2 (box 4 x 2), image 1 sees 1, 2 (box 1 x 2), image 2 nothing of theirs
    o, s, *_ = run([0, 3, 5, 6], [0, 1, 2, 2, 1, 3], [[0, 0], [0, 0], [4, 2], [1, 2], [0, 0], [7, 7]])
    np.testing.assert_allclose(o, [[-1, 1, 0], [1, -1, 0], [0, 0, -1]])
    np.testing.assert_allclose(s, [[-1, 2, -1], [0.5, -1, -1], [-1, -1, -1]])
    o, s, *_ = run([0, 3, 5, 6], [0, 1, 2, 2, 1, 3], [[0, 0]] * 6, valid=[True, False, True])
    assert (o[1] == -1).all() and (o[:, 1] == -1).all() and o[0, 2] == 0


def test_missing_photo_leaves_no_output(world, tmp_path):
    (tmp_path / "photos").mkdir()
    with pytest.raises(SfmpairsError, match="image not found") as e:
        export(world / "pairs.h5", tmp_path / "md", "megadepth", images_root=tmp_path / "photos")
    assert "\n" not in str(e.value)
    assert sorted(os.listdir(tmp_path)) == ["photos"]


def test_depth_files_agree_with_poses_on_exact_geometry(tmp_path, caplog):
    """synth's exact depth maps, through the export: at each observed point's pixel, the
    depth file holds the point's depth under the scene file's pose (what LoFTR's
    warping of pixels between images relies on). Mined with --val-fraction 0: no val
    list, said so, and no VAL_LIST_PATH in LoFTR's config."""
    import pycolmap

    from sfmpairs.mining.mine import mine
    from sfmpairs.sfm_io.ingest import ingest
    from sfmpairs.synthetic.world import synth

    synth(tmp_path / "w", clusters=2, images_per_cluster=5, image_size=(80, 60), seed=5, points=300, depth_maps=True)
    ingest([tmp_path / "w"], tmp_path / "sfm.h5")
    mine(tmp_path / "sfm.h5", tmp_path / "pairs.h5", queries_per_cluster=0, val_fraction=0)
    with caplog.at_level("WARNING", logger="sfmpairs.export"):
        export(tmp_path / "pairs.h5", tmp_path / "md", "megadepth")
    assert [r.getMessage() for r in caplog.records if r.name == "sfmpairs.export"] == [
        "LoFTR's val list is empty (0 scenes of that split, 0 with depth maps, 0 with depth maps and pairs in "
        "[0.1, 0.7]): VAL_LIST_PATH left out of loftr_data_config.py; LoFTR's train.py needs train and val lists "
        "(mine with --val-fraction > 0, scenes with depth maps)"
    ]
    lists = tmp_path / "md" / "index" / "trainvaltest_list"
    assert (lists / "val_list.txt").read_text() == "" and len((lists / "train_list.txt").read_text().split()) >= 2
    config = (tmp_path / "md" / "loftr_data_config.py").read_text()
    assert "VAL_LIST_PATH = " not in config and "\ncfg.DATASET.TRAIN_LIST_PATH = " in config
    info = np.load(tmp_path / "md" / "scene_info" / "cluster_00_sparse_0.npz", allow_pickle=True)
    rec = pycolmap.Reconstruction(str(tmp_path / "w" / "cluster_00" / "sparse" / "0"))
    assert all(d is not None for d in info["depth_paths"]) and len(info["pair_infos"]) > 0
    errors = []
    for k, path in enumerate(info["depth_paths"]):
        with h5py.File(tmp_path / "md" / path) as f:
            depth = f["depth"][()]
        assert depth.shape == (60, 80)
        for pid, (x, y) in info["points3D_id_to_2D"][k].items():
            z = (info["poses"][k] @ np.r_[rec.points3D[pid].xyz, 1])[2]
            errors.append(abs(depth[int(y), int(x)] - z) / z)
    assert len(errors) > 100 and np.median(errors) < 0.01


def test_intrinsics_of_every_camera_model_match_pycolmap():
    import pycolmap

    from sfmpairs.mining.export_megadepth import intrinsics
    from sfmpairs.sfm_io.store import max_params

    rng = np.random.default_rng(0)
    names, params, want, pinhole = [], [], [], []
    for name, member in pycolmap.CameraModelId.__members__.items():
        if member.value < 0:
            continue
        cam = pycolmap.Camera.create_from_model_name(1, name, 1.0, 640, 480)
        if not len(cam.focal_length_idxs()):
            continue
        for distorted in (False, True):
            p = rng.uniform(100, 900, len(cam.params))
            extra = [
                k for k in range(len(p)) if k not in cam.focal_length_idxs() and k not in cam.principal_point_idxs()
            ]
            p[extra] = rng.uniform(-0.1, 0.1, len(extra)) if distorted else 0
            cam.params = p
            names.append(name)
            params.append(np.r_[p, np.full(max_params() - len(p), np.nan)])
            want.append(cam.calibration_matrix())
            pinhole.append(not (distorted and extra) and "FISHEYE" not in name)
    K, got_pinhole = intrinsics(names, np.array(params))
    assert len(set(names)) >= 8
    np.testing.assert_allclose(K, want)
    assert got_pinhole.tolist() == pinhole


def test_distortion_is_warned_of(world, tmp_path, caplog):
    """A model with a distorted camera: a warning; its depth maps (in a dense workspace,
    of the undistorted model) ignored, and the scene in LoFTR's test list only."""
    pairs = _crafted(world, tmp_path)
    with h5py.File(tmp_path / "sfm.h5", "r+") as s:  # image 8 (cluster_01): SIMPLE_RADIAL, k = 0.05
        assert s["images/model"][8] == 1
        s["images/camera_model"][8] = "SIMPLE_RADIAL"
        f, cx, cy = s["images/params"][8, [0, 2, 3]]
        s["images/params"][8, :4] = [f, cx, cy, 0.05]
    with caplog.at_level("WARNING", logger="sfmpairs.export"):
        export(pairs, tmp_path / "md", "megadepth", images_root=world / "w")
    warned = [r.getMessage() for r in caplog.records if "distortion" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("cluster_01/sparse/0: 1 of its 6 images have cameras with")
    assert "the 6 depth maps in" in warned[0] and "image_undistorter" in warned[0]
    manifest = json.loads((tmp_path / "md" / "export.json").read_text())
    assert [x["distorted_images"] for x in manifest["scenes"]] == [0, 1, 0]
    assert [(x["depth_maps"], x["depth_maps_ignored"]) for x in manifest["scenes"]] == [(5, 0), (0, 6), (0, 0)]
    info = np.load(tmp_path / "md" / "scene_info" / "cluster_01_sparse_0.npz", allow_pickle=True)
    assert all(d is None for d in info["depth_paths"]) and len(info["pair_infos"])
    assert not (tmp_path / "md" / "depths" / "cluster_01_sparse_0").exists()
    lists, md = tmp_path / "md" / "index" / "trainvaltest_list", tmp_path / "md"
    assert "cluster_01" not in (lists / "train_list.txt").read_text() + (md / "train_scenes.txt").read_text()
    assert "cluster_01_sparse_0_" in (lists / "test_list.txt").read_text()


def test_missing_depth_is_warned_of_with_counts(world, tmp_path, caplog):
    """A partial workspace (5 of 6 maps, the sixth photometric only) and no workspace,
    from the world fixture's export; a workspace with photometric maps only."""
    from sfmpairs.mining.export_megadepth import depth_sources

    maps = world / "w" / "cluster_00" / "stereo" / "depth_maps"
    assert [w[:40] for w in EXPORT_WARNINGS] == [
        "cluster_00/sparse/0: 5 of its 6 images h",
        "cluster_00/sparse/0: none of the pairs o",  # its overlaps all above 0.7: in no LoFTR list
        "cluster_02/sparse/0: no COLMAP dense wor",
        "LoFTR's val list is empty (1 scenes of t",
    ]
    assert (
        f"cluster_00/sparse/0: 5 of its 6 images have a geometric depth map in {maps}; the 1 without (1 with only a "
        "photometric one; first: img_005.jpg) are left out of the overlap and scale-ratio matrices and of the pairs"
    ) in EXPORT_WARNINGS
    assert any(
        w.startswith("cluster_02/sparse/0: no COLMAP dense workspace") and "its 6 images" in w for w in EXPORT_WARNINGS
    )
    (tmp_path / "stereo" / "depth_maps").mkdir(parents=True)
    for name in ("a.jpg", "b.jpg"):
        write_depth_map(tmp_path / "stereo" / "depth_maps" / f"{name}.photometric.bin", np.ones((2, 2)))
    with caplog.at_level("WARNING", logger="sfmpairs.export"):
        assert depth_sources("m", tmp_path, ["a.jpg", "b.jpg", "c.jpg"], 0) == ([None] * 3, 0)
    [message] = [r.getMessage() for r in caplog.records if r.name == "sfmpairs.export"]
    assert message.startswith(
        f"m: {tmp_path / 'stereo' / 'depth_maps'} holds no geometric depth map of its 3 images (2 have only a "
        "photometric one)"
    )
    assert "geom_consistency" in message


def test_relative_images_root_links_resolve(world, tmp_path, monkeypatch):
    monkeypatch.chdir(world)
    export(world / "pairs.h5", tmp_path / "md", "megadepth", images_root="w", d2net_points=False)
    monkeypatch.chdir(tmp_path)  # elsewhere: a link to "w/..." would now dangle
    photos = sorted((tmp_path / "md" / "images").rglob("*.jpg"))
    assert len(photos) == 18
    for link in photos:
        assert link.is_symlink()
        scene, name = link.parent.name, link.name
        want = world / "w" / scene.replace("_sparse_0", "") / "images" / name
        assert link.read_bytes() == want.read_bytes() and os.path.samefile(link, want)


def test_depth_map_of_another_aspect_ratio_is_refused(tmp_path):
    from sfmpairs.mining.export_megadepth import convert_depths

    src = tmp_path / "a.jpg.geometric.bin"
    write_depth_map(src, np.ones((64, 64)))
    with pytest.raises(SfmpairsError) as e:
        convert_depths([src], ["a.jpg"], [64], [48], tmp_path, "depths/s")
    message = str(e.value)
    assert message.startswith(f"{src}: depth map of 64x64 ") and "64x48" in message and "\n" not in message


def test_model_ranges_by_hand():
    from sfmpairs.mining.export_megadepth import model_ranges

    assert model_ranges(np.array([0, 0, 2, 2, 2]), 4, "images").tolist() == [[0, 2], [0, 0], [2, 5], [0, 0]]
    assert model_ranges(np.zeros(0, np.int64), 2, "points").tolist() == [[0, 0], [0, 0]]
    with pytest.raises(ValueError, match="the points of model 1 are not contiguous"):
        model_ranges(np.array([1, 0, 1]), 2, "points")


def test_pair_infos_by_hand():
    """Bins compared in float32, as the overlap matrix holds the values (7/10 lies in
    [0.7, 1], though float32(0.7) < 0.7); a flipped pair lists (j, i) and swaps its
    centres."""
    from sfmpairs.mining.export_megadepth import orientations, pair_infos

    keys = np.array([0 * 3 + 1, 0 * 3 + 2, 1 * 3 + 2])  # (0, 1), (0, 2), (1, 2) of 3 images
    overlap = np.float32([7 / 10, 1 / 10, 3 / 10])
    centres = np.arange(12.0).reshape(3, 4)
    flip = np.array([False, True, False])

    def run(lo, hi, closed):
        return [
            (p.tolist(), ov, c.tolist()) for p, ov, c in pair_infos(keys, 3, overlap, centres, lo, hi, closed, flip)
        ]

    assert run(0.7, 1, True) == [([0, 1], float(np.float32(0.7)), [0, 1, 2, 3])]
    assert run(0.1, 0.7, False) == [
        ([2, 0], float(np.float32(0.1)), [6, 7, 4, 5]),
        ([1, 2], float(np.float32(0.3)), [8, 9, 10, 11]),
    ]
    assert run(0.1, 0.3, False) == [([2, 0], float(np.float32(0.1)), [6, 7, 4, 5])]
    a = orientations("cluster_00_sparse_0", 1000)
    assert (a == orientations("cluster_00_sparse_0", 1000)).all() and 400 < a.sum() < 600
    assert (a != orientations("cluster_01_sparse_0", 1000)).any()
