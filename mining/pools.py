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

import os
import queue
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy import sparse
from scipy.spatial import cKDTree

SCALE_MEASURES = ("depth", "bbox")
_KEY_SPAN = 256.0  # sort key = group * span + log ratio (|log ratio| < 127 after clipping)


def pool_members(centres: np.ndarray, k: int, extra: int = 8):
    """The k images with the nearest camera centres to each image, itself excluded.

    Returns ``(pool, distance)``, both (n, min(k, n - 1)): local image indices sorted
    by (distance, index), and the Euclidean distances between the centres.
    """
    n = len(centres)
    k = min(k, n - 1)
    if k <= 0:
        return np.zeros((n, 0), np.int64), np.zeros((n, 0))
    m = min(n, k + 1 + extra)  # a few more, so that ties at the k-th are resolved by index
    _, idx = cKDTree(centres).query(centres, m)
    idx = np.asarray(idx).reshape(n, m)
    dist = np.linalg.norm(centres[idx] - centres[:, None, :], axis=2)
    is_self = idx == np.arange(n)[:, None]
    dist[is_self] = np.inf
    order = np.lexsort((idx, dist), axis=1)[:, :k]
    rows = np.arange(n)[:, None]
    return idx[rows, order], dist[rows, order]


def unordered_pairs(pool: np.ndarray, n: int):
    """Sorted unique keys lo * n + hi (lo < hi) of every (query, candidate) pair."""
    q = np.repeat(np.arange(n), pool.shape[1])
    c = pool.ravel()
    return np.unique(np.minimum(q, c).astype(np.int64) * n + np.maximum(q, c))


def tracks(indptr: np.ndarray, point: np.ndarray, num_points: int):
    """The co-observation table by point (CSC), points relabelled in the order of the
    first image that observes them, so that the tracks of neighbouring images lie
    close together in memory.

    Returns ``(label, order, track_ptr, track_image, track_obs, position)``: point p
    has track ``label[p]`` and ``order[j]`` is the point of track j; the observations of track j are positions
    ``track_ptr[j]:track_ptr[j+1]``, in image order, of images ``track_image[...]``,
    observations (CSR indices) ``track_obs[...]``; ``position[o]`` is where observation
    o sits.
    """
    n, nnz = len(indptr) - 1, len(point)
    idx = np.int32 if max(nnz, n, num_points) < 2**31 else np.int64
    image = np.repeat(np.arange(n, dtype=idx), np.diff(indptr))
    first = np.full(num_points, n, idx)
    first[point[::-1]] = image[::-1]  # the last write wins: the first image of each point
    order = np.argsort(first, kind="stable")
    label = np.empty(num_points, idx)
    label[order] = np.arange(num_points, dtype=idx)
    csc = sparse.csr_matrix((np.arange(nnz, dtype=idx), label[point], indptr.astype(idx)),
                            shape=(n, num_points)).tocsc()
    position = np.empty(nnz, np.int64)
    position[csc.data] = np.arange(nnz)
    return label, order, csc.indptr.astype(np.int64), csc.indices, csc.data, position


def log_scale_by_track(track_ptr, track_image, xyz, axis, tz, log_f, chunk: int = 1 << 16):
    """log(f / z) of every observation, in track order: the log of the point's apparent
    size in the image, f the focal length divided by the image's longer side and z the
    point's depth (clamped to 1e-12: COLMAP keeps points in front of the cameras).
    ``xyz`` is in track order. Chunked, so that temporaries stay small."""
    out = np.empty(len(track_image))
    lengths = np.diff(track_ptr)
    for p0 in range(0, len(xyz), chunk):
        p1 = min(len(xyz), p0 + chunk)
        s, e = track_ptr[p0], track_ptr[p1]
        X = np.repeat(xyz[p0:p1], lengths[p0:p1], axis=0)
        img = track_image[s:e]
        a = axis[img]
        z = np.einsum("ij,ij->i", X, a) + tz[img]
        out[s:e] = log_f[img] - np.log(np.maximum(z, 1e-12))
    return out


def pair_statistics(indptr, point, xyz, rotation, tvec, focal, longer_side, pairs, n,
                    measure="depth", xy=None, batch_images: int = 64, threads: int | None = None):
    """Co-observed count and scale change of each unordered pair ``pairs`` (sorted keys
    lo * n + hi) of one model.

    ``indptr``/``point`` are the model's co-observation rows (local point indices),
    ``xyz`` its points; ``rotation``, ``tvec``, ``focal``, ``longer_side`` per image;
    ``xy`` the observations' 2D positions (for the ``bbox`` measure). Returns
    ``(count, scale)``; scale is NaN where a pair shares no point, or where it is
    undefined (a camera without focal length; a bounding box of zero area).
    """
    if measure not in SCALE_MEASURES:
        raise ValueError(f"unknown scale measure {measure!r}")
    num_points = len(xyz)
    label, order, track_ptr, track_image, track_obs, position = tracks(indptr, point, num_points)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_f = np.log(focal / longer_side)
    no_scale = ~np.isfinite(log_f)  # e.g. EQUIRECTANGULAR: no focal length
    log_f[no_scale] = 0.0
    if measure == "depth":
        by_track = log_scale_by_track(track_ptr, track_image, xyz[order], rotation[:, 2, :],
                                      tvec[:, 2], log_f)
    else:
        xy_norm = xy / np.repeat(longer_side, np.diff(indptr))[:, None]

    lo, hi = pairs // n, pairs % n
    lo_ptr = np.searchsorted(lo, np.arange(n + 1))
    count = np.zeros(len(pairs), np.int64)
    scale = np.full(len(pairs), np.nan)

    def run_batch(b0: int, slot: np.ndarray) -> None:
        b1 = min(n, b0 + batch_images)
        p0, p1 = lo_ptr[b0], lo_ptr[b1]
        if p0 == p1:
            return
        flat = (lo[p0:p1] - b0) * n + hi[p0:p1]
        slot[flat] = np.arange(p1 - p0)
        # each observation of the batch's images, with the later observations of its
        # track (images after this one): every co-observation of an unordered pair once
        a, b = indptr[b0], indptr[b1]
        start = position[a:b] + 1
        length = track_ptr[label[point[a:b]] + 1] - start
        first = np.cumsum(length) - length
        rep = np.repeat(np.arange(b - a), length)  # entry -> observation of the batch
        other = np.arange(len(rep)) + (start - first)[rep]  # track positions
        row = np.repeat(np.arange(b1 - b0), np.diff(indptr[b0:b1 + 1]))
        g = slot[(row * n)[rep] + track_image[other]]
        slot[flat] = -1
        keep = g >= 0
        g, other, rep = g[keep], other[keep], rep[keep]
        c = np.bincount(g, minlength=p1 - p0)
        count[p0:p1] = c
        if measure == "depth":
            v = np.clip(by_track[other] - by_track[start - 1][rep], -127, 127)
            keys = np.sort(g * _KEY_SPAN + v)
            off = np.cumsum(c) - c
            has = c > 0
            lo_val = keys[(off + (c - 1) // 2)[has]]
            hi_val = keys[(off + c // 2)[has]]
            base = np.flatnonzero(has) * _KEY_SPAN
            scale[p0:p1][has] = np.exp(np.abs(((lo_val - base) + (hi_val - base)) / 2))
        elif len(g):
            by_pos = np.argsort(g, kind="stable")
            g, mine_obs, other_obs = g[by_pos], (a + rep)[by_pos], track_obs[other[by_pos]]
            starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
            area = []
            for obs in (mine_obs, other_obs):
                x, y = xy_norm[obs, 0], xy_norm[obs, 1]
                w = np.maximum.reduceat(x, starts) - np.minimum.reduceat(x, starts)
                h = np.maximum.reduceat(y, starts) - np.minimum.reduceat(y, starts)
                area.append(w * h)
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.sqrt(area[0] / area[1])
                s = np.maximum(ratio, 1 / ratio)
            s[(area[0] <= 0) | (area[1] <= 0)] = np.nan  # one point, or all on a line
            scale[p0:p1][g[starts]] = s

    # batches are independent and numpy releases the GIL in its loops: use the cores
    workers = max(1, min(threads or os.cpu_count() or 1, 8))
    slots = queue.SimpleQueue()  # one (batch image, other image) -> pair table per worker
    for _ in range(workers):
        slots.put(np.full(batch_images * n, -1, np.int64))

    def task(b0: int) -> None:
        slot = slots.get()
        try:
            run_batch(b0, slot)
        finally:
            slots.put(slot)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(task, range(0, n, batch_images)))
    if measure == "depth":
        scale[no_scale[lo] | no_scale[hi]] = np.nan
    return count, scale
