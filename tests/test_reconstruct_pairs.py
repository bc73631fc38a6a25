"""Pair selection for ``reconstruct --matcher retrieval``, against brute force; the new
settings on the command line and their checks. Quick, no photos reconstructed."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from sfmpairs import SfmpairsError
from sfmpairs.sfm_io.pairs_from_retrieval import (
    most_similar,
    retrieval_pairs,
    sequential_pairs,
    two_hop_pairs,
    unique_pairs,
    write_pair_list,
)


def _unit(n, d, seed):
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("n,k,chunk", [(50, 5, 1024), (50, 5, 7), (9, 8, 4), (9, 20, 3), (2, 1, 1)])
def test_most_similar_is_the_brute_force_top_k(n, k, chunk):
    desc = _unit(n, 16, seed=n + k)
    got = most_similar(desc, k, chunk=chunk)
    for i in range(n):  # brute force: every other photo, by similarity, most similar first
        others = sorted((j for j in range(n) if j != i), key=lambda j: -float(desc[i] @ desc[j]))
        assert got[i].tolist() == others[: min(k, n - 1)]


def test_sequential_pairs_by_hand():
    assert sequential_pairs(5, 2).tolist() == [[0, 1], [0, 2], [1, 2], [1, 3], [2, 3], [2, 4], [3, 4]]
    assert sequential_pairs(5, 0).shape == (0, 2) and sequential_pairs(1, 3).shape == (0, 2)
    assert sequential_pairs(3, 10).tolist() == [[0, 1], [0, 2], [1, 2]]


def test_retrieval_pairs_are_the_union_of_neighbours_and_sequence():
    """Two groups of photos with opposite descriptors: with k = 2 every pair stays in
    its group; the sequence adds the pairs across the groups' boundary."""
    base = np.array([[1.0, 0.0], [-1.0, 0.0]], np.float32)
    desc = base[[0, 0, 0, 1, 1, 1]] + np.random.default_rng(0).normal(0, 0.01, (6, 2)).astype(np.float32)
    desc /= np.linalg.norm(desc, axis=1, keepdims=True)
    within = {(a, b) for g in ([0, 1, 2], [3, 4, 5]) for a, b in itertools.combinations(g, 2)}
    assert {tuple(p) for p in retrieval_pairs(desc, 2).tolist()} == within
    assert {tuple(p) for p in retrieval_pairs(desc, 2, sequential=1).tolist()} == within | {(2, 3)}
    pairs = retrieval_pairs(_unit(30, 8, 1), 4, sequential=3)
    assert (pairs[:, 0] < pairs[:, 1]).all() and len(np.unique(pairs, axis=0)) == len(pairs)
    assert len(pairs) <= 30 * 4 + 30 * 3


@pytest.mark.parametrize("k", [1, 3, 100])
def test_two_hop_pairs_against_brute_force(k):
    """Pairs not matched yet of photos with a verified neighbour in common, the k with
    the most common neighbours per photo (ties by index), counted by brute force."""
    n, rng = 25, np.random.default_rng(k)
    everything = np.array(list(itertools.combinations(range(n), 2)))
    matched = everything[rng.random(len(everything)) < 0.25]
    verified = matched[rng.random(len(matched)) < 0.6]
    nb = {i: set() for i in range(n)}
    for a, b in verified.tolist():
        nb[a].add(b)
        nb[b].add(a)
    done = {tuple(p) for p in matched.tolist()}
    want = set()
    for i in range(n):
        common = {j: len(nb[i] & nb[j]) for j in range(n) if j != i and (min(i, j), max(i, j)) not in done}
        best = sorted((j for j, c in common.items() if c > 0), key=lambda j: (-common[j], j))[:k]
        want |= {(min(i, j), max(i, j)) for j in best}
    got = two_hop_pairs(verified, matched, n, k)
    assert {tuple(p) for p in got.tolist()} == want and len(got) == len(want)
    assert two_hop_pairs(np.empty((0, 2), np.int64), matched, n, k).shape == (0, 2)


def test_unique_pairs_orders_and_drops_repeats():
    got = unique_pairs(np.array([[3, 1], [1, 3], [2, 2], [0, 4]]), np.array([[4, 0]]))
    assert got.tolist() == [[0, 4], [1, 3]]


def test_pair_list_is_colmaps_format(tmp_path):
    write_pair_list(tmp_path / "p.txt", ["a/1.jpg", "b.jpg", "c.jpg"], np.array([[0, 1], [1, 2]]))
    assert (tmp_path / "p.txt").read_text() == "a/1.jpg b.jpg\nb.jpg c.jpg\n"
    with pytest.raises(SfmpairsError, match="space"):
        write_pair_list(tmp_path / "q.txt", ["a 1.jpg", "b.jpg"], np.array([[0, 1]]))


@pytest.mark.parametrize(
    "options,message",
    [
        ({"num_neighbours": 0}, "--num-neighbours"),
        ({"sequential": -1}, "--sequential"),
        ({"expand": -1}, "--expand"),
        ({"min_model_size": 0}, "--min-model-size"),
        ({"matcher": "nope"}, "unknown --matcher"),
        ({"matcher": "retrieval", "checkpoint": "missing.pt"}, "missing.pt: no such checkpoint"),
        ({"matcher": "retrieval", "descriptor": "bow", "checkpoint": "any.pt"}, "--checkpoint is for --descriptor"),
        ({"descriptor": "vlad"}, "unknown --descriptor"),
        ({"vocabulary": 1}, "--vocabulary must be at least 2"),
        ({"seed": -1}, "--seed must be 0 or more"),
        ({"device": "gpu"}, "unknown --device"),
    ],
)
def test_bad_reconstruct_settings_are_one_line_errors(tmp_path, options, message):
    from sfmpairs.sfm_io.reconstruct import reconstruct
    from sfmpairs.synthetic.world import synth

    if not (tmp_path / "w").exists():
        synth(tmp_path / "w", clusters=1, images_per_cluster=2, image_size=(64, 48))
    with pytest.raises(SfmpairsError, match=message):
        reconstruct(tmp_path / "w" / "cluster_00" / "images", tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


def test_command_line_offers_the_settings():
    from click.testing import CliRunner

    from sfmpairs.cli import main

    text = CliRunner().invoke(main, ["reconstruct", "--help"]).output
    for option in (
        "retrieval",
        "--num-neighbours",
        "--sequential",
        "--expand",
        "--descriptor",
        "--vocabulary",
        "--checkpoint",
        "--min-model-size",
    ):
        assert option in text, option
    text = CliRunner().invoke(main, ["ingest", "--help"]).output
    assert "--shared-names" in text and "largest" in text


def test_a_photo_name_with_a_space_is_refused_before_any_work(tmp_path):
    """COLMAP's pair list splits at spaces: --matcher retrieval refuses such names at
    once (not after hours of feature extraction); other matchers take them."""
    from sfmpairs.sfm_io.reconstruct import reconstruct
    from sfmpairs.synthetic.world import synth

    synth(tmp_path / "w", clusters=1, images_per_cluster=3, image_size=(64, 48))
    images = tmp_path / "w" / "cluster_00" / "images"
    first = sorted(images.iterdir())[0]
    (images / "Camera Roll").mkdir()
    first.rename(images / "Camera Roll" / first.name)
    with pytest.raises(SfmpairsError, match=r"Camera Roll/.*a photo name with a space.*1 such photos"):
        reconstruct(images, tmp_path / "out", matcher="retrieval")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
