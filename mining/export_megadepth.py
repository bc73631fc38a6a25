"""The MegaDepth export: scene files for local-feature matchers (LoFTR, D2-Net and their kin).

One scene per model of the SfM store, as D2-Net's ``megadepth_utils/preprocess_scene.py``
defines a scene's information and LoFTR's ``MegaDepthDataset`` reads it (schema in
docs/formats.md, "MegaDepth export"). Between images i and j of a model, with P(i) the
3D points image i observes (one 2D point per point), the definitions of D2-Net's
``preprocess_scene.py`` at its commit 931db50 (June 2019):

- overlap: |P(i) ∩ P(j)| / min(|P(i)|, |P(j)|), symmetric; -1 on the diagonal and for
  images left out (those without a depth map, where the model has depth maps);
- scale ratio: sqrt(area_i / area_j), area_i the area of the bounding box, in pixels, of
  the co-observed points' 2D positions in image i ([j, i] is its inverse, so half the
  values are below 1); -1 where they share no point or a box has no area;
- angle: between the principal axes, in degrees.

Its commit a1e86ef (August 2019, still its master) changed them to an asymmetric
overlap |P(i) ∩ P(j)| / |P(i)| and a symmetric scale ratio >= 1: the smallest over the
shared points of max(nd_i / nd_j, nd_j / nd_i), nd a point's depth over the mean focal
length. Its loader keeps the pairs with scale ratio <= ``max_scale_ratio``, by default
infinite, which filters nothing: it reads these files as they are. With a finite value
every pair still passes in the orientation whose ratio here is <= 1 (or -1), so only
its per-point filter on ``points3D_id_to_ndepth`` applies (and its ``np.random.choice``
fails on a pair none of whose points passes): keep the default.

Everything comes from the store's co-observation table, by the same batched walk over
tracks as mining (:mod:`.pools`): the cost grows with the co-observations, not with n².
Only the n x n outputs themselves are dense (their format).
"""

from __future__ import annotations

import json
import logging
import pickle
import zlib
from pathlib import Path

import numpy as np
from scipy import sparse

from sfmpairs.common import SfmpairsError, progress
from sfmpairs.paths import check_relative_names, place_photo
from sfmpairs.sfm_io.colmap_depth import (
    dense_workspace,
    depth_maps_in,
    fit_depth,
    read_depth_map,
    write_depth_h5,
)

from .export_hloc import folder_name
from .pools import tracks, walk_pair_batches

logger = logging.getLogger("sfmpairs.export")
LOFTR_DEPTH_PAD = 2000  # LoFTR's MegaDepthDataset pads depth maps to this square in training


def co_observing_pairs(indptr: np.ndarray, point: np.ndarray, num_points: int, block: int = 1024) -> np.ndarray:
    """Sorted keys lo * n + hi (lo < hi) of every pair of images that share a point: the
    upper triangle of A Aᵀ, A the (n, M) image-point incidence, by blocks of rows."""
    n = len(indptr) - 1
    a = sparse.csr_matrix((np.ones(len(point), np.float32), point, indptr), shape=(n, num_points))
    at = a.T.tocsr()
    keys = []
    for r0 in range(0, n, block):
        c = (a[r0 : r0 + block] @ at).tocoo()
        row = c.row.astype(np.int64) + r0
        upper = c.col > row
        keys.append(row[upper] * n + c.col[upper])
    return np.sort(np.concatenate(keys)) if keys else np.zeros(0, np.int64)


def pair_boxes(indptr, point, xy, num_points, keys, batch_images: int = 64, threads: int | None = None):
    """For each pair ``keys`` (from :func:`co_observing_pairs`): the co-observed count,
    int64 (P,), and the bounding boxes of the co-observed points' 2D positions in the
    lower and the higher image, float64 (P, 2, 4) as (x0, y0, x1, y1)."""
    n = len(indptr) - 1
    lo, hi = keys // n, keys % n
    trk = tracks(indptr, point, num_points)
    track_obs = trk[4]
    count = np.zeros(len(keys), np.int64)
    boxes = np.zeros((len(keys), 2, 4))

    def visit(p0: int, p1: int, o0: int, pair, source, later) -> None:
        by_pair = np.argsort(pair, kind="stable")
        pair = pair[by_pair]
        start = np.flatnonzero(np.r_[True, pair[1:] != pair[:-1]])
        count[p0:p1] = np.bincount(pair, minlength=p1 - p0)
        for side, obs in enumerate((o0 + source[by_pair], track_obs[later][by_pair])):
            x, y = xy[obs, 0], xy[obs, 1]
            found = np.stack(
                [np.minimum.reduceat(v, start) for v in (x, y)] + [np.maximum.reduceat(v, start) for v in (x, y)], 1
            )
            boxes[p0:p1][pair[start], side] = found

    walk_pair_batches(lo, hi, n, indptr, point, trk, batch_images, threads, visit)
    return count, boxes


def scene_matrices(indptr, point, xy, num_points, valid: np.ndarray, threads: int | None = None):
    """``(overlap, scale_ratio, keys, pair_overlap, centres)``: the dense float32 (n, n)
    overlap and scale-ratio matrices (module docstring), and for every co-observing pair
    of valid images its key, overlap (float32, the matrix's value) and the centres of
    its two bounding boxes (float64 (P, 4))."""
    n = len(indptr) - 1
    keys = co_observing_pairs(indptr, point, num_points)
    lo, hi = keys // n, keys % n
    keep = valid[lo] & valid[hi]
    keys, lo, hi = keys[keep], lo[keep], hi[keep]
    count, boxes = pair_boxes(indptr, point, xy, num_points, keys, threads=threads)
    points = np.diff(indptr)
    if valid.all():
        overlap = np.zeros((n, n), np.float32)
    else:
        overlap = np.full((n, n), -1, np.float32)
        overlap[np.ix_(valid, valid)] = 0
    np.fill_diagonal(overlap, -1)
    pair_overlap = (count / np.maximum(np.minimum(points[lo], points[hi]), 1)).astype(np.float32)
    overlap[lo, hi] = overlap[hi, lo] = pair_overlap
    area = (boxes[:, :, 2] - boxes[:, :, 0]) * (boxes[:, :, 3] - boxes[:, :, 1])
    has = (area[:, 0] > 0) & (area[:, 1] > 0)
    ratio = np.sqrt(area[has, 0] / area[has, 1])
    scale = np.full((n, n), -1, np.float32)
    scale[lo[has], hi[has]] = ratio
    scale[hi[has], lo[has]] = 1 / ratio
    centres = ((boxes[:, :, :2] + boxes[:, :, 2:]) / 2).reshape(-1, 4)
    return overlap, scale, keys, pair_overlap, centres


def principal_angles(rotation: np.ndarray, block: int = 2048) -> np.ndarray:
    """float32 (n, n): the angle in degrees between each two images' principal axes
    (the third row of cam_from_world's rotation), by blocks of rows."""
    axis = rotation[:, 2, :]
    axis = axis / np.linalg.norm(axis, axis=1, keepdims=True)
    out = np.empty((len(axis), len(axis)), np.float32)
    for r0 in range(0, len(axis), block):
        out[r0 : r0 + block] = np.degrees(np.arccos(np.clip(axis[r0 : r0 + block] @ axis.T, -1, 1)))
    return out


def intrinsics(camera_model, params: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(K, pinhole)``: float64 (n, 3, 3) calibration matrices from each image's camera
    (focal lengths and principal point; distortion left out; NaN for a model without a
    focal length) and bool (n,), whether the camera is a pinhole one (no distortion
    coefficient other than 0, no fisheye model)."""
    import pycolmap

    n = len(params)
    K = np.zeros((n, 3, 3))
    K[:, 2, 2] = 1
    pinhole = np.zeros(n, bool)
    models = np.asarray(camera_model, dtype=object)
    for name in set(models.tolist()):
        rows = np.flatnonzero(models == name)
        cam = pycolmap.Camera.create_from_model_name(1, name, 1.0, 2, 2)
        f, c = list(cam.focal_length_idxs()), list(cam.principal_point_idxs())
        if not f or len(c) != 2:
            K[rows] = np.nan
            continue
        fx, fy = f[0], f[-1]
        K[rows, 0, 0], K[rows, 1, 1] = params[rows, fx], params[rows, fy]
        K[rows, 0, 2], K[rows, 1, 2] = params[rows, c[0]], params[rows, c[1]]
        extra = [k for k in range(len(cam.params)) if k not in f and k not in c]
        if "FISHEYE" not in name:  # a fisheye projection is no pinhole, whatever its coefficients
            pinhole[rows] = ~np.any(params[rows][:, extra] != 0, axis=1) if extra else True
    return K, pinhole


def poses(rotation: np.ndarray, tvec: np.ndarray) -> np.ndarray:
    """float64 (n, 4, 4) world-to-camera matrices [R t; 0 1] (COLMAP's cam_from_world)."""
    T = np.zeros((len(rotation), 4, 4))
    T[:, :3, :3], T[:, :3, 3], T[:, 3, 3] = rotation, tvec, 1
    return T


def pair_infos(keys, n: int, pair_overlap, centres, lo: float, hi: float, closed: bool = True, flip=None) -> list:
    """LoFTR's ``pair_infos``: ``(array([i, j]), overlap, central_matches)`` for each pair
    with lo <= overlap <= hi (< hi unless ``closed``), compared in float32 as the overlap
    matrix holds them; i < j, or i > j where ``flip`` (bool per key) says so, as LoFTR's
    own files hold both orders; central_matches float64 (4,): the centres (x_i, y_i,
    x_j, y_j) of the co-observed points' boxes."""
    pair_overlap = np.asarray(pair_overlap, np.float32)
    keep = (pair_overlap >= np.float32(lo)) & (
        (pair_overlap <= np.float32(hi)) if closed else (pair_overlap < np.float32(hi))
    )
    chosen = np.flatnonzero(keep)
    first, second = keys[chosen] // n, keys[chosen] % n
    central = np.asarray(centres, np.float64)[chosen]
    if flip is not None:
        f = np.asarray(flip, bool)[chosen]
        first, second = np.where(f, second, first), np.where(f, first, second)
        central = np.where(f[:, None], central[:, [2, 3, 0, 1]], central)
    ij = np.stack([first, second], 1)
    return list(zip(ij, pair_overlap[chosen].tolist(), central))


def orientations(scene: str, count: int) -> np.ndarray:
    """bool (count,): which pairs a scene file lists as (j, i), j > i: random, from a
    generator seeded by the scene's name (the same in every export of the scene)."""
    return np.random.default_rng(zlib.crc32(scene.encode())).random(count) < 0.5


def scene_name(model_name: str, taken: set) -> str:
    """A file name for a model: its name (which holds '/') with anything but letters,
    digits, '-' and '_' replaced by '_', so that it is one plain word in the scene lists
    (LoFTR reads a list line's first whitespace-separated word), made unique among
    ``taken`` case-insensitively (macOS disks: ``A`` and ``a`` are one file)."""
    return folder_name(model_name, taken)


def d2net_points(point_ids, point, xy, indptr, xyz_cam_z, K):
    """D2-Net's per-image dicts: ``points3D_id_to_2D`` (COLMAP point id -> [x, y]) and
    ``points3D_id_to_ndepth`` (id -> depth / mean focal length)."""
    ids = point_ids[point].tolist()
    xy_list = xy.tolist()
    mean_f = (K[:, 0, 0] + K[:, 1, 1]) / 2
    nd = (xyz_cam_z / np.repeat(mean_f, np.diff(indptr))).tolist()
    to_2d, to_nd = [], []
    for i in range(len(indptr) - 1):
        a, b = int(indptr[i]), int(indptr[i + 1])
        to_2d.append(dict(zip(ids[a:b], xy_list[a:b])))
        to_nd.append(dict(zip(ids[a:b], nd[a:b])))
    return to_2d, to_nd


STORE_KEYS = [
    "images/name",
    "images/colmap_name",
    "images/model",
    "images/camera_model",
    "images/params",
    "images/width",
    "images/height",
    "images/rotation",
    "images/tvec",
    "models/name",
    "models/path",
    "points/model",
    "observations/indptr",
]


def model_ranges(model: np.ndarray, count: int, what: str) -> np.ndarray:
    """int64 (count, 2): each model's rows [start, end) in a store column ``model`` of
    model indices ((0, 0) for a model without rows), in one pass; ValueError where a
    model's ``what`` are not contiguous."""
    model = np.asarray(model, np.int64)
    out = np.zeros((count, 2), np.int64)
    if not len(model):
        return out
    start = np.flatnonzero(np.r_[True, model[1:] != model[:-1]])
    runs = np.bincount(model[start], minlength=count)
    if (runs > 1).any():
        raise ValueError(f"the {what} of model {int(np.argmax(runs > 1))} are not contiguous")
    out[model[start]] = np.stack([start, np.r_[start[1:], len(model)]], 1)
    return out


def read_model_table(h5, s: dict, images: tuple[int, int], points: tuple[int, int]) -> dict:
    """The model whose image rows are ``images`` and point rows ``points`` ([start,
    end), :func:`model_ranges`) of an open store ``h5`` (``s``: its tables): its image
    rows, CSR co-observation table with local point indices, 2D points, and its points'
    COLMAP ids and positions."""
    (a, b), (p0, p1) = images, points
    indptr = s["observations/indptr"][a : b + 1]
    o0, o1 = int(indptr[0]), int(indptr[-1])
    m = {
        "rows": np.arange(a, b),
        "indptr": (indptr - indptr[0]).astype(np.int64),
        "point": h5["observations/point"][o0:o1].astype(np.int64) - p0,
        "xy": h5["observations/xy"][o0:o1].astype(np.float64),
        "point_ids": h5["points/colmap_id"][p0:p1],
        "xyz": h5["points/xyz"][p0:p1],
    }
    # read here by hand, past read_store's checks: each table's rows and columns
    expected = {
        "observations/point": ("point", (o1 - o0,)),
        "observations/xy": ("xy", (o1 - o0, 2)),
        "points/colmap_id": ("point_ids", (p1 - p0,)),
        "points/xyz": ("xyz", (p1 - p0, 3)),
    }
    for table, (key, shape) in expected.items():
        if m[key].shape != shape:
            raise ValueError(f"{table} has the shape {m[key].shape} where its rows of the model are {shape}")
    if len(m["point"]) and (m["point"].min() < 0 or m["point"].max() >= p1 - p0):
        raise ValueError("an observation of another model's point")
    return m


def convert_depths(sources, colmap_names, width, height, folder: Path, rel: str) -> list:
    """Each image's depth map ``sources[k]`` (None: none) as ``folder/rel/<name>.h5``;
    the relative paths written (None for an image without a map)."""
    paths = []
    for src, name, w, h in progress(list(zip(sources, colmap_names, width, height)), desc="depth maps", unit="map"):
        if src is None:
            paths.append(None)
            continue
        dst = f"{rel}/{name}.h5"
        (folder / dst).parent.mkdir(parents=True, exist_ok=True)
        write_depth_h5(folder / dst, fit_depth(read_depth_map(src), int(w), int(h), src), {"source": str(src)})
        paths.append(dst)
    return paths


def depth_sources(model: str, workspace: Path | None, colmap_names, distorted: int) -> tuple[list, int]:
    """``(sources, ignored)``: each image's geometric depth map in ``workspace`` (None:
    none), or none at all where the model has cameras with distortion (the maps belong
    to the undistorted model; ``ignored`` counts them); a warning, with counts, for
    every case short of a map for each image."""
    n = len(colmap_names)
    if workspace is None:
        logger.warning(
            "%s: no COLMAP dense workspace (stereo/depth_maps in the model folder or above its sparse folder): "
            "depth_paths left empty for its %d images; the scene serves LoFTR's test mode only "
            "(for training run COLMAP's image_undistorter and patch_match_stereo, and ingest the workspace)",
            model,
            n,
        )
        return [None] * n, 0
    found, photometric = depth_maps_in(workspace, colmap_names)
    have = sum(f is not None for f in found)
    maps = workspace / "stereo" / "depth_maps"
    if have and distorted:
        logger.warning(
            "%s: %d of its %d images have cameras with distortion, so the %d depth maps in %s are not of this model "
            "(a dense workspace holds the undistorted one): depth maps ignored, the scene is in the test list only; "
            "ingest the workspace's undistorted model (COLMAP's image_undistorter writes it to its sparse folder)",
            model,
            distorted,
            n,
            have,
            maps,
        )
        return [None] * n, have
    if not have:
        logger.warning(
            "%s: %s holds no geometric depth map of its %d images (%d have only a photometric one): "
            "depth_paths left empty, the scene is in the test list only "
            "(run patch_match_stereo with --PatchMatchStereo.geom_consistency true)",
            model,
            maps,
            n,
            photometric,
        )
    elif have < n:
        missing = [name for name, f in zip(colmap_names, found) if f is None]
        logger.warning(
            "%s: %d of its %d images have a geometric depth map in %s; the %d without (%d with only a photometric "
            "one; first: %s) are left out of the overlap and scale-ratio matrices and of the pairs",
            model,
            have,
            n,
            maps,
            n - have,
            photometric,
            missing[0],
        )
    return found, 0


def scene_info(m: dict, s: dict, K, image_paths, depth_paths, provenance: dict, with_points: bool):
    """``(info, pairs)``: the scene file's content (docs/formats.md) for model table
    ``m`` of store ``s`` (``K``: its intrinsics); its co-observing pairs (keys, overlap,
    box centres) for ``pair_infos``."""
    r = m["rows"]
    has_depth = np.array([d is not None for d in depth_paths], bool)
    valid = has_depth if has_depth.any() else np.ones(len(r), bool)
    overlap, scale, keys, pair_overlap, centres = scene_matrices(m["indptr"], m["point"], m["xy"], len(m["xyz"]), valid)
    info = {
        "image_paths": np.array(image_paths, dtype=object),
        "depth_paths": np.array(depth_paths, dtype=object),
        "intrinsics": K,
        "poses": poses(s["images/rotation"][r], s["images/tvec"][r]),
        "overlap_matrix": overlap,
        "scale_ratio_matrix": scale,
        "angles": principal_angles(s["images/rotation"][r]),
        "n_points3D": np.diff(m["indptr"]),
        "fact_x": np.ones(len(r)),
        "fact_y": np.ones(len(r)),
        "image_names": np.array(s["images/colmap_name"][r], dtype=object),
    }
    if with_points:
        image = np.repeat(np.arange(len(r)), np.diff(m["indptr"]))
        R, t = s["images/rotation"][r], s["images/tvec"][r]
        z = np.einsum("ij,ij->i", m["xyz"][m["point"]], R[image, 2, :]) + t[image, 2]
        info["points3D_id_to_2D"], info["points3D_id_to_ndepth"] = d2net_points(
            m["point_ids"], m["point"], m["xy"], m["indptr"], z, K
        )
    info["sfmpairs"] = json.dumps(provenance, sort_keys=True, default=str)
    return info, (keys, pair_overlap, centres)


def _write_pickle(path: Path, data: dict) -> None:
    # LoFTR's reader deletes a key from what np.load returns: a dict, which np.load
    # (allow_pickle=True) gives for a pickle, unlike the read-only NpzFile of a zip
    with open(path, "wb") as fh:
        pickle.dump(data, fh, protocol=4)


def _edge(v: float) -> str:
    return f"{v:g}"


def write_scene(info: dict, pairs: tuple, edges, folder: Path, scene: str) -> dict:
    """``scene_info/<scene>.npz`` (every key, the pairs with overlap in [edges[0],
    edges[-1]]) and LoFTR's index files, one per overlap bin, in
    ``index/scene_info_<lo>_<hi>/<scene>_<a>_<b>.npz``; the pairs, and each bin's file
    stem and pairs. A pair's orientation (:func:`orientations`) is the same in both."""
    keys, pair_overlap, centres = pairs
    n = len(info["image_paths"])
    flip = orientations(scene, len(keys))
    full = dict(info, pair_infos=pair_infos(keys, n, pair_overlap, centres, edges[0], edges[-1], flip=flip))
    (folder / "scene_info").mkdir(exist_ok=True)
    _write_pickle(folder / "scene_info" / f"{scene}.npz", full)
    index = folder / "index" / f"scene_info_{_edge(edges[0])}_{_edge(edges[-1])}"
    index.mkdir(parents=True, exist_ok=True)
    light = {k: info[k] for k in ("image_paths", "depth_paths", "intrinsics", "poses", "sfmpairs")}
    stems = {}
    for a, b in zip(edges[:-1], edges[1:]):
        stem = f"{scene}_{_edge(a)}_{_edge(b)}"
        # [a, b), the last [a, b]
        chosen = pair_infos(keys, n, pair_overlap, centres, a, b, closed=b == edges[-1], flip=flip)
        _write_pickle(index / f"{stem}.npz", {**light, "pair_infos": chosen})
        stems[stem] = len(chosen)
    return {"pairs": len(full["pair_infos"]), "bins": stems}


def _split_of(p: dict, rows: np.ndarray) -> str:
    val = p["splits"].get("val")
    return "val" if val is not None and np.isin(rows, val["images"]).any() else "train"


def _export_scene(p, s, m, k, images_root: Path, folder: Path, scene: str, conf, edges, provenance) -> dict:
    """One model as scene ``scene``: photos, depth files, the scene file and LoFTR's index files."""
    r, model = m["rows"], s["models/name"][k]
    colmap = list(s["images/colmap_name"][r])
    image_paths = [f"images/{scene}/{name}" for name in colmap]
    for name, i in zip(image_paths, r):
        place_photo(images_root / s["images/name"][i], folder / name, conf.copy)
    K, pinhole = intrinsics(s["images/camera_model"][r], s["images/params"][r])
    distorted = int((~pinhole).sum())
    workspace = dense_workspace(s["models/path"][k])
    sources, ignored = depth_sources(model, workspace, colmap, distorted)
    depth_paths = convert_depths(
        sources, colmap, s["images/width"][r], s["images/height"][r], folder, f"depths/{scene}"
    )
    with_depth = sum(d is not None for d in depth_paths)
    if distorted and not ignored:  # else depth_sources said so
        logger.warning(
            "%s: %d images have cameras with distortion, which the scene file's pinhole intrinsics leave out: "
            "export a model undistorted by COLMAP's image_undistorter",
            model,
            distorted,
        )
    own = dict(provenance, scene=scene, model=model, model_path=s["models/path"][k], dense_workspace=str(workspace))
    info, pairs = scene_info(m, s, K, image_paths, depth_paths, own, conf.d2net_points)
    large = int(np.sum(np.maximum(s["images/width"][r], s["images/height"][r]) > LOFTR_DEPTH_PAD))
    if large and with_depth:
        logger.warning(
            "%s: %d images are larger than %d pixels, to which LoFTR's training pads depth maps: "
            "undistort with --max_image_size 1600",
            model,
            large,
            LOFTR_DEPTH_PAD,
        )
    written = write_scene(info, pairs, edges, folder, scene)
    if not written["pairs"]:
        logger.warning(
            "%s: none of the pairs of its %d images (%d of them with depth) has an overlap in [%g, %g] "
            "(--loftr-overlaps): the scene is in no LoFTR list",
            model,
            len(r),
            with_depth,
            edges[0],
            edges[-1],
        )
    return {
        "scene": scene,
        "model": model,
        "split": _split_of(p, r),
        "images": len(r),
        "depth_maps": with_depth,
        "depth_maps_ignored": ignored,
        "distorted_images": distorted,
        **written,
    }


LOFTR_CONFIG = """# LoFTR's data config for an sfmpairs MegaDepth export (written by sfmpairs export).
# Run LoFTR's train.py from its checkout with this file as data_cfg_path.
from configs.data.base import cfg

cfg.DATASET.TRAINVAL_DATA_SOURCE = cfg.DATASET.TEST_DATA_SOURCE = "MegaDepth"
cfg.DATASET.TRAIN_DATA_ROOT = cfg.DATASET.VAL_DATA_ROOT = cfg.DATASET.TEST_DATA_ROOT = {root!r}
cfg.DATASET.TRAIN_NPZ_ROOT = cfg.DATASET.VAL_NPZ_ROOT = cfg.DATASET.TEST_NPZ_ROOT = {npz_root!r}
{list_paths}
cfg.DATASET.MIN_OVERLAP_SCORE_TRAIN = 0.0  # the index files hold only pairs in [{lo:g}, {hi:g}]
cfg.DATASET.MIN_OVERLAP_SCORE_TEST = 0.0
cfg.TRAINER.N_SAMPLES_PER_SUBSET = 100
cfg.DATASET.MGDPT_IMG_RESIZE = 640
"""
LOFTR_LISTS = {"train": "TRAIN_LIST_PATH", "val": "VAL_LIST_PATH", "test": "TEST_LIST_PATH"}


def loftr_lists(scenes: list[dict]) -> dict:
    """LoFTR's lists: index file stems of the bins with at least one pair (its
    RandomConcatSampler draws from every listed file, and an empty one stops it); train
    and val: of the scenes of that split with depth maps; test: of every scene."""
    lists = {}
    for split in LOFTR_LISTS:
        chosen = [x for x in scenes if split == "test" or (x["split"] == split and x["depth_maps"])]
        lists[split] = [stem for x in chosen for stem, count in x["bins"].items() if count]
    return lists


def _warn_empty(split: str, scenes: list[dict], edges) -> None:
    of = [x for x in scenes if split == "test" or x["split"] == split]
    logger.warning(
        "LoFTR's %s list is empty (%d scenes of that split, %d with depth maps, %d with depth maps and pairs "
        "in [%g, %g]): %s left out of loftr_data_config.py%s",
        split,
        len(of),
        sum(x["depth_maps"] > 0 for x in of),
        sum(x["depth_maps"] > 0 and x["pairs"] > 0 for x in of),
        edges[0],
        edges[-1],
        LOFTR_LISTS[split],
        "; LoFTR's train.py needs train and val lists (mine with --val-fraction > 0, scenes with depth maps)"
        if split != "test"
        else "",
    )


def _write_lists(folder: Path, final: Path, scenes: list[dict], edges) -> None:
    """D2-Net's scene lists (``train_scenes.txt``, ``valid_scenes.txt``: the split's
    scenes with depth), LoFTR's (``index/trainvaltest_list/{train,val,test}_list.txt``,
    :func:`loftr_lists`) and LoFTR's data config ``loftr_data_config.py`` with this
    export's paths (``final``: where the export will be), leaving out the list of a
    split that has none (a warning with counts)."""
    lists = folder / "index" / "trainvaltest_list"
    lists.mkdir(parents=True, exist_ok=True)
    for split, name in (("train", "train_scenes.txt"), ("val", "valid_scenes.txt")):
        chosen = [x["scene"] for x in scenes if x["split"] == split and x["depth_maps"]]
        (folder / name).write_text("".join(f"{x}\n" for x in chosen), encoding="utf-8")
    list_root = final / "index" / "trainvaltest_list"
    lines = []
    for split, stems in loftr_lists(scenes).items():
        (lists / f"{split}_list.txt").write_text("".join(f"{x}\n" for x in stems), encoding="utf-8")
        if stems:
            lines.append(f"cfg.DATASET.{LOFTR_LISTS[split]} = {str(list_root / f'{split}_list.txt')!r}")
        else:
            _warn_empty(split, scenes, edges)
            lines.append(f"# cfg.DATASET.{LOFTR_LISTS[split]}: left out, no {split} scene with depth maps and pairs")
    npz_root = final / "index" / f"scene_info_{_edge(edges[0])}_{_edge(edges[-1])}"
    text = LOFTR_CONFIG.format(
        root=str(final), npz_root=str(npz_root), list_paths="\n".join(lines), lo=edges[0], hi=edges[-1]
    )
    (folder / "loftr_data_config.py").write_text(text, encoding="utf-8")


def export_megadepth(
    p: dict, store_path: Path, images_root: Path, folder: Path, conf, provenance: dict, final: Path | None = None
) -> dict:
    """Every model of the store ``store_path`` (whose images are the pair file ``p``'s)
    as a scene into ``folder``, a new folder (layout in docs/formats.md) that will be
    renamed to ``final`` (default: ``folder``). Returns the summary and, under
    ``manifest``, one entry per scene."""
    from sfmpairs.sfm_io.store import open_store, read_store

    s = read_store(store_path, observations=False, keys=STORE_KEYS)
    check_relative_names(s["images/name"], store_path)
    check_relative_names(s["images/colmap_name"], store_path, "COLMAP image name")
    edges = sorted(conf.loftr_overlaps)
    folder.mkdir()
    scenes, taken = [], set()
    count = len(s["models/name"])
    try:
        image_rows = model_ranges(s["images/model"], count, "images")
        point_rows = model_ranges(s["points/model"], count, "points")
    except ValueError as e:
        raise SfmpairsError(f"{store_path}: {e}") from None
    with open_store(store_path) as h5:
        for k, model in enumerate(progress(list(s["models/name"]), desc="scenes", unit="model")):
            if image_rows[k, 1] == image_rows[k, 0]:
                continue
            try:
                m = read_model_table(h5, s, image_rows[k], point_rows[k])
            except ValueError as e:
                raise SfmpairsError(f"{store_path}: model {model!r}: {e}") from None
            scene = scene_name(model, taken)
            scenes.append(_export_scene(p, s, m, k, images_root, folder, scene, conf, edges, provenance))
    _write_lists(folder, Path(final or folder).resolve(), scenes, edges)
    return {
        "scenes": len(scenes),
        "pairs": sum(x["pairs"] for x in scenes),
        "with_depth": sum(x["depth_maps"] > 0 for x in scenes),
        "manifest": scenes,
    }
