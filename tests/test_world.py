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

SMALL_PLACES = {"images_per_cluster": 8, "image_size": (120, 90)}


@pytest.fixture(scope="module", params=["easy", "hard"])
def world(tmp_path_factory, request):
    """Two places, 8 photos each; the hard world (look-alike places, occluders, strong
    viewpoint and lighting change) must be as exact as the easy one."""
    root = tmp_path_factory.mktemp(f"world_{request.param}")
    synth(root / "w", clusters=2, seed=3, points=800, hard=request.param == "hard", **SMALL_PLACES)
    ingest([root / "w"], root / "sfm.h5")
    mine(root / "sfm.h5", root / "pairs.h5", queries_per_cluster=0, val_fraction=0.5, strategy="max-inliers")
    return root


@pytest.fixture(scope="module")
def hard_world(tmp_path_factory):
    """A hard world of four places (two texture families shared: places 0 and 3 are of
    family 0) and five distractor photos, mined with the distractors in val; with depth
    maps."""
    root = tmp_path_factory.mktemp("hard_world")
    synth(root / "w", clusters=4, seed=5, points=1500, hard=True, distractors=5, depth_maps=True, **SMALL_PLACES)
    ingest([root / "w"], root / "sfm.h5")
    val = ["cluster_00/sparse/0", "cluster_01/sparse/0", "distractors/sparse/0"]
    mine(root / "sfm.h5", root / "pairs.h5", queries_per_cluster=0, val_clusters=val)
    mine(root / "sfm.h5", root / "pairs_train.h5", queries_per_cluster=0, val_clusters=val[:2])
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


@pytest.mark.parametrize("hard", [False, True])
def test_same_seed_same_world(tmp_path, hard):
    for out in ("a", "b"):
        synth(
            tmp_path / out,
            clusters=1,
            images_per_cluster=3,
            image_size=(64, 48),
            seed=9,
            points=200,
            hard=hard,
            distractors=2,
        )
    assert (tmp_path / "a" / "world.json").read_text() == (tmp_path / "b" / "world.json").read_text()
    for name in [f"cluster_00/images/img_{k:03d}.jpg" for k in range(3)] + ["distractors/images/img_001.jpg"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_distractors_belong_to_no_place(hard_world):
    """Distractor photos are in the store, with cameras and no observations; mining
    never makes one a query, a positive or a pool member; in val every distractor is a
    negative of every query (neither positive nor junk), in train a possible negative."""
    from sfmpairs.mining.pairfile import read_pair_file
    from sfmpairs.retrieval.evaluate import val_ground_truth

    s = read_store(hard_world / "sfm.h5")
    names = s["images/name"]
    distractor = np.array([n.startswith("distractors/") for n in names])
    assert distractor.sum() == 5 == len(list((hard_world / "w" / "distractors" / "images").glob("*.jpg")))
    assert (np.diff(s["observations/indptr"])[distractor] == 0).all()
    assert (np.diff(s["observations/indptr"])[~distractor] > 0).all()
    for pairs, split in (("pairs.h5", "val"), ("pairs_train.h5", "train")):
        p = read_pair_file(hard_world / pairs)
        for g in p["splits"].values():
            used = np.concatenate([g["query"], g["positive"], g["pool"].ravel()])
            assert not distractor[used[used >= 0]].any(), pairs
        assert distractor[p["splits"][split]["images"]].sum() == 5, pairs  # they are in the split's database
    _, queries, database, pos, junk = val_ground_truth(hard_world / "pairs.h5")
    in_db = np.flatnonzero(distractor[database])
    assert len(in_db) == 5 and len(queries) > 0
    for p, j in zip(pos, junk):
        assert not set(in_db) & (set(p.tolist()) | set(j.tolist()))


def _blocked(X, C, occ):
    """Points X (N, 3) whose segment from the camera centre C crosses the occluder
    (recomputed here from world.json's description of it)."""
    across = np.array([occ["across"][0], 0.0, occ["across"][1]])
    normal = np.cross(across, [0.0, 1.0, 0.0])
    base = np.array([occ["base"][0], 0.0, occ["base"][1]])
    with np.errstate(divide="ignore", invalid="ignore"):
        lam = ((base - C) @ normal) / ((X - C) @ normal)  # 0 at the camera, 1 at the point
    P = C + lam[:, None] * (X - C)
    s, y = (P - base) @ across, P[:, 1]
    if occ["shape"] == "ellipse":
        mid, half = (occ["top"] + occ["bottom"]) / 2, (occ["top"] - occ["bottom"]) / 2
        inside = (s / occ["half_width"]) ** 2 + ((y - mid) / half) ** 2 <= 1
    else:
        inside = (np.abs(s) <= occ["half_width"]) & (y >= occ["bottom"]) & (y <= occ["top"])
    return inside & (lam > 0) & (lam < 1)


def test_occluders_hide_the_points_behind_them(hard_world):
    """Every point in frame whose line of sight crosses an occluder is missing from the
    model's observations of that photo, and every point in frame with a clear line of
    sight is there (up to the z-buffer's pixel at occluder outlines)."""
    w = json.loads((hard_world / "w" / "world.json").read_text())
    s = read_store(hard_world / "sfm.h5")
    names = list(s["images/name"])
    width, height = w["image_size"]
    hidden = hidden_seen = clear = clear_seen = occluded_photos = 0
    for c, truth in w["clusters"].items():
        ids = np.array([int(k) for k in truth["points"]])
        X = np.array(list(truth["points"].values()))
        for k, cam in enumerate(truth["cameras"]):
            R, t, f = np.array(cam["R"]), np.array(cam["t"]), cam["f"]
            i = names.index(f"{c}/images/img_{k:03d}.jpg")
            rows = s["observations/point"][s["observations/indptr"][i] : s["observations/indptr"][i + 1]]
            seen = np.isin(ids, s["points/colmap_id"][rows])
            Xc = X @ R.T + t
            xy = f * Xc[:, :2] / Xc[:, 2:] + np.array([width / 2, height / 2])
            in_frame = (
                (Xc[:, 2] > 0) & (xy[:, 0] > 1) & (xy[:, 0] < width - 1) & (xy[:, 1] > 1) & (xy[:, 1] < height - 1)
            )
            C = -R.T @ t
            blocked = np.zeros(len(X), bool)
            for occ in cam.get("occluders", []):
                blocked |= _blocked(X, C, occ)
            # seen within 75 degrees of the wall's normal (at grazing angles the z-buffer's
            # depth, read at one sample of the pixel, misses points that are in view)
            normal = np.where((X[:, 2] == 0)[:, None], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0])
            in_frame &= np.abs(((C - X) * normal).sum(1)) > np.cos(np.deg2rad(75)) * np.linalg.norm(C - X, axis=1)
            occluded_photos += bool((in_frame & blocked).any())
            hidden += (in_frame & blocked).sum()
            hidden_seen += (in_frame & blocked & seen).sum()
            clear += (in_frame & ~blocked).sum()
            clear_seen += (in_frame & ~blocked & seen).sum()
            assert not (seen & ((Xc[:, 2] <= 0) | (xy < 0).any(axis=1) | (xy > [width, height]).any(axis=1))).any()
    assert occluded_photos >= 8 and hidden >= 200  # the hard world has occluders that hide points
    assert hidden_seen <= 0.03 * hidden, (hidden_seen, hidden)
    assert clear_seen >= 0.97 * clear, (clear_seen, clear)


def test_places_of_a_family_share_palette_and_windows():
    """Textures of a family's places: the window grid's period the family's within 10 %
    (measured on the texture: the strongest frequency along the wall, well above the
    rest) and the wall colour nearer the family's other places' than any place's of
    another family."""
    from sfmpairs.synthetic.world import TEXTURE_PX_PER_UNIT, make_family, make_texture

    numbers = (1, 4)  # families whose windows stand out from the wall
    families = [make_family(np.random.default_rng([7, n, 1])) for n in numbers]
    width = 16.0  # units: a fine frequency resolution

    def period(tex):  # the strongest period along the wall between 0.25 and 1 unit
        power = np.abs(np.fft.rfft(tex.mean(axis=(0, 2)) - tex.mean())) ** 2
        freq = np.fft.rfftfreq(tex.shape[1], 1 / TEXTURE_PX_PER_UNIT)  # cycles per unit
        band = (freq >= 1) & (freq <= 4)
        assert power[band].max() > 10 * np.median(power[band])
        return 1 / freq[band][np.argmax(power[band])]

    colour = {}
    for f, fam in enumerate(families):
        for place in range(3):
            tex = make_texture(np.random.default_rng([7, place, numbers[f]]), width, 2.0, fam, 0.1, "palette")
            sx = fam["spacing"][0]
            assert period(tex) == pytest.approx(sx, rel=0.1 + sx / width), (f, place)
            colour[f, place] = np.median(tex.reshape(-1, 3), axis=0)
    for (f, place), c in colour.items():
        same = max(np.linalg.norm(c - colour[f, p]) for p in range(3))
        other = min(np.linalg.norm(c - colour[1 - f, p]) for p in range(3))
        assert same < other, (f, place)


def test_bad_synth_options(tmp_path):
    with pytest.raises(SfmpairsError, match="image-size"):
        synth(tmp_path / "x", image_size=(4, 4))
    with pytest.raises(SfmpairsError, match="distractors"):
        synth(tmp_path / "x", distractors=-1)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(SfmpairsError, match="not empty"):
        synth(tmp_path / "full", clusters=1, images_per_cluster=2)


def _surface_depth(K, cam_from_world, size, walls, ground: bool):
    """Reference depth per pixel, by brute force: z in the camera (pycolmap's pose and
    intrinsics) of the nearest of the two wall rectangles (and the ground plane y = 0)
    hit by the ray through the pixel's centre, inf where none; and the rays' 3D hits
    (a far point on the ray where none)."""
    width, height = size
    u, v = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    d_cam = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], -1).reshape(-1, 3)
    R, t = cam_from_world[:, :3], cam_from_world[:, 3]
    C, d = -R.T @ t, d_cam @ R  # a ray's parameter is its z: d_cam's z is 1
    best = np.full(len(d), np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        for axis, along, length in ((2, 0, walls["LA"]), (0, 2, walls["LB"])):  # wall A: z = 0, wall B: x = 0
            lam = -C[axis] / d[:, axis]
            P = C + lam[:, None] * d
            on = (lam > 0) & (P[:, along] >= 0) & (P[:, along] <= length) & (P[:, 1] >= 0) & (P[:, 1] <= walls["H"])
            best = np.where(on, np.minimum(best, lam), best)
        if ground:
            lam = -C[1] / d[:, 1]
            best = np.where(lam > 0, np.minimum(best, lam), best)
    hits = C + np.where(np.isfinite(best), best, 1e4)[:, None] * d
    return best.reshape(height, width), hits


def _check_depth_maps(folder, truth, ground: bool) -> dict:
    """Every photo of a model folder: the depth map (full size) equals the reference
    depth of :func:`_surface_depth` where no occluder of world.json stands in the way,
    is nearer but positive where one does, and 0 where nothing is hit; each observed 3D
    point's z (pycolmap's pose) is the depth at its pixel."""
    import pycolmap
    from PIL import Image

    from sfmpairs.sfm_io.colmap_depth import read_depth_map

    rec = pycolmap.Reconstruction(str(folder / "sparse" / "0"))
    counts = {"pixels": 0, "empty": 0, "occluded": 0, "points": 0, "points_off": 0}
    for image in rec.images.values():
        k = int(image.name[4:7])
        cam, pose = rec.cameras[image.camera_id], image.cam_from_world()
        depth = read_depth_map(folder / "stereo" / "depth_maps" / f"{image.name}.geometric.bin")
        assert depth.shape == Image.open(folder / "images" / image.name).size[::-1] == (cam.height, cam.width)
        walls = truth["walls"] if "LA" in truth["walls"] else truth["walls"][k]
        ref, hits = _surface_depth(cam.calibration_matrix(), pose.matrix(), (cam.width, cam.height), walls, ground)
        C = -pose.rotation.matrix().T @ pose.translation
        blocked = np.zeros(len(hits), bool)
        for occ in truth["cameras"][k].get("occluders", []):
            blocked |= _blocked(hits, C, occ)
        blocked = blocked.reshape(ref.shape)
        clear = ~blocked & np.isfinite(ref)
        np.testing.assert_allclose(depth[clear], ref[clear], rtol=2e-6)
        assert (depth[~blocked & ~np.isfinite(ref)] == 0).all()
        assert ((depth[blocked] > 0) & (depth[blocked] < ref[blocked])).all()
        counts["pixels"] += depth.size
        counts["empty"] += (depth == 0).sum()
        counts["occluded"] += blocked.sum()
        for p in image.points2D:
            if p.has_point3D():
                X = pose * rec.points3D[p.point3D_id].xyz
                counts["points"] += 1
                counts["points_off"] += not abs(_plane_depth_at(depth, cam.img_from_cam(X)) - X[2]) <= 1e-4 * X[2]
    return counts


def _plane_depth_at(depth, xy) -> float:
    """The depth at sub-pixel position ``xy`` (COLMAP's: pixel centres at +0.5) as a
    plane seen through the four nearest pixel centres has it: 1/depth is affine in the
    image on a plane, so its bilinear interpolation is exact (nan off the map or where a
    neighbour is empty)."""
    gx, gy = xy[0] - 0.5, xy[1] - 0.5
    x0, y0 = int(np.floor(gx)), int(np.floor(gy))
    if x0 < 0 or y0 < 0 or x0 + 1 >= depth.shape[1] or y0 + 1 >= depth.shape[0]:
        return np.nan
    q = depth[y0 : y0 + 2, x0 : x0 + 2].astype(np.float64)
    fx, fy = gx - x0, gy - y0
    weights = np.array([[(1 - fy) * (1 - fx), (1 - fy) * fx], [fy * (1 - fx), fy * fx]])
    return 1 / (weights / q).sum() if (q > 0).all() else np.nan


def test_depth_maps_are_exact(hard_world, tmp_path):
    """``synth(depth_maps=True)``: COLMAP depth maps beside each model, one per photo, at
    the photo's size, holding z along the optical axis (not the distance along the ray):
    checked against a brute-force ray cast from pycolmap's poses and the walls of
    world.json, against each observed 3D point's z (from pycolmap's pose; at its
    sub-pixel position), and 0 where the ray meets nothing."""
    synth(tmp_path / "w", clusters=1, images_per_cluster=4, image_size=(80, 60), seed=2, points=400, depth_maps=True)
    worlds = [(tmp_path / "w", False), (hard_world / "w", True)]
    total = {}
    for root, hard in worlds:
        w = json.loads((root / "world.json").read_text())
        models = [(root / name, truth) for name, truth in w["clusters"].items()]
        models += [(root / "distractors", w["distractors"])] if "distractors" in w else []
        for folder, truth in models:
            assert sorted(p.name for p in (folder / "stereo" / "depth_maps").iterdir()) == sorted(
                f"{p.name}.geometric.bin" for p in (folder / "images").iterdir()
            )
            for key, n in _check_depth_maps(folder, truth, hard).items():
                total[hard, key] = total.get((hard, key), 0) + n
    for hard in (False, True):  # there is sky, and (hard) there are occluders and observed points
        assert total[hard, "empty"] > 0.02 * total[hard, "pixels"], total
        # off: near an edge (the walls' corner, an occluder's outline, the photo's border)
        assert total[hard, "points"] > 500 and total[hard, "points_off"] <= 0.08 * total[hard, "points"], total
    assert total[True, "occluded"] > 0.02 * total[True, "pixels"], total


def test_no_depth_maps_unless_asked(world):
    assert not list((world / "w").glob("*/stereo"))


def test_synth_output_name_too_long(tmp_path):
    """A folder name past the file system's limit: one line before any work, not the
    traceback of an OSError (ENAMETOOLONG)."""
    from click.testing import CliRunner

    from sfmpairs.cli import main

    r = CliRunner().invoke(main, ["synth", "-o", str(tmp_path / ("a" * 300)), "--clusters", "1"])
    assert r.exit_code == 2 and "cannot write (File name too long)" in r.stderr and "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []
