"""Evaluation: AP worked by hand (junk included), the revisited protocol, the pair-file
val split, alpha-QE, the command."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from sfmpairs import SfmpairsError
from sfmpairs.retrieval.evaluate import (
    alpha_query_expansion,
    average_precision,
    evaluate,
    load_gnd,
    mean_average_precision,
    rank,
    revisited_protocols,
)


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


def _ap_by_hand(order, positives, junk) -> float:
    """The revisited protocol's AP, written out: drop the junk from the ranking, then
    average over the positives the mean of the precision before and at each one."""
    ranked = [j for j in order if j not in set(junk)]
    hits = [r for r, j in enumerate(ranked) if j in set(positives)]
    return sum(((k / r if r else 1.0) + (k + 1) / (r + 1)) / 2 for k, r in enumerate(hits)) / len(positives)


def test_revisited_protocol_by_hand():
    # query 0: easy {d0}, hard {d1}, junk {d2}; its ranking is d3, d0, d2, d1
    db = np.eye(4, 4, dtype=np.float32)
    q = np.array([[0.5, 0.05, 0.3, 0.8]], np.float32)
    ranks = rank(q, db)
    assert ranks[0].tolist() == [3, 0, 2, 1]
    setups = revisited_protocols([{"easy": [0], "hard": [1], "junk": [2], "bbx": [0, 0, 10, 10]}])
    # easy: positives {d0}, junk {d1, d2}: ranking d3, d0 -> AP (0/1 + 1/2) / 2
    m, _, mpr, _ = mean_average_precision(ranks, *setups["easy"])
    assert m == pytest.approx(0.25) and mpr == pytest.approx([0.0, 0.5, 0.5])
    # medium: positives {d0, d1}, junk {d2}: ranking d3, d0, d1
    m, *_ = mean_average_precision(ranks, *setups["medium"])
    assert m == pytest.approx(((0 + 1 / 2) / 2 + (1 / 2 + 2 / 3) / 2) / 2)
    # hard: positives {d1}, junk {d0, d2}: ranking d3, d1
    m, *_ = mean_average_precision(ranks, *setups["hard"])
    assert m == pytest.approx(0.25)


def test_bad_ground_truth_is_refused(tmp_path):
    with open(tmp_path / "bad.pkl", "wb") as fh:
        pickle.dump({"imlist": []}, fh)
    with pytest.raises(SfmpairsError, match="ground truth needs"):
        load_gnd(tmp_path / "bad.pkl")


def _texture(rng, size, colour):
    """A smooth random texture (W, H) tinted ``colour``: random 6x5 noise, upscaled."""
    from PIL import Image

    small = (rng.random((5, 6, 3)) * 255 * np.asarray(colour)).astype(np.uint8)
    return Image.fromarray(small).resize(size, Image.BILINEAR)


def test_gnd_queries_are_cropped_to_their_box(tmp_path, monkeypatch):
    """evaluate --gnd --model crops each query to its bbx before extracting: the query
    descriptors it ranks with are those of the photo cropped by hand with PIL and
    extracted uncropped, and each setup's mAP is the one worked out from them."""
    import torch
    from PIL import Image

    import sfmpairs.retrieval.evaluate as ev
    from sfmpairs.retrieval.extract import extract_descriptors
    from sfmpairs.retrieval.network import build_network, save_checkpoint

    rng = np.random.default_rng(5)
    photos = tmp_path / "photos"
    photos.mkdir()
    colours = [(1, 0.3, 0.3), (0.3, 1, 0.3), (0.3, 0.3, 1), (1, 1, 0.3), (0.3, 1, 1), (1, 0.3, 1)]
    for k, c in enumerate(colours):
        _texture(rng, (96, 72), c).save(photos / f"d{k}.jpg", quality=95)
    # each query: a database-like texture inside its box, something else around it
    boxes = [[16, 8, 80, 56], [40, 20, 110, 84]]
    for k, (box, inside, outside) in enumerate(zip(boxes, [0, 3], [(1, 1, 1), (0.2, 0.2, 0.2)])):
        q = _texture(rng, (128, 96), outside)
        q.paste(_texture(rng, (box[2] - box[0], box[3] - box[1]), colours[inside]), tuple(box[:2]))
        q.save(photos / f"q{k}.jpg", quality=95)
    gnd = [
        {"easy": [0, 1], "hard": [2], "junk": [5], "bbx": boxes[0]},
        {"easy": [3], "hard": [4, 0], "junk": [], "bbx": boxes[1]},
    ]
    with open(tmp_path / "gnd.pkl", "wb") as fh:
        pickle.dump({"imlist": [f"d{k}" for k in range(6)], "qimlist": ["q0", "q1"], "gnd": gnd}, fh)
    torch.manual_seed(0)
    net = build_network({"arch": "resnet18", "pool": "gem", "image_size": 64}).eval()
    save_checkpoint(tmp_path / "m.pt", net)

    # the reference: crop by hand, save losslessly, extract without boxes
    for k, box in enumerate(boxes):
        with Image.open(photos / f"q{k}.jpg") as im:
            im.convert("RGB").crop(tuple(box)).save(photos / f"q{k}-crop.png")
    opts = dict(image_size=64, precision="fp32", workers=0)
    dd, _ = extract_descriptors(net, photos, [f"d{k}.jpg" for k in range(6)], **opts)
    qd, _ = extract_descriptors(net, photos, ["q0-crop.png", "q1-crop.png"], **opts)
    whole, _ = extract_descriptors(net, photos, ["q0.jpg", "q1.jpg"], **opts)
    assert np.linalg.norm(qd - whole, axis=1).min() > 0.1  # the crop matters for these photos

    seen = []
    monkeypatch.setattr(ev, "rank", lambda q, d: seen.append((q, d)) or np.argsort(-(q @ d.T), axis=1))
    r = evaluate(
        tmp_path / "r.json",
        gnd=tmp_path / "gnd.pkl",
        model=tmp_path / "m.pt",
        images_root=photos,
        image_size=64,
        precision="fp32",
        workers=0,
        device="cpu",
    )
    ((used_q, used_d),) = seen
    np.testing.assert_allclose(used_d, dd, atol=1e-5)
    np.testing.assert_allclose(used_q, qd, atol=1e-5)
    assert r["queries_cropped"] == 2
    order = np.argsort(-(qd @ dd.T), axis=1)
    for setup, ok, junk in (
        ("easy", ["easy"], ["junk", "hard"]),
        ("medium", ["easy", "hard"], ["junk"]),
        ("hard", ["hard"], ["junk", "easy"]),
    ):
        aps = [
            _ap_by_hand(order[i], [j for k in ok for j in g[k]], [j for k in junk for j in g[k]])
            for i, g in enumerate(gnd)
        ]
        assert r[setup]["mAP"] == pytest.approx(np.mean(aps), abs=1e-9), setup
        assert r[setup]["queries"] == 2
        uncropped = [
            _ap_by_hand(o, [j for k in ok for j in g[k]], [j for k in junk for j in g[k]])
            for o, g in zip(np.argsort(-(whole @ dd.T), axis=1), gnd)
        ]
        assert abs(np.mean(uncropped) - np.mean(aps)) > 0.02, setup  # uncropped queries score otherwise
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["protocol"] == "revisited" and report["medium"]["mAP"] == pytest.approx(r["medium"]["mAP"])

    # a query without a box is used whole, the others are still cropped
    del gnd[1]["bbx"]
    with open(tmp_path / "gnd.pkl", "wb") as fh:
        pickle.dump({"imlist": [f"d{k}" for k in range(6)], "qimlist": ["q0", "q1"], "gnd": gnd}, fh)
    seen.clear()
    r = evaluate(
        tmp_path / "r2.json",
        gnd=tmp_path / "gnd.pkl",
        model=tmp_path / "m.pt",
        images_root=photos,
        image_size=64,
        precision="fp32",
        workers=0,
        device="cpu",
    )
    ((used_q, _),) = seen
    np.testing.assert_allclose(used_q, [qd[0], whole[1]], atol=1e-5)
    assert r["queries_cropped"] == 1


def test_alpha_query_expansion():
    db = np.eye(3)
    q = np.array([[0.8, 0.6, 0.0]])
    out = alpha_query_expansion(q, db, 1, 3.0)
    expect = q + 0.8**3 * db[0]
    np.testing.assert_allclose(out, expect / np.linalg.norm(expect))
    np.testing.assert_array_equal(alpha_query_expansion(q, db, 0, 3.0), q)


def test_val_split_evaluation(tmp_path):
    """Per-query AP and mAP of the val split against the protocol worked out here from
    the SfM store's observations (read with h5py): positives share at least
    ``min_covisible`` points with the query, junk is the rest of its cluster and the
    query itself. The descriptors mix each query's positives, junk and other clusters in
    the ranking, so that a wrong positive or junk set changes the result."""
    import h5py

    from conftest import make_models
    from sfmpairs.mining.mine import mine
    from sfmpairs.retrieval.descriptors import write_descriptors
    from sfmpairs.sfm_io.ingest import ingest

    make_models(tmp_path / "colmap", seed=4, scenes=4, images=20, points=800)
    ingest([tmp_path / "colmap"], tmp_path / "sfm.h5")
    mine(tmp_path / "sfm.h5", tmp_path / "p.h5", val_fraction=0.5, queries_per_cluster=0)
    with h5py.File(tmp_path / "sfm.h5") as f:
        names = f["images/name"].asstr()[()]
        cluster = f["images/cluster"][()]
        indptr, point = f["observations/indptr"][()], f["observations/point"][()]
    with h5py.File(tmp_path / "p.h5") as f:
        queries, database = f["val/query"][()], f["val/images"][()]
        pool, passes = f["val/pool"][()], f["val/pool_passes"][()]
    points = [set(point[a:b].tolist()) for a, b in zip(indptr[:-1], indptr[1:])]
    # the cluster's direction, blurred with noise: positives, junk and negatives interleave
    rng = np.random.default_rng(0)
    d = np.concatenate([np.eye(4)[cluster], rng.normal(scale=0.6, size=(len(names), 12))], axis=1)
    d = (d / np.linalg.norm(d, axis=1, keepdims=True)).astype(np.float32)
    write_descriptors(tmp_path / "d.h5", names, d, {})
    sim = d[queries] @ d[database].T

    def expected(positives_of):
        aps = {}
        for i, q in enumerate(queries):
            pos = positives_of(i, q)
            junk = [j for j in database if cluster[j] == cluster[q] and j not in pos]  # q too
            aps[names[q]] = _ap_by_hand(database[np.argsort(-sim[i])], pos, junk) if pos else None
        return aps

    def covisible(k):
        return lambda i, q: [j for j in database if j != q and len(points[q] & points[j]) >= k]

    for kwargs, positives_of in (
        ({}, covisible(1)),
        ({"min_covisible": 100}, covisible(100)),
        ({"positives": "relaxed"}, lambda i, q: list(pool[i][passes[i]])),
    ):
        want = expected(positives_of)
        r = evaluate(
            tmp_path / "r.json", pairs=tmp_path / "p.h5", descriptors=tmp_path / "d.h5", overwrite=True, **kwargs
        )
        assert set(r["per_query_ap"]) == set(want), kwargs
        for name, ap in want.items():
            assert (
                (r["per_query_ap"][name] is None)
                if ap is None
                else r["per_query_ap"][name] == pytest.approx(ap, abs=1e-12)
            ), (kwargs, name)
        m = np.mean([a for a in want.values() if a is not None])
        assert r["mAP"] == pytest.approx(m, abs=1e-12) and 0.3 < m < 0.95, kwargs
        assert r["queries_with_positives"] == sum(a is not None for a in want.values())
    # these descriptors tell the ground truths apart: with 100 shared points fewer
    # queries' positives and another mAP; had junk counted as negatives, another mAP too
    assert expected(covisible(100)) != expected(covisible(1))
    no_junk = [_ap_by_hand(database[np.argsort(-sim[i])], covisible(1)(i, q), [q]) for i, q in enumerate(queries)]
    assert np.mean(no_junk) < np.mean([a for a in expected(covisible(1)).values()]) - 0.02
    with pytest.raises(SfmpairsError, match="one of --pairs or --gnd"):
        evaluate(tmp_path / "x.json", descriptors=tmp_path / "d.h5")


class _RunsCode:
    """Unpickling this runs ``os.system`` (what a crafted gnd_*.pkl would do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def _real_format_gnd(rng) -> dict:
    """Shaped like roxford5k's gnd_roxford5k.pkl: numpy arrays of indices and boxes."""
    imlist = [f"oxford_{k:06d}" for k in range(20)]
    gnd = [
        {
            "bbx": np.array([10.5, 20.0, 300.25, 400.0]),
            "easy": rng.choice(20, 3, replace=False),
            "hard": np.array([4, 5], np.int64),
            "junk": np.array([], np.int64),
        }
        for _ in range(3)
    ]
    return {"imlist": imlist, "qimlist": ["q0", "q1", "q2"], "gnd": gnd}


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_real_format_ground_truth_loads(tmp_path, protocol):
    cfg = _real_format_gnd(np.random.default_rng(protocol))
    with open(tmp_path / "gnd.pkl", "wb") as fh:
        pickle.dump(cfg, fh, protocol=protocol)
    out = load_gnd(tmp_path / "gnd.pkl")
    assert out["imlist"] == cfg["imlist"] and out["qimlist"] == cfg["qimlist"]
    for a, b in zip(out["gnd"], cfg["gnd"]):
        for key in ("bbx", "easy", "hard", "junk"):
            np.testing.assert_array_equal(a[key], b[key])


def test_numpy1_ground_truth_loads(tmp_path):
    """A pickle written by numpy 1 names numpy.core.multiarray (numpy 2: numpy._core)."""
    data = pickle.dumps(_real_format_gnd(np.random.default_rng(0)), protocol=2)
    if b"numpy._core.multiarray" in data:
        data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    (tmp_path / "gnd.pkl").write_bytes(data)
    with __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("ignore", DeprecationWarning)
        out = load_gnd(tmp_path / "gnd.pkl")
    np.testing.assert_array_equal(out["gnd"][0]["hard"], [4, 5])


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_crafted_ground_truth_runs_nothing(tmp_path, protocol):
    from click.testing import CliRunner

    from sfmpairs.cli import main

    marker = tmp_path / "marker"
    cfg = _real_format_gnd(np.random.default_rng(0))
    cfg["gnd"][0]["junk"] = _RunsCode(marker)
    with open(tmp_path / "gnd.pkl", "wb") as fh:
        pickle.dump(cfg, fh, protocol=protocol)
    with pytest.raises(
        SfmpairsError, match=r"gnd.pkl: not a ground-truth pickle \(refuses to load '(posix|os)\.system'"
    ):
        load_gnd(tmp_path / "gnd.pkl")
    assert not marker.exists()
    r = CliRunner().invoke(
        main, ["evaluate", "--gnd", str(tmp_path / "gnd.pkl"), "--arch", "resnet18", "-o", str(tmp_path / "r.json")]
    )
    assert r.exit_code == 2 and not marker.exists() and not (tmp_path / "r.json").exists()
    errors = [line for line in r.stderr.splitlines() if line.startswith("sfmpairs: error:")]
    assert len(errors) == 1 and "gnd.pkl" in errors[0] and "Traceback" not in r.stderr
    pickle.loads(pickle.dumps(_RunsCode(marker)))  # the same object, unpickled freely, does run
    assert marker.exists()


@pytest.mark.parametrize(
    "cfg,expect",
    [
        ({"imlist": ["a"], "qimlist": ["q"], "gnd": 5}, "gnd must be a list"),
        ({"imlist": ["a"], "qimlist": ["q"], "gnd": [[1]]}, "entry 0 needs easy"),
        ({"imlist": ["a"], "qimlist": ["q"], "gnd": [{"easy": [3], "hard": [], "junk": []}]}, "indices into imlist"),
        ({"imlist": ["a"], "qimlist": ["q"], "gnd": [{"easy": "x", "hard": [], "junk": []}]}, "indices into imlist"),
        ({"imlist": [1], "qimlist": ["q"], "gnd": []}, "imlist must be a list of image names"),
        ({"imlist": ["a"], "qimlist": ["q"], "gnd": [{"easy": [0], "hard": [], "junk": [], "bbx": [1]}]}, "bbx"),
    ],
)
def test_malformed_ground_truth_is_one_line(tmp_path, cfg, expect):
    with open(tmp_path / "g.pkl", "wb") as fh:
        pickle.dump(cfg, fh)
    with pytest.raises(SfmpairsError, match=expect):
        load_gnd(tmp_path / "g.pkl")


def _picture_run(small_world, tmp_path):
    """evaluate --pairs --descriptors -o out/r.json --picture out/p.png, in this process."""
    import h5py

    from conftest import cli
    from sfmpairs.retrieval.descriptors import write_descriptors

    with h5py.File(small_world / "pairs.h5") as f:
        names = f["images/name"].asstr()[()]
    d = np.random.default_rng(0).normal(size=(len(names), 8)).astype(np.float32)
    tmp_path.mkdir(exist_ok=True)
    write_descriptors(tmp_path / "d.h5", names, d / np.linalg.norm(d, axis=1, keepdims=True), {})
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    args = ["evaluate", "--pairs", small_world / "pairs.h5", "--descriptors", tmp_path / "d.h5", "-o", out / "r.json"]
    return cli(*args, "--picture", out / "p.png", "--images-root", small_world / "photos", "-q"), out


def test_a_failed_picture_leaves_no_report(small_world, tmp_path, monkeypatch):
    """The picture cannot be written (a full disk, half-way through its PNG): one line
    naming the picture, exit 2, and neither the report nor the picture nor a temporary
    file is left (the report used to be published before the picture was drawn)."""
    import errno

    from matplotlib.figure import Figure

    from conftest import one_error_line

    def full_disk(self, fname, *args, **kwargs):
        with open(fname, "wb") as fh:
            fh.write(b"\x89PNG half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", full_disk)
    r, out = _picture_run(small_world, tmp_path)
    one_error_line(r, "p.png", "No space left on device")
    assert sorted(p.name for p in out.iterdir()) == []


def test_a_report_that_cannot_be_published_takes_its_picture_back(small_world, tmp_path, monkeypatch):
    """The other way round: the picture is published, then the report cannot be (another
    run wrote it meanwhile): one line, and the picture is removed with it; the other
    run's report is kept. Without the failure both are written."""
    import sfmpairs.plot
    from conftest import one_error_line

    drawn = sfmpairs.plot.retrieval_figure

    def and_another_run(rows, output, **kwargs):
        path = drawn(rows, output, **kwargs)
        (Path(output).parent / "r.json").write_text("another run's")
        return path

    r, out = _picture_run(small_world, tmp_path / "fine")
    assert r.exit_code == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["p.png", "r.json"]
    monkeypatch.setattr(sfmpairs.plot, "retrieval_figure", and_another_run)
    r, out = _picture_run(small_world, tmp_path)
    one_error_line(r, "r.json", "written meanwhile")
    assert sorted(p.name for p in out.iterdir()) == ["r.json"] and (out / "r.json").read_text() == "another run's"


@pytest.mark.parametrize("gone", [["gt_co_observed"], ["gt_image", "gt_co_observed"]])
def test_val_ground_truth_cut_short_is_one_line(small_world, tmp_path, gone):
    """A pair file (valid HDF5) whose val ground truth has its index (val/gt_indptr) but
    not its tables (a flipped byte of a link name did it; found by bench_faults): one
    line naming the pair file and the missing table, not a KeyError, and no report."""
    import h5py

    from conftest import cli, one_error_line
    from sfmpairs.retrieval.descriptors import write_descriptors

    pairs = tmp_path / "pairs.h5"
    pairs.write_bytes((small_world / "pairs.h5").read_bytes())
    with h5py.File(pairs, "r+") as f:
        names = f["images/name"].asstr()[()]
        for key in gone:
            del f[f"val/{key}"]
        if "gt_image" in gone:  # an index of nothing: what check_pairs lets by
            n = len(f["val/gt_indptr"])
            del f["val/gt_indptr"]
            f["val/gt_indptr"] = np.zeros(n, np.int64)
    d = np.random.default_rng(0).normal(size=(len(names), 8)).astype(np.float32)
    write_descriptors(tmp_path / "d.h5", names, d / np.linalg.norm(d, axis=1, keepdims=True), {})
    r = cli("evaluate", "--pairs", pairs, "--descriptors", tmp_path / "d.h5", "-o", tmp_path / "r.json")
    one_error_line(r, f"{pairs}: corrupt pair file (val/gt_indptr without val/{gone[0]})")
    assert not (tmp_path / "r.json").exists()
