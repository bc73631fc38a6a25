"""A fast reader of COLMAP binary models (cameras.bin, images.bin, points3D.bin and,
from COLMAP 3.12 on, rigs.bin and frames.bin).

It reads the files through ``mmap``, with numpy views and compiled loops that release
Python's lock, instead of building millions of Python or C++ objects, checks every
count and offset against the file size (a truncated or corrupt file gives a one-line
:class:`SfmpairsError`, never a crash or a huge allocation), and gives exactly what
the pycolmap reader (:mod:`.colmap_pycolmap`) gives. The byte layout is COLMAP's
``src/colmap/scene/reconstruction_io_binary.cc``; all integers little-endian.
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

import numpy as np

from sfmpairs.common import SfmpairsError
from sfmpairs.compiled import compiled

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

    def close(self):
        try:
            self.buf.close()
        except BufferError:  # a numpy view is still alive (we are unwinding an error)
            pass


def read_cameras(path: Path) -> dict[int, tuple[str, int, int, np.ndarray]]:
    """camera id -> (model name, width, height, params)."""
    f = _File(path)
    table = camera_models()
    num_params = np.full(max(table) + 1, -1, np.int64)  # by model id; -1: not a model
    for mid, (_, nparams, _) in table.items():
        num_params[mid] = nparams
    data = None
    try:
        n = f.count(0, _CAMERA.size, "cameras")
        data = np.frombuffer(f.buf, np.uint8)
        offsets, end, bad = _camera_offsets(data, n, num_params)
        if bad >= 0:  # the record at ``end``: its head, its model or its parameters
            cid, mid, _, _ = f.unpack(_CAMERA, int(end), "camera record")
            if not (0 <= mid < len(num_params) and num_params[mid] >= 0):
                f.fail(f"camera {cid} has unknown camera model id {mid}")
            f.fail(f"truncated: parameters of camera {cid} run past the end of the file")
        f.end(int(end))
        rec = _records(data, offsets, _CAMERA_RECORD)
        sizes = num_params[rec["model"]]  # each camera's parameters follow its head
        at = np.repeat(offsets + _CAMERA.size - 8 * (np.cumsum(sizes) - sizes), sizes)
        values = _records(data, at + 8 * np.arange(len(at)), np.dtype("<f8")).astype(np.float64)
    finally:
        data = None  # no view of the file left, so that it closes, on an error too
        f.close()
    ids = rec["id"]
    check_unique(ids, "camera", str(path))
    w, h = rec["width"], rec["height"]
    bad_size = (w == 0) | (w >= 2**31) | (h == 0) | (h >= 2**31)
    if bad_size.any():
        k = int(np.argmax(bad_size))
        raise SfmpairsError(f"{path}: camera {ids[k]} has an invalid size {w[k]}x{h[k]}")
    if not np.isfinite(values).all():
        k = np.repeat(np.arange(len(ids)), sizes)[~np.isfinite(values)][0]
        raise SfmpairsError(f"{path}: camera {ids[k]} has non-finite parameters")
    params = np.split(values, np.cumsum(sizes)[:-1])
    names = [table[m][0] for m in rec["model"].tolist()]
    return dict(zip(ids.tolist(), zip(names, w.tolist(), h.tolist(), params)))


_CAMERA_RECORD = np.dtype([("id", "<u4"), ("model", "<i4"), ("width", "<u8"), ("height", "<u8")])


@compiled
def _u64(data, off):
    """The little-endian uint64 at byte ``off`` of ``data`` (uint8), as int64; -1 if
    it does not fit."""
    if data[off + 7] >= 128:
        return -1
    return np.int64(_le64(data, off))


@compiled
def _le64(data, off):
    """The little-endian uint64 at byte ``off`` of ``data`` (uint8); the caller checks
    the bounds. The index is unsigned, so that numba adds no check for a negative one
    (:func:`_gather_points2d` of the corpus's largest model: 31 ms against 65 ms)."""
    value = np.uint64(0)
    at = np.uint64(off)
    for k in range(8):
        value |= np.uint64(data[at + np.uint64(k)]) << np.uint64(8 * k)
    return value


@compiled
def _camera_offsets(data, n, num_params):
    """The byte offset of each of the ``n`` records of cameras.bin (24 bytes, then
    ``num_params[model id]`` doubles), the offset after the last, and -1; or, where
    a record runs past the end of ``data`` or names no model, that record's offset
    in the second place and its index in the third."""
    offsets = np.empty(n, np.int64)
    off = 8
    for i in range(n):
        if off + 24 > len(data) or data[off + 7] >= 128:  # the head, and a model id >= 0
            return offsets, off, i
        model = 0
        for k in range(7, 3, -1):
            model = (model << 8) | np.int64(data[off + k])
        if model >= len(num_params) or num_params[model] < 0 or off + 24 + 8 * num_params[model] > len(data):
            return offsets, off, i
        offsets[i] = off
        off += 24 + 8 * num_params[model]
    return offsets, off, -1


def _records(data: np.ndarray, offsets: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The fixed-size records of ``dtype`` at byte ``offsets`` of ``data`` (copies):
    every byte offset seen as the start of a record, and the ones asked fancy-indexed."""
    if not len(offsets):
        return np.zeros(0, dtype)
    starts = np.ndarray((len(data) - dtype.itemsize + 1,), np.dtype((np.void, dtype.itemsize)), data, 0, (1,))
    return starts[offsets].view(dtype)


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


def _image_headers(f: _File) -> dict:
    """Every image's record head, in file order: ``id``, ``qvec``, ``tvec``, ``camera``
    (arrays), ``name`` (a list), and where its 2D points lie: ``points``, the byte
    offset of the first, and ``counts``, how many (int64 arrays)."""
    n = f.count(0, _IMAGE.size + 9, "images")
    data = np.frombuffer(f.buf, np.uint8)
    try:
        heads, name_ends, points, counts, bad = _image_offsets(data, n, _MAX_NAME)
        if bad >= 0:
            _image_failure(f, int(heads[bad]), int(name_ends[bad]))
        rec = _records(data, heads, _IMAGE_RECORD)
    finally:
        del data
    f.end(int(points[-1] + 24 * counts[-1]) if n else 8)
    names = [f.buf[a + _IMAGE.size : b - 1] for a, b in zip(heads.tolist(), name_ends.tolist())]
    try:
        decoded = [name.decode("utf-8") for name in names]
    except UnicodeDecodeError:
        k = next(k for k, name in enumerate(names) if not _utf8(name))
        f.fail(f"corrupt: name of image {rec['id'][k]} is not UTF-8")
    out = {key: rec[key] for key in ("id", "qvec", "tvec", "camera")}
    return {**out, "name": decoded, "points": points, "counts": counts}


_IMAGE_RECORD = np.dtype([("id", "<u4"), ("qvec", "<f8", 4), ("tvec", "<f8", 3), ("camera", "<u4")])


def _utf8(name: bytes) -> bool:
    try:
        name.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _image_failure(f: _File, head: int, name_end: int):
    """The one-line error of the image record at byte ``head`` whose walk stopped
    (:func:`_image_offsets`), ``name_end`` past its name's NUL (-1: none found)."""
    (iid, *_) = f.unpack(_IMAGE, head, "image record")
    if name_end < 0:
        f.fail(f"truncated or corrupt: name of image {iid} is not terminated")
    (npts,) = f.unpack(_U64, name_end, f"2D point count of image {iid}")
    f.need(name_end + 8, npts * _POINT2D.itemsize, f"2D points of image {iid}")
    f.fail(f"corrupt: image record {iid}")  # not reached: the walk stops for one of the above


@compiled
def _image_offsets(data, n, max_name):
    """Where each of the ``n`` records of images.bin lies: its head (64 bytes), the
    byte after its name's NUL, its 2D points and their number; and -1, or the index
    of the record where the walk stopped (its head, name or points past the end of
    ``data``; its name end -1 where no NUL ends it within ``max_name`` bytes)."""
    heads = np.full(n, -1, np.int64)
    names = np.full(n, -1, np.int64)
    points = np.zeros(n, np.int64)
    counts = np.zeros(n, np.int64)
    off = 8
    for i in range(n):
        heads[i] = off
        if off + 64 > len(data):
            return heads, names, points, counts, i
        stop = off + 64
        end = min(stop + max_name, len(data))
        while stop < end and data[stop] != 0:
            stop += 1
        if stop >= end:
            return heads, names, points, counts, i
        names[i] = stop + 1
        if stop + 9 > len(data):
            return heads, names, points, counts, i
        count = _u64(data, stop + 1)
        if count < 0 or count > (len(data) - stop - 9) // 24:
            return heads, names, points, counts, i
        points[i], counts[i] = stop + 9, count
        off = stop + 9 + 24 * count
    return heads, names, points, counts, -1


def _point_offsets(f: _File) -> np.ndarray:
    """Byte offset of every record of points3D.bin (records have variable length)."""
    n = f.count(0, _POINT_HEAD + 8, "3D points")
    data = np.frombuffer(f.buf, np.uint8)
    try:
        offsets, end, bad = _point_walk(data, n, _POINT_HEAD)
    finally:
        del data
    if bad >= 0:
        f.fail(f"truncated or corrupt: 3D point record {bad} runs past the end of the file")
    f.end(int(end))
    return offsets


@compiled
def _point_walk(data, n, head):
    """The byte offset of each of the ``n`` records of points3D.bin (``head`` bytes,
    a uint64 track length, 8 bytes an element), the offset after the last, and -1;
    or the index of the first record that runs past the end of ``data``."""
    offsets = np.empty(n, np.int64)
    off = 8
    for i in range(n):
        if off + head + 8 > len(data):
            return offsets, off, i
        length = _u64(data, off + head)
        if length < 0 or length > (len(data) - off - head - 8) // 8:
            return offsets, off, i
        offsets[i] = off
        off += head + 8 + 8 * length
    return offsets, off, -1


def read_points(path: Path):
    """Sorted point ids, xyz and the track length each record declares."""
    f = _File(path)
    try:
        ids, xyz, track = _gather_heads(f, _point_offsets(f))
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
    data = np.frombuffer(f.buf, np.uint8)
    rec = _records(data, offsets, _POINT_RECORD)
    del data
    return rec["id"].copy(), rec["xyz"].copy(), rec["track_length"].copy()


def _point2d_batches(f: _File, ids: np.ndarray, points: np.ndarray, counts: np.ndarray, batch: int = 1 << 16) -> list:
    """The (read, size) batches of :func:`.model.build_observations`: runs of
    consecutive images of about ``batch`` 2D points, image k (``ids[k]``) with
    ``counts[k]`` 2D points from byte ``points[k]`` on. Each batch is read by one
    compiled pass (:func:`_gather_points2d`), which releases Python's lock, so that
    batches and the next model read on other threads."""
    tasks, start, sizes = [], 0, counts.tolist()
    while start < len(ids):
        stop, total = start, 0
        while stop < len(ids) and (stop == start or total + sizes[stop] <= batch):
            total += sizes[stop]
            stop += 1

        def read(group=slice(start, stop)):
            data = np.frombuffer(f.buf, np.uint8)
            try:
                per_image, point3d, xy = _gather_points2d(data, points[group], counts[group])
            finally:
                del data  # the mmap closes only once no view of it is left
            return ids[group], per_image, point3d, xy

        tasks.append((read, total))
        start = stop
    return tasks


@compiled
def _gather_points2d(data, points, counts):
    """The 2D points of images that name a 3D point, image after image, each in its 2D
    point order: how many per image (int64), their 3D point ids (uint64) and their
    (x, y) as float32 (huge values become inf, as numpy's cast makes them). Image k
    has ``counts[k]`` 2D points (x, y as float64, then the id: 24 bytes) from byte
    ``points[k]`` of ``data`` on; :func:`_image_offsets` checked that they fit."""
    total = 0
    for c in counts:
        total += c
    per_image = np.empty(len(counts), np.int64)
    point3d = np.empty(total, np.uint64)
    xy = np.empty((total, 2), np.float32)
    n = 0
    for k in range(len(counts)):
        start, off = n, points[k]
        for _ in range(counts[k]):
            pid = _le64(data, off + 16)
            if pid != INVALID_POINT3D_ID:
                point3d[n] = pid
                xy[n, 0] = np.float32(np.uint64(_le64(data, off)).view(np.float64))
                xy[n, 1] = np.float32(np.uint64(_le64(data, off + 8)).view(np.float64))
                n += 1
            off += 24
        per_image[k] = n - start
    return per_image, point3d[:n], xy[:n]


def read_model(folder: str | os.PathLike, threads: int | None = None) -> Model:
    """Read the binary COLMAP model in ``folder`` (its 2D points on ``threads``
    threads: None, a few, :func:`.model.build_observations`)."""
    folder = Path(folder)
    cams = read_cameras(folder / "cameras.bin")
    point_ids, xyz, file_tracks = read_points(folder / "points3D.bin")
    images_path = folder / "images.bin"
    f = _File(images_path)
    try:
        heads = _image_headers(f)
        order = np.argsort(heads["id"], kind="stable")  # images by id
        image_ids, camera_ids = heads["id"][order], heads["camera"][order]
        check_unique(image_ids, "image", str(images_path))
        missing = [c for c in np.unique(camera_ids).tolist() if c not in cams]
        if missing:
            raise SfmpairsError(f"{images_path}: an image uses camera {missing[0]}, which cameras.bin does not have")
        qvec, tvec = heads["qvec"][order], heads["tvec"][order]
        rigs_path, frames_path = folder / "rigs.bin", folder / "frames.bin"
        if rigs_path.exists() or frames_path.exists():
            rigs = read_rigs(rigs_path)
            frames = read_frames(frames_path)
            qvec, tvec = poses_from_frames(image_ids, camera_ids, frames, rigs, str(frames_path))
        check_pose_quaternions(qvec, str(images_path))
        check_finite(tvec, "image translation", str(images_path))

        at = order.tolist()
        points, counts = heads["points"][order], heads["counts"][order]
        batches = _point2d_batches(f, image_ids, points, counts)
        observations = build_observations(
            batches, point_ids, file_tracks, str(images_path), str(folder / "points3D.bin"), threads
        )
    finally:
        f.close()
    check_finite(observations[2], "2D point position", str(images_path))
    names = [heads["name"][k] for k in at]
    return Model.from_arrays(
        folder, "binary", image_ids, names, camera_ids, qvec, tvec, cams, point_ids, xyz, observations
    )
