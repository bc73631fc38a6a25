"""One COLMAP model in memory, in the layout of the SfM store, and the pieces of logic
that every reader shares so that all readers give bit-identical results.

Conventions (those of COLMAP):
- a pose ``cam_from_world`` is a unit quaternion ``(qw, qx, qy, qz)`` and a translation
  ``t``; a world point X maps to the camera frame as ``R(q) @ X + t``;
- the camera centre is ``C = -R(q).T @ t``.

Observations are those of the registered images (their 2D points that name a 3D
point), one per (image, 3D point): where a track lists an image twice, the 2D point
with the lowest index in the image is kept. Each image's observations stay in the
order of its 2D points.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from ..common import SfmpairsError

INVALID_POINT3D_ID = np.uint64(2**64 - 1)


@dataclass
class Model:
    """A registered COLMAP model; arrays are sorted by COLMAP id."""

    path: str
    format: str  # "binary" or "text"
    # one row per registered image, sorted by image id
    image_ids: np.ndarray  # uint32 (N,)
    names: list[str]  # (N,) names as in the COLMAP model
    camera_ids: np.ndarray  # uint32 (N,)
    qvec: np.ndarray  # float64 (N, 4) cam_from_world rotation, w x y z
    tvec: np.ndarray  # float64 (N, 3) cam_from_world translation
    camera_model: list[str]  # (N,) COLMAP camera model names
    params: list[np.ndarray]  # (N,) intrinsics of each image's camera
    width: np.ndarray  # int64 (N,)
    height: np.ndarray  # int64 (N,)
    # one row per 3D point, sorted by point id
    point_ids: np.ndarray  # uint64 (M,)
    xyz: np.ndarray  # float64 (M, 3)
    # co-observation table, CSR over images
    indptr: np.ndarray  # int64 (N + 1,)
    point: np.ndarray  # int32 (nnz,) index into point_ids
    xy: np.ndarray  # float32 (nnz, 2) pixel coordinates in the COLMAP camera
    track_length: np.ndarray  # int32 (M,) distinct registered images observing each point

    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    @property
    def num_points(self) -> int:
        return len(self.point_ids)


# --------------------------------------------------------------------------- cameras
@functools.cache
def camera_models() -> dict[int, tuple[str, int, tuple[int, ...]]]:
    """COLMAP camera models as pycolmap knows them: id -> (name, num params, focal idxs)."""
    import pycolmap

    table = {}
    for name, member in pycolmap.CameraModelId.__members__.items():
        if member.value < 0:
            continue
        cam = pycolmap.Camera.create_from_model_id(1, member, 1.0, 2, 2)
        table[int(member.value)] = (name, len(cam.params), tuple(int(i) for i in cam.focal_length_idxs()))
    return table


@functools.cache
def camera_model_ids() -> dict[str, int]:
    return {name: mid for mid, (name, _, _) in camera_models().items()}


def focal_lengths(camera_model: list[str], params: list[np.ndarray]) -> np.ndarray:
    """Mean focal length in pixels of each image's camera (NaN for models without one)."""
    table = camera_models()
    ids = camera_model_ids()
    out = np.full(len(params), np.nan)
    for i, (name, p) in enumerate(zip(camera_model, params)):
        idxs = table[ids[name]][2]
        if idxs:
            out[i] = np.mean(p[list(idxs)])
    return out


# --------------------------------------------------------------------------- poses
def quat_to_rotmat(q: np.ndarray) -> np.ndarray:
    """(N, 4) quaternions w x y z (normalised here) -> (N, 3, 3) rotation matrices."""
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], axis=1).reshape(-1, 3, 3)


def camera_centres(qvec: np.ndarray, tvec: np.ndarray) -> np.ndarray:
    """Camera centres C = -R^T t, (N, 3)."""
    R = quat_to_rotmat(qvec)
    return -np.einsum("nji,nj->ni", R, tvec)


def compose_poses(q_a: np.ndarray, t_a: np.ndarray, q_b: np.ndarray, t_b: np.ndarray):
    """a_from_c = a_from_b * b_from_c for (N, 4) w-x-y-z quaternions and (N, 3) translations."""
    wa, xa, ya, za = q_a.T
    wb, xb, yb, zb = q_b.T
    q = np.stack([
        wa * wb - xa * xb - ya * yb - za * zb,
        wa * xb + xa * wb + ya * zb - za * yb,
        wa * yb - xa * zb + ya * wb + za * xb,
        wa * zb + xa * yb - ya * xb + za * wb,
    ], axis=1)
    t = np.einsum("nij,nj->ni", quat_to_rotmat(q_a), t_b) + t_a
    return q, t


def poses_from_frames(image_ids, camera_ids, frames: dict, rigs: dict, where: str):
    """cam_from_world of each image from COLMAP 3.12+ rigs and frames.

    ``frames`` maps image id -> (q, t) of the frame's rig_from_world and its rig id;
    ``rigs`` maps rig id -> {camera id: (q, t) sensor_from_rig or None for the
    reference sensor}.
    """
    n = len(image_ids)
    q = np.empty((n, 4))
    t = np.empty((n, 3))
    for i, (iid, cid) in enumerate(zip(image_ids.tolist(), camera_ids.tolist())):
        if iid not in frames:
            raise SfmpairsError(f"{where}: image {iid} belongs to no frame")
        fq, ft, rig_id = frames[iid]
        sensors = rigs.get(rig_id)
        if sensors is None or cid not in sensors:
            raise SfmpairsError(f"{where}: camera {cid} of image {iid} is not a sensor of rig {rig_id}")
        sensor_from_rig = sensors[cid]
        if sensor_from_rig is None:
            q[i], t[i] = fq, ft
        else:
            qq, tt = compose_poses(np.asarray([sensor_from_rig[0]]), np.asarray([sensor_from_rig[1]]),
                                   np.asarray([fq]), np.asarray([ft]))
            q[i], t[i] = qq[0], tt[0]
    return q, t


# --------------------------------------------------------------------------- points
def point_lookup(point_ids: np.ndarray):
    """Return f(ids) -> indices into the sorted ``point_ids``; -1 where an id is absent."""
    m = len(point_ids)
    if m == 0:
        return lambda ids: np.full(len(ids), -1, np.int64)
    max_id = int(point_ids[-1])
    if max_id < 4 * m + (1 << 20):  # dense ids: a lookup table is fastest
        lut = np.full(max_id + 2, -1, np.int32 if m < 2**31 else np.int64)
        lut[point_ids] = np.arange(m, dtype=lut.dtype)
        return lambda ids: lut[np.minimum(ids, np.uint64(max_id + 1))]

    def lookup(ids):
        pos = np.searchsorted(point_ids, ids)
        pos[pos == m] = 0
        return np.where(point_ids[pos] == ids, pos, -1)
    return lookup


def build_observations(rows, num_images: int, lookup, num_points: int, capacity: int,
                       where: str):
    """The CSR co-observation table from per-image rows.

    ``rows`` yields, image by image in store order, ``(image_id, point3D_ids, xy)`` of
    the image's 2D points that name a 3D point, in the image's 2D point order. A 3D
    point that an image observes twice is kept once, at its first 2D point. Returns
    ``(indptr, point, xy, track_length, raw_counts)``: ``track_length`` counts the
    distinct images that observe each point, ``raw_counts`` its observations before
    duplicates were dropped (to check against the track lengths that points3D lists).
    """
    indptr = np.zeros(num_images + 1, np.int64)
    point = np.empty(capacity, np.int32)
    out_xy = np.empty((capacity, 2), np.float32)
    stamp = np.empty(num_points, np.int64)  # scratch: first position of a point in a row
    track_length = np.zeros(num_points, np.int32)
    dropped = []
    pos = 0
    for i, (image_id, ids, xy) in enumerate(rows):
        idx = lookup(ids)
        k = len(idx)
        if k and idx.min() < 0:
            bad = int(ids[np.flatnonzero(idx < 0)[0]])
            raise SfmpairsError(f"{where}: image {image_id} observes 3D point {bad}, "
                                f"which the model does not have")
        # stamp[p] <- position of p's first occurrence in this row (written last)
        positions = np.arange(k)
        stamp[idx[::-1]] = positions[::-1]
        keep = stamp[idx] == positions
        if not keep.all():
            dropped.append(idx[~keep])
            idx, xy = idx[keep], xy[keep]
            k = len(idx)
        track_length[idx] += 1  # idx has no repeats now
        point[pos:pos + k] = idx
        out_xy[pos:pos + k] = xy
        pos += k
        indptr[i + 1] = pos
    point = point[:pos].copy() if pos < capacity // 2 else _shrink(point, pos)
    out_xy = out_xy[:pos].copy() if pos < capacity // 2 else _shrink(out_xy, pos)
    raw_counts = track_length
    if dropped:
        raw_counts = track_length + np.bincount(np.concatenate(dropped), minlength=num_points)
    return indptr, point, out_xy, track_length, raw_counts


def _shrink(a: np.ndarray, n: int) -> np.ndarray:
    a.resize((n,) + a.shape[1:], refcheck=False)  # in place, no copy
    return a


def check_unique(ids: np.ndarray, what: str, where: str) -> None:
    s = np.sort(ids)
    dup = s[1:][s[1:] == s[:-1]]
    if len(dup):
        raise SfmpairsError(f"{where}: {what} id {int(dup[0])} appears twice")


def check_finite(a: np.ndarray, what: str, where: str) -> None:
    if not np.all(np.isfinite(a)):
        raise SfmpairsError(f"{where}: non-finite {what}")


def check_tracks(model: Model, file_track_lengths: np.ndarray, raw_counts: np.ndarray,
                 where: str) -> None:
    """The track lengths that points3D lists must match the observations in images."""
    bad = np.flatnonzero(file_track_lengths != raw_counts)
    if len(bad):
        i = bad[0]
        raise SfmpairsError(
            f"{where}: 3D point {int(model.point_ids[i])} has a track of "
            f"{int(file_track_lengths[i])} observations but the images list {int(raw_counts[i])}")


def check_pose_quaternions(qvec: np.ndarray, where: str) -> None:
    check_finite(qvec, "image pose", where)
    norms = np.linalg.norm(qvec, axis=1)
    bad = np.flatnonzero(np.abs(norms - 1.0) > 1e-3)
    if len(bad):
        raise SfmpairsError(f"{where}: pose quaternion of image row {int(bad[0])} is not of unit length "
                            f"(norm {norms[bad[0]]:.6g})")
