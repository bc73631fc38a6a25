"""Training speed: one epoch (mining and training) of ``sfmpairs train`` against a
reference epoch that does what the authors' PyTorch code does: one image per forward in
mining and in training, every image decoded and resized from disk at every use.

On the real photos in ``$SFMPAIRS_DATA/colmap`` (ingested and mined here), resnet18 at
image size 362, the same tuples for both (mined once with the same network).
Target (issue 5): at least 2x faster on CPU. On CUDA it prints tuples per second.

    python benchmarks/bench_train.py [--device cpu|cuda] [--queries 60] [--pool 120] [--amp]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SFMPAIRS_DATA", REPO.parent / "shared" / "data"))
SCENES = ["statue-of-liberty", "fountain-p11", "computer-mouse", "drinks-can", "eyedrop-box", "lego-batmobile"]


def reference_epoch(net, pairs, opts, rng, device, root):
    """Mining and training as cirtorch does them: one image per forward, no cache."""
    from sfmpairs.mining.negatives import hard_negatives
    from sfmpairs.retrieval.data import load_image
    from sfmpairs.train.train import _freeze_batchnorm, tuple_loss

    names, cluster = pairs["names"], pairs["cluster"]
    train_q = pairs["train/query"]
    pick = np.sort(rng.choice(len(train_q), min(opts["query_size"], len(train_q)), replace=False))
    queries = train_q[pick]
    pool = np.sort(rng.choice(pairs["train/images"], min(opts["pool_size"], len(pairs["train/images"])), replace=False))
    positives = np.array(
        [pairs["train/pool"][k][rng.choice(np.flatnonzero(pairs["train/pool_passes"][k]))] for k in pick]
    )

    def describe(indices):
        net.eval()
        with torch.no_grad():
            return np.stack(
                [
                    net(net.normalise_input(load_image(root / names[i], opts["image_size"])[None].to(device)))
                    .cpu()
                    .numpy()[0]
                    for i in indices
                ]
            )

    qd, pd = describe(queries), describe(pool)
    idx, _ = hard_negatives(qd, cluster[queries], pd, cluster[pool], opts["neg_num"])
    tuples = [[int(q), int(p), *[int(pool[j]) for j in row if j >= 0]] for q, p, row in zip(queries, positives, idx)]
    net.train()
    _freeze_batchnorm(net)
    opt = torch.optim.Adam(net.parameters(), lr=1e-6)
    for b in range(0, len(tuples), opts["batch_size"]):
        opt.zero_grad()
        for t in tuples[b : b + opts["batch_size"]]:
            out = torch.cat(
                [net(net.normalise_input(load_image(root / names[i], opts["image_size"])[None].to(device))) for i in t]
            )
            loss = tuple_loss(out, [list(range(len(t)))], "contrastive", 0.85)
            loss.backward()
        opt.step()
    return len(tuples)


def main() -> None:
    from sfmpairs.config import conf_dict, make_conf
    from sfmpairs.mining.mine import mine
    from sfmpairs.retrieval.network import build_network
    from sfmpairs.sfm_io.ingest import ingest
    from sfmpairs.train.options import TrainConf
    from sfmpairs.train.train import ImageCache, _optimizer, _read_pairs, mine_epoch, train_epoch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--queries", type=int, default=60)
    ap.add_argument("--pool", type=int, default=120)
    ap.add_argument("--image-size", type=int, default=362)
    ap.add_argument("--amp", action="store_true", help="CPU: bfloat16 where the CPU computes it natively")
    args = ap.parse_args()
    root = DATA / "colmap"
    if not root.is_dir():
        raise SystemExit(f"no photos under {root} (set SFMPAIRS_DATA)")
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        ingest([root / s for s in SCENES], Path(tmp) / "sfm.h5")
        mine(Path(tmp) / "sfm.h5", Path(tmp) / "pairs.h5", queries_per_cluster=0, val_clusters=["drinks-can/sparse/0"])
        pairs = _read_pairs(Path(tmp) / "pairs.h5")
    conf = make_conf(
        TrainConf,
        query_size=args.queries,
        pool_size=args.pool,
        image_size=args.image_size,
        amp=device.type == "cuda" or args.amp,
        margin=0.85,
        lr=1e-6,
    )
    opts = conf_dict(conf)  # the reference reads a plain dict
    print(
        f"{len(pairs['train/query'])} train queries; epoch of {args.queries} queries, pool {args.pool}, "
        f"resnet18 at {args.image_size} px on {device}"
    )
    torch.manual_seed(0)
    net = build_network({"arch": "resnet18", "image_size": args.image_size}).to(device)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    t = time.perf_counter()
    n_ref = reference_epoch(net, pairs, opts, np.random.default_rng(0), device, root)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t_ref = time.perf_counter() - t
    net.load_state_dict(state)
    net = net.to(memory_format=torch.channels_last)
    optimizer = _optimizer(net, conf)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
    cache = ImageCache(root, args.image_size, 2 << 30)
    t = time.perf_counter()
    tuples, _ = mine_epoch(net, pairs, conf, np.random.default_rng(0), device, root)
    train_epoch(net, tuples, pairs["names"], conf, optimizer, scaler, device, cache, 0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t_ours = time.perf_counter() - t
    print(f"reference epoch: {t_ref:.1f} s ({n_ref / t_ref:.2f} tuples/s)")
    print(f"sfmpairs epoch:  {t_ours:.1f} s ({len(tuples) / t_ours:.2f} tuples/s)")
    print(f"speed-up: {t_ref / t_ours:.2f}x  (target >= 2.00 on CPU)")


if __name__ == "__main__":
    main()
