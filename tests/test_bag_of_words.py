"""The bag of visual words of ``reconstruct --matcher retrieval`` against brute force
(scipy's distances) and against photos whose places are known."""

from __future__ import annotations

import contextlib
import sqlite3

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from sfmpairs import SfmpairsError
from sfmpairs.sfm_io import bag_of_words
from sfmpairs.sfm_io.bag_of_words import DESCRIPTORS_PER_WORD, bow_descriptors, kmeans, nearest, vocabulary, words


def test_nearest_is_the_brute_force_nearest_centre():
    rng = np.random.default_rng(0)
    x, centres = rng.normal(size=(3_000, 16)).astype(np.float32), rng.normal(size=(70, 16)).astype(np.float32)
    np.testing.assert_array_equal(nearest(x, centres, chunk=512), cdist(x, centres).argmin(axis=1))


def test_kmeans_centres_are_the_means_of_their_points():
    """Five separated blobs: after k-means each centre is the mean of the points
    nearest to it (Lloyd's fixed point), by brute force."""
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(loc=10 * i, size=(200, 8)) for i in range(5)]).astype(np.float32)
    centres = kmeans(x, 5, 20, rng)
    label = cdist(x, centres).argmin(axis=1)
    for c in range(5):
        np.testing.assert_allclose(centres[c], x[label == c].mean(axis=0), atol=1e-4)


def test_kmeans_asked_for_more_centres_than_points():
    x = np.eye(3, dtype=np.float32)
    assert kmeans(x, 10, 3, np.random.default_rng(0)).shape == (3, 3)


def test_words_are_the_nearest_leaf_in_the_nearest_cell():
    rng = np.random.default_rng(2)
    sample = rng.random((4_000, 128)).astype(np.float32)
    vocab = vocabulary(sample, 6, 4, rng)
    x = rng.random((500, 128)).astype(np.float32)
    cell = cdist(x, vocab[0]).argmin(axis=1)
    expect = [c * 6 + cdist(x[i : i + 1], vocab[1 + c]).argmin() for i, c in enumerate(cell)]
    np.testing.assert_array_equal(words(x, vocab, 6), expect)


def _database(path, photos: list[np.ndarray]) -> list[str]:
    """A COLMAP-like database holding only what the bag of words reads: images and
    their SIFT descriptors (uint8, n x 128). Ids in reverse of the names' order."""
    names = [f"photo_{i:03d}.jpg" for i in range(len(photos))]
    with contextlib.closing(sqlite3.connect(path)) as con:
        con.execute("CREATE TABLE images (image_id INTEGER PRIMARY KEY, name TEXT)")
        con.execute("CREATE TABLE descriptors (image_id INTEGER PRIMARY KEY, rows INTEGER, cols INTEGER, data BLOB)")
        for i, (name, d) in enumerate(zip(names, photos)):
            con.execute("INSERT INTO images VALUES (?, ?)", (len(photos) - i, name))
            con.execute("INSERT INTO descriptors VALUES (?, ?, ?, ?)", (len(photos) - i, len(d), 128, d.tobytes()))
        con.commit()
    return names


def _places(rng, places=3, per_place=12, common=0):
    """Photos of ``places`` places: each place has 30 patterns of its own (peaked, as
    SIFT descriptors are), and each of its photos noisy copies of 20 of them; every
    photo also holds ``common`` copies of one pattern that all places share (a logo on
    every photo)."""
    shared = rng.random(128) ** 6 * 255
    photos, place = [], []
    for p in range(places):
        patterns = rng.random((30, 128)) ** 6 * 255
        for _ in range(per_place):
            d = patterns[rng.choice(30, 20, replace=False)] + rng.normal(scale=3, size=(20, 128))
            d = np.concatenate([d, np.repeat(shared[None], common, axis=0)])
            photos.append(np.clip(d, 0, 255).astype(np.uint8))
            place.append(p)
    return photos, np.array(place)


def test_photos_of_a_place_are_most_alike(tmp_path):
    rng = np.random.default_rng(3)
    photos, place = _places(rng)
    names = _database(tmp_path / "database.db", photos)
    desc = bow_descriptors(tmp_path / "database.db", names)
    # the vocabulary has about DESCRIPTORS_PER_WORD descriptors a word
    b = int(np.clip(np.sqrt(sum(map(len, photos)) / DESCRIPTORS_PER_WORD), 2, 256))
    assert desc.shape == (len(photos), b * b)
    np.testing.assert_allclose(np.sqrt(desc.multiply(desc).sum(axis=1)).A.ravel(), 1, rtol=1e-5)
    sim = (desc @ desc.T).toarray()
    np.fill_diagonal(sim, -np.inf)
    best = np.argsort(-sim, axis=1)[:, :5]  # the other five photos of the place
    assert np.all(place[best] == place[:, None])


def test_a_word_in_every_photo_counts_for_nothing(tmp_path):
    """Every photo holds 100 copies of one pattern: by counts alone, photos of
    different places would be near-identical; its idf, log(N / N) = 0, removes it."""
    rng = np.random.default_rng(4)
    photos, place = _places(rng, common=100)
    names = _database(tmp_path / "database.db", photos)
    sim = (lambda d: (d @ d.T).toarray())(bow_descriptors(tmp_path / "database.db", names))
    other = place[:, None] != place[None, :]
    assert sim[other].max() < 0.2


def test_same_seed_same_descriptors_and_another_seed_another_vocabulary(tmp_path):
    rng = np.random.default_rng(5)
    photos, _ = _places(rng)
    names = _database(tmp_path / "database.db", photos)
    a, b = (bow_descriptors(tmp_path / "database.db", names, {"seed": s}) for s in (0, 0))
    assert (a != b).nnz == 0
    c = bow_descriptors(tmp_path / "database.db", names, {"seed": 1})
    assert (a != c).nnz > 0


def test_corrupt_descriptors_are_one_line_naming_the_database(tmp_path):
    rng = np.random.default_rng(6)
    photos, _ = _places(rng)
    names = _database(tmp_path / "database.db", photos)
    with contextlib.closing(sqlite3.connect(tmp_path / "database.db")) as con:
        con.execute("UPDATE descriptors SET data = ? WHERE image_id = 1", (b"\0" * 100,))
        con.commit()
    with pytest.raises(SfmpairsError, match=r"database\.db: the SIFT descriptors of photo_\d+\.jpg are not"):
        bow_descriptors(tmp_path / "database.db", names)


@pytest.mark.parametrize("size", [100, 256])
def test_descriptors_of_no_rows_that_hold_bytes_are_one_line(tmp_path, size):
    """rows = 0 with bytes in data (a damaged database, or one not COLMAP's): one line
    naming the database and the photo, not a ValueError (100 bytes) nor descriptors
    made up from the bytes (256 bytes: two rows the table does not have)."""
    rng = np.random.default_rng(8)
    photos, _ = _places(rng)
    names = _database(tmp_path / "database.db", photos)
    with contextlib.closing(sqlite3.connect(tmp_path / "database.db")) as con:
        con.execute("UPDATE descriptors SET rows = 0, data = ? WHERE image_id = 2", (b"\x01" * size,))
        con.commit()
    name = names[len(photos) - 2]  # ids are in reverse of the names' order
    with pytest.raises(SfmpairsError, match=rf"database\.db: the SIFT descriptors of {name} are not 0 x 128 bytes"):
        bow_descriptors(tmp_path / "database.db", names)


def test_photos_without_features_and_a_path_sqlite_would_misread(tmp_path):
    """A photo without SIFT features (COLMAP stores NULL) gets a row of zeros, wherever
    it is in the list; a database under a folder named with URI characters is read
    as it is, and nothing is created beside it."""
    rng = np.random.default_rng(7)
    photos, place = _places(rng)
    folder = tmp_path / "models #2 %41?"
    folder.mkdir()
    names = _database(folder / "database.db", photos + [photos[0][:0]])  # the last photo: no features
    with contextlib.closing(sqlite3.connect(folder / "database.db")) as con:
        con.execute("UPDATE descriptors SET data = NULL, rows = 0 WHERE image_id = 1")  # the first id: the last name
        con.commit()
    desc = bow_descriptors(folder / "database.db", names)
    assert desc.shape[0] == len(photos) + 1 and desc[len(photos)].nnz == 0
    sim = (desc @ desc.T).toarray()[: len(photos), : len(photos)]
    np.fill_diagonal(sim, -np.inf)
    assert np.all(place[np.argsort(-sim, axis=1)[:, :5]] == place[:, None])
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]


def _brute_force_bow(photos: list[np.ndarray], vocab: list[np.ndarray], b: int) -> np.ndarray:
    """The tf-idf rows by brute force: each photo's descriptors on their own (RootSIFT
    in float64), each its nearest first-level centre then its nearest word of that cell
    by scipy's distances, counted, weighted by log(N / photos with the word) and
    L2-normalised."""
    tf = np.zeros((len(photos), b * b))
    for i, d in enumerate(photos):
        x = d.astype(np.float64)
        x = np.sqrt(x / np.maximum(x.sum(axis=1, keepdims=True), 1e-12))
        for row, c in zip(x, cdist(x, vocab[0]).argmin(axis=1) if len(x) else []):
            tf[i, c * b + cdist(row[None], vocab[1 + c]).argmin()] += 1
    x = tf * np.log(len(photos) / np.maximum((tf > 0).sum(axis=0), 1))
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def test_photos_quantised_in_batches_keep_their_own_words(tmp_path, monkeypatch):
    """The descriptors of many photos are quantised at once, in batches of about
    QUANTISE_BATCH rows (65,536; 64 here, so that a small database makes many): photos
    that fill a batch exactly, that cross its end, one of more than two batches, photos
    without features (rows 0, or NULL as COLMAP writes) first, right after a batch's
    end and last, one of them alone in the last batch. Each photo's row is that of its
    own descriptors, against brute force."""
    rng = np.random.default_rng(11)
    sizes = [0, 37, 0, 27, 13, 0, 0, 64, 1, 63, 0, 150, 2, 0, 64, 0]
    photos = [
        np.clip(rng.random((n, 128)) ** 6 * 255 + rng.normal(scale=3, size=(n, 128)), 0, 255).astype(np.uint8)
        for n in sizes
    ]
    names = _database(tmp_path / "database.db", photos)
    with contextlib.closing(sqlite3.connect(tmp_path / "database.db")) as con:
        for i in (2, 15):  # NULL data, as COLMAP writes for a photo without features (ids: reversed)
            con.execute("UPDATE descriptors SET data = NULL WHERE image_id = ?", (len(photos) - i,))
        con.commit()
    vocabs, batches = [], []
    learn, quantise = bag_of_words.vocabulary, bag_of_words.words
    monkeypatch.setattr(bag_of_words, "vocabulary", lambda *a: vocabs.append(learn(*a)) or vocabs[-1])
    monkeypatch.setattr(bag_of_words, "words", lambda x, *a: batches.append(len(x)) or quantise(x, *a))
    monkeypatch.setattr(bag_of_words, "QUANTISE_BATCH", 64)
    desc = bow_descriptors(tmp_path / "database.db", names)
    b = round(np.sqrt(desc.shape[1]))
    want = _brute_force_bow(photos, vocabs[0], b)
    got = desc.toarray()
    assert [desc[i].nnz for i, n in enumerate(sizes) if n == 0] == [0] * sizes.count(0)
    np.testing.assert_array_equal(got != 0, want != 0)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert batches == [64, 77, 64, 150, 66, 0]  # the batches the photos were meant to make
