"""Bag-of-visual-words global descriptors from the SIFT features that COLMAP has
already extracted: how the paper chose the photo pairs to match, and a descriptor that
needs no network weights.

- RootSIFT (Arandjelovic and Zisserman, 2012): each descriptor L1-normalised and
  square-rooted, so that dot products compare them as the Hellinger kernel does;
- a vocabulary tree of two levels (Nister and Stewenius, 2006): k-means of a sample of
  the descriptors into ``branching`` cells, then each cell's samples into ``branching``
  words, ``branching ** 2`` words in all (65,536 by default). A descriptor's word is
  its nearest centre in the first level, then its nearest word in that cell;
- each photo a histogram of its words weighted by tf-idf (a word seen in fewer photos
  counts more), L2-normalised: a sparse row whose dot products with the others rank
  the photos most alike.

On 2,000 rendered photos of 100 places (20 each), the five most similar photos were
of the same place for 94 % of photos with 65,536 words, 80 % with 16,384 and 53 % with
4,096 (benchmarks/bench_reconstruct.py's world).
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import urllib.parse
from pathlib import Path

import numpy as np
from scipy import sparse

from sfmpairs.common import SfmpairsError, progress

logger = logging.getLogger("sfmpairs.reconstruct")

DESCRIPTORS_PER_WORD = 20
# descriptors quantised at once (whole photos, so about as many): see bow_descriptors
QUANTISE_BATCH = 1 << 16

default_conf = {
    "branching": 256,  # at most; words: its square (fewer for few photos, see bow_descriptors)
    "sample": 1_000_000,  # descriptors the vocabulary is learnt from (at most)
    "iterations": 8,  # of k-means, at each level
    "seed": 0,
}


def _read_only(db: Path) -> str:
    """SQLite's URI of ``db`` opened read-only (never creating it), any character of the
    path quoted (``#``, ``?`` and ``%`` mean something in a URI)."""
    return f"file:{urllib.parse.quote(Path(db).resolve().as_posix())}?mode=ro"


def read_sift(db: Path, names: list[str]):
    """Yield ``(i, descriptors)``, uint8 (n_i, 128), of each photo ``names[i]`` in
    COLMAP's database ``db``, one photo at a time (all of them may not fit in memory)."""
    with contextlib.closing(sqlite3.connect(_read_only(db), uri=True)) as con:
        image_id = dict(con.execute("SELECT name, image_id FROM images"))
        for i, name in enumerate(names):
            row = con.execute("SELECT rows, cols, data FROM descriptors WHERE image_id = ?", (image_id[name],))
            rows, cols, data = row.fetchone() or (0, 128, b"")
            data = data or b""  # COLMAP writes NULL for a photo without features
            if (rows or data) and (cols != 128 or len(data) != rows * cols):  # bytes with rows = 0 too
                raise SfmpairsError(
                    f"{db}: the SIFT descriptors of {name} are not {rows} x 128 bytes (the table says "
                    f"{rows} x {cols} and holds {len(data)} bytes)"
                )
            yield i, np.frombuffer(data, np.uint8).reshape(-1, 128)


def root_sift(x: np.ndarray) -> np.ndarray:
    """RootSIFT, float32: each row L1-normalised, then square-rooted (unit L2 norm)."""
    x = x.astype(np.float32)
    x /= np.maximum(x.sum(axis=1, keepdims=True), 1e-12)
    return np.sqrt(x, out=x)


def nearest(x: np.ndarray, centres: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
    """Index of each row's nearest centre (Euclidean), int64: the largest
    x . c - |c|^2 / 2, one matrix product per chunk of rows."""
    half_norm = (centres * centres).sum(axis=1) / 2
    out = np.empty(len(x), np.int64)
    for a in range(0, len(x), chunk):
        out[a : a + chunk] = np.argmax(x[a : a + chunk] @ centres.T - half_norm, axis=1)
    return out


def kmeans(x: np.ndarray, k: int, iterations: int, rng) -> np.ndarray:
    """Centres (min(k, len(x)), D) of Lloyd's k-means from ``k`` rows drawn at random;
    a centre left without rows takes a random row again."""
    k = min(k, len(x))
    centres = x[rng.choice(len(x), k, replace=False)]
    for _ in range(iterations):
        label = nearest(x, centres)
        count = np.bincount(label, minlength=k)
        sums = np.stack([np.bincount(label, weights=col, minlength=k) for col in x.T], axis=1)
        empty = count == 0
        centres = (sums / np.maximum(count, 1)[:, None]).astype(np.float32)
        centres[empty] = x[rng.choice(len(x), int(empty.sum()))]
    return centres


def vocabulary(sample: np.ndarray, branching: int, iterations: int, rng) -> list[np.ndarray]:
    """The two-level tree: ``[top, cell_0, cell_1, ...]``, the first-level centres
    (b, 128) and each cell's words (at most b, 128 each)."""
    top = kmeans(sample, branching, iterations, rng)
    cell = nearest(sample, top)
    return [top] + [kmeans(sample[cell == c], branching, iterations, rng) for c in range(len(top))]


def words(x: np.ndarray, vocab: list[np.ndarray], branching: int) -> np.ndarray:
    """The word of each RootSIFT row of ``x``: cell * branching + word in the cell."""
    cell = nearest(x, vocab[0])
    out = np.empty(len(x), np.int64)
    for c in np.unique(cell):
        at = np.flatnonzero(cell == c)
        out[at] = c * branching + nearest(x[at], vocab[1 + c])
    return out


def _sample(db: Path, names: list[str], size: int, rng) -> tuple[np.ndarray, int]:
    """About ``size`` RootSIFT descriptors drawn evenly from every photo, and how many
    the photos have in all."""
    with contextlib.closing(sqlite3.connect(_read_only(db), uri=True)) as con:
        total = con.execute("SELECT SUM(rows) FROM descriptors").fetchone()[0] or 0
    share = min(1.0, size / max(total, 1))
    sample = np.empty((int(share * total) + len(names), 128), np.float32)
    filled = 0
    for _, d in read_sift(db, names):
        take = int(np.ceil(share * len(d)))
        sample[filled : filled + take] = root_sift(d[np.sort(rng.choice(len(d), take, replace=False))])
        filled += take
    sample = sample[:filled]
    if len(sample) < 2:
        raise SfmpairsError(f"{db}: too few SIFT features for a vocabulary ({len(sample)})")
    return sample, total


def _batches(photos, descriptors: int):
    """The descriptors of consecutive photos (``(i, d)`` in order) in lists of about
    ``descriptors`` rows, one entry a photo."""
    batch, rows = [], 0
    for _, d in photos:
        batch.append(d)
        rows += len(d)
        if rows >= descriptors:
            yield batch
            batch, rows = [], 0
    if batch:
        yield batch


def bow_descriptors(db: Path, names: list[str], conf: dict | None = None) -> sparse.csr_matrix:
    """(N, b ** 2) sparse, rows L2-normalised: each photo ``names[i]``'s tf-idf
    weighted histogram of visual words, from its SIFT features in COLMAP's database
    ``db``; the vocabulary is learnt from these photos (``conf``: :data:`default_conf`),
    with branching b = sqrt(descriptors / DESCRIPTORS_PER_WORD), 2 to ``branching``."""
    conf = {**default_conf, **(conf or {})}
    rng = np.random.default_rng(conf["seed"])
    sample, total = _sample(db, names, conf["sample"], rng)
    # about DESCRIPTORS_PER_WORD descriptors a word: a vocabulary much larger than the
    # collection's features leaves most words to one photo, and similar photos share none
    b = int(np.clip(np.sqrt(total / DESCRIPTORS_PER_WORD), 2, conf["branching"]))
    logger.info("vocabulary of up to %d words from %d SIFT descriptors", b * b, len(sample))
    vocab = vocabulary(sample, b, conf["iterations"], rng)
    del sample
    # the tf rows, CSR: each photo's distinct words and how often it has each
    indptr, word, count = [0], [], []
    photos = progress(read_sift(db, names), total=len(names), desc="bag of words", unit="photo")
    for batch in _batches(photos, QUANTISE_BATCH):
        # one quantisation of many photos' descriptors: the tree's per-cell products stay large
        w_all = words(root_sift(np.concatenate(batch)), vocab, b)
        for w in np.split(w_all, np.cumsum([len(d) for d in batch])[:-1]):
            w, c = np.unique(w, return_counts=True)
            word.append(w.astype(np.int32))
            count.append(c.astype(np.float32))
            indptr.append(indptr[-1] + len(w))
    tf = sparse.csr_matrix((np.concatenate(count), np.concatenate(word), np.array(indptr)), (len(names), b * b))
    photos_with_word = np.bincount(tf.indices, minlength=b * b)
    idf = np.log(len(names) / np.maximum(photos_with_word, 1)).astype(np.float32)
    tf.data *= idf[tf.indices]
    row = np.repeat(np.arange(len(names)), np.diff(tf.indptr))
    norm = np.sqrt(np.bincount(row, weights=tf.data.astype(np.float64) ** 2, minlength=len(names)))
    tf.data /= np.maximum(norm, 1e-12)[row].astype(np.float32)  # a photo without features: a row of zeros
    return tf
