"""The MegaDepth export: scene files for local-feature matchers (LoFTR, D2-Net and their kin).

One scene per model of the SfM store, as D2-Net's ``megadepth_utils/preprocess_scene.py``
defines a scene's information and LoFTR's ``MegaDepthDataset`` reads it (schema in
docs/formats.md, "MegaDepth export"). Between images i and j of a model, with P(i) the
3D points image i observes (one 2D point per point):

- overlap: |P(i) ∩ P(j)| / min(|P(i)|, |P(j)|), symmetric; -1 on the diagonal and for
  images left out (those without a depth map, where the model has depth maps);
- scale ratio: sqrt(area_i / area_j), area_i the area of the bounding box, in pixels, of
  the co-observed points' 2D positions in image i; -1 where they share no point or a box
  has no area;
- angle: between the principal axes, in degrees.

Everything comes from the store's co-observation table, by the same batched walk over
tracks as mining (:mod:`.pools`): the cost grows with the co-observations, not with n².
Only the n x n outputs themselves are dense (their format).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
from scipy import sparse

from sfmpairs.common import SfmpairsError, progress
from sfmpairs.paths import check_relative_names
from sfmpairs.sfm_io.colmap_depth import (
    dense_workspace,
    fit_depth,
    geometric_depth_path,
    read_depth_map,
    write_depth_h5,
)

from .pools import _co_observations, _run_batches, tracks

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
    lo_ptr = np.searchsorted(lo, np.arange(n + 1))
    count = np.zeros(len(keys), np.int64)
    boxes = np.zeros((len(keys), 2, 4))

    def run_batch(i0: int, slot: np.ndarray) -> None:
        i1 = min(n, i0 + batch_images)
        p0, p1 = lo_ptr[i0], lo_ptr[i1]
        if p0 == p1:
            return
        pair, source, later = _co_observations(i0, i1, n, indptr, point, trk, slot, (lo[p0:p1] - i0) * n + hi[p0:p1])
        by_pair = np.argsort(pair, kind="stable")
        pair = pair[by_pair]
        start = np.flatnonzero(np.r_[True, pair[1:] != pair[:-1]])
        count[p0:p1] = np.bincount(pair, minlength=p1 - p0)
        for side, obs in enumerate((indptr[i0] + source[by_pair], track_obs[later][by_pair])):
            x, y = xy[obs, 0], xy[obs, 1]
            found = np.stack(
                [np.minimum.reduceat(v, start) for v in (x, y)] + [np.maximum.reduceat(v, start) for v in (x, y)], 1
            )
            boxes[p0:p1][pair[start], side] = found

    _run_batches(run_batch, n, batch_images, threads)
    return count, boxes


def scene_matrices(indptr, point, xy, num_points, valid: np.ndarray, threads: int | None = None):
    """``(overlap, scale_ratio, keys, pair_overlap, centres)``: the dense float32 (n, n)
    overlap and scale-ratio matrices (module docstring), and for every co-observing pair
    of valid images its key, overlap and the centres of its two bounding boxes (P, 4)."""
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
    pair_overlap = count / np.maximum(np.minimum(points[lo], points[hi]), 1)
    overlap[lo, hi] = overlap[hi, lo] = pair_overlap
    area = (boxes[:, :, 2] - boxes[:, :, 0]) * (boxes[:, :, 3] - boxes[:, :, 1])
    has = (area[:, 0] > 0) & (area[:, 1] > 0)
    ratio = np.sqrt(area[has, 0] / area[has, 1])
    scale = np.full((n, n), -1, np.float32)
    scale[lo[has], hi[has]] = ratio
    scale[hi[has], lo[has]] = 1 / ratio
    centres = ((boxes[:, :, :2] + boxes[:, :, 2:]) / 2).reshape(-1, 4).astype(np.float32)
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


def pair_infos(keys, n: int, pair_overlap, centres, lo: float, hi: float, closed: bool = True) -> list:
    """LoFTR's ``pair_infos``: ``(array([i, j]), overlap, central_matches)`` for each pair
    i < j with lo <= overlap <= hi (< hi unless ``closed``); central_matches float32
    (1, 4): the centres (x_i, y_i, x_j, y_j) of the co-observed points' boxes."""
    keep = (pair_overlap >= lo) & ((pair_overlap <= hi) if closed else (pair_overlap < hi))
    chosen = np.flatnonzero(keep)
    ij = np.stack([keys[chosen] // n, keys[chosen] % n], 1)
    return [(pair, ov, c[None]) for pair, ov, c in zip(ij, pair_overlap[chosen].tolist(), centres[chosen])]


def scene_name(model_name: str, taken: set) -> str:
    """A file name for a model: its name with anything but letters, digits, '-' and '_'
    replaced by '_' (LoFTR splits a scene file's path at its first '.'), made unique."""
    base = re.sub(r"[^A-Za-z0-9_-]+", "_", model_name).strip("_") or "model"
    name, k = base, 1
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    return name


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


def read_model_table(h5, s: dict, k: int) -> dict:
    """Model ``k`` of an open store ``h5`` (``s``: its image and model tables): its image
    rows, CSR co-observation table with local point indices, 2D points, and its points'
    COLMAP ids and positions."""
    rows = np.flatnonzero(s["images/model"] == k)
    a, b = int(rows[0]), int(rows[-1]) + 1
    if b - a != len(rows):
        raise ValueError(f"the images of model {k} are not contiguous")
    indptr = s["observations/indptr"][a : b + 1]
    pts = np.flatnonzero(s["points/model"] == k)
    p0, p1 = (int(pts[0]), int(pts[-1]) + 1) if len(pts) else (0, 0)
    if p1 - p0 != len(pts):
        raise ValueError(f"the points of model {k} are not contiguous")
    point = h5["observations/point"][indptr[0] : indptr[-1]].astype(np.int64) - p0
    if len(point) and (point.min() < 0 or point.max() >= p1 - p0):
        raise ValueError("an observation of another model's point")
    return {
        "rows": np.arange(a, b),
        "indptr": (indptr - indptr[0]).astype(np.int64),
        "point": point,
        "xy": h5["observations/xy"][indptr[0] : indptr[-1]].astype(np.float64),
        "point_ids": h5["points/colmap_id"][p0:p1],
        "xyz": h5["points/xyz"][p0:p1],
    }


def convert_depths(workspace, colmap_names, width, height, folder: Path, rel: str) -> list:
    """Each image's geometric depth map in ``workspace`` as ``folder/rel/<name>.h5``;
    the relative paths written (None for an image without a map)."""
    paths = []
    for name, w, h in progress(list(zip(colmap_names, width, height)), desc="depth maps", unit="map"):
        src = geometric_depth_path(workspace, name) if workspace is not None else None
        if src is None or not src.is_file():
            paths.append(None)
            continue
        dst = f"{rel}/{name}.h5"
        (folder / dst).parent.mkdir(parents=True, exist_ok=True)
        write_depth_h5(folder / dst, fit_depth(read_depth_map(src), int(w), int(h)), {"source": str(src)})
        paths.append(dst)
    return paths


def place_photos(names, sources, folder: Path, copy: bool) -> None:
    """Link (or copy) each photo ``sources[k]`` to ``folder/names[k]``."""
    for name, src in zip(names, sources):
        if not src.is_file():
            raise SfmpairsError(f"{src}: image not found (give --images-root)")
        dst = folder / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copyfile if copy else os.symlink)(src, dst)


def scene_info(m: dict, s: dict, image_paths, depth_paths, provenance: dict, with_points: bool):
    """``(info, pairs, distorted)``: the scene file's content (docs/formats.md) for model
    table ``m`` of store ``s``; its co-observing pairs (keys, overlap, box centres) for
    ``pair_infos``; how many images have a camera with distortion."""
    r = m["rows"]
    has_depth = np.array([d is not None for d in depth_paths], bool)
    valid = has_depth if has_depth.any() else np.ones(len(r), bool)
    overlap, scale, keys, pair_overlap, centres = scene_matrices(m["indptr"], m["point"], m["xy"], len(m["xyz"]), valid)
    K, pinhole = intrinsics(s["images/camera_model"][r], s["images/params"][r])
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
    return info, (keys, pair_overlap, centres), int((~pinhole).sum())


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
    ``index/scene_info_<lo>_<hi>/<scene>_<a>_<b>.npz``; the bins' file stems."""
    keys, pair_overlap, centres = pairs
    n = len(info["image_paths"])
    full = dict(info, pair_infos=pair_infos(keys, n, pair_overlap, centres, edges[0], edges[-1]))
    (folder / "scene_info").mkdir(exist_ok=True)
    _write_pickle(folder / "scene_info" / f"{scene}.npz", full)
    index = folder / "index" / f"scene_info_{_edge(edges[0])}_{_edge(edges[-1])}"
    index.mkdir(parents=True, exist_ok=True)
    stems = {}
    for a, b in zip(edges[:-1], edges[1:]):
        stem = f"{scene}_{_edge(a)}_{_edge(b)}"
        chosen = pair_infos(keys, n, pair_overlap, centres, a, b, closed=b == edges[-1])  # [a, b), the last [a, b]
        light = {k: info[k] for k in ("image_paths", "depth_paths", "intrinsics", "poses", "sfmpairs")}
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
    place_photos(image_paths, [images_root / s["images/name"][i] for i in r], folder, conf.copy)
    workspace = dense_workspace(s["models/path"][k])
    depth_paths = convert_depths(
        workspace, colmap, s["images/width"][r], s["images/height"][r], folder, f"depths/{scene}"
    )
    with_depth = sum(d is not None for d in depth_paths)
    if not with_depth:
        logger.info("%s: no COLMAP depth maps (stereo/depth_maps) beside the model: depth_paths left empty", model)
    own = dict(provenance, scene=scene, model=model, model_path=s["models/path"][k], dense_workspace=str(workspace))
    info, pairs, distorted = scene_info(m, s, image_paths, depth_paths, own, conf.d2net_points)
    if distorted:
        logger.warning(
            "%s: %d images have cameras with distortion, which the scene file's pinhole intrinsics leave out: "
            "export a model undistorted by COLMAP's image_undistorter",
            model,
            distorted,
        )
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
    return {
        "scene": scene,
        "model": model,
        "split": _split_of(p, r),
        "images": len(r),
        "depth_maps": with_depth,
        "distorted_images": distorted,
        **written,
    }


LOFTR_CONFIG = """# LoFTR's data config for an sfmpairs MegaDepth export (written by sfmpairs export).
# Run LoFTR's train.py from its checkout with this file as data_cfg_path.
from configs.data.base import cfg

cfg.DATASET.TRAINVAL_DATA_SOURCE = cfg.DATASET.TEST_DATA_SOURCE = "MegaDepth"
cfg.DATASET.TRAIN_DATA_ROOT = cfg.DATASET.VAL_DATA_ROOT = cfg.DATASET.TEST_DATA_ROOT = {root!r}
cfg.DATASET.TRAIN_NPZ_ROOT = cfg.DATASET.VAL_NPZ_ROOT = cfg.DATASET.TEST_NPZ_ROOT = {npz_root!r}
cfg.DATASET.TRAIN_LIST_PATH = {lists!r} + "/train_list.txt"
cfg.DATASET.VAL_LIST_PATH = {lists!r} + "/val_list.txt"
cfg.DATASET.TEST_LIST_PATH = {lists!r} + "/test_list.txt"
cfg.DATASET.MIN_OVERLAP_SCORE_TRAIN = 0.0  # the index files hold only pairs in [{lo:g}, {hi:g}]
cfg.DATASET.MIN_OVERLAP_SCORE_TEST = 0.0
cfg.TRAINER.N_SAMPLES_PER_SUBSET = 100
cfg.DATASET.MGDPT_IMG_RESIZE = 640
"""


def _write_lists(folder: Path, final: Path, scenes: list[dict], edges) -> None:
    """D2-Net's scene lists (``train_scenes.txt``, ``valid_scenes.txt``: scenes with
    depth), LoFTR's (``index/trainvaltest_list/{train,val,test}_list.txt``: the index
    files' stems; train and val the scenes with depth, test every scene) and LoFTR's
    data config ``loftr_data_config.py`` with this export's paths (``final``: where the
    export will be)."""
    lists = folder / "index" / "trainvaltest_list"
    lists.mkdir(parents=True, exist_ok=True)
    for split, d2net, loftr in (
        ("train", "train_scenes.txt", "train_list.txt"),
        ("val", "valid_scenes.txt", "val_list.txt"),
    ):
        chosen = [x for x in scenes if x["split"] == split and x["depth_maps"]]
        (folder / d2net).write_text("".join(f"{x['scene']}\n" for x in chosen), encoding="utf-8")
        (lists / loftr).write_text("".join(f"{stem}\n" for x in chosen for stem in x["bins"]), encoding="utf-8")
    (lists / "test_list.txt").write_text("".join(f"{stem}\n" for x in scenes for stem in x["bins"]), encoding="utf-8")
    npz_root = final / "index" / f"scene_info_{_edge(edges[0])}_{_edge(edges[-1])}"
    text = LOFTR_CONFIG.format(
        root=str(final),
        npz_root=str(npz_root),
        lists=str(final / "index" / "trainvaltest_list"),
        lo=edges[0],
        hi=edges[-1],
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
    with open_store(store_path) as h5:
        for k, model in enumerate(progress(list(s["models/name"]), desc="scenes", unit="model")):
            if not np.any(s["images/model"] == k):
                continue
            try:
                m = read_model_table(h5, s, k)
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
