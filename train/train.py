"""``sfmpairs train``: fine-tuning with hard examples re-mined every epoch (Radenovic et
al., TPAMI 2018).

Each epoch:

1. draws ``query_size`` training queries and a random negative pool of ``pool_size``
   training images (seeded);
2. picks each query's positive by the pair file's strategy (``relaxed``: drawn afresh
   among the candidates that pass; ``max-inliers``: the file's; ``mac``: the candidate
   nearest with the current network);
3. extracts descriptors of the queries and the pool with the current network (the fast
   extraction path) and mines ``neg_num`` hard negatives per query with the mining
   stage's :func:`~sfmpairs.mining.negatives.hard_negatives`;
4. trains on (query, positive, negatives) tuples with the contrastive (or triplet)
   loss, batch normalisation frozen, images of equal size forwarded together (with
   frozen statistics this changes nothing but speed), decoded images cached in memory;
5. validates on the ``val`` split with the evaluation protocol.

The run folder holds ``config.json``, ``metrics.jsonl``, ``last.pt`` (every epoch) and
``best.pt`` (by val mAP), checkpoints that ``sfmpairs extract`` reads.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from sfmpairs.common import SfmpairsError, file_sha256, progress
from sfmpairs.mining.mine import pool_similarity, positive_slots
from sfmpairs.mining.negatives import hard_negatives
from sfmpairs.retrieval.data import load_image
from sfmpairs.retrieval.extract import NonFiniteDescriptors, extract_descriptors, resolve_device
from sfmpairs.retrieval.network import build_network, load_checkpoint, read_checkpoint, save_checkpoint

from .options import MARGINS, TRAIN_DEFAULTS

logger = logging.getLogger("sfmpairs.train")

DEFAULTS = TRAIN_DEFAULTS
# what --resume may change; everything else is the run's own
RESUME_OPTIONS = ("epochs", "lr", "device", "workers")
NETWORK_KEYS = ("arch", "pool", "p", "whitening")


# ----------------------------------------------------------------------------- losses
def contrastive_loss(q: torch.Tensor, x: torch.Tensor, label: torch.Tensor, margin: float) -> torch.Tensor:
    """Sum over pairs of ½ y d² + ½ (1 - y) max(0, margin - d)², d = ||q - x||."""
    d = (q - x).norm(dim=-1)
    return (0.5 * label * d.pow(2) + 0.5 * (1 - label) * (margin - d).clamp(min=0).pow(2)).sum()


def triplet_loss(q: torch.Tensor, p: torch.Tensor, n: torch.Tensor, margin: float) -> torch.Tensor:
    """Sum over negatives of max(0, ||q - p||² - ||q - n||² + margin)."""
    return ((q - p).pow(2).sum(-1) - (q - n).pow(2).sum(-1) + margin).clamp(min=0).sum()


def tuple_loss(desc: torch.Tensor, tuples: list[list[int]], kind: str, margin: float) -> torch.Tensor:
    """The loss of a batch of tuples; ``desc`` rows are the batch's images and each tuple
    lists rows (query, positive, negatives...)."""
    total = desc.new_zeros(())
    for t in tuples:
        q, p, negs = desc[t[0]], desc[t[1]], desc[t[2:]]
        if kind == "contrastive":
            others = desc[t[1:]]
            label = torch.zeros(len(others), device=desc.device)
            label[0] = 1
            total = total + contrastive_loss(q.expand_as(others), others, label, margin)
        else:
            total = total + triplet_loss(q, p, negs, margin)
    return total


# ----------------------------------------------------------------------------- images
class ImageCache:
    """Decoded, resized uint8 images in memory (least recently used out beyond
    ``max_bytes``), decoded by a thread pool (PIL releases the GIL)."""

    def __init__(self, root: Path, image_size: int, max_bytes: int, threads: int = 4):
        self.root, self.image_size, self.max_bytes = Path(root), image_size, max_bytes
        self.items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.pool = ThreadPoolExecutor(threads)

    def get(self, names: list[str]) -> list[torch.Tensor]:
        missing = [n for n in dict.fromkeys(names) if n not in self.items]
        for n, img in zip(missing, self.pool.map(lambda n: load_image(self.root / n, self.image_size), missing)):
            self.items[n] = img
            self.bytes += img.numel()
        out = []
        for n in names:
            self.items.move_to_end(n)
            out.append(self.items[n])
        while self.bytes > self.max_bytes and len(self.items) > len(set(names)):
            _, img = self.items.popitem(last=False)
            self.bytes -= img.numel()
        return out


# ----------------------------------------------------------------------------- the run
def _read_pairs(path: Path) -> dict:
    """The pair file as flat arrays (``train/query``...), the train split required."""
    from sfmpairs.mining.pairfile import read_pair_file

    p = read_pair_file(path)
    d = {"names": p["names"], "cluster": p["cluster"], "strategy": p["strategy"],
         "source_store": p["source_store"], "min_co_observed": p["min_co_observed"]}
    for split in ("train", "val"):
        s = p["splits"].get(split, {})
        for key in ("query", "positive", "images", "pool", "pool_passes", "pool_co_observed", "gt_indptr"):
            d[f"{split}/{key}"] = s.get(key, np.zeros(0, int))
    if len(d["train/query"]) == 0:
        raise SfmpairsError(f"{path}: the train split has no queries")
    return d


def _optimizer(net, opts):
    p_params = [net.p]
    other = [p for n, p in net.named_parameters() if n != "p"]
    groups = [{"params": other, "lr": opts["lr"], "weight_decay": opts["weight_decay"]},
              {"params": p_params, "lr": opts["lr"] * opts["p_lr_factor"], "weight_decay": 0.0}]
    if opts["optimizer"] == "adam":
        return torch.optim.Adam(groups, lr=opts["lr"])
    if opts["optimizer"] == "sgd":
        return torch.optim.SGD(groups, lr=opts["lr"], momentum=opts["momentum"])
    raise SfmpairsError(f"unknown optimizer {opts['optimizer']!r} (adam or sgd)")


def _freeze_batchnorm(net) -> None:
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


def mine_epoch(net, pairs: dict, opts: dict, rng, device, root: Path):
    """The tuples of one epoch: (query, positive, negatives...) image indices, and the
    mining statistics."""
    train_q = pairs["train/query"]
    pick = np.sort(rng.choice(len(train_q), min(opts["query_size"], len(train_q)), replace=False))
    queries = train_q[pick]
    images = pairs["train/images"]
    pool = np.sort(rng.choice(images, min(opts["pool_size"], len(images)), replace=False))
    strategy, rows = pairs["strategy"], pairs["train/pool"][pick]
    candidate = (rows >= 0) & (pairs["train/pool_co_observed"][pick] >= pairs["min_co_observed"])
    if strategy != "mac":  # relaxed draws afresh each epoch; max-inliers gives the file's
        slots = positive_slots(strategy, pairs["train/pool_passes"][pick], candidate,
                               pairs["train/pool_co_observed"][pick], rng)
        positives = rows[np.arange(len(pick)), slots]
        wanted = np.unique(np.concatenate([queries, positives, pool]))
    else:  # the candidates are described too: the positive is the nearest with this network
        wanted = np.unique(np.concatenate([queries, pool, rows[candidate]]))
    desc, bad = extract_descriptors(net, root, list(pairs["names"][wanted]), image_size=opts["image_size"],
                                    device=device, workers=opts["workers"], skip_bad=opts["skip_bad"],
                                    precision=extract_precision(device, opts), desc="mining")

    def row(images):  # rows of desc: wanted is sorted
        return np.minimum(np.searchsorted(wanted, images), len(wanted) - 1)

    ok = np.isfinite(desc).all(axis=1)
    if strategy == "mac":
        candidate &= ok[row(rows)]  # an unreadable candidate (--skip-bad) is none
        found = candidate.any(axis=1)
        queries, rows, candidate = queries[found], rows[found], candidate[found]
        similarity = pool_similarity(desc, row(queries), row(rows))
        positives = rows[np.arange(len(rows)), positive_slots("mac", candidate, candidate, None, rng, similarity)]
    pool = pool[ok[row(pool)]]
    keep = ok[row(queries)] & ok[row(positives)]
    queries, positives = queries[keep], positives[keep]
    qd = desc[row(queries)]
    idx, _ = hard_negatives(qd, pairs["cluster"][queries], desc[row(pool)], pairs["cluster"][pool],
                            opts["neg_num"])
    negatives = np.where(idx >= 0, pool[np.maximum(idx, 0)], -1)
    pd = desc[row(positives)]
    nd = np.where(idx[..., None] >= 0, desc[row(np.maximum(negatives, 0))], np.nan)
    nan = float("nan")
    stats = {"queries": int(len(queries)), "pool": int(len(pool)),
             "positive_distance": float(np.linalg.norm(qd - pd, axis=1).mean()) if len(qd) else nan,
             "negative_distance": float(np.nanmean(np.linalg.norm(qd[:, None] - nd, axis=2))) if len(qd) else nan}
    tuples = [[int(q), int(p), *[int(n) for n in negs if n >= 0]] for q, p, negs in zip(queries, positives, negatives)]
    # the queries were drawn sorted, so clusters come in blocks: shuffle, so that a batch
    # mixes clusters and every epoch has its own order
    tuples = [tuples[k] for k in rng.permutation(len(tuples))]
    return tuples, stats


def extract_precision(device, opts) -> str:
    """Mining and validation extract in mixed precision where training's ``amp`` is on
    (by default only on CUDA), else in float32."""
    amp = device.type == "cuda" if opts["amp"] is None else opts["amp"]
    return "auto" if amp else "fp32"


def train_epoch(net, tuples, names, opts, optimizer, scaler, device, cache: ImageCache, epoch: int):
    """One pass over the tuples (rows of image indices into ``names``); returns the mean
    loss per tuple. Stops on NaN."""
    net.train()
    _freeze_batchnorm(net)
    amp = device.type == "cuda" and opts["amp"] is not False
    total, count = 0.0, 0
    bar = progress(range(0, len(tuples), opts["batch_size"]), desc=f"epoch {epoch}", unit="batch")
    for b in bar:
        batch = tuples[b:b + opts["batch_size"]]
        images = sorted({i for t in batch for i in t})
        where = {img: k for k, img in enumerate(images)}
        tensors = cache.get([names[i] for i in images])
        groups: dict[tuple, list[int]] = {}
        for k, t in enumerate(tensors):
            groups.setdefault(tuple(t.shape), []).append(k)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, enabled=amp):
            parts, order = [], []
            for ks in groups.values():
                x = torch.stack([tensors[k] for k in ks]).to(device, non_blocking=True)
                x = net.normalise_input(x).contiguous(memory_format=torch.channels_last)
                parts.append(net(x).float())
                order += ks
            desc = torch.empty(len(images), parts[0].shape[1], device=device)
            desc[torch.tensor(order, device=device)] = torch.cat(parts)
            loss = tuple_loss(desc, [[where[i] for i in t] for t in batch], opts["loss"], opts["margin"])
        if not torch.isfinite(loss):
            raise SfmpairsError(f"epoch {epoch}: the loss is {loss.item()}; training stopped, "
                                f"the last good checkpoint is kept")
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        total += float(loss.detach())
        count += len(batch)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{total / count:.4f}")
    return total / max(count, 1)


def validate(net, val, opts, device, root: Path):
    """mAP on the val split (the evaluation protocol, at the test image size), or None
    without val queries; ``val`` is :func:`~.evaluate.val_ground_truth`'s result."""
    from sfmpairs.retrieval.evaluate import mean_average_precision, rank

    if val is None:
        return None
    names, queries, database, pos, junk = val
    used = np.unique(np.concatenate([queries, database]))
    desc, _ = extract_descriptors(net, root, list(names[used]), image_size=opts["test_image_size"],
                                  device=device, workers=opts["workers"], skip_bad=opts["skip_bad"],
                                  precision=extract_precision(device, opts), desc="validation")
    desc = np.nan_to_num(desc)
    m, *_ = mean_average_precision(rank(desc[np.searchsorted(used, queries)], desc[np.searchsorted(used, database)]),
                                   pos, junk)
    return m


def _rng_state(rng) -> dict:
    return {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(rng, state: dict) -> None:
    rng.bit_generator.state = state["numpy"]
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_trainable(pairs: Path, data: dict, opts: dict):
    """Refuse, up front and with the fix, a pair file this run cannot train on; return
    the val ground truth (None without a val split)."""
    from sfmpairs.retrieval.evaluate import FEW_QUERIES, val_ground_truth

    clusters = np.unique(data["cluster"][data["train/images"]])
    if len(clusters) < 2:
        raise SfmpairsError(f"{pairs}: the train split has {len(clusters)} cluster, and hard negatives come "
                            f"from other clusters; ingest more models, or mine with a smaller "
                            f"--val-fraction or other --val-clusters")
    if len(clusters) < opts["neg_num"] + 1:
        raise SfmpairsError(f"{pairs}: the train split has {len(clusters)} clusters, and --neg-num "
                            f"{opts['neg_num']} takes one hard negative from each of {opts['neg_num']} "
                            f"other clusters; use --neg-num {len(clusters) - 1} or fewer, or add clusters")
    if len(data["val/query"]) == 0:
        logger.warning("%s: no val queries: no validation and no best.pt (last.pt holds each epoch's "
                       "weights); mine with --val-fraction or --val-clusters to validate", pairs)
        return None
    store = None
    if len(data["val/gt_indptr"]) == 0:  # schema version 1: the ground truth from its store, if still there
        store = data["source_store"]
        if not store or not Path(store).is_file():
            raise SfmpairsError(f"{pairs}: a pair file of schema version 1, without the val ground truth, and "
                                f"its SfM store {store} is gone; mine it again")
    val = val_ground_truth(pairs, opts["min_covisible"], store=store)
    counted = sum(len(p) > 0 for p in val[3])
    if counted == 0:
        raise SfmpairsError(f"{pairs}: no val query has a positive (an image sharing at least "
                            f"{opts['min_covisible']} 3D points with it); lower min_covisible")
    if counted < FEW_QUERIES:
        logger.warning("the val split has %d queries with positives: val mAP will be noisy", counted)
    return val


def _write_json(path: Path, value: dict) -> None:
    """Write a JSON file atomically (a crash leaves the old one or none)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2, default=str))
    tmp.replace(path)


def _new_run(pairs, images_root, run_dir: Path, overwrite: bool, options: dict) -> dict:
    """The options of a new run, checked, with the paths resolved."""
    if pairs is None:
        raise SfmpairsError("give --pairs (or --resume RUN_DIR)")
    if not Path(pairs).is_file():
        raise SfmpairsError(f"{pairs}: not a readable pair file")
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise SfmpairsError(f"unknown option {sorted(unknown)[0]!r}")
    if images_root is None:
        from sfmpairs.mining.pairfile import read_pair_file

        images_root = read_pair_file(pairs)["images_root"] or None
        if images_root is None:
            raise SfmpairsError(f"{pairs}: no images root recorded; give --images-root")
    started = [n for n in ("last.pt", "metrics.jsonl", "best.pt") if (run_dir / n).exists()]
    if started and not overwrite:
        raise SfmpairsError(f"{run_dir}: run folder exists (with {', '.join(started)}); pass --overwrite "
                            f"to start afresh, or --resume {run_dir} to continue it")
    if run_dir.exists() and not run_dir.is_dir():
        raise SfmpairsError(f"{run_dir}: not a folder")
    if options.get("weights") is not None:
        clash = [k for k in (*NETWORK_KEYS, "pretrained") if options.get(k) not in (None, False)]
        if clash:
            raise SfmpairsError(f"--weights starts from a checkpoint with its own network; "
                                f"--{clash[0]} cannot go with it")
    opts = {**DEFAULTS, **{k: v for k, v in options.items() if v is not None}}
    opts["amp"] = options.get("amp")
    for key in ("weights", "pretrained"):  # files, resolved: a run folder can be resumed from anywhere
        if isinstance(opts[key], (str, Path)) and opts[key] != "imagenet":
            opts[key] = str(Path(opts[key]).resolve())
    opts.update(pairs=str(Path(pairs).resolve()), images_root=str(Path(images_root).resolve()),
                pairs_sha256=file_sha256(pairs))
    return opts


def _resumed_run(run_dir: Path, pairs, images_root, options: dict) -> dict:
    """The saved options of the run in ``run_dir``, with those --resume may change."""
    if not (run_dir / "config.json").is_file():
        raise SfmpairsError(f"{run_dir}: nothing to resume (no config.json); start a run with -o {run_dir}")
    saved = json.loads((run_dir / "config.json").read_text())
    # a run of an older sfmpairs: what its config lacks, as that version did it
    saved = {**DEFAULTS, "test_image_size": saved.get("image_size", DEFAULTS["image_size"]), **saved}
    fixed = sorted(k for k, v in options.items() if v is not None and k not in RESUME_OPTIONS
                   and v != saved.get(k))
    if fixed:
        raise SfmpairsError(f"--resume continues {run_dir} with its own settings; --{fixed[0].replace('_', '-')} "
                            f"cannot change (only {', '.join('--' + k for k in RESUME_OPTIONS)} can); "
                            f"start a new run with -o to change it")
    changed = {k: v for k, v in options.items() if k in RESUME_OPTIONS and v is not None and v != saved.get(k)}
    for k, v in changed.items():
        logger.info("resume: %s %s (was %s)", k, v, saved.get(k))
    opts = {**saved, **changed}
    if pairs is not None:  # the run's pair file, moved
        if saved.get("pairs_sha256") and file_sha256(pairs) != saved["pairs_sha256"]:
            raise SfmpairsError(f"{pairs}: not the pair file {run_dir} trains on (another SHA-256); "
                                f"start a new run with -o to train on it")
        opts["pairs"] = str(Path(pairs).resolve())
    if images_root is not None:
        opts["images_root"] = str(Path(images_root).resolve())
    return opts


def _check_options(opts: dict) -> None:
    if opts["loss"] not in ("contrastive", "triplet"):
        raise SfmpairsError(f"unknown loss {opts['loss']!r} (contrastive or triplet)")
    for key in ("epochs", "query_size", "pool_size", "batch_size", "image_size", "test_image_size", "neg_num"):
        if opts[key] < 1:
            raise SfmpairsError(f"--{key.replace('_', '-')} must be at least 1")
    if not opts["lr"] > 0:
        raise SfmpairsError("--lr must be positive")


def _set_lr(optimizer, scheduler, opts: dict, epoch: int) -> None:
    """Epoch ``epoch``'s learning rates for the run's initial ``lr`` (the GeM exponent's
    ``p_lr_factor`` times higher), decayed by exp(-lr_decay) per epoch: used where
    --resume changes the lr."""
    bases = [opts["lr"], opts["lr"] * opts["p_lr_factor"]]
    scheduler.base_lrs = bases
    for group, base in zip(optimizer.param_groups, bases):
        group["initial_lr"] = base
        group["lr"] = base * math.exp(-opts["lr_decay"] * epoch)


def train(pairs: str | Path | None, images_root: str | Path | None, run_dir: str | Path, *,
          resume: bool = False, overwrite: bool = False, on_epoch_end=None, **options) -> dict:
    """Fine-tune a retrieval network on a pair file; see the module docstring.

    With ``resume``, continue the run in ``run_dir`` from its ``last.pt`` (or from the
    start if no epoch finished); ``pairs`` and ``images_root`` default to the run's, and
    only ``epochs``, ``lr`` (the run's initial rate: epoch e then trains at lr
    exp(-lr_decay e)), ``device`` and ``workers`` may change. ``on_epoch_end(epoch,
    metrics)`` is called after each epoch's checkpoint is written. Returns the last
    epoch's metrics.
    """
    run_dir = Path(run_dir)
    last = run_dir / "last.pt"
    options = {k: v for k, v in options.items() if v is not None}
    opts = (_resumed_run(run_dir, pairs, images_root, options) if resume
            else _new_run(pairs, images_root, run_dir, overwrite, options))
    _check_options(opts)
    pairs, images_root = Path(opts["pairs"]), Path(opts["images_root"])
    if not images_root.is_dir():
        raise SfmpairsError(f"{images_root}: images root is not a folder")
    device = resolve_device(opts["device"])
    data = _read_pairs(pairs)
    val = check_trainable(pairs, data, opts)
    # the training state on the CPU: the random generators' states must stay there
    state = read_checkpoint(last, "cpu") if resume and last.is_file() else None
    if state is not None and state["train"]["epoch"] + 1 >= opts["epochs"]:
        raise SfmpairsError(f"{run_dir}: the run is finished ({state['train']['epoch'] + 1} of "
                            f"{opts['epochs']} epochs); pass --epochs N to train it longer")

    torch.manual_seed(opts["seed"])
    rng = np.random.default_rng(opts["seed"])
    if state is not None:
        net, _ = load_checkpoint(last, device)
        start, best = state["train"]["epoch"] + 1, state["train"]["best_map"]
        best_epoch = state["train"].get("best_epoch")  # runs of sfmpairs 0.1: read from best.pt
        if best is not None and best_epoch is None:
            best_epoch = int(read_checkpoint(run_dir / "best.pt")["epoch"])
        _keep_metrics_before(run_dir / "metrics.jsonl", start)
    else:
        if opts["weights"]:
            net, _ = load_checkpoint(opts["weights"], device)
        else:
            net = build_network({k: opts[k] for k in NETWORK_KEYS}, pretrained=opts["pretrained"])
        net.config.update(image_size=opts["test_image_size"], train_image_size=opts["image_size"])
        # the network trained, also from --weights
        opts.update({k: net.config[k] for k in NETWORK_KEYS}, pretrained=net.config.get("pretrained", False))
        opts["margin"] = opts["margin"] if opts["margin"] is not None else MARGINS.get(opts["arch"], 0.85)
        start, best, best_epoch = 0, None, None
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in ("metrics.jsonl", "last.pt", "best.pt"):
            (run_dir / stale).unlink(missing_ok=True)
    _write_json(run_dir / "config.json", opts)
    net = net.to(device).to(memory_format=torch.channels_last)
    opts_runtime = {**opts, "amp": (device.type == "cuda") if opts["amp"] is None else opts["amp"]}
    optimizer = _optimizer(net, opts)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=math.exp(-opts["lr_decay"]))
    scaler = torch.amp.GradScaler(device.type, enabled=opts_runtime["amp"] and device.type == "cuda")
    if state is not None:
        optimizer.load_state_dict(state["train"]["optimizer"])
        scheduler.load_state_dict(state["train"]["scheduler"])
        scaler.load_state_dict(state["train"]["scaler"])
        _set_rng_state(rng, state["train"]["rng"])
        if optimizer.param_groups[0]["initial_lr"] != opts["lr"]:  # --resume --lr
            _set_lr(optimizer, scheduler, opts, start)
    writer = None
    try:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tensorboard"))
    except Exception:  # tensorboard not installed
        pass
    cache = ImageCache(images_root, opts["image_size"], int(opts["cache_mb"]) << 20)
    train_q = len(data["train/query"])
    logger.info("train %s + %s on %s%s: %d of %d train queries and a pool of %d images per epoch, %d hard "
                "negatives, %d val queries, epochs %d-%d, at %d px (val at %d px) -> %s",
                opts["arch"], opts["pool"], device, " (mixed precision)" if opts_runtime["amp"] else "",
                min(opts["query_size"], train_q), train_q,
                min(opts["pool_size"], len(data["train/images"])), opts["neg_num"],
                0 if val is None else len(val[1]), start, opts["epochs"] - 1, opts["image_size"],
                opts["test_image_size"], run_dir)
    logger.debug("options: %s", json.dumps({k: v for k, v in opts.items()}, default=str))
    metrics = {}
    for epoch in range(start, opts["epochs"]):
        t0 = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        kept = last if last.exists() else "none written yet"
        try:
            tuples, stats = mine_epoch(net, data, opts_runtime, rng, device, images_root)
            logger.debug("epoch %d: %d tuples mined in %.1f s", epoch, len(tuples), time.perf_counter() - t0)
            loss = train_epoch(net, tuples, data["names"], opts_runtime, optimizer, scaler, device, cache, epoch)
            val_map = validate(net, val, opts_runtime, device, images_root)
        except NonFiniteDescriptors as e:
            fix = ("the network's activations overflow mixed precision: train with --no-amp" if e.reduced
                   else "the network's weights hold NaN or infinity")
            raise SfmpairsError(f"epoch {epoch}: {str(e).split(';')[0]}; {fix} ({kept})") from None
        except SfmpairsError as e:
            raise SfmpairsError(f"{e} ({kept})") from None
        scheduler.step()
        if val_map is not None and (best is None or val_map > best):
            best, best_epoch = val_map, epoch
            save_checkpoint(run_dir / "best.pt", net, epoch=epoch, val_map=val_map)
        metrics = {"epoch": epoch, "loss": loss, **stats, "val_map": val_map, "lr": lr,
                   "seconds": time.perf_counter() - t0}
        with open(run_dir / "metrics.jsonl", "a") as fh:  # before last.pt: a resume drops it if last.pt is older
            fh.write(json.dumps(metrics) + "\n")
        save_checkpoint(last, net, epoch=epoch, val_map=val_map, train={
            "epoch": epoch, "best_map": best, "best_epoch": best_epoch, "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": _rng_state(rng)})
        if writer is not None:
            for key in ("loss", "val_map", "positive_distance", "negative_distance", "lr"):
                if metrics[key] is not None:
                    writer.add_scalar(key, metrics[key], epoch)
        logger.info("epoch %d/%d: loss %.4f, val mAP %s, %.1f s", epoch, opts["epochs"] - 1, loss,
                    "-" if val_map is None else f"{100 * val_map:.2f}", metrics["seconds"])
        logger.debug("epoch %d: lr %.3g, distances positive %.3f negative %.3f, %d queries, pool %d", epoch,
                     lr, stats["positive_distance"], stats["negative_distance"], stats["queries"], stats["pool"])
        if on_epoch_end is not None:
            on_epoch_end(epoch, metrics)
    if best is not None:
        logger.info("done: best val mAP %.2f at epoch %d -> %s (last epoch: %s)", 100 * best,
                    best_epoch, run_dir / "best.pt", last)
    else:
        logger.info("done: %d epochs, no validation -> %s", opts["epochs"], last)
    return metrics


def _keep_metrics_before(path: Path, epoch: int) -> None:
    """Drop the lines of epochs from ``epoch`` on (a run stopped after writing an epoch's
    metrics but before its checkpoint redoes that epoch)."""
    if path.exists():
        lines = [x for x in path.read_text().splitlines() if x.strip() and json.loads(x)["epoch"] < epoch]
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(x + "\n" for x in lines))
        tmp.replace(path)
