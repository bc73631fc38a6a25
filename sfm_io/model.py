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

import contextlib
import functools
import os
import queue
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from sfmpairs.common import SfmpairsError
from sfmpairs.compiled import compiled

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

    @classmethod
    def from_arrays(
        cls,
        path,
        format: str,
        image_ids: np.ndarray,
        names: list[str],
        camera_ids: np.ndarray,
        qvec: np.ndarray,
        tvec: np.ndarray,
        cameras: dict,
        point_ids: np.ndarray,
        xyz: np.ndarray,
        observations: tuple,
    ) -> Model:
        """The model from what a reader read, the one place every reader builds it.

        The image arrays (``image_ids`` to ``tvec``) are in store order (by image id);
        ``cameras`` maps each camera id to ``(model name, width, height, params)``, from
        which each image gets its camera's; ``observations`` is what
        :func:`build_observations` returns.
        """
        cams = [cameras[c] for c in camera_ids.tolist()]
        # format, image_ids, names, camera_ids, qvec, tvec, point_ids and xyz go in as given
        given = {k: v for k, v in locals().items() if k not in ("cls", "path", "cameras", "cams", "observations")}
        return cls(
            **given,
            path=str(path),
            camera_model=[c[0] for c in cams],
            params=[c[3] for c in cams],
            width=np.array([c[1] for c in cams], np.int64),
            height=np.array([c[2] for c in cams], np.int64),
            **dict(zip(("indptr", "point", "xy", "track_length"), observations)),
        )


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


def focal_lengths(camera_model: list[str], params: np.ndarray) -> np.ndarray:
    """Mean focal length in pixels of each image's camera (NaN for models without one);
    ``params`` (n, width): each image's camera parameters, padded (:func:`param_table`)."""
    table, ids = camera_models(), camera_model_ids()
    out = np.full(len(params), np.nan)
    names = set(camera_model)
    models = np.array(camera_model, dtype=object) if len(names) > 1 else None  # None: one for every row
    for name in names:
        rows = np.arange(len(params)) if models is None else np.flatnonzero(models == name)
        idxs = list(table[ids[name]][2])
        if idxs:
            out[rows] = params[np.ix_(rows, idxs)].mean(axis=1)
    return out


def param_table(params: list[np.ndarray], width: int) -> np.ndarray:
    """(n, width) float64: each image's camera parameters, NaN after its last (one copy
    for the usual model whose cameras all have as many parameters, not a row at a time)."""
    out = np.full((len(params), width), np.nan)
    lengths = {len(p) for p in params}
    if len(lengths) == 1:
        (length,) = lengths
        if length:
            out[:, :length] = np.concatenate(params).reshape(-1, length)
        return out
    for i, p in enumerate(params):
        out[i, : len(p)] = p
    return out


# --------------------------------------------------------------------------- poses
def quat_to_rotmat(q: np.ndarray) -> np.ndarray:
    """(N, 4) quaternions w x y z (normalised here) -> (N, 3, 3) rotation matrices."""
    with np.errstate(over="ignore", invalid="ignore"):  # corrupt input: checked by callers
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack(
        [
            1 - 2 * (y * y + z * z),
            2 * (x * y - w * z),
            2 * (x * z + w * y),
            2 * (x * y + w * z),
            1 - 2 * (x * x + z * z),
            2 * (y * z - w * x),
            2 * (x * z - w * y),
            2 * (y * z + w * x),
            1 - 2 * (x * x + y * y),
        ],
        axis=1,
    ).reshape(-1, 3, 3)


def camera_centres(qvec: np.ndarray, tvec: np.ndarray, rotation: np.ndarray | None = None) -> np.ndarray:
    """Camera centres C = -R^T t, (N, 3) (``rotation``: R where the caller has it,
    :func:`quat_to_rotmat` of ``qvec``)."""
    R = quat_to_rotmat(qvec) if rotation is None else rotation
    return -np.einsum("nji,nj->ni", R, tvec)


def compose_poses(q_a: np.ndarray, t_a: np.ndarray, q_b: np.ndarray, t_b: np.ndarray):
    """a_from_c = a_from_b * b_from_c for (N, 4) w-x-y-z quaternions and (N, 3) translations."""
    wa, xa, ya, za = q_a.T
    wb, xb, yb, zb = q_b.T
    q = np.stack(
        [
            wa * wb - xa * xb - ya * yb - za * zb,
            wa * xb + xa * wb + ya * zb - za * yb,
            wa * yb - xa * zb + ya * wb + za * xb,
            wa * zb + xa * yb - ya * xb + za * wb,
        ],
        axis=1,
    )
    t = np.einsum("nij,nj->ni", quat_to_rotmat(q_a), t_b) + t_a
    return q, t


def frame_table(rows) -> dict:
    """Frames as arrays from (image id, rig_from_world pose (7,), rig id) rows."""
    return {
        "image_id": np.array([r[0] for r in rows], np.uint64),
        "q": np.array([r[1][:4] for r in rows], np.float64).reshape(-1, 4),
        "t": np.array([r[1][4:] for r in rows], np.float64).reshape(-1, 3),
        "rig_id": np.array([r[2] for r in rows], np.int64),
    }


def poses_from_frames(image_ids, camera_ids, frames: dict, rigs: dict, where: str):
    """cam_from_world of each image from COLMAP 3.12+ rigs and frames.

    ``frames`` (:func:`frame_table`) gives each image's frame pose (rig_from_world) and
    rig; ``rigs`` maps rig id -> {camera id: (q, t) sensor_from_rig, or None for the
    reference sensor}.
    """
    order = np.argsort(frames["image_id"], kind="stable")
    known = frames["image_id"][order]
    pos = np.searchsorted(known, image_ids.astype(np.uint64))
    pos = np.minimum(pos, max(len(known) - 1, 0))
    missing = np.flatnonzero((known[pos] != image_ids) if len(known) else np.ones(len(image_ids), bool))
    if len(missing):
        raise SfmpairsError(f"{where}: image {int(image_ids[missing[0]])} belongs to no frame")
    row = order[pos]
    q, t, rig = frames["q"][row].copy(), frames["t"][row].copy(), frames["rig_id"][row]
    for i, (cid, rid) in enumerate(zip(camera_ids.tolist(), rig.tolist())):
        sensors = rigs.get(rid)
        if sensors is None or cid not in sensors:
            raise SfmpairsError(f"{where}: camera {cid} of image {int(image_ids[i])} is not a sensor of rig {rid}")
        if sensors[cid] is not None:  # not the rig's reference sensor
            qq, tt = compose_poses(sensors[cid][0][None], sensors[cid][1][None], q[i : i + 1], t[i : i + 1])
            q[i], t[i] = qq[0], tt[0]
    return q, t


# --------------------------------------------------------------------------- points
def point_lookup(point_ids: np.ndarray):
    """Return f(ids) -> indices into the sorted uint64 ``point_ids``; -1 where absent."""
    m = len(point_ids)
    if m == 0:
        return lambda ids: np.full(len(ids), -1, np.int64)
    max_id = int(point_ids[-1])
    if max_id < 4 * m + (1 << 20) and point_ids[0] > 0:  # dense ids: a lookup table
        lut = np.full(max_id + 2, -1, np.int32 if m < 2**31 else np.int64)
        lut[point_ids] = np.arange(m, dtype=lut.dtype)
        # ids past the table clip to its last entry (-1); ids >= 2**63 wrap negative and
        # clip to entry 0 (-1 too, as no point has id 0 here)
        return lambda ids: np.take(lut, ids.view(np.int64), mode="clip")

    def lookup(ids):
        pos = np.searchsorted(point_ids, ids)
        pos[pos == m] = 0
        return np.where(point_ids[pos] == ids, pos, -1)

    return lookup


def build_observations(
    batches,
    point_ids: np.ndarray,
    file_track_lengths: np.ndarray,
    where: str,
    points_file: str,
    threads: int | None = None,
):
    """The CSR co-observation table from the images' 2D points.

    ``batches`` is a list of ``(read, size)``: ``read()`` returns, for consecutive
    images in store order, ``(image_ids, counts, point3D_ids, xy)``, the images' 2D
    points that name a 3D point, image after image, each in its 2D point order,
    ``counts`` of them per image; ``size`` bounds how many it returns. A 3D point that
    an image observes twice is kept once, at its first 2D point. The observations of
    each point, repeats included, must number what its track in points3D says
    (``file_track_lengths``). Returns ``(indptr, point, xy, track_length)``,
    ``track_length`` counting the distinct images that observe each point.

    Batches run on ``threads`` threads (None: one a core, at most 4; the binary
    reader's batches and the steps below are compiled or numpy loops, which release
    the GIL), each writing at its own offset of the output; the gaps are squeezed out
    at the end.
    """
    lookup = point_lookup(point_ids)
    # batch b writes its observations at offsets[b]:offsets[b+1] of ``point`` and ``xy``
    # (its ``size``, an upper bound): (B + 1,) int64
    offsets = np.concatenate([[0], np.cumsum([size for _, size in batches])]).astype(np.int64)
    point = np.empty(int(offsets[-1]), np.int32)  # index into point_ids, with gaps
    out_xy = np.empty((int(offsets[-1]), 2), np.float32)
    counts_of = [None] * len(batches)  # int64 (images of batch b,): its observations per image
    workers = max(1, min(threads or os.cpu_count() or 1, 4, len(batches)))
    tracks = _per_worker(workers, len(point_ids))  # track lengths, int32 (M,): no shared writes

    def run(b: int) -> None:
        image_ids, counts, ids, xy = batches[b][0]()
        idx = lookup(ids)
        _check_points_known(idx, ids, image_ids, counts, where)
        _write_at(int(offsets[b]), point, out_xy, idx, xy)
        with _borrowed(tracks) as track:
            _count_track_lengths(track, idx, counts)
        counts_of[b] = np.asarray(counts, np.int64)

    _run_batches(run, len(batches), workers)
    track_length = _total(tracks)
    indptr, point, out_xy = _squeeze_gaps(point, out_xy, offsets, counts_of)
    indptr, point, out_xy = _drop_repeats(
        indptr, point, out_xy, track_length, file_track_lengths, point_ids, points_file
    )
    return indptr, point, out_xy, track_length


def _per_worker(workers: int, num_points: int) -> queue.SimpleQueue:
    """One track-length array, int32 (M,) zeros, per worker, to borrow in turn."""
    arrays = queue.SimpleQueue()
    for _ in range(workers):
        arrays.put(np.zeros(num_points, np.int32))
    return arrays


@contextlib.contextmanager
def _borrowed(arrays: queue.SimpleQueue):
    """One of ``arrays`` for a with-block, given back after it."""
    a = arrays.get()
    try:
        yield a
    finally:
        arrays.put(a)


def _total(arrays: queue.SimpleQueue) -> np.ndarray:
    """The sum of ``arrays`` (into the first of them)."""
    total = arrays.get()
    while not arrays.empty():
        total += arrays.get()
    return total


def _write_at(pos: int, point: np.ndarray, xy: np.ndarray, batch_point: np.ndarray, batch_xy: np.ndarray) -> None:
    """A batch's observations into ``point`` and ``xy`` (float32) from offset ``pos`` on."""
    point[pos : pos + len(batch_point)] = batch_point
    with np.errstate(over="ignore"):  # huge values become inf: check_finite reports them
        xy[pos : pos + len(batch_point)] = batch_xy


def _check_points_known(idx: np.ndarray, ids: np.ndarray, image_ids, counts, where: str) -> None:
    """Raise where an observation names a 3D point id that the model lacks (``idx`` -1):
    the observations ``ids`` are those of ``image_ids``, image after image, ``counts``
    of them per image."""
    if len(idx) and idx.min() < 0:
        j = np.flatnonzero(idx < 0)[0]
        image = image_ids[np.searchsorted(np.cumsum(counts), j, side="right")]
        raise SfmpairsError(
            f"{where}: image {int(image)} observes 3D point {int(ids[j])}, which the model does not have"
        )


def _count_track_lengths(track: np.ndarray, idx: np.ndarray, counts) -> None:
    """Add to ``track`` (M,) one for each distinct (image, point) of a batch: ``idx``
    holds the points of its observations, image after image, ``counts`` of them per
    image (:func:`_count_distinct`)."""
    counts = np.asarray(counts, np.int64)
    if counts.sum() != len(idx):  # the kernel trusts it
        raise ValueError(f"{counts.sum()} observations counted per image, {len(idx)} given")
    _count_distinct(track, idx, counts)


@compiled
def _count_distinct(track, idx, counts):
    """One more in ``track`` (>= 0) for each point of each run of ``idx`` (``counts``
    long, one an image), a point repeated within a run counted once: the first pass
    over a run marks each of its points (-v - 1 for v), the second unmarks each
    marked one and adds one."""
    start = 0
    for k in counts:
        for e in range(start, start + k):
            if track[idx[e]] >= 0:
                track[idx[e]] = -track[idx[e]] - 1
        for e in range(start, start + k):
            if track[idx[e]] < 0:
                track[idx[e]] = -track[idx[e]]
        start += k


def _run_batches(run, num_batches: int, workers: int) -> None:
    """``run(b)`` for each batch b, on ``workers`` threads (here, in order, if one)."""
    if workers == 1:
        for b in range(num_batches):
            run(b)
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(run, range(num_batches)))


def _squeeze_gaps(point: np.ndarray, xy: np.ndarray, offsets: np.ndarray, counts_of: list):
    """``(indptr, point, xy)`` with the gaps between batches squeezed out: batch b wrote
    its observations, ``counts_of[b]`` a row, at its upper-bound offset ``offsets[b]``;
    each moves down to follow the previous batch's."""
    pos = 0
    for b, counts in enumerate(counts_of):
        n = int(counts.sum())
        if pos != offsets[b] and n:
            point[pos : pos + n] = point[offsets[b] : offsets[b] + n]
            xy[pos : pos + n] = xy[offsets[b] : offsets[b] + n]
        pos += n
    row_counts = np.concatenate(counts_of) if counts_of else np.zeros(0, np.int64)
    indptr = np.concatenate([[0], np.cumsum(row_counts)]).astype(np.int64)
    capacity = len(point)
    point = point[:pos].copy() if pos < capacity // 2 else _shrink(point, pos)
    xy = xy[:pos].copy() if pos < capacity // 2 else _shrink(xy, pos)
    return indptr, point, xy


def _drop_repeats(
    indptr: np.ndarray,
    point: np.ndarray,
    xy: np.ndarray,
    track_length: np.ndarray,
    file_track_lengths: np.ndarray,
    point_ids: np.ndarray,
    points_file: str,
):
    """``(indptr, point, xy)`` without the repeats of a point within an image's row (the
    first stays), after checking that the observations of each point, repeats
    included, number what its track in points3D says (``file_track_lengths``);
    ``track_length`` counts each point's distinct images."""
    num_points, pos = len(point_ids), len(point)
    raw_counts = track_length
    if pos != track_length.sum():  # some image observes a point twice: drop repeats
        drop = _repeats_in_rows(indptr, point, track_length != file_track_lengths)
        if len(drop) != pos - track_length.sum():  # inconsistent file: look everywhere
            drop = _repeats_in_rows(indptr, point, np.ones(num_points, bool))
        raw_counts = track_length + np.bincount(point[drop], minlength=num_points)
        indptr = indptr - np.searchsorted(drop, indptr)
        point, xy = _delete_in_place(point, drop), _delete_in_place(xy, drop)
    bad = np.flatnonzero(raw_counts != file_track_lengths)
    if len(bad):
        i = bad[0]
        raise SfmpairsError(
            f"{points_file}: the track of 3D point {int(point_ids[i])} has "
            f"{int(file_track_lengths[i])} observations but the images list {int(raw_counts[i])}"
        )
    return indptr, point, xy


def _repeats_in_rows(indptr: np.ndarray, point: np.ndarray, suspect: np.ndarray) -> np.ndarray:
    """Sorted positions of observations that repeat a point already seen earlier in
    the same row, looking only at observations of ``suspect`` points."""
    hits = np.flatnonzero(suspect[point])
    rows = np.searchsorted(indptr, hits, side="right") - 1
    key = rows * np.int64(len(suspect)) + point[hits]
    order = np.argsort(key, kind="stable")  # equal keys keep their order in the row
    key = key[order]
    repeat = np.zeros(len(key), bool)
    repeat[1:] = key[1:] == key[:-1]
    return np.sort(hits[order[repeat]])


def _delete_in_place(a: np.ndarray, drop: np.ndarray) -> np.ndarray:
    """``np.delete(a, drop, axis=0)`` without a second copy of ``a``: the few dropped
    rows are squeezed out by moving the runs between them left."""
    if not len(drop):
        return a
    if len(drop) > len(a) // 8:
        keep = np.ones(len(a), bool)
        keep[drop] = False
        return a[keep]
    starts = (drop + 1).tolist()
    stops = [*drop[1:].tolist(), len(a)]
    dst = int(drop[0])
    for s, e in zip(starts, stops):
        a[dst : dst + e - s] = a[s:e]  # numpy copies overlapping ranges safely
        dst += e - s
    return _shrink(a, dst)


def _shrink(a: np.ndarray, n: int) -> np.ndarray:
    a.resize((n,) + a.shape[1:], refcheck=False)  # in place, no copy
    return a
