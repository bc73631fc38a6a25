"""Random COLMAP models built with pycolmap, for tests and benchmarks.

The geometry is consistent (2D points are exact pinhole projections of the 3D points
into cameras that look at them), ids are odd on purpose (not 1..N, with gaps), and a
few tracks list an image twice, as real models do. The photo-realistic synthetic
world of ``sfmpairs synth`` is a different thing; this is the small, fast generator
for exercising readers and miners.
"""

from __future__ import annotations

import numpy as np


def _look_at(centres: np.ndarray, targets: np.ndarray, rng) -> np.ndarray:
    """Rotations (cam_from_world) of cameras at ``centres`` looking at ``targets``."""
    z = targets - centres
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    up = np.array([0.0, -1.0, 0.0]) + rng.normal(0, 0.05, (len(z), 3))
    x = np.cross(up, z)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = np.cross(z, x)
    return np.stack([x, y, z], axis=1)  # rows are the camera axes in world coordinates


_WIDTH, _HEIGHT = 640, 480  # image size (some cameras a little wider); the principal point's origin


def random_reconstruction(
    num_images: int = 30,
    num_points: int = 500,
    track_length: int = 4,
    *,
    camera_models: tuple[str, ...] = ("SIMPLE_RADIAL",),
    shared_cameras: bool = True,
    duplicate_fraction: float = 0.02,
    untriangulated_per_image: int = 5,
    id_start: int = 5,
    id_step: int = 3,
    point_id_gaps: bool = True,
    seed: int = 0,
):
    """A pycolmap.Reconstruction of ``num_images`` cameras on a circle (about 0.5 apart)
    looking at its centre, and ``num_points`` points, each seen by ``track_length``
    consecutive cameras and lying 3 to 8 in front of them.

    ``camera_models`` cycles over images (one camera per model when
    ``shared_cameras``, else one per image).
    """
    import pycolmap

    rng = np.random.default_rng(seed)  # drawn from in this order: poses, cameras, points, images
    n = num_images
    centres, R, t = _poses_on_circle(n, rng)
    rec = pycolmap.Reconstruction()
    image_cam = _add_cameras(rec, n, camera_models, shared_cameras, id_start, id_step, rng)
    image_ids = id_start + id_step * np.arange(n)
    xyz, seen_by = _points_in_view(centres, num_points, max(1, min(track_length, n)), rng)
    focal = np.array([rec.cameras[c].mean_focal_length() for c in image_cam])
    obs_image, obs_point, uv = _observations(seen_by, xyz, R, t, focal, duplicate_fraction, rng)
    kp_index = _add_images(rec, obs_image, uv, image_ids, image_cam, R, t, untriangulated_per_image, rng)
    _add_points(rec, xyz, obs_image, obs_point, kp_index, image_ids, point_id_gaps)
    return rec


def _poses_on_circle(n: int, rng):
    """``(centres, R, t)``, (n, 3), (n, 3, 3), (n, 3): cameras on a circle, about 0.5
    apart (with noise), looking at its centre; R and t are cam_from_world."""
    r0 = max(10.0, 0.5 * n / (2 * np.pi))
    ang = np.linspace(0, 2 * np.pi * (1 - 1 / max(n, 1)), n) + rng.normal(0, 0.05 / r0, n)
    radius = r0 + rng.normal(0, 0.05, n)
    centres = np.stack([radius * np.cos(ang), rng.normal(0, 0.05, n), radius * np.sin(ang)], 1)
    R = _look_at(centres, rng.normal(0, 0.3, (n, 3)), rng)
    t = -np.einsum("nij,nj->ni", R, centres)
    return centres, R, t


def _add_cameras(rec, n: int, camera_models, shared_cameras: bool, id_start: int, id_step: int, rng) -> list:
    """Add the cameras (one per model when ``shared_cameras``, else one per image, with
    random distortion parameters) to ``rec``; returns each image's camera id (n,)."""
    import pycolmap

    cam_ids = []
    for k in range(n if not shared_cameras else len(camera_models)):
        model = camera_models[k % len(camera_models)]
        cid = id_start + id_step * k + 2
        focal = 500.0 + 40 * k if not shared_cameras else 520.0
        cam = pycolmap.Camera.create_from_model_name(cid, model, focal, _WIDTH + 16 * (k % 3), _HEIGHT)
        params = np.asarray(cam.params, np.float64).copy()
        extra = list(cam.extra_params_idxs())
        params[extra] = rng.normal(0, 0.01, len(extra))
        cam.params = params
        rec.add_camera_with_trivial_rig(cam)
        cam_ids.append(cid)
    return [cam_ids[i % len(cam_ids)] for i in range(n)]


def _points_in_view(centres: np.ndarray, m: int, L: int, rng):
    """``(xyz, seen_by)``, (m, 3) and (m, L): points near the scene centre, each seen by
    the L consecutive cameras ``seen_by`` on the path, the first camera chosen at random
    (wrapping around the circle), the point 3 to 8 in front of their mean centre."""
    n = len(centres)
    first = rng.integers(0, n, m)
    seen_by = (first[:, None] + np.arange(L)) % n
    mid = centres[seen_by].mean(1)
    inward = -mid / np.linalg.norm(mid, axis=1, keepdims=True)
    xyz = mid + inward * rng.uniform(3, 8, (m, 1)) + rng.normal(0, 0.7, (m, 3))
    return xyz, seen_by


def _observations(seen_by, xyz, R, t, focal, duplicate_fraction: float, rng):
    """``(obs_image, obs_point, uv)``, one row an observation, sorted by image then point:
    each point in each image of its track (``seen_by`` (m, L)) at its exact pinhole
    projection ``uv`` (``focal`` (n,) per image), and a few tracks (``duplicate_fraction``)
    listing their first image twice, the second 2D point jittered by about half a pixel."""
    m, L = seen_by.shape
    dup = rng.random(m) < duplicate_fraction
    obs_point = np.concatenate([np.repeat(np.arange(m), L), np.flatnonzero(dup)])
    obs_image = np.concatenate([seen_by.ravel(), seen_by[dup, 0]])
    Xc = np.einsum("nij,nj->ni", R[obs_image], xyz[obs_point]) + t[obs_image]
    f = focal[obs_image]
    uv = f[:, None] * Xc[:, :2] / Xc[:, 2:3] + np.array([_WIDTH / 2, _HEIGHT / 2])
    uv[len(uv) - dup.sum() :] += rng.normal(0, 0.5, (dup.sum(), 2))
    order = np.lexsort((obs_point, obs_image))
    return obs_image[order], obs_point[order], uv[order]


def _add_images(rec, obs_image, uv, image_ids, image_cam, R, t, untriangulated: int, rng) -> np.ndarray:
    """Add each image with its pose and keypoints to ``rec``: its observations' ``uv``
    (a run of ``obs_image``, which is sorted) between ``untriangulated`` random
    keypoints, half before and half after. Returns each observation's keypoint index."""
    import pycolmap

    starts = np.searchsorted(obs_image, np.arange(len(image_ids) + 1))  # image i: starts[i]:starts[i+1]
    kp_index = np.empty(len(obs_image), np.int64)
    before = untriangulated // 2
    for i in range(len(image_ids)):
        a, b = starts[i], starts[i + 1]
        extra = rng.uniform([0, 0], [_WIDTH, _HEIGHT], (untriangulated, 2))
        kps = np.concatenate([extra[:before], uv[a:b], extra[before:]])
        kp_index[a:b] = before + np.arange(b - a)
        img = pycolmap.Image(
            name=f"seq/img_{int(image_ids[i]):05d}.jpg",
            keypoints=kps,
            camera_id=image_cam[i],
            image_id=int(image_ids[i]),
        )
        pose = pycolmap.Rigid3d(pycolmap.Rotation3d(R[i]), t[i])
        rec.add_image_with_trivial_frame(img, pose)
    return kp_index


def _add_points(rec, xyz, obs_image, obs_point, kp_index, image_ids, point_id_gaps: bool) -> None:
    """Add each point with its track (its observations, as (image id, keypoint index)) to
    ``rec``; ids with gaps where ``point_id_gaps`` (a spare point added after every
    third and deleted at the end)."""
    import pycolmap

    m = len(xyz)
    by_point = np.argsort(obs_point, kind="stable")  # observations grouped by point
    pstarts = np.searchsorted(obs_point[by_point], np.arange(m + 1))  # point p: pstarts[p]:pstarts[p+1]
    spares = []
    for p in range(m):
        sel = by_point[pstarts[p] : pstarts[p + 1]]
        track = pycolmap.Track([pycolmap.TrackElement(int(image_ids[obs_image[s]]), int(kp_index[s])) for s in sel])
        rec.add_point3D(xyz[p], track)
        if point_id_gaps and p % 3 == 0:
            spares.append(rec.add_point3D(xyz[p], pycolmap.Track()))
    for s in spares:
        rec.delete_point3D(s)


def write_model(rec, folder, fmt: str = "binary") -> None:
    """Write a pycolmap.Reconstruction as a binary or text COLMAP model."""
    from pathlib import Path

    Path(folder).mkdir(parents=True, exist_ok=True)
    (rec.write_binary if fmt == "binary" else rec.write_text)(str(folder))
