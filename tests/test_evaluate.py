"""Evaluation: AP worked by hand (junk included), the revisited protocol, the pair-file
val split, alpha-QE, the command."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from sfmpairs import SfmpairsError
from sfmpairs.train.evaluate import (alpha_query_expansion, average_precision, evaluate,
                                     mean_average_precision, revisited_protocols)


def test_average_precision_by_hand():
    # positives at ranks 0 and 2 of 2 positives: (1+1)/2*0.5 + (1/2+2/3)/2*0.5
    assert average_precision(np.array([0, 2]), 2) == pytest.approx(0.5 + 7 / 24)
    # a single positive at rank 3: (1/3... j=0: precision before = 0/3, at = 1/4
    assert average_precision(np.array([3]), 1) == pytest.approx((0 + 1 / 4) / 2)
    # one of two positives never retrieved
    assert average_precision(np.array([0]), 2) == pytest.approx(0.5)


def test_junk_is_removed_from_the_ranking():
    ranks = np.array([[4, 1, 2, 0, 3, 5]])  # database 0..5 ranked for one query
    # positives {0, 3}, junk {4, 2}: ranking without junk is [1, 0, 3, 5] -> positives at 1, 2
    m, aps, mpr, prs = mean_average_precision(ranks, [[0, 3]], [[4, 2]])
    expect = ((0 / 1 + 1 / 2) / 2 + (1 / 2 + 2 / 3) / 2) / 2
    assert m == pytest.approx(expect) and aps[0] == pytest.approx(expect)
    # mP@k: positives at 1-based 2 and 3; k=1 -> 0/1; k=5 -> min(3, 5) = 3 -> 2/3; k=10 too
    np.testing.assert_allclose(prs[0], [0.0, 2 / 3, 2 / 3])
    # the same without junk: positives at 3 and 4 (0-based)
    m2, *_ = mean_average_precision(ranks, [[0, 3]], [[]])
    assert m2 == pytest.approx(((0 + 1 / 4) / 2 + (1 / 4 + 2 / 5) / 2) / 2)


def test_queries_without_positives_are_left_out():
    ranks = np.array([[0, 1, 2], [2, 1, 0]])
    m, aps, _, _ = mean_average_precision(ranks, [[0], []], [[], []])
    assert m == 1.0 and np.isnan(aps[1])


def test_revisited_setups():
    gnd = [{"easy": [1], "hard": [2], "junk": [3], "bbx": [0, 0, 5, 5]}]
    setups = revisited_protocols(gnd)
    assert [list(x[0]) for x in setups["easy"][:1]] == [[1]] and sorted(setups["easy"][1][0]) == [2, 3]
    assert sorted(setups["medium"][0][0]) == [1, 2] and list(setups["medium"][1][0]) == [3]
    assert list(setups["hard"][0][0]) == [2] and sorted(setups["hard"][1][0]) == [1, 3]


def test_gnd_protocol_end_to_end(tmp_path):
    from sfmpairs.mining.pairfile import write_descriptors

    # query 0: easy {d0}, hard {d1}, junk {d2}; its ranking is d3, d0, d2, d1
    db = np.eye(4, 4, dtype=np.float32)
    q = np.array([[0.5, 0.05, 0.3, 0.8]], np.float32)
    q /= np.linalg.norm(q)
    cfg = {"imlist": ["d0", "d1", "d2", "d3"], "qimlist": ["q0"],
           "gnd": [{"easy": [0], "hard": [1], "junk": [2], "bbx": [0, 0, 10, 10]}]}
    with open(tmp_path / "gnd.pkl", "wb") as fh:
        pickle.dump(cfg, fh)
    write_descriptors(tmp_path / "d.h5", ["d0.jpg", "d1.jpg", "d2.jpg", "d3.jpg", "q0.jpg"],
                      np.concatenate([db, q]), {})
    r = evaluate(tmp_path / "r.json", gnd=tmp_path / "gnd.pkl", descriptors=tmp_path / "d.h5")
    # easy: positives {d0}, junk {d1, d2}: ranking d3, d0 -> AP (0/1 + 1/2) / 2
    assert r["easy"]["mAP"] == pytest.approx(0.25)
    # medium: positives {d0, d1}, junk {d2}: ranking d3, d0, d1
    assert r["medium"]["mAP"] == pytest.approx(((0 + 1 / 2) / 2 + (1 / 2 + 2 / 3) / 2) / 2)
    # hard: positives {d1}, junk {d0, d2}: ranking d3, d1
    assert r["hard"]["mAP"] == pytest.approx(0.25)
    assert r["easy"]["mP@k"] == pytest.approx([0.0, 0.5, 0.5])
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["protocol"] == "revisited" and set(report) >= {"easy", "medium", "hard"}
    with pytest.raises(SfmpairsError, match="ground truth needs"):
        with open(tmp_path / "bad.pkl", "wb") as fh:
            pickle.dump({"imlist": []}, fh)
        evaluate(tmp_path / "r2.json", gnd=tmp_path / "bad.pkl", descriptors=tmp_path / "d.h5")


def test_gnd_queries_are_cropped_to_their_box(tmp_path):
    """With --model, query images are cropped to bbx before extraction."""
    from PIL import Image

    from sfmpairs.train.data import load_image

    arr = np.zeros((40, 60, 3), np.uint8)
    arr[10:30, 20:50] = 200
    Image.fromarray(arr).save(tmp_path / "q.png")
    crop = load_image(tmp_path / "q.png", 100, box=(20, 10, 50, 30))
    assert tuple(crop.shape) == (3, 20, 30) and int(crop.min()) == 200


def test_alpha_query_expansion():
    db = np.eye(3)
    q = np.array([[0.8, 0.6, 0.0]])
    out = alpha_query_expansion(q, db, 1, 3.0)
    expect = q + 0.8 ** 3 * db[0]
    np.testing.assert_allclose(out, expect / np.linalg.norm(expect))
    np.testing.assert_array_equal(alpha_query_expansion(q, db, 0, 3.0), q)


def test_val_split_evaluation(tmp_path):
    from sfmpairs.demo import make_models
    from sfmpairs.mining.mine import mine
    from sfmpairs.mining.pairfile import write_descriptors
    from sfmpairs.sfm_io.ingest import ingest
    from sfmpairs.sfm_io.store import read_store

    make_models(tmp_path / "colmap", seed=4, scenes=4, images=20, points=800)
    ingest([tmp_path / "colmap"], tmp_path / "sfm.h5")
    s = read_store(tmp_path / "sfm.h5", keys=["images/name", "images/cluster"])
    names, cluster = s["images/name"], s["images/cluster"]
    mine(tmp_path / "sfm.h5", tmp_path / "p.h5", val_fraction=0.5, queries_per_cluster=0)
    # perfect descriptors: one direction per cluster -> every covisible image ranks first
    d = np.eye(4, dtype=np.float32)[cluster]
    write_descriptors(tmp_path / "perfect.h5", names, d, {})
    r = evaluate(tmp_path / "r.json", pairs=tmp_path / "p.h5", descriptors=tmp_path / "perfect.h5")
    assert r["mAP"] == pytest.approx(1.0)
    # random descriptors do worse
    rng = np.random.default_rng(0)
    d2 = rng.normal(size=d.shape).astype(np.float32)
    d2 /= np.linalg.norm(d2, axis=1, keepdims=True)
    write_descriptors(tmp_path / "random.h5", names, d2, {})
    r2 = evaluate(tmp_path / "r2.json", pairs=tmp_path / "p.h5", descriptors=tmp_path / "random.h5")
    assert r2["mAP"] < 0.9
    r3 = evaluate(tmp_path / "r3.json", pairs=tmp_path / "p.h5", descriptors=tmp_path / "perfect.h5",
                  positives="relaxed")
    assert r3["mAP"] == pytest.approx(1.0)
    with pytest.raises(SfmpairsError, match="one of --pairs or --gnd"):
        evaluate(tmp_path / "x.json", descriptors=tmp_path / "perfect.h5")
