"""``mine`` against brute force (pycolmap loops), its rules, and its bad input."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pycolmap
import pytest

from conftest import COLMAP, needs_real_data
from sfmpairs import SfmpairsError
from sfmpairs.mining.mine import mine, paper_queries_per_cluster
from sfmpairs.mining.negatives import hard_negatives
from sfmpairs.retrieval.descriptors import write_descriptors
from sfmpairs.sfm_io.ingest import ingest
from sfmpairs.sfm_io.store import read_store


def read_pairs(path) -> dict:
    out = {}
    with h5py.File(path, "r") as f:

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                out[name] = obj.asstr()[()] if h5py.check_string_dtype(obj.dtype) else obj[()]

        f.visititems(visit)
        out["attrs"] = dict(f.attrs)
    return out


def brute_force(model_dir, k, measure="depth"):
    """Pools and statistics straight from pycolmap, one pair at a time."""
    rec = pycolmap.Reconstruction(str(model_dir))
    ids = sorted(i for i, im in rec.images.items() if im.has_pose)
    ims = [rec.images[i] for i in ids]
    centres = np.array([im.projection_center() for im in ims])
    points = []  # per image: {point3D id: first xy}
    for im in ims:
        seen = {}
        for p in im.points2D:
            if p.has_point3D() and p.point3D_id not in seen:
                seen[p.point3D_id] = np.asarray(p.xy)
        points.append(seen)
    out = {}
    for q in range(len(ims)):
        d = np.linalg.norm(centres - centres[q], axis=1)
        d[q] = np.inf
        order = np.lexsort((np.arange(len(ims)), d))[: min(k, len(ims) - 1)]
        rows = []
        for i in order:
            common = sorted(set(points[q]) & set(points[i]))
            scale = np.nan
            cq, ci = rec.cameras[ims[q].camera_id], rec.cameras[ims[i].camera_id]
            no_focal = not len(cq.focal_length_idxs()) or not len(ci.focal_length_idxs())
            if common and measure == "depth" and not no_focal:  # else undefined: NaN
                fq = cq.mean_focal_length() / max(cq.width, cq.height)
                fi = ci.mean_focal_length() / max(ci.width, ci.height)
                logs = []
                for pid in common:
                    X = rec.points3D[pid].xyz
                    zq = (ims[q].cam_from_world() * X)[2]
                    zi = (ims[i].cam_from_world() * X)[2]
                    logs.append(np.log((fq / zq) / (fi / zi)))
                scale = np.exp(abs(np.median(logs)))
            elif common:

                def area(im_points, cam):
                    P = np.array([im_points[p] for p in common]) / max(cam.width, cam.height)
                    return np.ptp(P[:, 0]) * np.ptp(P[:, 1])

                a, b = area(points[q], cq), area(points[i], ci)
                if a > 0 and b > 0:
                    scale = max(np.sqrt(a / b), np.sqrt(b / a))
            rows.append((ids[i], len(common), len(common) / len(points[q]) if points[q] else 0.0, scale, d[i]))
        out[ids[q]] = rows
    return out


def check_against_brute_force(store_path, pairs_path, model_dirs, k, measure):
    s = read_store(store_path, observations=False)
    p = read_pairs(pairs_path)
    colmap_id, model = s["images/colmap_id"], s["images/model"]
    checked = 0
    for m, model_dir in enumerate(model_dirs):
        ref = brute_force(model_dir, k, measure)
        for split in ("train", "val"):
            for row, q in enumerate(p[f"{split}/query"]):
                if model[q] != m:
                    continue
                expect = ref[int(colmap_id[q])]
                pool = p[f"{split}/pool"][row]
                n = len(expect)
                assert np.all(pool[n:] == -1)
                assert [int(colmap_id[j]) for j in pool[:n]] == [e[0] for e in expect]
                assert all(model[j] == m for j in pool[:n])
                np.testing.assert_array_equal(p[f"{split}/pool_co_observed"][row, :n], [e[1] for e in expect])
                np.testing.assert_allclose(p[f"{split}/pool_inlier_ratio"][row, :n], [e[2] for e in expect], rtol=1e-15)
                np.testing.assert_allclose(
                    p[f"{split}/pool_scale_change"][row, :n], [e[3] for e in expect], rtol=0, atol=1e-6, equal_nan=True
                )
                np.testing.assert_allclose(p[f"{split}/pool_distance"][row, :n], [e[4] for e in expect], rtol=1e-12)
                checked += 1
    assert checked == sum(len(p[f"{sp}/query"]) for sp in ("train", "val"))
    return checked


@needs_real_data()
@pytest.mark.parametrize(
    "scene,k,measure",
    [
        ("statue-of-liberty", 100, "depth"),
        ("lego-batmobile", 10, "depth"),
        ("fountain-p11", 100, "depth"),
        ("eyedrop-box", 15, "bbox"),
        ("drinks-can", 12, "depth"),
        ("computer-mouse", 8, "bbox"),
        ("many-cameras-no-photos", 5, "depth"),
        ("video-submodels-no-photos/sparse/9", 9, "depth"),
    ],
)
def test_pools_and_statistics_equal_brute_force_on_real_models(scene, k, measure, tmp_path):
    model_dir = COLMAP / scene if "/sparse/" in scene else COLMAP / scene / "sparse" / "0"
    ingest([model_dir], tmp_path / "sfm.h5")
    mine(
        tmp_path / "sfm.h5",
        tmp_path / "pairs.h5",
        pool_size=k,
        queries_per_cluster=0,
        scale_measure=measure,
        strategy="max-inliers",
        val_fraction=0,
    )
    assert check_against_brute_force(tmp_path / "sfm.h5", tmp_path / "pairs.h5", [model_dir], k, measure) > 0


@pytest.mark.parametrize("measure", ["depth", "bbox"])
def test_pools_and_statistics_equal_brute_force_on_synthetic(synthetic_models, tmp_path, measure):
    dirs = [synthetic_models["shared-cameras"] / "binary", synthetic_models["per-image-cameras"] / "binary"]
    ingest(dirs, tmp_path / "sfm.h5")
    mine(
        tmp_path / "sfm.h5",
        tmp_path / "pairs.h5",
        pool_size=12,
        queries_per_cluster=0,
        scale_measure=measure,
        strategy="max-inliers",
        val_fraction=0.5,
    )
    check_against_brute_force(tmp_path / "sfm.h5", tmp_path / "pairs.h5", dirs, 12, measure)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Six synthetic scenes, ingested, with random descriptors for every image."""
    from conftest import make_models

    root = tmp_path_factory.mktemp("world")
    make_models(root / "colmap", seed=3, scenes=6, images=30, points=1500)
    ingest([root / "colmap"], root / "sfm.h5")
    names = read_store(root / "sfm.h5", observations=False)["images/name"]
    rng = np.random.default_rng(0)
    desc = rng.normal(size=(len(names), 16)).astype(np.float32)
    desc /= np.linalg.norm(desc, axis=1, keepdims=True)
    write_descriptors(root / "desc.h5", names, desc, {"schema": "sfmpairs/descriptors", "schema_version": 1})
    return root, desc


def test_whiten_command_and_info_on_its_files(world, tmp_path):
    from click.testing import CliRunner

    from sfmpairs.cli import main
    from sfmpairs.retrieval.whiten import read_whitening

    root, desc = world
    mine(root / "sfm.h5", tmp_path / "p.h5", queries_per_cluster=0, val_fraction=0.34)
    r = CliRunner().invoke(
        main,
        [
            "whiten",
            "--descriptors",
            str(root / "desc.h5"),
            "--pairs",
            str(tmp_path / "p.h5"),
            "--method",
            "pca",
            "--dim",
            "8",
            "-o",
            str(tmp_path / "w.h5"),
        ],
    )
    assert r.exit_code == 0, r.stderr
    assert read_whitening(tmp_path / "w.h5")["projection"].shape == (8, 16)
    r = CliRunner().invoke(main, ["info", str(tmp_path / "w.h5")])
    assert r.exit_code == 0 and "whitening   pca: 16 -> 8 dimensions" in r.stdout
    assert "schema      sfmpairs/whitening v1" in r.stdout
    r = CliRunner().invoke(main, ["info", str(root / "desc.h5")])
    assert r.exit_code == 0 and f"descriptors {len(desc)} images, dimension 16, 0 skipped" in r.stdout


def test_relaxed_rules(world, tmp_path):
    root, desc = world
    mine(
        root / "sfm.h5",
        tmp_path / "p.h5",
        descriptors=root / "desc.h5",
        negatives=3,
        seed=5,
        queries_per_cluster=0,
        val_fraction=0.34,
    )
    p = read_pairs(tmp_path / "p.h5")
    cluster = p["images/cluster"]
    split_of = {c: s for c, s in zip(range(len(p["clusters/name"])), p["clusters/split"])}
    assert set(p["clusters/split"]) == {"train", "val"}
    for split in ("train", "val"):
        q, pos, pool = p[f"{split}/query"], p[f"{split}/positive"], p[f"{split}/pool"]
        assert len(q) > 0
        assert np.all(q != pos)  # no image is its own positive
        assert all(split_of[c] == split for c in cluster[q])
        slot = (pool == pos[:, None]).argmax(1)
        assert np.all(pool[np.arange(len(q)), slot] == pos)  # the positive is in the pool
        rows = np.arange(len(q))
        assert np.all(p[f"{split}/pool_inlier_ratio"][rows, slot] >= 0.2)
        assert np.all(p[f"{split}/pool_scale_change"][rows, slot] <= 1.5)
        assert np.all(p[f"{split}/pool_co_observed"][rows, slot] >= 1)
        assert np.all(p[f"{split}/pool_passes"][rows, slot])
        assert np.all(cluster[pos] == cluster[q])
        neg = p[f"{split}/negatives"]
        images = set(p[f"{split}/images"].tolist())
        for i, row in enumerate(neg):
            row = row[row >= 0]
            assert not np.any(cluster[row] == cluster[q[i]])  # never q's cluster
            assert len(set(cluster[row].tolist())) == len(row)  # at most one per cluster
            assert set(row.tolist()) <= images  # searched within the split
        # the negatives are the most similar, worked out by brute force: per query, the
        # best image of each other cluster of the split, the 3 most similar such clusters
        d = desc.astype(np.float64)
        for i, query in enumerate(q):
            best = {}  # cluster -> (similarity, image)
            for j in sorted(images):
                if cluster[j] != cluster[query]:
                    s = float(d[j] @ d[query])
                    if cluster[j] not in best or s > best[cluster[j]][0]:
                        best[cluster[j]] = (s, j)
            top = sorted(best.values(), reverse=True)[:3]
            assert neg[i].tolist() == [j for _, j in top] + [-1] * (3 - len(top)), (split, i)
        assert (neg[:, 0] >= 0).all()
    train_clusters = set(cluster[p["train/images"]].tolist())
    val_clusters = set(cluster[p["val/images"]].tolist())
    assert train_clusters and val_clusters and not train_clusters & val_clusters


def test_relaxed_positives_are_drawn_among_all_passing(world, tmp_path):
    root, _ = world
    drawn = {}
    for seed in range(5):
        mine(root / "sfm.h5", tmp_path / f"p{seed}.h5", seed=seed, queries_per_cluster=0, val_fraction=0)
        p = read_pairs(tmp_path / f"p{seed}.h5")
        for q, pos, pool, ok in zip(p["train/query"], p["train/positive"], p["train/pool"], p["train/pool_passes"]):
            assert pos in pool[ok]
            drawn.setdefault(int(q), set()).add(int(pos))
    assert max(len(v) for v in drawn.values()) > 1  # other seeds draw other positives


def test_max_inliers_and_mac(world, tmp_path):
    root, desc = world
    mine(root / "sfm.h5", tmp_path / "mi.h5", strategy="max-inliers", queries_per_cluster=0)
    p = read_pairs(tmp_path / "mi.h5")
    co, pool, pos = p["train/pool_co_observed"], p["train/pool"], p["train/positive"]
    rows = np.arange(len(pos))
    assert np.all(co[rows, (pool == pos[:, None]).argmax(1)] == co.max(1))
    mine(
        root / "sfm.h5",
        tmp_path / "mac.h5",
        strategy="mac",
        descriptors=root / "desc.h5",
        queries_per_cluster=0,
        negatives=0,
    )
    p = read_pairs(tmp_path / "mac.h5")
    for q, pos, pool, co in zip(p["train/query"], p["train/positive"], p["train/pool"], p["train/pool_co_observed"]):
        cand = pool[(pool >= 0) & (co >= 1)]
        assert pos == cand[np.argmax(desc[cand] @ desc[q])]
    assert "train/negatives" not in p


def test_queries_per_cluster_follow_the_paper(world, tmp_path):
    root, _ = world
    mine(root / "sfm.h5", tmp_path / "p.h5", val_fraction=0)
    p = read_pairs(tmp_path / "p.h5")
    counts = np.bincount(p["images/cluster"][p["train/query"]], minlength=6)
    assert list(counts) == [paper_queries_per_cluster(30)] * 6 == [3] * 6
    assert paper_queries_per_cluster(300) == 30 and paper_queries_per_cluster(301) == 30
    assert paper_queries_per_cluster(1000) == 30 and paper_queries_per_cluster(55) == 6
    mine(root / "sfm.h5", tmp_path / "p2.h5", val_fraction=0, queries_per_cluster=5)
    assert len(read_pairs(tmp_path / "p2.h5")["train/query"]) == 30


def test_same_seed_same_file(world, tmp_path):
    root, _ = world
    for name in ("a.h5", "b.h5"):
        mine(root / "sfm.h5", tmp_path / name, descriptors=root / "desc.h5", seed=7)
    a, b = read_pairs(tmp_path / "a.h5"), read_pairs(tmp_path / "b.h5")
    assert a.keys() == b.keys()
    for key in a:
        if key == "attrs":
            continue
        assert np.array_equal(a[key], b[key], equal_nan=a[key].dtype.kind == "f"), key
    for key in a["attrs"]:
        if key != "created":
            assert np.array_equal(a["attrs"][key], b["attrs"][key]), key
    assert a["attrs"]["parameters"] == b["attrs"]["parameters"]
    mine(root / "sfm.h5", tmp_path / "c.h5", seed=8)
    c = read_pairs(tmp_path / "c.h5")
    assert not np.array_equal(c["train/query"], a["train/query"]) or not np.array_equal(
        c["clusters/split"], a["clusters/split"]
    )


def test_pair_file_records_how_it_was_made(world, tmp_path):
    from sfmpairs.common import file_sha256

    root, _ = world
    mine(root / "sfm.h5", tmp_path / "p.h5", val_clusters=["scene_02/sparse/0"], max_scale_change=2.0)
    attrs = read_pairs(tmp_path / "p.h5")["attrs"]
    assert attrs["schema"] == "sfmpairs/pairs" and attrs["schema_version"] == 2  # docs/formats.md: val/gt_*
    assert attrs["strategy"] == "relaxed" and attrs["max_scale_change"] == 2.0
    assert attrs["scale_measure"] == "depth" and attrs["seed"] == 0
    assert attrs["source_store_sha256"] == file_sha256(root / "sfm.h5")
    p = read_pairs(tmp_path / "p.h5")
    assert list(p["clusters/split"]).count("val") == 1
    assert p["clusters/split"][list(p["clusters/name"]).index("scene_02/sparse/0")] == "val"


def _brute_force_negatives(qd, qc, pd, pc, num):
    """Each query's hard negatives one by one: pool images by similarity (first index on
    a tie), the first of each other cluster, clusters by (similarity, label)."""
    index, similarity = [], []
    for i in range(len(qd)):
        s = pd @ qd[i]
        best = {}
        for j in np.argsort(-s, kind="stable"):
            if pc[j] != qc[i] and pc[j] not in best and np.isfinite(s[j]):
                best[pc[j]] = j
        items = sorted(best.items(), key=lambda kv: (-s[kv[1]], kv[0]))[:num]
        index.append([j for _, j in items] + [-1] * (num - len(items)))
        similarity.append([s[j] for _, j in items] + [-np.inf] * (num - len(items)))
    return np.array(index).reshape(len(qd), num), np.array(similarity).reshape(len(qd), num)


def test_hard_negatives_against_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(30):
        Q, P, C, num = rng.integers(1, 30), rng.integers(1, 150), rng.integers(1, 10), rng.integers(1, 6)
        qd = rng.normal(size=(Q, 8)).astype(np.float32)
        pd = rng.normal(size=(P, 8)).astype(np.float32)
        qd /= np.linalg.norm(qd, axis=1, keepdims=True)
        pd /= np.linalg.norm(pd, axis=1, keepdims=True)
        qc, pc = rng.integers(0, C, Q), rng.integers(0, C, P)
        workers = int(rng.integers(1, 4))  # rows split over 1 to 3 threads
        idx, sim = hard_negatives(qd, qc, pd, pc, num, batch_size=int(rng.integers(1, 9)), workers=workers)
        expect_idx, expect_sim = _brute_force_negatives(qd, qc, pd, pc, num)
        np.testing.assert_array_equal(idx, expect_idx)
        np.testing.assert_allclose(sim, expect_sim, rtol=1e-5)


def test_hard_negatives_of_no_queries_or_no_pool_or_labels_of_another_length():
    d = np.eye(4, dtype=np.float32)
    for q, p in ((d[:0], d), (d, d[:0])):
        idx, sim = hard_negatives(q, np.zeros(len(q), int), p, np.arange(len(p)), 2)
        assert idx.shape == sim.shape == (len(q), 2) and (idx == -1).all() and (sim == -np.inf).all()
    wrong = [(np.zeros(3, int), np.arange(4)), (np.zeros(4, int), np.arange(40)), (np.zeros((4, 1)), np.arange(4))]
    for qc, pc in wrong:
        with pytest.raises(ValueError, match="one label per image"):  # not a read past the end in compiled code
            hard_negatives(d, qc, d, pc, 2)


def test_hard_negatives_ties_and_non_finite():
    """Small integer descriptors: many images of a cluster, and many clusters, tie
    exactly. Within a cluster the first image is taken, and clusters of equal
    similarity go by label, also at the last place kept; an image whose similarity is
    NaN or infinite is never a negative."""
    rng = np.random.default_rng(1)
    for trial in range(40):
        Q, P, C, num = rng.integers(1, 40), rng.integers(1, 200), rng.integers(1, 12), rng.integers(1, 8)
        qd = rng.integers(-1, 2, size=(Q, 3)).astype(np.float32)
        pd = rng.integers(-1, 2, size=(P, 3)).astype(np.float32)
        if trial % 2:
            pd[rng.random(P) < 0.2, 0] = rng.choice([np.nan, np.inf, -np.inf])
        qc, pc = rng.integers(0, C, Q) * 3 - 4, rng.integers(0, C, P) * 3 - 4  # labels neither 0.. nor dense
        with np.errstate(invalid="ignore"):
            idx, sim = hard_negatives(qd, qc, pd, pc, num, batch_size=int(rng.integers(1, 9)))
            expect_idx, expect_sim = _brute_force_negatives(qd, qc, pd, pc, num)
        np.testing.assert_array_equal(idx, expect_idx)
        np.testing.assert_array_equal(sim, expect_sim)


# ----------------------------------------------------------------------------- bad input
def test_bad_input(world, tmp_path):
    root, desc = world
    out = tmp_path / "p.h5"
    cases = [
        (dict(min_inlier_ratio=1.5), "--min-inlier-ratio"),
        (dict(max_scale_change=0.5), "--max-scale-change"),
        (dict(pool_size=0), "--pool-size"),
        (dict(val_fraction=1.0), "--val-fraction"),
        (dict(negatives=-1), "--negatives"),
        (dict(strategy="mac"), "needs --descriptors"),
        (dict(val_clusters=["nowhere"]), "no cluster named 'nowhere'"),
    ]
    for options, expect in cases:
        with pytest.raises(SfmpairsError, match=expect):
            mine(root / "sfm.h5", out, **options)
        assert not out.exists()


def test_store_of_another_schema_version(world, tmp_path):
    root, _ = world
    shutil.copy(root / "sfm.h5", tmp_path / "old.h5")
    with h5py.File(tmp_path / "old.h5", "a") as f:
        f.attrs["schema_version"] = 99
    with pytest.raises(SfmpairsError, match="schema version 99"):
        mine(tmp_path / "old.h5", tmp_path / "p.h5")
    assert not (tmp_path / "p.h5").exists()


def test_one_cluster_asked_for_negatives(synthetic_models, tmp_path):
    ingest([synthetic_models["shared-cameras"] / "binary"], tmp_path / "one.h5")
    names = read_store(tmp_path / "one.h5", observations=False)["images/name"]
    d = np.eye(len(names), 40, dtype=np.float32)
    write_descriptors(tmp_path / "d.h5", names, d, {})
    with pytest.raises(SfmpairsError, match="at least two clusters"):
        mine(tmp_path / "one.h5", tmp_path / "p.h5", descriptors=tmp_path / "d.h5")
    assert not (tmp_path / "p.h5").exists()
    mine(tmp_path / "one.h5", tmp_path / "p.h5", descriptors=tmp_path / "d.h5", negatives=0)


def test_descriptors_missing_or_not_normalised(world, tmp_path):
    root, desc = world
    names = read_store(root / "sfm.h5", observations=False)["images/name"]
    write_descriptors(tmp_path / "few.h5", names[:-3], desc[:-3], {})
    with pytest.raises(SfmpairsError, match="no descriptors for 3 images"):
        mine(root / "sfm.h5", tmp_path / "p.h5", descriptors=tmp_path / "few.h5")
    write_descriptors(tmp_path / "raw.h5", names, desc * 2, {})
    with pytest.raises(SfmpairsError, match="L2-normalised"):
        mine(root / "sfm.h5", tmp_path / "p.h5", descriptors=tmp_path / "raw.h5")
    assert not (tmp_path / "p.h5").exists()


def test_cli_mine_and_info(world, tmp_path):
    from click.testing import CliRunner

    from sfmpairs.cli import main

    root, _ = world
    r = CliRunner().invoke(
        main, ["mine", str(root / "sfm.h5"), "-o", str(tmp_path / "p.h5"), "--descriptors", str(root / "desc.h5"), "-q"]
    )
    assert r.exit_code == 0, r.stderr
    r = CliRunner().invoke(main, ["info", str(tmp_path / "p.h5")])
    assert r.exit_code == 0 and "strategy relaxed" in r.stdout and "train" in r.stdout
    r = CliRunner().invoke(main, ["mine", str(root / "sfm.h5"), "-o", str(tmp_path / "p.h5")])
    assert r.exit_code == 2 and "exists" in r.stderr
    r = CliRunner().invoke(
        main, ["mine", str(root / "sfm.h5"), "-o", str(tmp_path / "x.h5"), "--max-scale-change", "0.9"]
    )
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "--max-scale-change" in r.stderr
    assert not (tmp_path / "x.h5").exists()


def test_formats_doc_pair_example_runs_without_sfmpairs(world, tmp_path, monkeypatch, capsys):
    from conftest import doc_example

    root, _ = world
    mine(root / "sfm.h5", tmp_path / "pairs.h5", descriptors=root / "desc.h5")
    example = doc_example("## The pair file")
    monkeypatch.chdir(tmp_path)
    exec(compile(example, "formats.md", "exec"), {})
    p = read_pairs(tmp_path / "pairs.h5")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    q, pos = p["train/query"][0], p["train/positive"][0]
    assert lines[0].startswith(f"{p['images/name'][q]} -> {p['images/name'][pos]} of ")


def test_formats_doc_lists_every_pair_dataset(world, tmp_path):
    from conftest import REPO

    root, _ = world
    mine(root / "sfm.h5", tmp_path / "pairs.h5", descriptors=root / "desc.h5")
    doc = (REPO / "docs" / "formats.md").read_text()
    for key in read_pairs(tmp_path / "pairs.h5"):
        if key != "attrs":
            name = key.replace("train/", "{split}/").replace("val/", "{split}/")
            assert f"`{name}`" in doc or f"`{key}`" in doc, key  # val/gt_*: the val split only


def test_random_negatives_are_one_per_other_cluster_and_cover_every_choice():
    """The control of hard negatives: never the query's cluster, never two from one
    cluster, -1 once the other clusters run out; over many draws every other cluster
    and every image of it turns up (a brute-force count)."""
    from sfmpairs.mining.negatives import random_negatives

    pool_cluster = np.array([0, 0, 1, 1, 1, 2, 3, 3])
    rng = np.random.default_rng(0)
    idx = random_negatives(np.array([1] * 400 + [0]), pool_cluster, 4, rng)
    assert (idx[:400, 3] == -1).all() and (idx[:400, :3] >= 0).all()  # three other clusters
    chosen = pool_cluster[idx[:400, :3]]
    assert (chosen != 1).all() and all(len(set(r)) == 3 for r in chosen.tolist())
    assert set(idx[:400, :3].ravel()) == {0, 1, 5, 6, 7}  # every image of the other clusters
    firsts = np.bincount(chosen[:, 0], minlength=4)
    assert min(firsts[[0, 2, 3]]) > 80  # the first negative's cluster is random, not always the lowest


def test_clusters_of_several_models_against_brute_force(tmp_path):
    """Models pooled one by one on threads, only the queries' rows kept: pools,
    statistics and the val ground truth of clusters of several models (scenes with
    sparse/0, sparse/1, ...) equal pycolmap's, whatever the threads."""
    from sfmpairs.synthetic.models import random_reconstruction, write_model

    dirs = []
    for scene, models in enumerate((1, 3, 2, 1)):
        for m in range(models):
            n = (12, 3, 25, 2, 17, 9, 30)[len(dirs)]  # a two-image model too
            dirs.append(tmp_path / "colmap" / f"s{scene}" / "sparse" / str(m))
            write_model(random_reconstruction(n, 300, 4, seed=len(dirs)), dirs[-1])
    ingest([tmp_path / "colmap"], tmp_path / "sfm.h5", cluster_by="scene")
    s = read_store(tmp_path / "sfm.h5", observations=False)
    assert len(s["clusters/name"]) == 4 and len(s["models/name"]) == 7
    order = [tmp_path / "colmap" / name for name in s["models/name"]]  # the store's model order
    options = dict(queries_per_cluster=0, val_fraction=0.5, pool_size=6, seed=2)
    mine(tmp_path / "sfm.h5", tmp_path / "p1.h5", workers=1, **options)
    mine(tmp_path / "sfm.h5", tmp_path / "p3.h5", workers=3, **options)
    a, b = read_pairs(tmp_path / "p1.h5"), read_pairs(tmp_path / "p3.h5")
    for key in a:
        if key != "attrs":
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    check_against_brute_force(tmp_path / "sfm.h5", tmp_path / "p1.h5", order, 6, "depth")
    # the val ground truth: every other image of the cluster sharing points with q, and how many
    seen = []  # per store image: its set of 3D points (model, point id)
    for m, d in enumerate(order):
        rec = pycolmap.Reconstruction(str(d))
        for i in sorted(i for i, im in rec.images.items() if im.has_pose):
            seen.append({(m, p.point3D_id) for p in rec.images[i].points2D if p.has_point3D()})
    cluster, ptr = s["images/cluster"], a["val/gt_indptr"]
    assert len(a["val/query"]) > 10
    for row, q in enumerate(a["val/query"]):
        expect = [(i, len(seen[q] & seen[i])) for i in np.flatnonzero(cluster == cluster[q]) if i != q]
        expect = [(i, c) for i, c in expect if c]
        got = list(zip(a["val/gt_image"][ptr[row] : ptr[row + 1]], a["val/gt_co_observed"][ptr[row] : ptr[row + 1]]))
        assert got == expect, q
    # the same from the whole store's table (evaluate's route for pair files without val/gt_*)
    from sfmpairs.mining.mine import co_observing_images

    full = read_store(tmp_path / "sfm.h5", keys=["observations/indptr", "observations/point", "images/cluster"])
    shuffled = np.random.default_rng(0).permutation(a["val/query"])  # queries in any order
    gt = co_observing_images(shuffled, full["observations/indptr"], full["observations/point"], cluster)
    for row, q in enumerate(shuffled):
        k = int(np.flatnonzero(a["val/query"] == q)[0])
        for key in ("gt_image", "gt_co_observed"):
            np.testing.assert_array_equal(
                gt[key][gt["gt_indptr"][row] : gt["gt_indptr"][row + 1]], a[f"val/{key}"][ptr[k] : ptr[k + 1]]
            )


def test_store_whose_model_observes_another_models_points(world, tmp_path):
    """A corrupt store: an observation of the second model names a point of the first
    (in range for the store, so only the per-model check can see it)."""
    root, _ = world
    shutil.copy(root / "sfm.h5", tmp_path / "bad.h5")
    with h5py.File(tmp_path / "bad.h5", "a") as f:
        (a, _), (pa, _) = f["models/image_range"][1], f["models/point_range"][1]
        assert pa > 0
        first = int(f["observations/indptr"][a])
        f["observations/point"][first] = 0  # the first model's first point
    with pytest.raises(SfmpairsError, match="observe points of another model"):
        mine(tmp_path / "bad.h5", tmp_path / "p.h5")
    assert not (tmp_path / "p.h5").exists()


@pytest.mark.parametrize("size", [1, 2, 3, 7, 8, 9, 16, 17, 18, 64, 65, 300, 3_001, 3_000])
def test_median_is_numpys_median(size):
    """The compiled median (quickselect; insertion sort of 7 values or fewer) gives exactly
    ``np.median``, on shuffled values with many ties, sorted and reversed runs, and
    all-equal ones: every size class and both middles."""
    from sfmpairs.mining.pools import _median

    rng = np.random.default_rng(size)
    cases = [
        np.round(rng.normal(scale=2.0, size=size), 1),  # ties
        rng.normal(size=size),
        np.sort(rng.normal(size=size)),
        np.sort(rng.normal(size=size))[::-1].copy(),
        np.full(size, 0.25),
        rng.integers(0, 3, size).astype(np.float64),  # mostly ties
    ]
    rise_fall = np.r_[np.arange(size // 2), np.arange(size - size // 2)[::-1]].astype(np.float64)
    cases += [rise_fall, -rise_fall]  # orders that defeat the median of three: the heap sort's
    for values in cases:
        assert _median(values.copy()) == np.median(values), values


def test_heap_sort_of_a_range_is_numpys_sort():
    """The quickselect's fallback sorts exactly the range it is given."""
    from sfmpairs.mining.pools import _heap_sort

    rng = np.random.default_rng(1)
    for n in range(1, 70):
        for values in (rng.normal(size=n), rng.integers(0, 3, n).astype(np.float64)):
            got = values.copy()
            lo, hi = n // 5, n - 1 - n // 7
            _heap_sort(got, lo, hi)
            assert got[lo : hi + 1].tolist() == np.sort(values[lo : hi + 1]).tolist()
            assert got[:lo].tolist() == values[:lo].tolist() and got[hi + 1 :].tolist() == values[hi + 1 :].tolist()


def test_median_with_ties_of_the_minimum_at_every_boundary():
    """Copies of the smallest value ending before, at and after the middle (the pass that
    groups the pivot's copies decides these), against ``np.median``."""
    from sfmpairs.mining.pools import _median

    rng = np.random.default_rng(0)
    for n in range(8, 60):
        for m in range(1, n + 1):
            for _ in range(3):
                values = np.r_[np.zeros(m), rng.integers(1, 4, n - m)].astype(np.float64)
                rng.shuffle(values)
                assert _median(values.copy()) == np.median(values), (n, m, values.tolist())


def test_pair_statistics_on_the_legacy_grid():
    """The ``depth`` scale change of each pair is exp(|median|) of its log ratios as
    sfmpairs <= 0.5 computed them: rounded to the grid of the keys g * 256 + ratio, g the
    pair's index within its batch of lower images. A model worked by hand: 3 images,
    all looking along +z (identity rotations), each seeing the 3 points; a point at
    height Z is at depth Z + t_z in an image translated by t_z."""
    from sfmpairs.mining.pools import pair_statistics

    xyz = np.array([[0.0, 0.0, 1.0], [0.0, 0.0, 2.0], [0.0, 0.0, 5.0]])
    rotation = np.repeat(np.eye(3)[None], 3, axis=0)
    tvec = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 3.0]])
    focal, longer = np.array([100.0, 200.0, 100.0]), np.full(3, 100.0)
    indptr, points = np.array([0, 3, 6, 9]), np.array([0, 1, 2] * 3, np.int32)
    pairs = np.array([0 * 3 + 1, 0 * 3 + 2, 1 * 3 + 2])  # (0, 1), (0, 2), (1, 2)
    count, scale = pair_statistics(indptr, points, xyz, rotation, tvec, focal, longer, pairs, 3)
    assert count.tolist() == [3, 3, 3]
    log_size = np.log(focal / longer)[None, :] - np.log(xyz[:, 2:] + tvec[:, 2][None, :])  # (point, image)
    for g, (lo, hi) in enumerate([(0, 1), (0, 2), (1, 2)]):
        ratio = log_size[:, hi] - log_size[:, lo]
        on_grid = (g * 256.0 + ratio) - g * 256.0
        assert scale[g] == np.exp(abs(np.median(on_grid)))
        assert abs(scale[g] - np.exp(abs(np.median(ratio)))) < 1e-12
    assert not np.array_equal(
        scale[1:], [np.exp(abs(np.median(log_size[:, hi] - log_size[:, lo]))) for lo, hi in [(0, 2), (1, 2)]]
    )


@pytest.mark.parametrize("k", [3, 10, 100])
def test_pools_are_nearest_first_with_ties_by_index(k):
    """M(q): the k nearest camera centres, q left out, by (distance, index), against a
    brute force over every pair. The centres lie on a small grid in a shuffled order,
    so that many distances tie exactly and the k-d tree hands ties in any order; the
    distances are numpy's ``linalg.norm`` of the difference, bit for bit."""
    from sfmpairs.mining.pools import pool_members

    rng = np.random.default_rng(k)
    centres = rng.integers(0, 4, size=(60, 3)).astype(np.float64) * 0.5 + 0.1
    pool, dist = pool_members(centres, k, workers=1)
    full = np.linalg.norm(centres[None, :, :] - centres[:, None, :], axis=2)
    kk = min(k, len(centres) - 1)
    for q in range(len(centres)):
        others = np.delete(np.arange(len(centres)), q)
        order = others[np.lexsort((others, full[q, others]))][:kk]
        assert pool[q].tolist() == order.tolist(), q
        assert dist[q].tobytes() == full[q, order].tobytes(), q


def test_log_sizes_are_numpys_bit_for_bit():
    """log(f / z) of each observation equals numpy's formula bit for bit, the depth
    summed in the order that numpy's ``einsum("ij,ij->i")`` of sfmpairs <= 0.6 sums
    (x and z, then y, then the translation: on this project's numpy it gave the same
    bits as einsum for all 95.7M observations of the SfM-120k-shaped corpus), so
    that the scale changes of the pair files of every version stay the same."""
    from sfmpairs.mining.pools import log_scale_by_track

    rng = np.random.default_rng(5)
    points, images = 3_000, 40
    lengths = rng.integers(0, 6, points)
    track_ptr = np.concatenate([[0], np.cumsum(lengths)])
    track_image = rng.integers(0, images, track_ptr[-1]).astype(np.int32)
    xyz = rng.normal(scale=5.0, size=(points, 3))
    axis = rng.normal(size=(images, 3))
    tz = rng.normal(scale=20.0, size=images)
    log_f = rng.normal(size=images)
    got = log_scale_by_track(track_ptr, track_image, xyz, axis, tz, log_f, chunk=500)
    X, A = np.repeat(xyz, lengths, axis=0), axis[track_image]
    z = (X[:, 0] * A[:, 0] + X[:, 2] * A[:, 2]) + X[:, 1] * A[:, 1] + tz[track_image]
    want = log_f[track_image] - np.log(np.maximum(z, 1e-12))
    assert (z < 1e-12).any() and (z > 1).any()  # the clamp is reached, and so are real depths
    assert got.tobytes() == want.tobytes()
    in_order = (X[:, 0] * A[:, 0] + X[:, 1] * A[:, 1]) + X[:, 2] * A[:, 2] + tz[track_image]
    assert not np.array_equal(z, in_order)  # the order of the sum shows in the last bits


def test_tracks_are_scipys_csc_with_points_by_first_image():
    """The co-observation table by point against scipy's CSR to CSC conversion, the
    points relabelled by a stable sort on their first image: a random model with
    points no image observes, images that observe nothing, and one point seen by all."""
    from scipy import sparse

    from sfmpairs.mining.pools import tracks

    rng = np.random.default_rng(3)
    n, num_points = 30, 400
    rows = [rng.choice(num_points - 50, rng.integers(0, 40), replace=False) for _ in range(n)]
    rows[4], rows[9] = np.zeros(0, np.int64), np.zeros(0, np.int64)
    rows = [np.r_[r, 7] if 7 not in r else r for r in rows]  # point 7 in every image
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    point = np.concatenate(rows).astype(np.int32)
    label, order, track_ptr, track_image, track_obs, position = tracks(indptr, point, num_points)

    image = np.repeat(np.arange(n), np.diff(indptr))
    first = np.full(num_points, n)
    for o in range(len(point))[::-1]:
        first[point[o]] = image[o]
    want_order = np.argsort(first, kind="stable")
    want_label = np.empty(num_points, np.int64)
    want_label[want_order] = np.arange(num_points)
    csc = sparse.csr_matrix((np.arange(len(point)), want_label[point], indptr), shape=(n, num_points)).tocsc()
    assert order.tolist() == want_order.tolist() and label.tolist() == want_label.tolist()
    assert track_ptr.tolist() == csc.indptr.tolist()
    assert track_image.tolist() == csc.indices.tolist() and track_obs.tolist() == csc.data.tolist()
    assert (track_obs[position] == np.arange(len(point))).all()
    unobserved = num_points - len(np.unique(point))
    assert unobserved >= 50 and (np.diff(track_ptr)[-unobserved:] == 0).all()  # empty tracks, last


def test_pair_index_is_searchsorted_over_all_pairs():
    """Each pool slot's pair found by bisection within its lower image's run: the same
    as numpy's searchsorted over every pair (from the review)."""
    from sfmpairs.mining.pools import pair_index, pool_members, unordered_pairs

    rng = np.random.default_rng(1)
    for n, k in [(2, 1), (3, 2), (10, 9), (10, 3), (200, 20), (50, 49)]:
        pool, _ = pool_members(rng.normal(size=(n, 3)), k, workers=1)
        pairs = unordered_pairs(pool, n)
        q = np.repeat(np.arange(n), pool.shape[1]).reshape(pool.shape)
        want = np.searchsorted(pairs, np.minimum(q, pool) * n + np.maximum(q, pool))
        assert np.array_equal(pair_index(pool, pairs, n), want)


def test_unordered_pairs_are_the_sorted_set_of_every_pool_pair():
    """Against Python's own set of (min, max) pairs: each pair once however many pools
    hold it (both images in each other's pool), sorted; no pair of an image with
    itself."""
    from sfmpairs.mining.pools import pool_members, unordered_pairs

    rng = np.random.default_rng(4)
    for n, k in [(1, 0), (2, 1), (3, 2), (10, 9), (10, 3), (300, 20), (60, 59)]:
        pool, _ = pool_members(rng.normal(size=(n, 3)), k, workers=1)
        want = sorted({min(q, c) * n + max(q, c) for q in range(n) for c in pool[q].tolist()})
        got = unordered_pairs(pool, n)
        assert got.dtype == np.int64 and got.tolist() == want, (n, k)


def test_models_pooled_beside_others_take_one_thread(tmp_path, monkeypatch):
    """The largest model is pooled on every core; models of at most half its
    observations, which are pooled beside others, on one thread each."""
    from sfmpairs.mining import mine as mine_module
    from sfmpairs.synthetic.models import random_reconstruction, write_model

    for m, n in enumerate((40, 6, 9)):
        write_model(random_reconstruction(n, 30 * n, 4, seed=m), tmp_path / "colmap" / f"m{m}")
    ingest([tmp_path / "colmap"], tmp_path / "sfm.h5")
    images = np.diff(read_store(tmp_path / "sfm.h5", observations=False)["models/image_range"], axis=1)[:, 0]
    seen = {}
    real = mine_module.model_pools

    def spy(m, first, *args):
        seen[len(m["indptr"]) - 1] = args[-1]  # the model's images -> its threads
        return real(m, first, *args)

    monkeypatch.setattr(mine_module, "model_pools", spy)
    mine(tmp_path / "sfm.h5", tmp_path / "pairs.h5", queries_per_cluster=0, val_fraction=0.34, workers=2)
    assert sorted(images.tolist()) == [6, 9, 40]
    assert seen == {40: None, 6: 1, 9: 1}


def test_a_store_replaced_while_mining_is_one_line(tmp_path):
    """The tables read whole at the start and the file read model by model are two
    opens of one path: where the file was replaced in between by a smaller store, the
    model's observations are not there, which is said in one line (it was a read past
    the end of the table in compiled code)."""
    from sfmpairs.mining.mine import model_arrays, store_keys
    from sfmpairs.sfm_io.store import open_store
    from sfmpairs.synthetic.models import random_reconstruction, write_model

    for name, sizes in (("big", (20, 30)), ("small", (20,))):
        for m, n in enumerate(sizes):
            write_model(random_reconstruction(n, 20 * n, 4, seed=m), tmp_path / name / f"m{m}")
        ingest([tmp_path / name], tmp_path / f"{name}.h5")
    s = read_store(tmp_path / "big.h5", keys=store_keys())
    (a, b), (pa, pb) = s["models/image_range"][-1], s["models/point_range"][-1]
    with open_store(tmp_path / "big.h5") as h5:  # the same file: the model's arrays
        assert len(model_arrays(h5, s, int(a), int(b), int(pa), int(pb), "depth")["point"]) > 0
    with open_store(tmp_path / "small.h5") as h5, pytest.raises(SfmpairsError, match="small.h5: changed while mining"):
        model_arrays(h5, s, int(a), int(b), int(pa), int(pb), "depth")
