"""Pools M(q) and the statistics of every (query, candidate) pair in them.

All work is per model: a model has its own coordinate frame, so camera centres and
depths of different models are never compared. Image indices here are local to the
model (0..n-1) unless said otherwise.

For a pair (q, i) with co-observed 3D points P = P(q) ∩ P(i):

- co-observed count |P|, and inlier ratio |P| / |P(q)|;
- scale change, ``depth`` measure: for each p in P the ratio of its apparent size in
  the two images, r_p = (f_q / z_qp) / (f_i / z_ip), z the point's depth in the camera
  and f the focal length divided by the image's longer side; the pair's scale change
  is exp(|median_p log r_p|) >= 1 (1: same scale, 2: twice or half);
- scale change, ``bbox`` measure: sqrt of the ratio of the areas of the bounding boxes
  of P's 2D points in each image, each normalised by its image's longer side, as a
  number >= 1.

Both measures are symmetric in (q, i), so each unordered pair is computed once.
"""

from __future__ import annotations

import functools
import os
import queue
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy.spatial import cKDTree

from sfmpairs.compiled import compiled

SCALE_MEASURES = ("depth", "bbox")
_KEY_SPAN = 256.0  # the grid of sfmpairs <= 0.5's sort keys: pair * span + log ratio (|log ratio| <= 127)


def pool_members(centres: np.ndarray, k: int, extra: int = 8, workers: int | None = None):
    """The k images with the nearest camera centres to each image, itself excluded
    (the nearest-neighbour query on ``workers`` threads: None, every core).

    Returns ``(pool, distance)``, both (n, min(k, n - 1)): local image indices sorted
    by (distance, index), and the Euclidean distances between the centres.
    """
    n = len(centres)
    k = min(k, n - 1)
    if k <= 0:
        return np.zeros((n, 0), np.int64), np.zeros((n, 0))
    m = min(n, k + 1 + extra)  # a few more, so that ties at the k-th are resolved by index
    _, idx = cKDTree(centres).query(centres, m, workers=worker_threads(workers))
    pool, dist = np.empty((n, k), np.int64), np.empty((n, k))
    _nearest_first(centres, np.asarray(idx, np.int64).reshape(n, m), pool, dist)
    return pool, dist


@compiled
def _nearest_first(centres, idx, pool, dist):
    """Each row of ``idx`` (the nearest neighbours of each image, the image itself
    among them or not) ordered by (distance, index), the image itself left out, its
    first k into ``pool`` and the distances into ``dist`` (n, k) (compiled). The
    distances are numpy's ``linalg.norm`` of the difference, summed x, y, z; the rows
    come from the k-d tree nearly in order, so an insertion sort does it."""
    n, m = idx.shape
    k = pool.shape[1]
    d = np.empty(m)
    j_of = np.empty(m, np.int64)
    for q in range(n):
        for t in range(m):
            j = idx[q, t]
            dx = centres[j, 0] - centres[q, 0]
            dy = centres[j, 1] - centres[q, 1]
            dz = centres[j, 2] - centres[q, 2]
            v = np.inf if j == q else np.sqrt(dx * dx + dy * dy + dz * dz)
            at = t
            while at > 0 and (d[at - 1] > v or (d[at - 1] == v and j_of[at - 1] > j)):
                d[at] = d[at - 1]
                j_of[at] = j_of[at - 1]
                at -= 1
            d[at] = v
            j_of[at] = j
        for t in range(k):
            pool[q, t] = j_of[t]
            dist[q, t] = d[t]


def worker_threads(threads: int | None) -> int:
    """The threads to use: ``threads``, or (None) the cores this process may run on, at most 8."""
    if threads:
        return threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cores or 1, 8))


def unordered_pairs(pool: np.ndarray, n: int):
    """Sorted unique keys lo * n + hi (lo < hi) of every (query, candidate) pair of
    ``pool`` (n, k): local image indices, 0 <= pool[q, t] < n and never q, as
    :func:`pool_members` gives them (compiled: :func:`_unordered_pairs`)."""
    return _unordered_pairs(np.ascontiguousarray(pool, np.int64), n)


@compiled
def _unordered_pairs(pool, n):
    """The pairs bucketed by lower image (a counting sort), each bucket's higher images
    sorted and their repeats dropped: about a pool's width in each bucket, against a
    sort of all n * k keys (about half the time: 17.7 ms against 33.1 ms for 5,664
    images, k = 100)."""
    k = pool.shape[1]
    start = np.zeros(n + 1, np.int64)
    for q in range(n):
        for t in range(k):
            start[min(q, pool[q, t]) + 1] += 1
    for i in range(n):
        start[i + 1] += start[i]
    fill = start[:-1].copy()
    higher = np.empty(n * k, np.int64)
    for q in range(n):
        for t in range(k):
            c = pool[q, t]
            lo = min(q, c)
            higher[fill[lo]] = max(q, c)
            fill[lo] += 1
    keys = np.empty(n * k, np.int64)
    out = 0
    for lo in range(n):
        run = np.sort(higher[start[lo] : start[lo + 1]])
        for j in range(len(run)):
            if j == 0 or run[j] != run[j - 1]:
                keys[out] = lo * n + run[j]
                out += 1
    return keys[:out].copy()


def lower_runs(lo: np.ndarray, n: int) -> np.ndarray:
    """(n + 1,): where the pairs of each lower image begin, ``lo`` being the sorted
    lower images of :func:`unordered_pairs`' keys: the pairs of lower image i are
    ``runs[i]:runs[i+1]``."""
    return np.searchsorted(lo, np.arange(n + 1))


def pair_index(pool: np.ndarray, pairs: np.ndarray, n: int) -> np.ndarray:
    """(n, k): where each (query, candidate) of ``pool`` is in ``pairs``
    (:func:`unordered_pairs`, which holds them all). The pairs of a lower image are one
    run of ``pairs``: each is looked up by bisection within its run (compiled)."""
    lo_ptr = lower_runs(pairs // n, n)
    which = np.empty(pool.shape, np.int64)
    _pair_index(pool, pairs, lo_ptr, n, which)
    return which


@compiled
def _pair_index(pool, pairs, lo_ptr, n, which):
    for q in range(pool.shape[0]):
        for t in range(pool.shape[1]):
            c = pool[q, t]
            lo, hi = min(q, c), max(q, c)
            key = lo * n + hi
            a, b = lo_ptr[lo], lo_ptr[lo + 1]  # the first pair >= key in a..b-1, as np.searchsorted
            while a < b:
                mid = (a + b) // 2
                if pairs[mid] < key:
                    a = mid + 1
                else:
                    b = mid
            which[q, t] = a


def tracks(indptr: np.ndarray, point: np.ndarray, num_points: int):
    """The co-observation table by point (CSC), points relabelled in the order of the
    first image that observes them, so that the tracks of neighbouring images lie
    close together in memory.

    Returns ``(label, order, track_ptr, track_image, track_obs, position)``, with nnz
    observations, M points and the index type ``idx`` (int32, or int64 for huge models):

    - ``label`` idx (M,): point p has track ``label[p]``; ``order`` int64 (M,), its
      inverse: ``order[j]`` is the point of track j. Tracks are numbered by the first
      image that observes their point (ties by point index); unobserved points last;
    - ``track_ptr`` int64 (M + 1,): the observations of track j are the *track
      positions* ``track_ptr[j]:track_ptr[j+1]``;
    - ``track_image`` idx (nnz,): the image of the observation at each track position;
      within a track strictly increasing (the CSR -> CSC conversion walks the images in
      order, and an image observes a point once);
    - ``track_obs`` idx (nnz,): the observation (CSR index into ``point``) at each track
      position;
    - ``position`` int64 (nnz,): the inverse of ``track_obs``: where observation o sits.
    """
    n, nnz = len(indptr) - 1, len(point)
    idx = np.int32 if max(nnz, n, num_points) < 2**31 else np.int64
    label, order = np.empty(num_points, idx), np.empty(num_points, np.int64)
    track_ptr, position = np.zeros(num_points + 1, np.int64), np.empty(nnz, np.int64)
    track_image, track_obs = np.empty(nnz, idx), np.empty(nnz, idx)
    _tracks(indptr, point, label, order, track_ptr, track_image, track_obs, position)
    return label, order, track_ptr, track_image, track_obs, position


@compiled
def _tracks(indptr, point, label, order, track_ptr, track_image, track_obs, position):
    """:func:`tracks`' tables, filled in (``track_ptr`` zeros on entry; compiled): each
    point's first image; the points by first image, ties by index (a counting sort);
    the track lengths; then the observations image after image into their tracks,
    which therefore list their images in increasing order (the CSR to CSC conversion)."""
    n, num_points = len(indptr) - 1, len(label)
    first = np.full(num_points, n, np.int64)  # n: observed by no image
    for i in range(n):
        for o in range(indptr[i], indptr[i + 1]):
            if first[point[o]] == n:
                first[point[o]] = i
    start = np.zeros(n + 2, np.int64)  # where the tracks of the points first seen by image i begin
    for p in range(num_points):
        start[first[p] + 1] += 1
    for i in range(1, n + 2):
        start[i] += start[i - 1]
    for p in range(num_points):
        j = start[first[p]]
        start[first[p]] = j + 1
        order[j] = p
        label[p] = j
    for o in range(len(point)):
        track_ptr[label[point[o]] + 1] += 1
    for j in range(num_points):
        track_ptr[j + 1] += track_ptr[j]
    end = track_ptr[:-1].copy()  # where the next observation of each track goes
    for i in range(n):
        for o in range(indptr[i], indptr[i + 1]):
            j = label[point[o]]
            track_image[end[j]] = i
            track_obs[end[j]] = o
            position[o] = end[j]
            end[j] += 1


def log_scale_by_track(track_ptr, track_image, xyz, axis, tz, log_f, chunk: int = 1 << 16):
    """log(f / z) of every observation, in track order: the log of the point's apparent
    size in the image, f the focal length divided by the image's longer side and z the
    point's depth (clamped to 1e-12: COLMAP keeps points in front of the cameras).
    ``xyz`` is in track order. The depths are compiled (:func:`_depths`) and the logs
    numpy's, chunk by chunk of points, so that each chunk stays in the cache."""
    out = np.empty(len(track_image))
    for p0 in range(0, len(xyz), chunk):
        p1 = min(len(xyz), p0 + chunk)
        s, e = track_ptr[p0], track_ptr[p1]
        _depths(p0, p1, track_ptr, track_image, xyz, axis, tz, out)
        np.log(np.maximum(out[s:e], 1e-12, out=out[s:e]), out=out[s:e])
        _log_size(s, e, track_image, log_f, out)
    return out


@compiled
def _depths(p0, p1, track_ptr, track_image, xyz, axis, tz, out):
    """The depth z of each observation of points p0..p1-1 (track order) in its image,
    into ``out`` (compiled): the point's position along the camera's viewing axis,
    summed in the order numpy's ``einsum("ij,ij->i")`` sums (sfmpairs <= 0.6 used it):
    x and z, then y, then the translation."""
    for p in range(p0, p1):
        x, y, z = xyz[p, 0], xyz[p, 1], xyz[p, 2]
        for e in range(track_ptr[p], track_ptr[p + 1]):
            i = track_image[e]
            out[e] = (x * axis[i, 0] + z * axis[i, 2]) + y * axis[i, 1] + tz[i]


@compiled
def _log_size(s, e, track_image, log_f, out):
    """``out[s:e]``, the logs of the depths, made log(f) - log(z) in place (compiled)."""
    for k in range(s, e):
        out[k] = log_f[track_image[k]] - out[k]


def pair_statistics(
    indptr,
    point,
    xyz,
    rotation,
    tvec,
    focal,
    longer_side,
    pairs,
    n,
    measure="depth",
    xy=None,
    batch_images: int = 64,
    threads: int | None = None,
):
    """Co-observed count and scale change of each unordered pair ``pairs`` of one model.

    All of one model, images 0..n-1, points 0..M-1 and observations 0..nnz-1 local:

    - ``indptr`` int64 (n + 1,), ``point`` int (nnz,): the co-observation table, CSR by
      image: the observations of image i are ``indptr[i]:indptr[i+1]``, in the image's
      2D point order (not sorted by point), ``point[o]`` the point observation o sees;
      an image observes a point at most once;
    - ``xyz`` float64 (M, 3): the points; ``rotation`` (n, 3, 3), ``tvec`` (n, 3):
      each image's cam_from_world; ``focal`` (n,): focal length in pixels (NaN for a
      camera without one); ``longer_side`` (n,): the image's longer side in pixels;
    - ``pairs`` int64 (P,): unique keys lo * n + hi, lo < hi, sorted, hence by lo then
      by hi (:func:`unordered_pairs`);
    - ``xy`` float64 (nnz, 2): the observations' pixel positions (``bbox`` only).

    Returns ``(count, scale)``, int64 and float64 (P,), in the order of ``pairs``;
    scale is NaN where a pair shares no point, or where it is undefined (a camera
    without focal length; a bounding box of zero area). Images go in batches of
    ``batch_images`` consecutive lower images, on ``threads`` threads. The ``depth``
    measure's last bits depend on ``batch_images`` (its log ratios are rounded to the
    grid of sfmpairs <= 0.5's sort keys, numbered within a batch): keep the default,
    64, for the pair files of every version to stay bit-identical.
    """
    if measure not in SCALE_MEASURES:
        raise ValueError(f"unknown scale measure {measure!r}")
    trk = tracks(indptr, point, len(xyz))
    lo, hi = pairs // n, pairs % n  # (P,) each pair's lower and higher image
    if measure == "depth":
        args = (indptr, point, xyz, rotation, tvec, focal, longer_side, trk, batch_images, threads)
        count, scale = _depth_statistics(lo, hi, n, *args)
    else:
        # float64 (nnz, 2) by observation (CSR): positions in units of the image's longer side
        xy_norm = xy / np.repeat(longer_side, np.diff(indptr))[:, None]
        scale_change = functools.partial(_bbox_scale, xy_norm, trk[4])
        count, scale = _statistics_by_batch(lo, hi, n, indptr, point, trk, scale_change, batch_images, threads)
    return count, scale


def _depth_statistics(lo, hi, n, indptr, point, xyz, rotation, tvec, focal, longer_side, trk, batch_images, threads):
    """``(count, scale)`` of each pair (lo[j], hi[j]), the ``depth`` measure: the
    compiled walk (:func:`_depth_batch`) over batches of ``batch_images`` lower
    images, on ``threads`` threads (:func:`_run_batches`)."""
    label, order, track_ptr, track_image, _, position = trk
    log_f, no_scale = _log_focal(focal, longer_side)
    # float64 (nnz,) by track position: log(f / z) of each observation
    log_size = log_scale_by_track(track_ptr, track_image, xyz[order], rotation[:, 2, :], tvec[:, 2], log_f)
    lo_ptr = lower_runs(lo, n)
    count = np.zeros(len(lo), np.int64)
    median = np.full(len(lo), np.nan)
    hi = hi.astype(np.int64)

    def run_batch(i0: int, slot: np.ndarray) -> None:
        i1 = min(n, i0 + batch_images)
        args = (indptr, point, label, track_ptr, track_image, position, log_size, lo_ptr, hi, slot, count, median)
        _depth_batch(i0, i1, *args)

    _run_batches(run_batch, n, batch_images, threads, slot_size=n)
    scale = np.exp(np.abs(median))
    scale[no_scale[lo] | no_scale[hi]] = np.nan
    return count, scale


def load_kernels() -> None:
    """Load the compiled kernels of pooling and of the ``depth`` measure (from numba's
    cache: about 0.2 s, mostly LLVM starting; a first run compiles them) by pooling a
    model of 3 images, with the argument types a store gives. Mining calls it on a
    thread at its start, beside reading the store, rather than at the first model."""
    xyz = np.array([[0.0, 0.0, 1.0], [0.0, 0.0, 2.0], [0.0, 0.0, 3.0]])
    rotation, tvec = np.repeat(np.eye(3)[None], 3, axis=0), np.zeros((3, 3))
    points = np.array([0, 1, 2] * 3, np.int32)  # the store's observations/point
    pool, _ = pool_members(xyz, 2, workers=1)
    pairs = unordered_pairs(pool, 3)
    pair_index(pool, pairs, 3)
    pair_statistics(np.arange(0, 12, 3), points, xyz, rotation, tvec, np.ones(3), np.ones(3), pairs, 3)


def _log_focal(focal: np.ndarray, longer_side: np.ndarray):
    """``(log_f, no_scale)``, (n,) each: the log of each image's focal length in units of
    its longer side, and whether the image has none (e.g. EQUIRECTANGULAR), where
    ``log_f`` is 0.0 (any finite value: the pairs of these images get NaN at the end)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        log_f = np.log(focal / longer_side)
    no_scale = ~np.isfinite(log_f)
    log_f[no_scale] = 0.0
    return log_f, no_scale


def _statistics_by_batch(lo, hi, n, indptr, point, trk, scale_change, batch_images, threads):
    """``(count, scale)`` of each pair (lo[j], hi[j]), (P,), batch by batch of
    ``batch_images`` consecutive lower images (:func:`_run_batches`).

    ``scale_change(pair, o0, source, later, shared)`` gives ``(which, value)``, the
    scale changes of a batch's pairs ``which`` from its co-observations
    (:func:`_co_observations`; lo's observation, CSR, is ``o0 + source``)."""
    count = np.zeros(len(lo), np.int64)
    scale = np.full(len(lo), np.nan)

    def visit(p0: int, p1: int, o0: int, pair, source, later) -> None:
        shared = np.bincount(pair, minlength=p1 - p0)  # (p1 - p0,): |P(lo) ∩ P(hi)|
        count[p0:p1] = shared
        which, value = scale_change(pair, o0, source, later, shared)
        scale[p0:p1][which] = value

    walk_pair_batches(lo, hi, n, indptr, point, trk, batch_images, threads, visit)
    return count, scale


def walk_pair_batches(lo, hi, n, indptr, point, trk, batch_images: int, threads, visit) -> None:
    """Call ``visit(p0, p1, o0, pair, source, later)`` for each batch of
    ``batch_images`` consecutive lower images (on ``threads``, :func:`_run_batches`):
    the batch's pairs are the run ``p0:p1`` of the pairs (lo, hi) (``lo`` sorted);
    ``pair, source, later`` their co-observations (:func:`_co_observations`: ``pair``
    local, 0..p1-p0-1; ``source`` lo's observation minus ``o0``, the batch's first
    observation; ``later`` hi's track position)."""
    # ``lo`` is sorted (``pairs`` are keys lo * n + hi, sorted), so the pairs whose lower
    # image is i are the run lo_ptr[i]:lo_ptr[i+1] (lo_ptr (n + 1,)), those of a batch one run
    lo_ptr = lower_runs(lo, n)

    def run_batch(i0: int, slot: np.ndarray) -> None:
        i1 = min(n, i0 + batch_images)
        p0, p1 = lo_ptr[i0], lo_ptr[i1]
        if p0 == p1:
            return
        # the batch's pairs as keys (lo - i0) * n + hi, each < batch_images * n: indices into ``slot``
        pair, source, later = _co_observations(i0, i1, n, indptr, point, trk, slot, (lo[p0:p1] - i0) * n + hi[p0:p1])
        visit(p0, p1, indptr[i0], pair, source, later)

    _run_batches(run_batch, n, batch_images, threads)


def _co_observations(i0, i1, n, indptr, point, trk, slot, keys):
    """Every co-observation (a point seen by both images) of the batch's pairs, once.

    Images i0..i1-1 are the batch; ``keys`` are its pairs (lo, hi), p1 - p0 of them, as
    ``(lo - i0) * n + hi``, which also index ``slot``, int64 (batch_images * n,), all
    -1 on entry and on return. ``trk`` is what :func:`tracks` returns.

    A pair (lo, hi) shares point p where p's track holds both images. The track lists
    its images in increasing order, so the entries after lo's are the images hi > lo
    that see p: walking, for each observation of the batch's images, the rest of its
    track finds each co-observation of an unordered pair exactly once, from lo's side.
    Those of image pairs in no pool are dropped.

    Returns ``(pair, source, later)``, one entry a co-observation, grouped by lo's
    observation, each group in track order: ``pair`` the index into ``keys``,
    ``source`` lo's observation minus ``indptr[i0]``, ``later`` hi's track position.
    """
    label, _, track_ptr, track_image, _, position = trk
    slot[keys] = np.arange(len(keys))
    o0, o1 = indptr[i0], indptr[i1]  # the batch's observations, CSR
    start = position[o0:o1] + 1  # the track position after each of them
    length = track_ptr[label[point[o0:o1]] + 1] - start  # how many follow in the track
    # lay the runs start:start+length end to end: run s begins at entry run_begin[s]
    run_begin = np.cumsum(length) - length
    source = np.repeat(np.arange(o1 - o0), length)  # entry -> the observation whose run it is in
    # entry e is the (e - run_begin[s])-th of run s, at track position start[s] + that
    later = np.arange(len(source)) + (start - run_begin)[source]
    row = np.repeat(np.arange(i1 - i0), np.diff(indptr[i0 : i1 + 1]))  # observation -> image - i0
    pair = slot[(row * n)[source] + track_image[later]]  # -1: (lo, hi) is in no pool
    slot[keys] = -1
    keep = pair >= 0
    return pair[keep], source[keep], later[keep]


@compiled
def _depth_batch(
    i0, i1, indptr, point, label, track_ptr, track_image, position, log_size, lo_ptr, hi, slot, count, median
):
    """The co-observed count and median log ratio of the pairs of lower images
    i0..i1-1, into ``count`` and ``median`` (compiled; releases the GIL).

    The pairs of lower image i are ``lo_ptr[i]:lo_ptr[i+1]`` (higher images ``hi``).
    A pair (lo, hi) shares point p where p's track holds both images; the track lists
    its images in increasing order, so walking, for each observation of lo, the rest
    of its track finds each co-observation of the pair exactly once, from lo's side.
    One lower image at a time, so that its buffers stay in the processor's cache:
    ``slot`` int64 (n,), all -1 on entry and on return, maps hi to the pair's index
    among lo's while lo's tracks are walked. Each co-observation of a pair in the
    pools gives its log ratio, ``log_size`` of hi's observation minus lo's; they are
    then grouped by pair, and each group's median found by selection.

    The log ratios are clipped to +-127 and rounded to the grid of the keys
    g * 256 + log ratio that sfmpairs <= 0.5 sorted, g the pair's index within the
    batch (from ``lo_ptr[i0]``), so that scale changes stay bit-identical to theirs
    (a change below 1e-9).
    """
    p0 = lo_ptr[i0]
    widest, longest = 0, 0  # the most pairs and track entries of one lower image
    for i in range(i0, i1):
        walk = 0
        for o in range(indptr[i], indptr[i + 1]):
            walk += track_ptr[label[point[o]] + 1] - position[o] - 1
        longest = max(longest, walk)
        widest = max(widest, lo_ptr[i + 1] - lo_ptr[i])
    pair = np.empty(longest, np.int64)
    ratio = np.empty(longest, np.float64)
    grouped = np.empty(longest, np.float64)
    fill = np.empty(widest, np.int64)
    for i in range(i0, i1):
        a, b = lo_ptr[i], lo_ptr[i + 1]
        if a == b:
            continue
        for p in range(a, b):
            slot[hi[p]] = p - a
        found = 0
        for o in range(indptr[i], indptr[i + 1]):
            own = log_size[position[o]]
            for e in range(position[o] + 1, track_ptr[label[point[o]] + 1]):
                g = slot[track_image[e]]
                if g >= 0:  # (i, track_image[e]) is a pair of the pools
                    pair[found] = g
                    ratio[found] = log_size[e] - own
                    found += 1
        for p in range(a, b):
            slot[hi[p]] = -1
        for j in range(found):
            count[a + pair[j]] += 1
        total = 0
        for g in range(b - a):
            fill[g] = total
            total += count[a + g]
        for j in range(found):
            g = pair[j]
            key = float(a - p0 + g) * _KEY_SPAN
            grouped[fill[g]] = (key + min(max(ratio[j], -127.0), 127.0)) - key
            fill[g] += 1
        start = 0
        for g in range(b - a):
            c = count[a + g]
            if c > 0:
                median[a + g] = _median(grouped[start : start + c])
            start += c


@compiled
def _median(a):
    """The median of ``a`` (reordered in place): the mean of its two middle values
    (one for an odd length), found by quickselect, as ``np.median`` gives it."""
    c = len(a)
    lower = _select(a, (c - 1) // 2)  # a[k] in place: all before <=, all after >=
    upper = lower
    if c % 2 == 0:  # the smallest after it
        upper = a[c // 2]
        for x in range(c // 2 + 1, c):
            upper = min(upper, a[x])
    return (lower + upper) / 2


@compiled
def _select(a, k):
    """The k-th smallest of ``a``, moved to a[k] with nothing larger before it and
    nothing smaller after it (quickselect, median-of-three pivots; insertion sort of
    the last 7 values or fewer). The partition has no branch on the values (Lomuto's
    scheme, branch-free): the data are random, so a branch would be mispredicted half the
    time; it costs a third of Hoare's scheme's time on groups of about 200.
    Copies of the pivot when nothing is smaller go first in one more pass, so that
    equal values cannot make it quadratic; orders that defeat the median of three
    (values rising then falling, say) get a heap sort of what is left after 2 log2(n)
    + 8 partitions, so that it is O(n log n) whatever the values."""
    lo, hi = 0, len(a) - 1
    budget = 8
    size = len(a)
    while size > 1:
        budget += 2
        size //= 2
    while hi - lo > 6:
        budget -= 1
        if budget < 0:
            _heap_sort(a, lo, hi)
            return a[k]
        mid = (lo + hi) // 2
        if a[mid] < a[lo]:
            a[mid], a[lo] = a[lo], a[mid]
        if a[hi] < a[lo]:
            a[hi], a[lo] = a[lo], a[hi]
        if a[mid] < a[hi]:
            a[hi], a[mid] = a[mid], a[hi]
        pivot = a[hi]  # the median of a[lo], a[mid], a[hi], moved to hi
        i = lo  # a[lo:i] < pivot <= a[i:j]
        for j in range(lo, hi):
            x = a[j]
            a[j] = a[i]
            a[i] = x
            i += x < pivot
        a[hi] = a[i]
        a[i] = pivot
        if i == lo:  # nothing smaller than the pivot: its copies to a[lo:i + 1]
            for j in range(lo + 1, hi + 1):
                x = a[j]
                a[j] = a[i + 1]
                a[i + 1] = x
                i += x == pivot
            if k <= i:
                return pivot
            lo = i + 1
        elif k == i:
            return pivot
        elif k < i:
            hi = i - 1
        else:
            lo = i + 1
    for x in range(lo + 1, hi + 1):
        v = a[x]
        y = x - 1
        while y >= lo and a[y] > v:
            a[y + 1] = a[y]
            y -= 1
        a[y + 1] = v
    return a[k]


@compiled
def _heap_sort(a, lo, hi):
    """a[lo:hi + 1] sorted in place (heap sort: O(n log n) whatever the order)."""
    n = hi - lo + 1
    for start in range(n // 2 - 1, -1, -1):
        _sift_down(a, lo, start, n)
    for end in range(n - 1, 0, -1):
        a[lo], a[lo + end] = a[lo + end], a[lo]
        _sift_down(a, lo, 0, end)


@compiled
def _sift_down(a, lo, root, n):
    while True:
        child = 2 * root + 1
        if child >= n:
            return
        if child + 1 < n and a[lo + child] < a[lo + child + 1]:
            child += 1
        if a[lo + root] >= a[lo + child]:
            return
        a[lo + root], a[lo + child] = a[lo + child], a[lo + root]
        root = child


def _bbox_scale(xy_norm, track_obs, pair, o0, source, later, shared):
    """The ``bbox`` measure: sqrt of the ratio of the bounding-box areas of each pair's
    shared points, >= 1.

    ``xy_norm`` float64 (nnz, 2) by observation (CSR): positions in units of the
    image's longer side; ``track_obs`` (nnz,): the observation at each track position.
    One entry a co-observation: ``pair`` its pair, ``o0 + source`` lo's observation
    (CSR), ``later`` hi's track position (``shared`` unused: the signature of
    the callbacks of :func:`_statistics_by_batch`). Returns ``(which, value)``: the pairs that share points,
    ascending, and their scale changes (NaN for a box of zero area).
    """
    if not len(pair):
        return np.zeros(0, np.int64), np.zeros(0)
    by_pair = np.argsort(pair, kind="stable")
    pair, obs_lo, obs_hi = pair[by_pair], (o0 + source)[by_pair], track_obs[later][by_pair]
    group_start = np.flatnonzero(np.r_[True, pair[1:] != pair[:-1]])
    area = []
    for obs in (obs_lo, obs_hi):
        x, y = xy_norm[obs, 0], xy_norm[obs, 1]
        w = np.maximum.reduceat(x, group_start) - np.minimum.reduceat(x, group_start)
        h = np.maximum.reduceat(y, group_start) - np.minimum.reduceat(y, group_start)
        area.append(w * h)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.sqrt(area[0] / area[1])
        value = np.maximum(ratio, 1 / ratio)
    value[(area[0] <= 0) | (area[1] <= 0)] = np.nan  # one point, or all on a line
    return pair[group_start], value


def _run_batches(run_batch, n: int, batch_images: int, threads: int | None, slot_size: int | None = None) -> None:
    """``run_batch(i0, slot)`` for i0 = 0, batch_images, ... < n on a few threads.

    Batches are independent (each writes its own run of the outputs) and numpy
    releases the GIL in its loops. Each worker owns a slot table, int64
    (``slot_size``, default batch_images * n), all -1, that its batches borrow in turn."""
    slot_size = batch_images * n if slot_size is None else slot_size
    starts = range(0, n, batch_images)
    workers = min(worker_threads(threads), len(starts))
    if workers <= 1:  # no threads to start for a small model
        slot = np.full(slot_size, -1, np.int64)
        for i0 in starts:
            run_batch(i0, slot)
        return
    slots = queue.SimpleQueue()
    for _ in range(workers):
        slots.put(np.full(slot_size, -1, np.int64))

    def task(i0: int) -> None:
        slot = slots.get()
        try:
            run_batch(i0, slot)
        finally:
            slots.put(slot)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(task, starts))
