"""A reader of COLMAP text models (cameras.txt, images.txt, points3D.txt and, from
COLMAP 3.12 on, rigs.txt and frames.txt) that names the file and line of any bad line.

It gives exactly what the pycolmap reader gives for the same model; COLMAP writes
floating-point values with 17 significant digits, so a text model and its binary twin
give identical stores.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from sfmpairs.common import SfmpairsError

from .checks import check_finite, check_pose_quaternions, check_unique
from .model import Model, build_observations, camera_model_ids, camera_models, frame_table, poses_from_frames


def _lines(path: Path):
    """(line number, text) of every data line: comments and blank lines skipped."""
    try:
        with open(path, encoding="utf-8") as fh:
            for no, line in enumerate(fh, 1):
                s = line.strip()
                if s and not s.startswith("#"):
                    yield no, s
    except OSError as e:
        raise SfmpairsError(f"{path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise SfmpairsError(f"{path}: not a UTF-8 text file") from None


def _short(token: str, limit: int = 24) -> str:
    return token if len(token) <= limit else token[: limit - 3] + "..."


class _Line:
    """Token access with errors that name the file and line."""

    def __init__(self, path: Path, no: int, text: str, maxsplit: int = -1):
        self.path, self.no, self.tok = path, no, text.split(maxsplit=maxsplit)

    def fail(self, problem: str):
        raise SfmpairsError(f"{self.path} line {self.no}: {problem}")

    def need(self, n: int, what: str):
        if len(self.tok) < n:
            self.fail(f"expected {what}")

    def int(self, i: int, what: str, bits: int = 32) -> int:
        """An unsigned integer that fits its column (COLMAP's ids are 32-bit, but
        3D point ids 64-bit)."""
        try:
            v = int(self.tok[i])
        except (ValueError, IndexError):
            self.fail(f"bad {what} {self.tok[i] if i < len(self.tok) else '(missing)'!r}")
        if v < 0:
            self.fail(f"negative {what}")
        if v >= 1 << bits:
            self.fail(f"{what} {_short(self.tok[i])} too large (at most {(1 << bits) - 1})")
        return v

    def floats(self, i: int, n: int, what: str) -> np.ndarray:
        try:
            v = np.array([float(t) for t in self.tok[i : i + n]])
        except ValueError:
            self.fail(f"bad number in {what}")
        if len(v) != n:
            self.fail(f"expected {n} values for {what}")
        if not np.all(np.isfinite(v)):
            self.fail(f"non-finite {what}")
        return v


def read_cameras(path: Path):
    table, ids = camera_models(), camera_model_ids()
    cams = {}
    for no, text in _lines(path):
        ln = _Line(path, no, text)
        ln.need(4, "CAMERA_ID MODEL WIDTH HEIGHT PARAMS[]")
        cid = ln.int(0, "camera id")
        if ln.tok[1] not in ids:
            ln.fail(f"unknown camera model {ln.tok[1]!r}")
        name = ln.tok[1]
        w, h = ln.int(2, "width"), ln.int(3, "height")
        nparams = table[ids[name]][1]
        if len(ln.tok) != 4 + nparams:
            ln.fail(f"{name} takes {nparams} parameters, the line has {len(ln.tok) - 4}")
        if not (0 < w < 2**31 and 0 < h < 2**31):
            ln.fail(f"invalid camera size {w}x{h}")
        if cid in cams:
            ln.fail(f"camera id {cid} appears twice")
        cams[cid] = (name, w, h, ln.floats(4, nparams, "camera parameters"))
    return cams


def read_rigs(path: Path):
    rigs = {}
    for no, text in _lines(path):
        ln = _Line(path, no, text)
        ln.need(2, "RIG_ID NUM_SENSORS ...")
        rig_id, num = ln.int(0, "rig id"), ln.int(1, "sensor count")
        sensors, pos = {}, 2
        for j in range(num):
            ln.need(pos + 2, f"sensor {j} of rig {rig_id}")
            stype, sid = ln.tok[pos], ln.int(pos + 1, "sensor id")
            pos += 2
            value = None
            if j > 0:
                ln.need(pos + 1, "HAS_POSE")
                if ln.int(pos, "HAS_POSE") != 1:
                    ln.fail(f"sensor {sid} has no pose relative to the rig")
                pose = ln.floats(pos + 1, 7, "sensor pose")
                value, pos = (pose[:4], pose[4:]), pos + 8
            if stype == "CAMERA":
                sensors[sid] = value
        if pos != len(ln.tok):
            ln.fail("unexpected values at the end of the line")
        rigs[rig_id] = sensors
    return rigs


def read_frames(path: Path):
    rows = []
    for no, text in _lines(path):
        ln = _Line(path, no, text)
        ln.need(10, "FRAME_ID RIG_ID QW QX QY QZ TX TY TZ NUM_DATA_IDS ...")
        ln.int(0, "frame id")
        rig_id = ln.int(1, "rig id")
        pose = ln.floats(2, 7, "frame pose")
        num = ln.int(9, "data id count")
        if len(ln.tok) != 10 + 3 * num:
            ln.fail(f"expected {num} data ids (SENSOR_TYPE SENSOR_ID DATA_ID)")
        for k in range(num):
            if ln.tok[10 + 3 * k] == "CAMERA":
                rows.append((ln.int(12 + 3 * k, "data id"), pose, rig_id))
    return frame_table(rows)


def _parse_points2d(ln: _Line):
    """(point3D ids, xy) of the image's 2D points that name a 3D point."""
    if len(ln.tok) % 3:
        ln.fail("2D points must come as X Y POINT3D_ID triples")
    try:
        arr = np.array(ln.tok, dtype=object).reshape(-1, 3)
        ints = [int(t) for t in arr[:, 2]]
        xy = np.array([[float(a), float(b)] for a, b in arr[:, :2]], np.float64).reshape(-1, 2)
    except ValueError:
        ln.fail("bad number in the 2D points")
    try:
        ids = np.array(ints, np.int64)
    except OverflowError:  # signed 64 bits, as COLMAP reads them
        ln.fail(f"3D point id {_short(str(max(ints, key=abs)))} too large (at most {(1 << 63) - 1})")
    if np.any(ids < -1):
        ln.fail("bad 3D point id")
    valid = ids != -1
    return ids[valid].astype(np.uint64), xy[valid]


def read_images(path: Path):
    """Header tuples and (line, text) of the 2D points of every image."""
    records = []
    it = _LinesWithBlanks(path)
    for no, text in it:
        ln = _Line(path, no, text, maxsplit=9)
        ln.need(10, "IMAGE_ID QW QX QY QZ TX TY TZ CAMERA_ID NAME")
        iid = ln.int(0, "image id")
        pose = ln.floats(1, 7, "image pose")
        cid = ln.int(8, "camera id")
        points = it.points_line()
        if points is None:
            ln.fail(f"image {iid} has no line of 2D points")
        pno, ptext = points
        records.append((iid, pose[:4], pose[4:], cid, ln.tok[9], _Line(path, pno, ptext)))
    return records


class _LinesWithBlanks:
    """Header lines skip comments and blanks; the line after a header is always its
    2D points line, blank when the image has none."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.fh = open(path, encoding="utf-8")
        except OSError as e:
            raise SfmpairsError(f"{path}: cannot read ({e.strerror or e})") from None
        self.no = 0

    def _next_raw(self):
        try:
            line = self.fh.readline()
        except UnicodeDecodeError:
            raise SfmpairsError(f"{self.path}: not a UTF-8 text file") from None
        if not line:
            self.fh.close()
            return None
        self.no += 1
        return line

    def __iter__(self):
        return self

    def __next__(self):
        while True:
            line = self._next_raw()
            if line is None:
                raise StopIteration
            s = line.strip()
            if s and not s.startswith("#"):
                return self.no, s

    def points_line(self):
        line = self._next_raw()
        return None if line is None else (self.no, line.strip())


def read_points(path: Path):
    ids, xyz, tracks = [], [], []
    for no, text in _lines(path):
        ln = _Line(path, no, text)
        ln.need(8, "POINT3D_ID X Y Z R G B ERROR TRACK[]")
        ids.append(ln.int(0, "3D point id", bits=64))
        xyz.append(ln.floats(1, 3, "3D point position"))
        if (len(ln.tok) - 8) % 2:
            ln.fail("track must come as IMAGE_ID POINT2D_IDX pairs")
        tracks.append((len(ln.tok) - 8) // 2)
    ids = np.array(ids, np.uint64)
    xyz = np.array(xyz, np.float64).reshape(-1, 3)
    tracks = np.array(tracks, np.int64)
    check_unique(ids, "3D point", str(path))
    order = np.argsort(ids, kind="stable")
    return ids[order], xyz[order], tracks[order]


def read_model(folder: str | os.PathLike, threads: int | None = None) -> Model:
    folder = Path(folder)
    cams = read_cameras(folder / "cameras.txt")
    point_ids, xyz, file_tracks = read_points(folder / "points3D.txt")
    images_path = folder / "images.txt"
    recs = sorted(read_images(images_path), key=lambda r: r[0])
    image_ids = np.array([r[0] for r in recs], np.uint32)
    check_unique(image_ids, "image", str(images_path))
    camera_ids = np.array([r[3] for r in recs], np.uint32)
    for r in recs:
        if r[3] not in cams:
            r[5].fail(f"image {r[0]} uses camera {r[3]}, which cameras.txt does not have")
    qvec = np.array([r[1] for r in recs], np.float64).reshape(-1, 4)
    tvec = np.array([r[2] for r in recs], np.float64).reshape(-1, 3)
    rigs_path, frames_path = folder / "rigs.txt", folder / "frames.txt"
    if rigs_path.exists() or frames_path.exists():
        qvec, tvec = poses_from_frames(
            image_ids, camera_ids, read_frames(frames_path), read_rigs(rigs_path), str(frames_path)
        )
    check_pose_quaternions(qvec, str(images_path))
    parsed = [_parse_points2d(r[5]) for r in recs]
    rows = [(lambda r=r, ids=ids, xy=xy: ([r[0]], [len(ids)], ids, xy), len(ids)) for r, (ids, xy) in zip(recs, parsed)]
    observations = build_observations(
        rows, point_ids, file_tracks, str(images_path), str(folder / "points3D.txt"), threads
    )
    check_finite(observations[2], "2D point position", str(images_path))
    return Model.from_arrays(
        folder, "text", image_ids, [r[4] for r in recs], camera_ids, qvec, tvec, cams, point_ids, xyz, observations
    )
