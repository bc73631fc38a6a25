"""``sfmpairs demo``: the whole pipeline on a synthetic world it makes itself, in minutes.

synth (rendered photos, exact COLMAP models) -> ingest -> mine (relaxed) -> evaluate a
randomly initialised network -> train it -> evaluate again; plus a picture of mined
tuples. Prints the val mAP before and after training.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .common import SfmpairsError

logger = logging.getLogger("sfmpairs.demo")

DEMO = {
    "clusters": 10,
    "images_per_cluster": 24,
    "image_size": (224, 168),
    "points": 2000,
    "arch": "resnet18",
    "train_size": 128,
    "test_size": 224,
    "lr": 1e-4,
    "query_size": 200,
    "pool_size": 400,
}


def run_demo(
    workdir: str | Path, seed: int = 0, epochs: int = 6, device: str = "cpu", overwrite: bool = False, **overrides
) -> dict:
    import torch

    from sfmpairs.mining.mine import mine
    from sfmpairs.retrieval.evaluate import evaluate
    from sfmpairs.retrieval.network import build_network, save_checkpoint
    from sfmpairs.sfm_io.ingest import ingest
    from sfmpairs.synthetic.world import synth
    from sfmpairs.train.train import train

    from .info import summary
    from .show import show

    conf = {**DEMO, **overrides}
    workdir = Path(workdir)
    world, store, pairs = workdir / "world", workdir / "sfm.h5", workdir / "pairs.h5"
    run_dir, picture = workdir / "run", workdir / "tuples.png"
    if workdir.exists() and any(workdir.iterdir()) and not overwrite:
        raise SfmpairsError(f"{workdir}: folder exists and is not empty; pass --overwrite")
    workdir.mkdir(parents=True, exist_ok=True)
    say = print
    say(f"1/6 synth: {conf['clusters']} places x {conf['images_per_cluster']} rendered photos -> {world}")
    synth(
        world,
        clusters=conf["clusters"],
        images_per_cluster=conf["images_per_cluster"],
        image_size=conf["image_size"],
        seed=seed,
        overwrite=True,
        points=conf["points"],
    )
    say(f"2/6 ingest -> {store}")
    ingest([world], store, overwrite=True)
    say(f"3/6 mine (relaxed) -> {pairs}")
    mine(store, pairs, strategy="relaxed", queries_per_cluster=0, val_fraction=0.3, seed=seed, overwrite=True)
    torch.manual_seed(seed)
    net = build_network({"arch": conf["arch"], "image_size": conf["test_size"]})
    save_checkpoint(workdir / "init.pt", net)
    say(f"4/6 evaluate the randomly initialised {conf['arch']} on the val split")
    before = evaluate(
        workdir / "eval_before.json",
        pairs=pairs,
        model=workdir / "init.pt",
        images_root=world,
        device=device,
        overwrite=True,
    )
    say(f"5/6 train {epochs} epochs on {device} -> {run_dir}")
    train(
        pairs,
        world,
        run_dir,
        overwrite=True,
        weights=workdir / "init.pt",
        epochs=epochs,
        image_size=conf["train_size"],
        test_image_size=conf["test_size"],
        lr=conf["lr"],
        query_size=conf["query_size"],
        pool_size=conf["pool_size"],
        device=device,
        seed=seed,
    )
    say("6/6 evaluate the trained network")
    after = evaluate(
        workdir / "eval_after.json",
        pairs=pairs,
        model=run_dir / "best.pt",
        images_root=world,
        device=device,
        overwrite=True,
    )
    say("   hard negatives with the trained network, and a picture of mined tuples")
    from sfmpairs.retrieval.extract import extract

    extract(run_dir / "best.pt", workdir / "descriptors.h5", store=store, device=device, overwrite=True)
    mine(
        store,
        workdir / "pairs_negatives.h5",
        strategy="relaxed",
        queries_per_cluster=0,
        val_fraction=0.3,
        seed=seed,
        descriptors=workdir / "descriptors.h5",
        overwrite=True,
    )
    show(workdir / "pairs_negatives.h5", world, picture, count=5, seed=seed, overwrite=True)
    say("")
    say(summary(workdir / "pairs_negatives.h5"))
    say(
        f"\nval mAP before training {100 * before['mAP']:.2f}, after {100 * after['mAP']:.2f} "
        f"({100 * (after['mAP'] - before['mAP']):+.2f} points)"
    )
    say(
        f"Outputs: photos and COLMAP models {world}, SfM store {store}, pairs {pairs}, "
        f"run {run_dir} (best.pt, metrics.jsonl), descriptors {workdir / 'descriptors.h5'}, "
        f"pairs with hard negatives {workdir / 'pairs_negatives.h5'}, mined tuples {picture}"
    )
    return {"before": before["mAP"], "after": after["mAP"]}
