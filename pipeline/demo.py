"""``sfmpairs demo``: the whole pipeline on a synthetic world it makes itself, in minutes.

synth (a hard world: look-alike places, strong viewpoint and lighting change, occluders,
distractor photos; exact COLMAP models) -> ingest -> mine (relaxed; val: places never
trained on, and the distractors) -> evaluate a randomly initialised network -> train it
-> evaluate the same network trained; plus hard negatives mined with it, a picture of
mined tuples and one of the top results before and after training. Ends with a short
summary: val mAP before and after training, per epoch, and where the pictures are.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from .common import SfmpairsError

logger = logging.getLogger("sfmpairs.demo")

# the demo's world and training (measured over seeds 0 to 4: README, "sfmpairs demo")
DEMO = {
    "clusters": 40,
    "val_clusters": 10,
    "images_per_cluster": 8,
    "distractors": 20,
    "hard": True,
    "image_size": (160, 120),
    "points": 2000,
    "arch": "alexnet",
    "epochs": 5,
    "train_size": 128,
    "test_size": 160,
    "lr": 5e-5,
    "query_size": 200,
    "pool_size": 60,
}

# what the demo passes to train as it is (batch_size, neg_num: also when given to run_demo)
TRAIN_KEYS = ("lr", "query_size", "pool_size", "batch_size", "neg_num")

# the pictures the summary lists: (what, path in the work folder)
PICTURES = [
    ("training curves", "run/metrics.png"),
    ("top 5 before and after", "retrieval.png"),
    ("mined tuples", "tuples.png"),
]


def val_cluster_names(cluster_names, places: int, seed: int) -> list[str]:
    """The val split: ``places`` of the world's places, drawn with ``seed``, and the
    distractors' model (photos of no place: negatives of every val query)."""
    names = [str(n) for n in cluster_names]
    place = [n for n in names if n.startswith("cluster_")]
    chosen = np.random.default_rng(seed).choice(len(place), places, replace=False)
    return sorted(place[k] for k in chosen) + [n for n in names if n.startswith("distractors")]


def _check_conf(conf: dict) -> None:
    if conf["val_clusters"] < 2 or conf["clusters"] - conf["val_clusters"] < 2:
        raise SfmpairsError(
            f"demo: {conf['clusters']} places with {conf['val_clusters']} of them for val: "
            "give at least 2 val places and 2 others to train on"
        )


def make_world(work: dict, conf: dict, seed: int, say) -> list[str]:
    """synth and ingest the world; returns the val split's clusters."""
    from sfmpairs.sfm_io.ingest import ingest
    from sfmpairs.sfm_io.store import read_store
    from sfmpairs.synthetic.world import synth

    say(
        f"1/7 synth: {conf['clusters']} places x {conf['images_per_cluster']} rendered photos "
        f"and {conf['distractors']} distractor photos -> {work['world']}"
    )
    keys = ("clusters", "images_per_cluster", "image_size", "points", "hard", "distractors")
    synth(work["world"], seed=seed, overwrite=True, **{k: conf[k] for k in keys})
    say(f"2/7 ingest -> {work['store']}")
    ingest([work["world"]], work["store"], overwrite=True)
    names = read_store(work["store"], keys=["clusters/name"])["clusters/name"]
    return val_cluster_names(names, conf["val_clusters"], seed)


def evaluate_untrained(work: dict, conf: dict, seed: int, device: str, say) -> dict:
    """A randomly initialised network (``init.pt``, seeded) on the val split."""
    import torch

    from sfmpairs.retrieval.network import build_network, save_checkpoint

    say(f"4/7 evaluate a randomly initialised {conf['arch']} on the val split")
    torch.manual_seed(seed)
    net = build_network({"arch": conf["arch"], "image_size": conf["test_size"]})
    save_checkpoint(work["dir"] / "init.pt", net)
    return _evaluate(work, "eval_before.json", work["dir"] / "init.pt", device)


def _evaluate(work: dict, report: str, model: Path, device: str) -> dict:
    from sfmpairs.retrieval.evaluate import evaluate

    return evaluate(
        work["dir"] / report, pairs=work["pairs"], model=model, images_root=work["world"], device=device, overwrite=True
    )


def train_network(work: dict, conf: dict, seed: int, device: str, say) -> None:
    """Train ``init.pt`` on the pair file's train split into ``run/``."""
    from sfmpairs.train.train import train

    say(f"5/7 train it {conf['epochs']} epochs on {device} -> {work['run']}")
    train(
        work["pairs"],
        work["world"],
        work["run"],
        overwrite=True,
        weights=work["dir"] / "init.pt",
        epochs=conf["epochs"],
        image_size=conf["train_size"],
        test_image_size=conf["test_size"],
        device=device,
        seed=seed,
        **{key: conf[key] for key in TRAIN_KEYS if key in conf},
    )


def mine_with_trained(work: dict, mining: dict, seed: int, device: str, say) -> None:
    """Hard negatives mined with the trained network, and a picture of mined tuples."""
    from sfmpairs.mining.mine import mine
    from sfmpairs.retrieval.extract import extract

    from .show import show

    say("7/7 hard negatives mined with the trained network; pictures")
    descriptors, pairs = work["dir"] / "descriptors.h5", work["dir"] / "pairs_negatives.h5"
    extract(work["run"] / "last.pt", descriptors, store=work["store"], device=device, overwrite=True)
    mine(work["store"], pairs, descriptors=descriptors, overwrite=True, **mining)
    show(pairs, work["world"], work["dir"] / "tuples.png", count=5, seed=seed, overwrite=True)


def draw_retrieval(work: dict) -> None:
    """``retrieval.png``: the top 5 of a few val queries, untrained beside trained."""
    from .plot import compare_retrieval

    reports = [work["dir"] / "eval_before.json", work["dir"] / "eval_after.json"]
    compare_retrieval(
        reports,
        work["dir"] / "retrieval.png",
        labels=["untrained", "trained"],
        images_root=work["world"],
        overwrite=True,
    )


def per_epoch_map(run_dir: Path) -> list[float]:
    """The val mAP after each epoch, from the run's ``metrics.jsonl`` (its line of epoch
    -1 holds the mAP before training)."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [e["val_map"] for e in lines if e["epoch"] >= 0]


def summary_text(result: dict, workdir: Path) -> str:
    """The closing lines: the val split, val mAP before and after training and per
    epoch, where the pictures and the outputs are."""
    v, before, after = result["val"], 100 * result["before"], 100 * result["after"]
    per_epoch = " ".join(f"{100 * m:.1f}" for m in result["per_epoch"])
    return "\n".join(
        [
            f"val: {v['places']} places never trained on and {v['distractors']} distractor photos, "
            f"{v['queries']} queries",
            f"val mAP before training {before:.2f}, after {after:.2f} ({after - before:+.2f} points; "
            f"{result['arch']} from random weights, {len(result['per_epoch'])} epochs)",
            f"val mAP per epoch: {per_epoch}",
            "pictures:",
            *[f"  {what:<24}{workdir / path}" for what, path in PICTURES],
            f"outputs in {workdir}: world/ (photos, COLMAP models), sfm.h5, pairs.h5, init.pt (the untrained "
            "network), eval_before.json, run/ (last.pt, best.pt, metrics.jsonl), eval_after.json, descriptors.h5, "
            "pairs_negatives.h5; sfmpairs info FILE describes any of them",
            f"done in {result['seconds'] / 60:.1f} min",
        ]
    )


def run_demo(workdir: str | Path, seed: int = 0, device: str = "cpu", overwrite: bool = False, **overrides) -> dict:
    """Run the demo in ``workdir``; ``overrides`` change :data:`DEMO` (e.g. ``epochs``).
    Returns the val mAP before and after training (``before``, ``after``: the network
    as trained, ``last.pt``, so that val only measures and chooses nothing), after each
    epoch (``per_epoch``), the val split's size (``val``) and the wall-clock
    ``seconds``."""
    start, conf, say = time.perf_counter(), {**DEMO, **overrides}, print
    _check_conf(conf)
    workdir = Path(workdir)
    if workdir.exists() and any(workdir.iterdir()) and not overwrite:
        raise SfmpairsError(f"{workdir}: folder exists and is not empty; pass --overwrite")
    workdir.mkdir(parents=True, exist_ok=True)
    work = {"dir": workdir, "world": workdir / "world", "store": workdir / "sfm.h5", "pairs": workdir / "pairs.h5"}
    work["run"] = workdir / "run"
    val_clusters = make_world(work, conf, seed, say)
    from sfmpairs.mining.mine import mine

    say(f"3/7 mine (relaxed) -> {work['pairs']}")
    mining = {"strategy": "relaxed", "queries_per_cluster": 0, "val_clusters": val_clusters, "seed": seed}
    mined = mine(work["store"], work["pairs"], overwrite=True, **mining)
    before = evaluate_untrained(work, conf, seed, device, say)
    train_network(work, conf, seed, device, say)
    say("6/7 evaluate the trained network (last.pt)")
    after = _evaluate(work, "eval_after.json", work["run"] / "last.pt", device)
    mine_with_trained(work, mining, seed, device, say)
    draw_retrieval(work)
    result = {"before": before["mAP"], "after": after["mAP"], "per_epoch": per_epoch_map(work["run"])}
    result["arch"], result["seconds"] = conf["arch"], time.perf_counter() - start
    result["val"] = {
        "places": conf["val_clusters"],
        "distractors": conf["distractors"],
        "queries": mined["val_queries"],
    }
    say("\n" + summary_text(result, workdir))
    return result
