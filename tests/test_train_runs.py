"""Runs a user can trust: shuffled tuples, train and test sizes, pair files that hold
their own val ground truth, run folders that can always be re-run or resumed, pair
files that cannot train refused up front, logs and help."""

from __future__ import annotations

import json
import math
import pickle
import re
import shutil

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import SMALL
from sfmpairs import SfmpairsError
from sfmpairs.cli import main
from sfmpairs.config import make_conf
from sfmpairs.mining.mine import mine
from sfmpairs.retrieval.descriptors import write_descriptors
from sfmpairs.retrieval.evaluate import evaluate
from sfmpairs.retrieval.network import build_network, load_checkpoint, save_checkpoint
from sfmpairs.train.options import TrainConf
from sfmpairs.train.train import _read_pairs, mine_epoch, train

ONE_EPOCH = {**SMALL, "epochs": 1}


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def random_descriptors(path, names, dim=8, seed=0):
    d = np.random.default_rng(seed).normal(size=(len(names), dim)).astype(np.float32)
    write_descriptors(path, names, d / np.linalg.norm(d, axis=1, keepdims=True), {})


def store_names(store):
    with h5py.File(store, "r") as f:
        return f["images/name"].asstr()[()], f["clusters/name"].asstr()[()]


# ----------------------------------------------------------------------------- tuples
def test_epoch_tuples_are_shuffled_mixing_clusters_and_differ_between_epochs(small_world):
    pairs = _read_pairs(small_world / "pairs.h5")
    opts = make_conf(TrainConf, **{**SMALL, "neg_num": 2, "amp": False, "skip_bad": False, "query_size": 1000})
    torch.manual_seed(0)
    net = build_network({"arch": "resnet18"})
    rng = np.random.default_rng(0)
    epochs = [mine_epoch(net, pairs, opts, rng, torch.device("cpu"), small_world / "photos")[0] for _ in range(2)]
    qa, qb = ([t[0] for t in e] for e in epochs)
    assert sorted(qa) == sorted(qb) == sorted(pairs["train/query"].tolist())  # every query, each epoch
    assert qa != qb  # in another order
    cluster = pairs["cluster"][qa]
    n_clusters = len(np.unique(cluster))
    # in the pair file's order the clusters come in blocks: n_clusters - 1 changes
    assert np.count_nonzero(np.diff(pairs["cluster"][pairs["train/query"]])) == n_clusters - 1
    assert np.count_nonzero(np.diff(cluster)) > 3 * (n_clusters - 1)
    batches = [cluster[k : k + SMALL["batch_size"]] for k in range(0, len(cluster), SMALL["batch_size"])]
    assert sum(len(set(b)) > 1 for b in batches) > len(batches) / 2  # most batches mix clusters


# ----------------------------------------------------------------------------- sizes
def test_checkpoints_record_both_sizes_and_extract_uses_the_test_size(small_world, tmp_path):
    from sfmpairs.retrieval.extract import extract, extract_descriptors
    from sfmpairs.train.options import TrainConf

    assert (TrainConf.image_size, TrainConf.test_image_size) == (362, 1024)  # the paper's
    photos = small_world / "photos"
    train(small_world / "pairs.h5", photos, tmp_path / "run", **{**ONE_EPOCH, "image_size": 40, "test_image_size": 56})
    net, _ = load_checkpoint(tmp_path / "run" / "best.pt")
    assert (net.config["image_size"], net.config["train_image_size"]) == (56, 40)
    extract(
        tmp_path / "run" / "best.pt",
        tmp_path / "d.h5",
        store=small_world / "sfm.h5",
        images_root=photos,
        device="cpu",
        workers=0,
        precision="fp32",
    )
    with h5py.File(tmp_path / "d.h5", "r") as f:
        names, got = f["names"].asstr()[()][:4], f["descriptors"][:4]
        assert json.loads(f.attrs["parameters"])["image_size"] == 56
    at = {
        size: extract_descriptors(net, photos, list(names), image_size=size, workers=0, precision="fp32")[0]
        for size in (56, 64)
    }  # the photos are 64 x 48: at 64, they are not resized
    np.testing.assert_allclose(got, at[56], atol=1e-6)
    assert np.abs(got - at[64]).max() > 1e-3


# ----------------------------------------------------------------------------- val ground truth
def test_pair_files_hold_the_val_ground_truth_of_every_val_query(small_world):
    """val/gt_* against sets of point ids, image by image (brute force)."""
    with h5py.File(small_world / "sfm.h5", "r") as f:
        indptr, point = f["observations/indptr"][()], f["observations/point"][()]
    with h5py.File(small_world / "pairs.h5", "r") as f:
        cluster, queries = f["images/cluster"][()], f["val/query"][()]
        gt = [f[f"val/{k}"][()] for k in ("gt_indptr", "gt_image", "gt_co_observed")]
    points = [set(point[indptr[i] : indptr[i + 1]].tolist()) for i in range(len(indptr) - 1)]
    assert len(queries) > 5
    for k, q in enumerate(queries):
        expect = {
            j: len(points[q] & points[j])
            for j in range(len(points))
            if j != q and cluster[j] == cluster[q] and points[q] & points[j]
        }
        a, b = gt[0][k], gt[0][k + 1]
        assert dict(zip(gt[1][a:b].tolist(), gt[2][a:b].tolist())) == expect
        assert list(gt[1][a:b]) == sorted(expect)


def test_train_and_evaluate_need_no_store_once_mined(small_world, tmp_path):
    """The store moves away after mining: evaluate gives the mAP it gave with the store
    (the pre-0.2 path, from the store's observations), and training validates."""
    from sfmpairs.retrieval.evaluate import val_ground_truth

    shutil.copy(small_world / "sfm.h5", tmp_path / "sfm.h5")
    mine(tmp_path / "sfm.h5", tmp_path / "pairs.h5", queries_per_cluster=0, val_fraction=0.34, max_scale_change=3.0)
    names, _ = store_names(tmp_path / "sfm.h5")
    random_descriptors(tmp_path / "d.h5", names, seed=3)
    for min_covisible in (1, 5):
        with_file = val_ground_truth(tmp_path / "pairs.h5", min_covisible)
        with h5py.File(tmp_path / "old.h5", "w") as f:  # the same pair file without val/gt_*
            with h5py.File(tmp_path / "pairs.h5", "r") as g:
                for key in g:
                    g.copy(key, f)
                f.attrs.update(g.attrs)
            for key in ("gt_indptr", "gt_image", "gt_co_observed"):
                del f[f"val/{key}"]
        from_store = val_ground_truth(tmp_path / "old.h5", min_covisible, store=tmp_path / "sfm.h5")
        for a, b in zip(with_file[3] + with_file[4], from_store[3] + from_store[4]):
            np.testing.assert_array_equal(a, b)
        (tmp_path / "old.h5").unlink()
    before = evaluate(tmp_path / "r1.json", pairs=tmp_path / "pairs.h5", descriptors=tmp_path / "d.h5")
    (tmp_path / "sfm.h5").rename(tmp_path / "moved.h5")
    after = evaluate(tmp_path / "r2.json", pairs=tmp_path / "pairs.h5", descriptors=tmp_path / "d.h5")
    assert after["mAP"] == before["mAP"] and 0 < after["mAP"] < 1
    metrics = train(tmp_path / "pairs.h5", small_world / "photos", tmp_path / "run", **ONE_EPOCH)
    assert metrics["val_map"] is not None and (tmp_path / "run" / "best.pt").exists()


def test_revisited_protocol_refuses_precomputed_descriptors_it_cannot_crop(tmp_path):
    gnd = {
        "imlist": ["a", "b"],
        "qimlist": ["q"],
        "gnd": [{"easy": [0], "hard": [], "junk": [1], "bbx": [0, 0, 10, 10]}],
    }
    (tmp_path / "gnd.pkl").write_bytes(pickle.dumps(gnd))
    random_descriptors(tmp_path / "d.h5", ["a.jpg", "b.jpg", "q.jpg"])
    with pytest.raises(SfmpairsError, match="crops each query to its box.*give --model or --arch"):
        evaluate(tmp_path / "r.json", gnd=tmp_path / "gnd.pkl", descriptors=tmp_path / "d.h5")
    assert not (tmp_path / "r.json").exists()
    del gnd["gnd"][0]["bbx"]  # nothing to crop: precomputed descriptors serve
    (tmp_path / "gnd.pkl").write_bytes(pickle.dumps(gnd))
    report = evaluate(tmp_path / "r.json", gnd=tmp_path / "gnd.pkl", descriptors=tmp_path / "d.h5")
    assert report["queries_cropped"] == 0 and report["medium"]["queries"] == 1


# ----------------------------------------------------------------------------- run folders
def test_a_run_that_failed_before_its_first_epoch_can_be_rerun_and_resumed(small_world, tmp_path, monkeypatch):
    import sfmpairs.train.train as T

    pairs, photos = small_world / "pairs.h5", small_world / "photos"

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(T, "mine_epoch", broken)
    (tmp_path / "b").mkdir()  # a folder that existed is kept, with the run's config.json (as after a kill)
    for run in ("a", "b"):
        with pytest.raises(OSError):
            train(pairs, photos, tmp_path / run, **ONE_EPOCH)
    assert not (tmp_path / "a").exists()  # a new run that failed before its first epoch leaves nothing
    assert (tmp_path / "b" / "config.json").exists() and not (tmp_path / "b" / "last.pt").exists()
    monkeypatch.undo()
    train(pairs, photos, tmp_path / "a", **ONE_EPOCH)  # the same command again: no --overwrite needed
    train(None, None, tmp_path / "b", resume=True)  # or --resume: from the start
    a, _ = load_checkpoint(tmp_path / "a" / "last.pt")
    b, _ = load_checkpoint(tmp_path / "b" / "last.pt")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)
    with pytest.raises(SfmpairsError, match="run folder exists.*--overwrite.*--resume"):
        train(pairs, photos, tmp_path / "a", **ONE_EPOCH)  # once an epoch is done, it is a run


def test_resume_applies_new_epochs_and_lr_records_them_and_refuses_other_changes(small_world, tmp_path):
    run = tmp_path / "run"
    train(small_world / "pairs.h5", small_world / "photos", run, **ONE_EPOCH)
    with pytest.raises(SfmpairsError, match=r"finished \(1 of 1 epochs\).*--epochs"):
        train(None, None, run, resume=True)
    with pytest.raises(SfmpairsError, match="--arch cannot change"):
        train(None, None, run, resume=True, epochs=3, arch="resnet34")
    train(None, None, run, resume=True, epochs=3, lr=5e-5)
    config = json.loads((run / "config.json").read_text())
    assert (config["epochs"], config["lr"]) == (3, 5e-5)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [-1, 0, 1, 2]
    assert [m["lr"] for m in lines[1:]] == pytest.approx([1e-4, 5e-5 * math.exp(-0.1), 5e-5 * math.exp(-0.2)])
    groups = torch.load(run / "last.pt", weights_only=True)["train"]["optimizer"]["param_groups"]
    assert groups[1]["lr"] == pytest.approx(10 * groups[0]["lr"])  # GeM p: ten times the rate
    assert groups[0]["lr"] == pytest.approx(5e-5 * math.exp(-0.3))  # after epoch 2's decay


def test_config_records_the_network_trained_from_weights(small_world, tmp_path):
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "init.pt", build_network({"arch": "resnet18", "pool": "mac"}))
    options = {k: v for k, v in ONE_EPOCH.items() if k != "arch"}  # the default arch is resnet50
    train(small_world / "pairs.h5", small_world / "photos", tmp_path / "run", weights=tmp_path / "init.pt", **options)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["arch"], config["pool"]) == ("resnet18", "mac")
    assert load_checkpoint(tmp_path / "run" / "last.pt")[0].config["pool"] == "mac"


def test_pair_files_that_cannot_train_are_refused_up_front(small_world, tmp_path):
    names, clusters = store_names(small_world / "sfm.h5")
    mine(small_world / "sfm.h5", tmp_path / "one.h5", queries_per_cluster=0, val_clusters=list(clusters[1:]))
    with pytest.raises(SfmpairsError, match="train split has 1 cluster.*ingest more models"):
        train(tmp_path / "one.h5", small_world / "photos", tmp_path / "r1", **SMALL)
    # small_world's train split has 4 clusters: 5 negatives, one per other cluster, cannot be
    r = cli(
        "train",
        "--pairs",
        small_world / "pairs.h5",
        "--images-root",
        small_world / "photos",
        "-o",
        tmp_path / "r2",
        "--neg-num",
        5,
        "--arch",
        "resnet18",
        "--device",
        "cpu",
    )
    assert r.exit_code == 2
    assert r.stderr.strip().splitlines() == [
        f"sfmpairs: error: {small_world / 'pairs.h5'}: the train split has 4 clusters, and --neg-num 5 takes "
        "one hard negative from each of 5 other clusters; use --neg-num 3 or fewer, or add clusters"
    ]
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()


# ----------------------------------------------------------------------------- logs
TRAIN_ARGS = [
    "--arch",
    "resnet18",
    "--epochs",
    2,
    "--image-size",
    48,
    "--test-image-size",
    48,
    "--query-size",
    12,
    "--pool-size",
    30,
    "--neg-num",
    3,
    "--batch-size",
    3,
    "--workers",
    0,
    "--device",
    "cpu",
    "--lr",
    1e-4,
]


def test_train_logs_a_start_line_a_line_per_epoch_and_a_closing_line(small_world, tmp_path):
    run = tmp_path / "run"
    r = cli(
        "train", "--pairs", small_world / "pairs.h5", "--images-root", small_world / "photos", "-o", run, *TRAIN_ARGS
    )
    assert r.exit_code == 0, r.stderr
    lines = r.stderr.splitlines()  # CliRunner's stderr is no terminal
    train_queries = len(_read_pairs(small_world / "pairs.h5")["train/query"])
    start = [x for x in lines if x.startswith("train resnet18 + gem on cpu")]
    assert len(start) == 1 and f"12 of {train_queries} train queries" in start[0]
    assert "pool of 30 images" in start[0] and "3 hard negatives" in start[0] and str(run) in start[0]
    line = r"epoch (\d) \((\d) of 2\): loss \d+\.\d{4}, val mAP \d+\.\d\d, \d+\.\d s"
    epochs = [m.groups() for x in lines if (m := re.fullmatch(line, x))]
    assert epochs == [("0", "1"), ("1", "2")]
    best = max(json.loads(x)["val_map"] for x in (run / "metrics.jsonl").read_text().splitlines())
    best_epoch = load_checkpoint(run / "best.pt")[1]["epoch"]
    when = "before training: no epoch did better" if best_epoch == -1 else f"at epoch {best_epoch}"
    assert [x for x in lines if x.startswith("done:")] == [
        f"done: best val mAP {100 * best:.2f} {when} -> {run / 'best.pt'} (last epoch: {run / 'last.pt'})"
    ]
    baseline = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert baseline["epoch"] == -1
    assert [x for x in lines if x.startswith("before training:")] == [
        f"before training: val mAP {100 * baseline['val_map']:.2f}"
    ]
    val_queries = len(_read_pairs(small_world / "pairs.h5")["val/query"])
    assert f"3 hard negatives, {val_queries} val queries" in start[0]
    quiet = cli(
        "-q",
        "train",
        "--pairs",
        small_world / "pairs.h5",
        "--images-root",
        small_world / "photos",
        "-o",
        tmp_path / "quiet",
        *TRAIN_ARGS,
    )
    assert not any(x.startswith(("train ", "epoch ", "done:")) for x in quiet.stderr.splitlines())


def test_a_small_val_split_is_reported_with_its_count(small_world, tmp_path):
    _, clusters = store_names(small_world / "sfm.h5")
    mine(
        small_world / "sfm.h5",
        tmp_path / "p.h5",
        queries_per_cluster=1,
        val_clusters=list(clusters[:2]),
        max_scale_change=3.0,
    )
    args = [a if a != 2 else 1 for a in TRAIN_ARGS]  # one epoch
    r = cli("train", "--pairs", tmp_path / "p.h5", "--images-root", small_world / "photos", "-o", tmp_path / "r", *args)
    assert r.exit_code == 0, r.stderr
    assert "the val split has 2 queries with positives: its mAP is noisy" in r.stderr
    assert "2 val queries" in r.stderr
    names, _ = store_names(small_world / "sfm.h5")
    random_descriptors(tmp_path / "d.h5", names)
    r = cli("evaluate", "--pairs", tmp_path / "p.h5", "--descriptors", tmp_path / "d.h5", "-o", tmp_path / "r.json")
    assert "the val split has 2 queries with positives: its mAP is noisy" in r.stderr
    assert r.stdout.splitlines()[1].split()[:2] == ["val", "2"]


@pytest.mark.parametrize("command", ["mine", "evaluate", "info"])
def test_verbose_adds_detail(small_world, tmp_path, command):
    names, _ = store_names(small_world / "sfm.h5")
    random_descriptors(tmp_path / "d.h5", names)
    args = {
        "mine": ["mine", small_world / "sfm.h5", "-o", tmp_path / "{}.h5"],
        "evaluate": [
            "evaluate",
            "--pairs",
            small_world / "pairs.h5",
            "--descriptors",
            tmp_path / "d.h5",
            "-o",
            tmp_path / "{}.json",
        ],
        "info": ["info", small_world / "pairs.h5"],
    }[command]
    plain = cli(*[str(a).format("plain") for a in args])
    verbose = cli("-v", *[str(a).format("verbose") for a in args])
    assert plain.exit_code == verbose.exit_code == 0, verbose.stderr
    extra = set(verbose.stderr.splitlines()) - set(plain.stderr.splitlines())
    assert any(x.startswith(f"sfmpairs {command}:") for x in extra)
    if command != "info":  # the stage's own detail too
        assert len(extra) >= 3, extra


def test_evaluate_table_shows_the_number_of_queries(small_world, tmp_path):
    names, _ = store_names(small_world / "sfm.h5")
    random_descriptors(tmp_path / "d.h5", names)
    r = cli(
        "evaluate", "--pairs", small_world / "pairs.h5", "--descriptors", tmp_path / "d.h5", "-o", tmp_path / "r.json"
    )
    report = json.loads((tmp_path / "r.json").read_text())
    header, row = r.stdout.splitlines()[:2]
    assert header.split()[:2] == ["queries", "mAP"]
    assert row.split()[:3] == ["val", str(report["queries_with_positives"]), f"{100 * report['mAP']:.2f}"]
    assert report["queries_with_positives"] == report["queries"] == 24 and "noisy" not in r.stderr


# ----------------------------------------------------------------------------- mine, info
def test_mine_says_how_many_negatives_it_gave_and_info_reports_them(small_world, tmp_path):
    names, _ = store_names(small_world / "sfm.h5")
    random_descriptors(tmp_path / "d.h5", names)
    r = cli(
        "mine",
        small_world / "sfm.h5",
        "-o",
        tmp_path / "p.h5",
        "--descriptors",
        tmp_path / "d.h5",
        "--negatives",
        5,
        "--val-fraction",
        0.34,
        "--queries-per-cluster",
        0,
    )
    assert r.exit_code == 0, r.stderr
    assert (
        "train split: 4 clusters and at most one negative from each other cluster: 3 hard negatives per query, not 5"
    ) in r.stderr
    assert "val split: 2 clusters" in r.stderr and "1 hard negatives per query, not 5" in r.stderr
    rows = {
        x.split()[0]: x.split()
        for x in cli("info", tmp_path / "p.h5").stdout.splitlines()
        if x.startswith(("train ", "val "))
    }
    assert rows["train"][-1] == "3.0/5" and rows["val"][-1] == "1.0/5"


def test_mine_and_evaluate_check_the_output_before_the_work(tmp_path):
    (tmp_path / "out").write_text("a user's file")
    with pytest.raises(SfmpairsError, match="output exists"):
        mine(tmp_path / "no-store.h5", tmp_path / "out")
    with pytest.raises(SfmpairsError, match="output exists"):
        evaluate(tmp_path / "out", pairs=tmp_path / "no-pairs.h5", descriptors=tmp_path / "no.h5")
    assert (tmp_path / "out").read_text() == "a user's file"


# ----------------------------------------------------------------------------- help
def test_every_option_has_help_and_help_shows_no_escapes():
    import click

    for name, command in main.commands.items():
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help, f"sfmpairs {name} {param.opts[0]} has no description"
        text = cli(name, "--help").output
        assert "%%" not in text, name
    from sfmpairs.retrieval.backbones import BACKBONES

    text = " ".join(cli("train", "--help").output.split())
    assert all(arch in text for arch in BACKBONES)


def test_unknown_val_cluster_lists_the_valid_ones(small_world, tmp_path):
    _, clusters = store_names(small_world / "sfm.h5")
    with pytest.raises(SfmpairsError, match="no cluster named 'nope'") as e:
        mine(small_world / "sfm.h5", tmp_path / "p.h5", val_clusters=["nope"])
    assert str(e.value).endswith("its clusters: " + ", ".join(clusters))


def test_show_points_a_val_query_to_split_val(small_world, tmp_path):
    with h5py.File(small_world / "pairs.h5", "r") as f:
        name = f["images/name"].asstr()[f["val/query"][0]]
    r = cli("show", small_world / "pairs.h5", "--query", name, "-o", tmp_path / "t.png")
    assert r.exit_code == 2 and "it is a query of the val split: add --split val" in r.stderr
    r = cli(
        "show",
        small_world / "pairs.h5",
        "--query",
        name,
        "--split",
        "val",
        "--images-root",
        small_world / "photos",
        "-o",
        tmp_path / "t.png",
    )
    assert r.exit_code == 0, r.stderr


# ----------------------------------------------------------------------------- off-the-shelf
def test_extract_and_evaluate_an_off_the_shelf_network_from_a_local_weights_file(small_world, tmp_path):
    """The paper's baseline from the command line on an offline machine: --arch with
    --pretrained FILE; descriptors against torchvision's network and GeM by hand."""
    import torchvision
    from PIL import Image

    torch.manual_seed(1)
    reference = torchvision.models.resnet18(weights=None).eval()
    torch.save(reference.state_dict(), tmp_path / "resnet18-local.pth")
    photos = small_world / "photos"
    r = cli(
        "extract",
        "--arch",
        "resnet18",
        "--pretrained",
        tmp_path / "resnet18-local.pth",
        "--store",
        small_world / "sfm.h5",
        "--images-root",
        photos,
        "-o",
        tmp_path / "d.h5",
        "--device",
        "cpu",
        "--precision",
        "fp32",
        "--workers",
        0,
    )
    assert r.exit_code == 0, r.stderr
    with h5py.File(tmp_path / "d.h5", "r") as f:
        name, got = f["names"].asstr()[0], f["descriptors"][0]
    x = torch.from_numpy(np.asarray(Image.open(photos / name).convert("RGB"), np.float32) / 255).permute(2, 0, 1)
    x = (x - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    with torch.no_grad():
        fmap = torch.nn.Sequential(*list(reference.children())[:-2])(x[None])[0]  # the 64 x 48 photo, not resized
    v = fmap.clamp(min=1e-6).pow(3).mean(dim=(1, 2)).pow(1 / 3)  # GeM, p = 3
    np.testing.assert_allclose(got, (v / v.norm()).numpy(), atol=1e-5)
    r = cli(
        "evaluate",
        "--pairs",
        small_world / "pairs.h5",
        "--arch",
        "resnet18",
        "--pretrained",
        tmp_path / "resnet18-local.pth",
        "--images-root",
        photos,
        "--device",
        "cpu",
        "--precision",
        "fp32",
        "-o",
        tmp_path / "r.json",
    )
    assert r.exit_code == 0, r.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["network"]["arch"] == "resnet18" and "resnet18-local.pth" in str(report["network"]["pretrained"])
    same = evaluate(tmp_path / "same.json", pairs=small_world / "pairs.h5", descriptors=tmp_path / "d.h5")
    assert report["mAP"] == pytest.approx(same["mAP"], abs=1e-6)
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), tmp_path / "resnet34.pth")
    r = cli(
        "extract",
        "--arch",
        "resnet18",
        "--pretrained",
        tmp_path / "resnet34.pth",
        "--store",
        small_world / "sfm.h5",
        "--images-root",
        photos,
        "-o",
        tmp_path / "bad.h5",
    )
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and "resnet34.pth" in r.stderr
    assert not (tmp_path / "bad.h5").exists()


def test_training_positives_follow_the_pair_files_min_co_observed(small_world, tmp_path):
    """Every epoch, mac positives are the most similar of the candidates that share at
    least the pair file's --min-co-observed points (not 1), max-inliers the file's."""
    names, _ = store_names(small_world / "sfm.h5")
    random_descriptors(tmp_path / "d.h5", names, seed=1)
    with h5py.File(small_world / "pairs.h5", "r") as f:
        co = f["train/pool_co_observed"][()]
    m = int(np.median(co[co > 0]))
    assert m > 1
    photos = small_world / "photos"
    torch.manual_seed(0)
    net = build_network({"arch": "resnet18"})
    opts = make_conf(TrainConf, **{**SMALL, "neg_num": 2, "amp": False, "skip_bad": False, "query_size": 1000})
    for strategy in ("mac", "max-inliers"):
        mine(
            small_world / "sfm.h5",
            tmp_path / f"{strategy}.h5",
            strategy=strategy,
            descriptors=tmp_path / "d.h5",
            min_co_observed=m,
            queries_per_cluster=0,
            val_fraction=0.34,
            max_scale_change=3.0,
        )
        pairs = _read_pairs(tmp_path / f"{strategy}.h5")
        tuples, _ = mine_epoch(net, pairs, opts, np.random.default_rng(0), torch.device("cpu"), photos)
        query = list(pairs["train/query"])
        assert len(tuples) == len(query)
        for t in tuples:
            k = query.index(t[0])
            pool, shared = pairs["train/pool"][k], pairs["train/pool_co_observed"][k]
            assert shared[list(pool).index(t[1])] >= m
            if strategy == "max-inliers":
                assert t[1] == pairs["train/positive"][k]
    # mac by hand for one query: the network's most similar candidate
    from sfmpairs.retrieval.extract import extract_descriptors

    pairs = _read_pairs(tmp_path / "mac.h5")
    tuples, _ = mine_epoch(net, pairs, opts, np.random.default_rng(0), torch.device("cpu"), photos)
    q, p = tuples[0][:2]
    k = list(pairs["train/query"]).index(q)
    cands = [int(i) for i, c in zip(pairs["train/pool"][k], pairs["train/pool_co_observed"][k]) if i >= 0 and c >= m]
    d, _ = extract_descriptors(
        net,
        photos,
        [pairs["names"][i] for i in [q, *cands]],
        image_size=SMALL["image_size"],
        workers=0,
        precision="fp32",
    )
    assert p == cands[int(np.argmax(d[1:] @ d[0]))]


def test_val_splits_that_cannot_measure_are_refused(small_world, tmp_path):
    """One val cluster: every val image is a positive or junk, mAP is 100 whatever the
    network. No query with a positive: no mAP at all."""
    names, clusters = store_names(small_world / "sfm.h5")
    random_descriptors(tmp_path / "d.h5", names)
    mine(small_world / "sfm.h5", tmp_path / "one.h5", queries_per_cluster=0, val_clusters=[clusters[0]])
    for run in (
        lambda: train(tmp_path / "one.h5", small_world / "photos", tmp_path / "r1", **SMALL),
        lambda: evaluate(tmp_path / "e1.json", pairs=tmp_path / "one.h5", descriptors=tmp_path / "d.h5"),
    ):
        with pytest.raises(SfmpairsError, match="val split has one cluster.*mAP is 100 whatever.*--val-clusters A,B"):
            run()
    with pytest.raises(SfmpairsError, match="no val query has a positive .*at least 100000 3D points"):
        train(small_world / "pairs.h5", small_world / "photos", tmp_path / "r2", **SMALL, min_covisible=100000)
    with pytest.raises(SfmpairsError, match="no val query has a positive .*lower --min-covisible"):
        evaluate(
            tmp_path / "e2.json", pairs=small_world / "pairs.h5", descriptors=tmp_path / "d.h5", min_covisible=100000
        )
    assert not any((tmp_path / x).exists() for x in ("r1", "r2", "e1.json", "e2.json"))


def test_mine_puts_at_least_two_clusters_in_val_when_it_can(small_world, tmp_path):
    _, clusters = store_names(small_world / "sfm.h5")  # 6 clusters: 0.2 x 6 rounds to 1
    mine(small_world / "sfm.h5", tmp_path / "p.h5", queries_per_cluster=0)
    with h5py.File(tmp_path / "p.h5", "r") as f:
        assert list(f["clusters/split"].asstr()[()]).count("val") == 2


def test_weights_refuse_network_options_and_config_records_the_weights_used(small_world, tmp_path):
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "init.pt", build_network({"arch": "resnet18"}))
    options = {k: v for k, v in ONE_EPOCH.items() if k != "arch"}
    for clash in ({"whitening": 64}, {"arch": "resnet18"}, {"pretrained": True}):
        with pytest.raises(SfmpairsError, match=f"--{next(iter(clash))} cannot go with it"):
            train(
                small_world / "pairs.h5",
                small_world / "photos",
                tmp_path / "r",
                weights=tmp_path / "init.pt",
                **options,
                **clash,
            )
    train(small_world / "pairs.h5", small_world / "photos", tmp_path / "r", weights=tmp_path / "init.pt", **options)
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["pretrained"] is False and config["whitening"] is None
    assert config["weights"] == str((tmp_path / "init.pt").resolve())


def test_resume_takes_the_same_pair_file_moved_but_no_other(small_world, tmp_path):
    shutil.copy(small_world / "pairs.h5", tmp_path / "pairs.h5")
    train(tmp_path / "pairs.h5", small_world / "photos", tmp_path / "run", **ONE_EPOCH)
    (tmp_path / "pairs.h5").rename(tmp_path / "moved.h5")
    mine(
        small_world / "sfm.h5",
        tmp_path / "other.h5",
        queries_per_cluster=0,
        val_fraction=0.34,
        seed=7,
        max_scale_change=3.0,
    )
    with pytest.raises(SfmpairsError, match="other.h5: not the pair file .* trains on"):
        train(tmp_path / "other.h5", None, tmp_path / "run", resume=True, epochs=2)
    train(tmp_path / "moved.h5", None, tmp_path / "run", resume=True, epochs=2)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["pairs"] == str(tmp_path / "moved.h5")


def test_resume_of_a_run_of_an_older_sfmpairs(small_world, tmp_path):
    """Its config.json lacks what this version added (test_image_size, pairs_sha256):
    the run goes on as that version ran it (validation at the training size)."""
    train(small_world / "pairs.h5", small_world / "photos", tmp_path / "run", **ONE_EPOCH)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    for key in ("test_image_size", "pairs_sha256"):
        del config[key]
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    train(None, None, tmp_path / "run", resume=True, epochs=2)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["test_image_size"] == SMALL["image_size"]


@pytest.mark.parametrize("saved", [False, True], ids=["before-last.pt", "after-last.pt"])
def test_a_stop_around_the_checkpoint_leaves_one_metrics_line_per_epoch(small_world, tmp_path, monkeypatch, saved):
    """Stopped while epoch 1's last.pt is written (or right after): the resumed run's
    metrics.jsonl has each epoch once, neither a gap nor a repeat."""
    import sfmpairs.train.train as T

    real = T.save_checkpoint

    def dies_saving_last_of_epoch_1(path, net, **extra):
        if path.name == "last.pt" and extra.get("epoch") == 1:
            if saved:
                real(path, net, **extra)
            raise KeyboardInterrupt()
        return real(path, net, **extra)

    monkeypatch.setattr(T, "save_checkpoint", dies_saving_last_of_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        train(small_world / "pairs.h5", small_world / "photos", tmp_path / "run", **SMALL)
    monkeypatch.undo()
    train(None, None, tmp_path / "run", resume=True)
    epochs = [json.loads(x)["epoch"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [-1, 0, 1, 2]


def test_descriptors_that_are_not_finite_stop_training_with_the_cause(small_world, tmp_path):
    torch.manual_seed(0)
    net = build_network({"arch": "resnet18"})
    with torch.no_grad():
        net.features[0].weight[0, 0, 0, 0] = float("nan")
    save_checkpoint(tmp_path / "nan.pt", net)
    options = {k: v for k, v in ONE_EPOCH.items() if k != "arch"}
    with pytest.raises(
        SfmpairsError,
        match=r"^before training: \d+ of \d+ descriptors are not finite \(first: .*\) "
        r"in float32; the network's weights hold NaN or infinity "
        r"\(none written yet\)$",
    ):
        train(small_world / "pairs.h5", small_world / "photos", tmp_path / "r", weights=tmp_path / "nan.pt", **options)
