"""A fast reader of COLMAP binary models (cameras.bin, images.bin, points3D.bin and,
from COLMAP 3.12 on, rigs.bin and frames.bin).

It reads the files through ``mmap`` and numpy views instead of building millions of
Python or C++ objects, checks every count and offset against the file size (a
truncated or corrupt file gives a one-line :class:`SfmpairsError`, never a crash or
a huge allocation), and gives exactly what the pycolmap reader
(:mod:`.colmap_pycolmap`) gives. The byte layout is COLMAP's
``src/colmap/scene/reconstruction_io_binary.cc``; all integers little-endian.
"""

from __future__ import annotations

import mmap
import os
import struct
from array import array
from pathlib import Path

import numpy as np

from sfmpairs.common import SfmpairsError

from .checks import check_finite, check_pose_quaternions, check_unique
from .model import INVALID_POINT3D_ID, Model, build_observations, camera_models, frame_table, poses_from_frames

_U64 = struct.Struct("<Q")
_CAMERA = struct.Struct("<IiQQ")  # camera_id, model_id, width, height
_IMAGE = struct.Struct("<I4d3dI")  # image_id, qvec, tvec, camera_id  (64 bytes)
_POINT_HEAD = 43  # point3D_id u64, xyz 3 f8, rgb 3 u8, error f8; then track_length u64
_POINT2D = np.dtype([("x", "<f8"), ("y", "<f8"), ("id", "<u8")])  # 24 bytes
_MAX_NAME = 4096
_SENSOR_CAMERA = 0


class _File:
    """A read-only view of one model file with bounds-checked reads."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size == 0:
                    raise SfmpairsError(f"{path}: empty file")
                self.buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise SfmpairsError(f"{path}: cannot read ({e.strerror or e})") from None
        self.size = size
        self._released = 0

    def fail(self, problem: str):
        raise SfmpairsError(f"{self.path}: {problem}")

    def need(self, offset: int, nbytes: int, what: str) -> None:
        if offset + nbytes > self.size:
            self.fail(
                f"truncated: {what} runs past the end of the file (needs byte {offset + nbytes}, file has {self.size})"
            )

    def unpack(self, st: struct.Struct, offset: int, what: str):
        self.need(offset, st.size, what)
        return st.unpack_from(self.buf, offset)

    def count(self, offset: int, min_record: int, what: str) -> int:
        (n,) = self.unpack(_U64, offset, f"number of {what}")
        if n * min_record > self.size - offset - 8:
            self.fail(f"truncated or corrupt: says {n} {what}, more than the file can hold")
        return n

    def end(self, offset: int) -> None:
        if offset != self.size:
            self.fail(f"corrupt: {self.size - offset} unexpected bytes after the last record")

    def release(self, upto: int) -> None:
        """Drop the pages before ``upto`` from memory (they were read and are clean)."""
        upto -= upto % mmap.PAGESIZE
        if upto - self._released >= 1 << 25:
            self.buf.madvise(mmap.MADV_DONTNEED, self._released, upto - self._released)
            self._released = upto

    def close(self):
        try:
            self.buf.close()
        except BufferError:  # a numpy view is still alive (we are unwinding an error)
            pass


def read_cameras(path: Path) -> dict[int, tuple[str, int, int, np.ndarray]]:
    """camera id -> (model name, width, height, params)."""
    f = _File(path)
    table = camera_models()
    cameras = {}
    try:
        n = f.count(0, _CAMERA.size, "cameras")
        off = 8
        for _ in range(n):
            cid, mid, w, h = f.unpack(_CAMERA, off, "camera record")
            if mid not in table:
                f.fail(f"camera {cid} has unknown camera model id {mid}")
            name, nparams, _ = table[mid]
            off += _CAMERA.size
            f.need(off, 8 * nparams, f"parameters of camera {cid}")
            params = np.frombuffer(f.buf, "<f8", nparams, off).astype(np.float64)
            off += 8 * nparams
            if cid in cameras:
                f.fail(f"camera id {cid} appears twice")
            if not (0 < w < 2**31 and 0 < h < 2**31):
                f.fail(f"camera {cid} has an invalid size {w}x{h}")
            if not np.all(np.isfinite(params)):
                f.fail(f"camera {cid} has non-finite parameters")
            cameras[cid] = (name, w, h, params)
        f.end(off)
    finally:
        f.close()
    return cameras


def read_rigs(path: Path) -> dict[int, dict[int, tuple | None]]:
    """rig id -> {camera id: (q, t) sensor_from_rig, None for the reference sensor}."""
    f = _File(path)
    rigs = {}
    head, sensor = struct.Struct("<II"), struct.Struct("<iI")
    flag, pose = struct.Struct("<B"), struct.Struct("<7d")
    try:
        n = f.count(0, 8, "rigs")
        off = 8
        for _ in range(n):
            rig_id, num_sensors = f.unpack(head, off, "rig record")
            off += head.size
            sensors = {}
            for j in range(num_sensors):
                stype, sid = f.unpack(sensor, off, f"sensor of rig {rig_id}")
                off += sensor.size
                value = None
                if j > 0:
                    (has_pose,) = f.unpack(flag, off, "sensor pose flag")
                    off += flag.size
                    if has_pose:
                        vals = f.unpack(pose, off, "sensor pose")
                        off += pose.size
                        value = (np.array(vals[:4]), np.array(vals[4:]))
                        if not np.all(np.isfinite(vals)):
                            f.fail(f"rig {rig_id} has a non-finite sensor pose")
                    else:
                        f.fail(f"rig {rig_id}: sensor {sid} has no pose relative to the rig")
                if stype == _SENSOR_CAMERA:
                    sensors[sid] = value
            rigs[rig_id] = sensors
        f.end(off)
    finally:
        f.close()
    return rigs


_FRAME_ONE_IMAGE = np.dtype(
    [
        ("frame_id", "<u4"),
        ("rig_id", "<u4"),
        ("pose", "<f8", 7),
        ("num_data", "<u4"),
        ("sensor_type", "<i4"),
        ("sensor_id", "<u4"),
        ("data_id", "<u8"),
    ]
)


def read_frames(path: Path) -> dict:
    """The frames' poses by image: ``{"image_id", "q", "t", "rig_id"}`` arrays, with
    (q, t) the rig_from_world of the frame that holds the image."""
    f = _File(path)
    head, data = struct.Struct("<II7dI"), struct.Struct("<iIQ")
    rows = []
    try:
        n = f.count(0, head.size, "frames")
        if f.size == 8 + n * _FRAME_ONE_IMAGE.itemsize:  # one image per frame: read at once
            rec = np.frombuffer(f.buf, _FRAME_ONE_IMAGE, n, 8).copy()
            if np.all(rec["num_data"] == 1):
                if not np.all(np.isfinite(rec["pose"])):
                    bad = int(rec["frame_id"][~np.isfinite(rec["pose"]).all(1)][0])
                    f.fail(f"frame {bad} has a non-finite pose")
                cam = rec["sensor_type"] == _SENSOR_CAMERA
                return {
                    "image_id": rec["data_id"][cam],
                    "q": rec["pose"][cam, :4],
                    "t": rec["pose"][cam, 4:],
                    "rig_id": rec["rig_id"][cam].astype(np.int64),
                }
        off = 8
        for _ in range(n):
            frame_id, rig_id, *pose, num_data = f.unpack(head, off, "frame record")
            off += head.size
            if not np.all(np.isfinite(pose)):
                f.fail(f"frame {frame_id} has a non-finite pose")
            f.need(off, num_data * data.size, f"data ids of frame {frame_id}")
            for _ in range(num_data):
                stype, _sid, data_id = data.unpack_from(f.buf, off)
                off += data.size
                if stype == _SENSOR_CAMERA:
                    rows.append((data_id, pose, rig_id))
        f.end(off)
    finally:
        f.close()
    return frame_table(rows)


def _image_headers(f: _File):
    """Offsets, ids, poses, camera ids, names and 2D point counts of every image."""
    n = f.count(0, _IMAGE.size + 9, "images")
    off = 8
    recs = []
    buf = f.buf
    for _ in range(n):
        iid, qw, qx, qy, qz, tx, ty, tz, cid = f.unpack(_IMAGE, off, "image record")
        start = off + _IMAGE.size
        stop = buf.find(b"\0", start, min(start + _MAX_NAME, f.size))
        if stop < 0:
            f.fail(f"truncated or corrupt: name of image {iid} is not terminated")
        try:
            name = buf[start:stop].decode("utf-8")
        except UnicodeDecodeError:
            f.fail(f"corrupt: name of image {iid} is not UTF-8")
        (npts,) = f.unpack(_U64, stop + 1, f"2D point count of image {iid}")
        pts = stop + 9
        f.need(pts, npts * _POINT2D.itemsize, f"2D points of image {iid}")
        recs.append((iid, (qw, qx, qy, qz), (tx, ty, tz), cid, name, pts, npts))
        off = pts + npts * _POINT2D.itemsize
    f.end(off)
    return recs


def _point_offsets(f: _File, guess: bool = False) -> np.ndarray | None:
    """Byte offset of every record of points3D.bin (records have variable length).

    With ``guess``, read only the low byte of each track length (a third faster) and
    return None where that cannot be right; the caller checks that every track length
    read at the offsets is below 256, which makes the guess exact.
    """
    n = f.count(0, _POINT_HEAD + 8, "3D points")
    offsets = array("q", bytes(8 * n))
    buf, step = f.buf, _POINT_HEAD + 8
    off = 8
    if guess:
        try:
            for i in range(n):  # the one Python loop over points: 0.2 us a record
                offsets[i] = off
                off += step + 8 * buf[off + _POINT_HEAD]
        except IndexError:
            return None
        return np.frombuffer(offsets, np.int64) if off == f.size else None
    unpack = _U64.unpack_from
    try:
        for i in range(n):
            offsets[i] = off
            off += step + 8 * unpack(buf, off + _POINT_HEAD)[0]
    except (struct.error, OverflowError):  # a track length that leaves the file
        f.fail(f"truncated or corrupt: 3D point record {i} runs past the end of the file")
    f.end(off)
    return np.frombuffer(offsets, np.int64)


def read_points(path: Path):
    """Sorted point ids, xyz and the track length each record declares."""
    f = _File(path)
    try:
        offsets = _point_offsets(f, guess=True)
        if offsets is not None:
            head = _gather_heads(f, offsets)
            if not np.all(head[2] < 256):  # a long track: the guess went wrong there
                offsets = None
        if offsets is None:
            offsets = _point_offsets(f)
            head = _gather_heads(f, offsets)
        ids, xyz, track = head
    finally:
        f.close()
    if not np.all(ids[1:] > ids[:-1]):  # COLMAP < 3.12 wrote points in hash order
        order = np.argsort(ids, kind="stable")
        ids, xyz, track = ids[order], xyz[order], track[order]
        check_unique(ids, "3D point", str(path))
    check_finite(xyz, "3D point position", str(path))
    return ids, xyz, track


_POINT_RECORD = np.dtype(
    [("id", "<u8"), ("xyz", "<f8", 3), ("rgb", "u1", 3), ("error", "<f8"), ("track_length", "<u8")]
)  # the fixed-size head, 51 bytes, packed


def _gather_heads(f: _File, offsets: np.ndarray):
    """(ids, xyz, track lengths) from the fixed-size head of each point record."""
    if not len(offsets):
        return np.empty(0, np.uint64), np.empty((0, 3)), np.empty(0, np.uint64)
    # every byte offset as the start of a 51-byte record: a 1-D fancy index copies the ones asked
    heads = np.ndarray(
        (f.size - _POINT_RECORD.itemsize + 1,), np.dtype((np.void, _POINT_RECORD.itemsize)), f.buf, 0, (1,)
    )
    rec = heads[offsets].view(_POINT_RECORD)
    del heads
    return rec["id"].copy(), rec["xyz"].copy(), rec["track_length"].copy()


def _point2d_batches(f: _File, heads: list, batch: int = 1 << 16) -> list:
    """The (read, size) batches of :func:`.model.build_observations`: runs of
    consecutive images in ``heads`` order of about ``batch`` 2D points. Batching keeps
    numpy's per-call overhead off the 10,000-image hot loop."""
    tasks, start = [], 0
    while start < len(heads):
        stop, total = start, 0
        while stop < len(heads) and (stop == start or total + heads[stop][6] <= batch):
            total += heads[stop][6]
            stop += 1

        def read(group=heads[start:stop]):
            block = np.concatenate([np.frombuffer(f.buf, "<f8", 3 * r[6], r[5]) for r in group])
            block = block.reshape(-1, 3)
            ids = block[:, 2].view("<u8")
            valid = ids != INVALID_POINT3D_ID
            sizes = [r[6] for r in group]
            cum = np.concatenate([[0], np.cumsum(valid)])
            ends = np.cumsum(sizes)
            with np.errstate(over="ignore"):  # huge values become inf: check_finite reports them
                xy = block[:, :2].astype(np.float32)
            # (x, y) pairs as one complex64 each: a 1-D boolean index, numpy's fast path
            xy = xy.view(np.complex64)[:, 0][valid].view(np.float32).reshape(-1, 2)
            return [r[0] for r in group], cum[ends] - cum[ends - sizes], ids[valid], xy

        tasks.append((read, total))
        start = stop
    return tasks


def read_model(folder: str | os.PathLike) -> Model:
    """Read the binary COLMAP model in ``folder``."""
    folder = Path(folder)
    cams = read_cameras(folder / "cameras.bin")
    point_ids, xyz, file_tracks = read_points(folder / "points3D.bin")
    images_path = folder / "images.bin"
    f = _File(images_path)
    try:
        heads = sorted(_image_headers(f), key=lambda r: r[0])
        image_ids = np.array([r[0] for r in heads], np.uint32)
        check_unique(image_ids, "image", str(images_path))
        camera_ids = np.array([r[3] for r in heads], np.uint32)
        missing = [c for c in camera_ids.tolist() if c not in cams]
        if missing:
            raise SfmpairsError(f"{images_path}: an image uses camera {missing[0]}, which cameras.bin does not have")
        qvec = np.array([r[1] for r in heads], np.float64).reshape(-1, 4)
        tvec = np.array([r[2] for r in heads], np.float64).reshape(-1, 3)
        rigs_path, frames_path = folder / "rigs.bin", folder / "frames.bin"
        if rigs_path.exists() or frames_path.exists():
            rigs = read_rigs(rigs_path)
            frames = read_frames(frames_path)
            qvec, tvec = poses_from_frames(image_ids, camera_ids, frames, rigs, str(frames_path))
        check_pose_quaternions(qvec, str(images_path))
        check_finite(tvec, "image translation", str(images_path))

        batches = _point2d_batches(f, heads)
        observations = build_observations(
            batches, point_ids, file_tracks, str(images_path), str(folder / "points3D.bin")
        )
    finally:
        f.close()
    check_finite(observations[2], "2D point position", str(images_path))
    return Model.from_arrays(
        folder, "binary", image_ids, [r[4] for r in heads], camera_ids, qvec, tvec, cams, point_ids, xyz, observations
    )
