"""Training: the losses by hand, one step lowers the loss, per-epoch mining rules, resume
reproduces an uninterrupted run, bad input; and an end-to-end run on real photos."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import COLMAP, SMALL, needs_real_data
from sfmpairs import SfmpairsError
from sfmpairs.config import make_conf
from sfmpairs.retrieval.network import build_network, load_checkpoint
from sfmpairs.train.options import TrainConf
from sfmpairs.train.train import contrastive_loss, mine_epoch, train, triplet_loss, tuple_loss


def test_contrastive_loss_by_hand():
    q = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    x = torch.tensor([[0.6, 0.8], [0.0, 1.0]])  # d = sqrt(0.16 + 0.64) = 0.894..., sqrt(2)
    d1, d2 = np.sqrt(0.8), np.sqrt(2.0)
    # positive: 1/2 d²; negative: 1/2 max(0, m - d)²
    got = contrastive_loss(q, x, torch.tensor([1.0, 0.0]), margin=1.5)
    assert float(got) == pytest.approx(0.5 * d1**2 + 0.5 * (1.5 - d2) ** 2)
    got = contrastive_loss(q, x, torch.tensor([0.0, 0.0]), margin=0.7)  # both beyond the margin
    assert d1 > 0.7 and float(got) == 0.0
    got = contrastive_loss(q, x, torch.tensor([0.0, 0.0]), margin=1.0)  # the first within it
    assert float(got) == pytest.approx(0.5 * (1.0 - d1) ** 2)
    assert float(triplet_loss(q[0], x[0], x[1:], 0.5)) == pytest.approx(max(0, 0.8 - 2.0 + 0.5))
    assert float(triplet_loss(q[0], x[0], x[1:], 2.0)) == pytest.approx(0.8 - 2.0 + 2.0)


def test_tuple_loss_sums_the_pairs_of_each_tuple():
    torch.manual_seed(0)
    desc = torch.nn.functional.normalize(torch.randn(6, 4), dim=1)
    tuples = [[0, 1, 2, 3], [4, 5, 2]]
    got = tuple_loss(desc, tuples, "contrastive", 0.85)
    expect = 0
    for t in tuples:
        for k, j in enumerate(t[1:]):
            d = float((desc[t[0]] - desc[j]).norm())
            expect += 0.5 * d * d if k == 0 else 0.5 * max(0.0, 0.85 - d) ** 2
    assert float(got) == pytest.approx(expect, rel=1e-5)


def test_the_optimizer_steps_lower_the_loss_and_move_gem_p_ten_times_faster():
    """The project's optimizer set-up (_optimizer): Adam's first step moves every weight by
    about lr (its update is lr g / (|g| + eps)), GeM's p by p_lr_factor times that, with
    no weight decay on p; and a few steps lower the loss of a fixed batch."""
    from sfmpairs.train.train import _optimizer

    torch.manual_seed(0)
    net = build_network({"arch": "resnet18", "pool": "gem"})
    net.train()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    x = torch.rand(7, 3, 64, 64)
    tuples = [[0, 1, 2, 3, 4], [5, 6, 2, 3]]
    lr = 1e-4
    opt = _optimizer(net, make_conf(TrainConf, lr=lr, weight_decay=1e-6, p_lr_factor=10.0, optimizer="adam"))
    groups = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert groups[id(net.p)]["weight_decay"] == 0.0 and groups[id(net.p)]["lr"] == pytest.approx(10 * lr)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(net.parameters()))
    p0, w0 = float(net.p.detach()), net.features[0].weight.detach().clone()
    losses = []
    for step in range(3):
        loss = tuple_loss(net(net.normalise_input(x)), tuples, "contrastive", 0.85)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if step == 0:
            assert abs(float(net.p.detach()) - p0) == pytest.approx(10 * lr, rel=1e-2)
            moved = (net.features[0].weight.detach() - w0).abs()
            assert float(moved.max()) == pytest.approx(lr, rel=1e-2)
    assert losses[-1] < losses[0]


def test_mining_obeys_the_rules_and_follows_the_network(small_world):
    from sfmpairs.train.train import _read_pairs

    pairs = _read_pairs(small_world / "pairs.h5")
    opts = make_conf(TrainConf, **{**SMALL, "neg_num": 3, "amp": False, "skip_bad": False})
    cluster = pairs["cluster"]
    torch.manual_seed(0)
    net_a = build_network({"arch": "resnet18", "image_size": 48})
    torch.manual_seed(1)
    net_b = build_network({"arch": "resnet18", "image_size": 48})
    a, stats = mine_epoch(net_a, pairs, opts, np.random.default_rng(0), torch.device("cpu"), small_world / "photos")
    b, _ = mine_epoch(net_b, pairs, opts, np.random.default_rng(0), torch.device("cpu"), small_world / "photos")
    train_images = set(pairs["train/images"].tolist())
    for t in a:
        q, p, negs = t[0], t[1], t[2:]
        assert cluster[p] == cluster[q] and p != q
        assert all(cluster[n] != cluster[q] for n in negs)  # other clusters only
        assert len({cluster[n] for n in negs}) == len(negs)  # at most one per cluster
        assert set(t) <= train_images
    assert [t[:2] for t in a] == [t[:2] for t in b]  # the same draws...
    assert [t[2:] for t in a] != [t[2:] for t in b]  # ...but other networks, other negatives
    assert stats["queries"] == 12 and stats["negative_distance"] > 0


def test_relaxed_positives_vary_between_epochs_and_pass(small_world):
    from sfmpairs.train.train import _read_pairs

    pairs = _read_pairs(small_world / "pairs.h5")
    opts = make_conf(TrainConf, **{**SMALL, "neg_num": 2, "amp": False, "skip_bad": False, "query_size": 1000})
    net = build_network({"arch": "resnet18", "image_size": 48})
    rng = np.random.default_rng(0)
    seen = {}
    for _ in range(3):
        tuples, _ = mine_epoch(net, pairs, opts, rng, torch.device("cpu"), small_world / "photos")
        for t in tuples:
            k = list(pairs["train/query"]).index(t[0])
            passing = pairs["train/pool"][k][pairs["train/pool_passes"][k]]
            assert t[1] in passing
            seen.setdefault(t[0], set()).add(t[1])
    assert max(len(v) for v in seen.values()) > 1


def test_run_folder_and_resume_reproduces_an_uninterrupted_run(small_world, tmp_path):
    pairs, photos = small_world / "pairs.h5", small_world / "photos"
    full = train(pairs, photos, tmp_path / "full", **SMALL)

    class Killed(Exception):
        pass

    def kill_after_epoch_1(epoch, metrics):
        if epoch == 1:
            raise Killed()

    with pytest.raises(Killed):
        train(pairs, photos, tmp_path / "cut", on_epoch_end=kill_after_epoch_1, **SMALL)
    resumed = train(None, None, tmp_path / "cut", resume=True)
    assert resumed["epoch"] == full["epoch"] == 2
    a, _ = load_checkpoint(tmp_path / "full" / "last.pt")
    b, _ = load_checkpoint(tmp_path / "cut" / "last.pt")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)
    lines = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [-1, 0, 1, 2]  # -1: the val mAP before training
    assert lines[0]["loss"] is None and 0 <= lines[0]["val_map"] <= 1
    assert {"loss", "positive_distance", "negative_distance", "val_map", "lr", "seconds"} <= set(lines[1])
    assert [m["skipped_images"] for m in lines] == [0, 0, 0, 0]  # no bad photo, none skipped
    cut = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in cut] == [-1, 0, 1, 2]  # each epoch once: the line of the kill redone
    assert lines[2]["lr"] == pytest.approx(lines[1]["lr"] * np.exp(-0.1))
    config = json.loads((tmp_path / "full" / "config.json").read_text())
    assert config["margin"] == 0.85 and config["arch"] == "resnet18"
    assert (tmp_path / "full" / "best.pt").exists()
    # extract reads the checkpoints
    net, state = load_checkpoint(tmp_path / "full" / "best.pt")
    assert net.config["image_size"] == 48 and "val_map" in state
    from sfmpairs.info import summary

    text = summary(tmp_path / "full" / "best.pt")
    assert f"training    epoch {state['epoch']}" in text and "image size 48" in text
    with pytest.raises(SfmpairsError, match="run folder exists"):
        train(pairs, photos, tmp_path / "full", **SMALL)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(small_world, tmp_path, monkeypatch):
    import sfmpairs.train.train as T

    pairs, photos = small_world / "pairs.h5", small_world / "photos"
    real = T.tuple_loss
    calls = {"epoch": 0}

    def poisoned(desc, tuples, kind, margin):
        loss = real(desc, tuples, kind, margin)
        return loss * float("nan") if calls["epoch"] >= 1 else loss

    monkeypatch.setattr(T, "tuple_loss", poisoned)
    with pytest.raises(SfmpairsError, match="loss is nan.*last.pt"):
        train(pairs, photos, tmp_path / "run", on_epoch_end=lambda e, m: calls.update(epoch=e + 1), **SMALL)
    _, state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["train"]["epoch"] == 0  # the good one


def test_bad_train_input(small_world, tmp_path):
    with pytest.raises(SfmpairsError, match="not a pair file"):
        train(small_world / "sfm.h5", small_world / "photos", tmp_path / "r", **SMALL)
    with pytest.raises(SfmpairsError, match="images root"):
        train(small_world / "pairs.h5", tmp_path / "nowhere", tmp_path / "r2", **SMALL)
    with pytest.raises(SfmpairsError, match="nothing to resume"):
        train(None, None, tmp_path / "r3", resume=True)
    with pytest.raises(SfmpairsError, match="unknown --loss"):
        train(small_world / "pairs.h5", small_world / "photos", tmp_path / "r4", **{**SMALL, "loss": "hinge"})


@needs_real_data()
def test_end_to_end_on_real_photos(tmp_path):
    """ingest, mine, train two short epochs from random init on CPU, evaluate."""
    from click.testing import CliRunner

    from sfmpairs.cli import main

    scenes = ["statue-of-liberty", "fountain-p11", "computer-mouse", "drinks-can", "eyedrop-box", "lego-batmobile"]

    def run(*args):
        r = CliRunner().invoke(main, ["-q", *[str(a) for a in args]])
        assert r.exit_code == 0, r.stderr
        return r

    run("ingest", *[COLMAP / s for s in scenes], "-o", tmp_path / "sfm.h5")
    run(
        "mine",
        tmp_path / "sfm.h5",
        "-o",
        tmp_path / "pairs.h5",
        "--val-clusters",
        "statue-of-liberty/sparse/0,drinks-can/sparse/0",
    )
    run(
        "train",
        "--pairs",
        tmp_path / "pairs.h5",
        "--images-root",
        COLMAP,
        "-o",
        tmp_path / "run",
        "--arch",
        "resnet18",
        "--epochs",
        2,
        "--image-size",
        96,
        "--query-size",
        30,
        "--pool-size",
        60,
        "--lr",
        1e-4,
        "--device",
        "cpu",
        "--test-image-size",
        96,
        "--neg-num",
        3,
    )
    r = run(
        "evaluate",
        "--pairs",
        tmp_path / "pairs.h5",
        "--model",
        tmp_path / "run" / "best.pt",
        "--images-root",
        COLMAP,
        "--device",
        "cpu",
        "-o",
        tmp_path / "report.json",
    )
    report = json.loads((tmp_path / "report.json").read_text())
    assert 0 < report["mAP"] <= 1 and report["queries"] > 0
    assert f"{100 * report['mAP']:.2f}" in r.stdout  # the printed table
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [-1, 0, 1] and all(np.isfinite(m["loss"]) for m in metrics[1:])


def test_training_keeps_batch_norm_statistics_frozen(small_world):
    from sfmpairs.train.train import ImageCache, _optimizer, _read_pairs, train_epoch

    pairs = _read_pairs(small_world / "pairs.h5")
    torch.manual_seed(0)
    net = build_network({"arch": "resnet18", "image_size": 48})
    bn = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    means = [m.running_mean.clone() for m in bn]
    conv = net.features[0].weight.detach().clone()
    q, p = pairs["train/query"], pairs["train/positive"]
    other = [int(i) for i in pairs["train/images"] if pairs["cluster"][i] != pairs["cluster"][q[0]]][:2]
    tuples = [[int(q[0]), int(p[0]), *other], [int(q[1]), int(p[1]), *other]]
    opts = make_conf(
        TrainConf,
        **{
            **SMALL,
            "loss": "contrastive",
            "margin": 0.85,
            "amp": False,
            "lr": 1e-3,
            "weight_decay": 0.0,
            "p_lr_factor": 10.0,
            "optimizer": "adam",
        },
    )
    optimizer = _optimizer(net, opts)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    train_epoch(
        net,
        tuples,
        pairs["names"],
        opts,
        optimizer,
        scaler,
        torch.device("cpu"),
        ImageCache(small_world / "photos", 48, 1 << 26),
        0,
    )
    assert not torch.equal(conv, net.features[0].weight)  # it trained...
    for m, before in zip(bn, means):  # ...with the batch statistics untouched
        torch.testing.assert_close(m.running_mean, before, rtol=0, atol=0)
