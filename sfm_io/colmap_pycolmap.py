"""The reference reader: any COLMAP model (binary or text) through pycolmap.

Slow on large models (it walks every 2D point in Python) but independent of the fast
readers' parsing; tests require both to give the same :class:`.model.Model`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from sfmpairs.common import SfmpairsError

from .checks import check_pose_quaternions
from .model import Model, build_observations, compose_poses


def _xyzw_to_wxyz(q) -> np.ndarray:
    q = np.asarray(q, np.float64)
    return np.array([q[3], q[0], q[1], q[2]])


def read_model(folder: str | os.PathLike, fmt: str = "binary") -> Model:
    """Read the COLMAP model (``fmt`` "binary" or "text") in ``folder`` with pycolmap."""
    folder = Path(folder)
    rec = _reconstruction(folder, fmt)
    image_ids = np.array(sorted(i for i, im in rec.images.items() if im.has_pose), np.uint32)
    images = [rec.images[int(i)] for i in image_ids]
    qvec, tvec = _cam_from_world(rec, images)
    check_pose_quaternions(qvec, str(folder))
    point_ids, xyz, file_tracks = _points(rec)
    observations = build_observations(
        _observation_rows(image_ids, images), point_ids, file_tracks, str(folder), str(folder)
    )
    cameras = {
        cid: (c.model.name, c.width, c.height, np.asarray(c.params, np.float64)) for cid, c in rec.cameras.items()
    }
    return Model.from_arrays(
        folder,
        fmt,
        image_ids,
        [im.name for im in images],
        np.array([im.camera_id for im in images], np.uint32),
        qvec,
        tvec,
        cameras,
        point_ids,
        xyz,
        observations,
    )


def _reconstruction(folder: Path, fmt: str):
    """The pycolmap.Reconstruction in ``folder``; pycolmap's errors become one line."""
    import pycolmap

    try:
        rec = pycolmap.Reconstruction()
        if fmt == "binary":
            rec.read_binary(str(folder))
        else:
            rec.read_text(str(folder))
    except Exception as e:  # pycolmap raises ValueError/RuntimeError with C++ context
        msg = " ".join(str(e).split())
        raise SfmpairsError(f"{folder}: pycolmap cannot read the model: {msg}") from None
    return rec


def _cam_from_world(rec, images: list):
    """``(qvec, tvec)``, (N, 4) w x y z and (N, 3): each image's cam_from_world pose."""
    import pycolmap

    qvec = np.empty((len(images), 4))
    tvec = np.empty((len(images), 3))
    for k, im in enumerate(images):
        # cam_from_world = sensor_from_rig * rig_from_world, composed as the fast
        # readers compose it so that both give the same bits
        frame = rec.frames[im.frame_id]
        rig = rec.rigs[frame.rig_id]
        q = _xyzw_to_wxyz(frame.rig_from_world.rotation.quat)
        t = np.asarray(frame.rig_from_world.translation, np.float64)
        ref = rig.ref_sensor_id
        if not (ref.type == pycolmap.SensorType.CAMERA and ref.id == im.camera_id):
            sensor = pycolmap.sensor_t(type=pycolmap.SensorType.CAMERA, id=im.camera_id)
            s_from_r = rig.sensor_from_rig(sensor)
            qq, tt = compose_poses(
                _xyzw_to_wxyz(s_from_r.rotation.quat)[None], np.asarray(s_from_r.translation)[None], q[None], t[None]
            )
            q, t = qq[0], tt[0]
        qvec[k], tvec[k] = q, t
    return qvec, tvec


def _points(rec):
    """``(point_ids, xyz, track_lengths)`` of the 3D points, sorted by id: uint64 (M,),
    float64 (M, 3), int64 (M,) (observations in each point's track, repeats included)."""
    point_ids = np.array(sorted(rec.points3D), np.uint64)
    xyz = np.array([rec.points3D[int(p)].xyz for p in point_ids], np.float64).reshape(-1, 3)
    file_tracks = np.array([rec.points3D[int(p)].track.length() for p in point_ids], np.int64)
    return point_ids, xyz, file_tracks


def _observation_rows(image_ids: np.ndarray, images: list) -> list:
    """The (read, size) batches of :func:`.model.build_observations`, one an image: its
    2D points that name a 3D point, in its 2D point order."""
    rows = []
    for iid, im in zip(image_ids.tolist(), images):
        pts = [p for p in im.points2D if p.has_point3D()]
        ids = np.array([p.point3D_id for p in pts], np.uint64)
        xy = np.array([p.xy for p in pts], np.float64).reshape(-1, 2)
        rows.append((lambda iid=iid, ids=ids, xy=xy: ([iid], [len(ids)], ids, xy), len(ids)))
    return rows
