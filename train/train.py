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

The run folder holds ``config.json``, ``metrics.jsonl``, ``metrics.png`` (its plot),
``last.pt`` (every epoch) and ``best.pt`` (by val mAP), checkpoints that ``sfmpairs
extract`` reads. While a train writes it, it holds ``.lock`` (``flock``: one train per
folder; the system drops the lock when the process ends, however it ends). With
``--overwrite`` the files of the run replaced wait in ``.replaced`` until the new run's
first ``last.pt``, and go back if it stops before.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
import typing
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from sfmpairs.common import SfmpairsError, atomic_output, file_sha256, progress
from sfmpairs.config import conf_dict, given, make_conf
from sfmpairs.distributed import ONE, Ranks, environment_ranks, join, leave, rank_device
from sfmpairs.mining.mine import pool_similarity, positive_slots
from sfmpairs.mining.negatives import hard_negatives, random_negatives
from sfmpairs.plot import BASELINE_EPOCH as BEFORE_TRAINING
from sfmpairs.plot import plot_run, read_metrics
from sfmpairs.retrieval.backbones import timm_name
from sfmpairs.retrieval.data import load_image
from sfmpairs.retrieval.extract import NonFiniteDescriptors, cpu_has_bf16, extract_across_ranks, resolve_device
from sfmpairs.retrieval.network import build_network, load_checkpoint, read_checkpoint, save_checkpoint

from .options import NETWORK_KEYS, RESUME_OPTIONS, TrainConf

logger = logging.getLogger("sfmpairs.train")


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
def _read_pairs(path: Path, p: dict | None = None) -> dict:
    """The pair file ``path`` as flat arrays (``train/query``...), the train split
    required; ``p``: the file already read (:func:`~sfmpairs.mining.pairfile.read_pair_file`)."""
    from sfmpairs.mining.pairfile import read_pair_file

    p = read_pair_file(path) if p is None else p
    d = {
        "names": p["names"],
        "cluster": p["cluster"],
        "strategy": p["strategy"],
        "source_store": p["source_store"],
        "min_co_observed": p["min_co_observed"],
    }
    for split in ("train", "val"):
        s = p["splits"].get(split, {})
        for key in ("query", "positive", "images", "pool", "pool_passes", "pool_co_observed", "gt_indptr"):
            d[f"{split}/{key}"] = s.get(key, np.zeros(0, int))
    if len(d["train/query"]) == 0:
        raise SfmpairsError(f"{path}: the train split has no queries")
    return d


def _optimizer(net, conf: TrainConf):
    p_params = [net.p]
    other = [p for n, p in net.named_parameters() if n != "p"]
    groups = [
        {"params": other, "lr": conf.lr, "weight_decay": conf.weight_decay},
        {"params": p_params, "lr": conf.lr * conf.p_lr_factor, "weight_decay": 0.0},
    ]
    if conf.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=conf.lr, momentum=conf.momentum)
    return torch.optim.Adam(groups, lr=conf.lr)  # TrainConf.check knows no other


def _freeze_batchnorm(net) -> None:
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


def _distances(query: np.ndarray, positive: np.ndarray, negatives: np.ndarray) -> dict:
    """The mean descriptor distance of the queries to their positives and to their
    negatives (NaN rows: no negative), as the epoch's statistics."""
    if len(query) == 0:
        return {"positive_distance": float("nan"), "negative_distance": float("nan")}
    return {
        "positive_distance": float(np.linalg.norm(query - positive, axis=1).mean()),
        "negative_distance": float(np.nanmean(np.linalg.norm(query[:, None] - negatives, axis=2))),
    }


def _report_skipped(what: str, names, bad: dict) -> int:
    """Log the photos --skip-bad left out of ``what`` (their count, the first few names
    and the first message); returns the count."""
    if bad:
        first = sorted(bad)
        shown = ", ".join(str(names[i]) for i in first[:5]) + (", ..." if len(bad) > 5 else "")
        logger.warning("%s: skipped %d unreadable photos (--skip-bad): %s; %s", what, len(bad), shown, bad[first[0]])
    return len(bad)


def mine_epoch(net, pairs: dict, conf: TrainConf, rng, device, root: Path, ranks: Ranks = ONE):
    """The tuples of one epoch: (query, positive, negatives...) image indices, and the
    mining statistics (``skipped_images``: the photos --skip-bad left out)."""
    train_q = pairs["train/query"]
    pick = np.sort(rng.choice(len(train_q), min(conf.query_size, len(train_q)), replace=False))
    queries = train_q[pick]
    images = pairs["train/images"]
    pool = np.sort(rng.choice(images, min(conf.pool_size, len(images)), replace=False))
    strategy, rows = pairs["strategy"], pairs["train/pool"][pick]
    candidate = (rows >= 0) & (pairs["train/pool_co_observed"][pick] >= pairs["min_co_observed"])
    if strategy != "mac":  # relaxed draws afresh each epoch; max-inliers gives the file's
        slots = positive_slots(
            strategy, pairs["train/pool_passes"][pick], candidate, pairs["train/pool_co_observed"][pick], rng
        )
        positives = rows[np.arange(len(pick)), slots]
        wanted = np.unique(np.concatenate([queries, positives, pool]))
    else:  # the candidates are described too: the positive is the nearest with this network
        wanted = np.unique(np.concatenate([queries, pool, rows[candidate]]))
    kwargs = dict(image_size=conf.image_size, device=device, workers=conf.workers, skip_bad=conf.skip_bad)
    names = list(pairs["names"][wanted])
    desc, bad = extract_across_ranks(
        net, root, names, ranks, precision=extract_precision(device, conf), desc="mining", **kwargs
    )
    skipped = _report_skipped("mining", names, bad)

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
    if conf.negative_mining == "hard":
        idx, _ = hard_negatives(
            qd,
            pairs["cluster"][queries],
            desc[row(pool)],
            pairs["cluster"][pool],
            conf.neg_num,
            workers=torch.get_num_threads(),  # this rank's share of the cores (torchrun: OMP_NUM_THREADS)
        )
    else:
        idx = random_negatives(pairs["cluster"][queries], pairs["cluster"][pool], conf.neg_num, rng)
    negatives = np.where(idx >= 0, pool[np.maximum(idx, 0)], -1)
    nd = np.where(idx[..., None] >= 0, desc[row(np.maximum(negatives, 0))], np.nan)
    stats = {"queries": int(len(queries)), "pool": int(len(pool)), **_distances(qd, desc[row(positives)], nd)}
    stats["skipped_images"] = skipped
    tuples = [[int(q), int(p), *[int(n) for n in negs if n >= 0]] for q, p, negs in zip(queries, positives, negatives)]
    # the queries were drawn sorted, so clusters come in blocks: shuffle, so that a batch
    # mixes clusters and every epoch has its own order
    tuples = [tuples[k] for k in rng.permutation(len(tuples))]
    return tuples, stats


def extract_precision(device, conf: TrainConf) -> str:
    """Mining and validation extract in mixed precision where training's ``amp`` is on
    (by default only on CUDA), else in float32."""
    amp = device.type == "cuda" if conf.amp is None else conf.amp
    return "auto" if amp else "fp32"


class TupleForward(torch.nn.Module):
    """The images of a batch, one stack per image size, through the network in one
    forward call: the module DistributedDataParallel wraps. With batch normalisation
    frozen, grouping images by size changes nothing but speed."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, stacks: list[torch.Tensor]) -> list[torch.Tensor]:
        return [
            self.net(self.net.normalise_input(x).contiguous(memory_format=torch.channels_last)).float() for x in stacks
        ]


def _batch_descriptors(model, batch, names, cache: ImageCache, device):
    """The descriptors of the images of a batch of tuples (rows: the images in ascending
    order) and the tuples as rows of them."""
    images = sorted({i for t in batch for i in t})
    where = {img: k for k, img in enumerate(images)}
    tensors = cache.get([names[i] for i in images])
    groups: dict[tuple, list[int]] = {}
    for k, t in enumerate(tensors):
        groups.setdefault(tuple(t.shape), []).append(k)
    parts = model([torch.stack([tensors[k] for k in ks]).to(device, non_blocking=True) for ks in groups.values()])
    order = [k for ks in groups.values() for k in ks]
    desc = torch.empty(len(images), parts[0].shape[1], device=device)
    desc[torch.tensor(order, device=device)] = torch.cat(parts)
    return desc, [[where[i] for i in t] for t in batch]


def _finite_on_every_rank(loss: torch.Tensor, ranks: Ranks) -> bool:
    """Whether the loss is finite here and, under torchrun, on every rank (so that all
    stop together rather than some waiting for the others' gradients)."""
    finite = bool(torch.isfinite(loss))
    return all(ranks.gather(finite)) if ranks.distributed else finite


def training_dtype(device, conf: TrainConf) -> torch.dtype | None:
    """The reduced precision of training's forward pass, None for float32: float16 on
    CUDA unless ``--no-amp``; on the CPU bfloat16 with ``--amp`` where the CPU computes
    it natively (AVX512-BF16, AMX), else float32."""
    if device.type == "cuda":
        return torch.float16 if conf.amp is not False else None
    return torch.bfloat16 if conf.amp and cpu_has_bf16() else None


def train_epoch(
    net,
    tuples,
    names,
    conf: TrainConf,
    optimizer,
    scaler,
    device,
    cache: ImageCache,
    epoch: int,
    model=None,
    ranks: Ranks = ONE,
):
    """One pass over the tuples (rows of image indices into ``names``); returns the mean
    loss per tuple. Stops on NaN.

    ``model``: the forward module (:class:`TupleForward` of ``net``, wrapped in
    DistributedDataParallel under torchrun). There each rank takes its share of every
    batch of ``batch_size`` tuples and weighs its loss by the number of ranks: DDP
    averages the gradients over the ranks, so a step is the one of the whole batch in one
    process, and ``--batch-size`` and ``--lr`` mean the same with any number of ranks."""
    model = TupleForward(net) if model is None else model
    net.train()
    _freeze_batchnorm(net)
    dtype = training_dtype(device, conf)
    total, count = 0.0, 0
    bar = progress(range(0, len(tuples), conf.batch_size), desc=f"epoch {epoch}", unit="batch")
    for b in bar:
        batch = tuples[b : b + conf.batch_size]
        start, stop = ranks.share(len(batch))
        share, weight = batch[start:stop], float(ranks.world_size)
        if not share:  # fewer tuples than ranks: a forward and backward that count for nothing
            share, weight = batch[:1], 0.0
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            desc, rows = _batch_descriptors(model, share, names, cache, device)
            loss = tuple_loss(desc, rows, conf.loss, conf.margin)
        if not _finite_on_every_rank(loss, ranks):
            raise SfmpairsError(
                f"epoch {epoch}: the loss is {loss.item()}"
                f"{' on a rank' if ranks.distributed else ''}; training stopped, "
                f"the last good checkpoint is kept"
            )
        scaler.scale(loss * weight).backward()
        scaler.step(optimizer)
        scaler.update()
        total += float(loss.detach()) if weight else 0.0
        count += len(share) if weight else 0
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{total / max(count, 1):.4f}")
    total, count = ranks.all_sum([total, count])
    return total / max(count, 1)


def validate(net, val, conf: TrainConf, device, root: Path, ranks: Ranks = ONE, skipped: list | None = None):
    """mAP on the val split (the evaluation protocol, at the test image size), or None
    without val queries; ``val`` is :func:`~.evaluate.val_ground_truth`'s result. The
    number of photos --skip-bad left out is appended to ``skipped``."""
    from sfmpairs.retrieval.evaluate import mean_average_precision, rank

    if val is None:
        return None
    names, queries, database, pos, junk = val
    used = np.unique(np.concatenate([queries, database]))
    desc, bad = extract_across_ranks(
        net,
        root,
        list(names[used]),
        ranks,
        image_size=conf.test_image_size,
        device=device,
        workers=conf.workers,
        skip_bad=conf.skip_bad,
        precision=extract_precision(device, conf),
        desc="validation",
    )
    count = _report_skipped("validation", list(names[used]), bad)
    if skipped is not None:
        skipped.append(count)
    desc = np.nan_to_num(desc)
    m, *_ = mean_average_precision(
        rank(desc[np.searchsorted(used, queries)], desc[np.searchsorted(used, database)]), pos, junk
    )
    return m


def _rng_state(rng) -> dict:
    return {
        "numpy": rng.bit_generator.state,
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(rng, state: dict) -> None:
    rng.bit_generator.state = state["numpy"]
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_trainable(pairs: Path, data: dict, conf: TrainConf, contents: dict | None = None):
    """Refuse, up front and with the fix, a pair file this run cannot train on; return
    the val ground truth (None without a val split)."""
    from sfmpairs.retrieval.evaluate import check_val_queries, val_ground_truth

    clusters = np.unique(data["cluster"][data["train/images"]])
    if len(clusters) < 2:
        raise SfmpairsError(
            f"{pairs}: the train split has {len(clusters)} cluster, and hard negatives come "
            f"from other clusters; ingest more models, or mine with a smaller "
            f"--val-fraction or other --val-clusters"
        )
    if len(clusters) < conf.neg_num + 1:
        raise SfmpairsError(
            f"{pairs}: the train split has {len(clusters)} clusters, and --neg-num "
            f"{conf.neg_num} takes one hard negative from each of {conf.neg_num} "
            f"other clusters; use --neg-num {len(clusters) - 1} or fewer, or add clusters"
        )
    if len(data["val/query"]) == 0:
        logger.warning(
            "%s: no val queries: no validation and no best.pt (last.pt holds each epoch's "
            "weights); mine with --val-fraction or --val-clusters to validate",
            pairs,
        )
        return None
    store = None
    if len(data["val/gt_indptr"]) == 0:  # schema version 1: the ground truth from its store, if still there
        store = data["source_store"]
        if not store or not Path(store).is_file():
            raise SfmpairsError(
                f"{pairs}: a pair file of schema version 1, without the val ground truth, and "
                f"its SfM store {store} is gone; mine it again"
            )
    val = val_ground_truth(pairs, conf.min_covisible, store=store, contents=contents)
    check_val_queries(pairs, sum(len(p) > 0 for p in val[3]), conf.min_covisible)
    return val


def _write_json(path: Path, value: dict) -> None:
    """Write a JSON file atomically (a crash leaves the old one or none; a full disk is
    one line naming it)."""
    with atomic_output(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(value, indent=2, default=str))


def _write_lines(path: Path, lines: list[str]) -> None:
    """Write ``metrics.jsonl`` whole and atomically: a full disk or a kill never leaves
    half a line."""
    with atomic_output(path, overwrite=True) as tmp:
        tmp.write_text("".join(x + "\n" for x in lines))


def _append_metrics(path: Path, metrics: dict) -> None:
    """Add an epoch's line to ``metrics.jsonl``."""
    lines = path.read_text().splitlines() if path.exists() else []
    _write_lines(path, [x for x in lines if x.strip()] + [json.dumps(metrics)])


# ----------------------------------------------------------------------------- the run's configuration
# config.json: the run's inputs and its number of ranks, beside TrainConf's fields
INPUT_KEYS = ("pairs", "images_root", "pairs_sha256", "world_size")


def _new_run(pairs, images_root, run_dir: Path, overwrite: bool, options: dict) -> tuple[TrainConf, dict]:
    """A new run's configuration, checked, and its inputs (paths resolved; the images
    root None where the pair file's is to be used)."""
    if pairs is None:
        raise SfmpairsError("give --pairs (or --resume RUN_DIR)")
    if not Path(pairs).is_file():
        raise SfmpairsError(f"{pairs}: no such file")
    conf = make_conf(TrainConf, **options)
    if run_dir.exists() and not run_dir.is_dir():
        raise SfmpairsError(f"{run_dir}: not a folder")
    _check_run_folder(run_dir, overwrite)
    if conf.weights is not None:
        clash = [k for k in (*NETWORK_KEYS, "pretrained") if options.get(k) not in (None, False)]
        if clash:
            raise SfmpairsError(
                f"--weights starts from a checkpoint with its own network; --{clash[0]} cannot go with it"
            )
    # files, resolved: a run folder can be resumed from anywhere
    files = {
        k: str(Path(v).resolve()) for k in ("weights", "pretrained") if isinstance(v := getattr(conf, k), (str, Path))
    }
    inputs = {
        "pairs": str(Path(pairs).resolve()),
        "pairs_sha256": file_sha256(pairs),
        "images_root": str(Path(images_root).resolve()) if images_root is not None else None,
    }
    return dataclasses.replace(conf, **files), inputs


def _resumed_run(run_dir: Path, pairs, images_root, options: dict) -> tuple[TrainConf, dict]:
    """The configuration and inputs of the run in ``run_dir``, with the settings that
    --resume may change (:data:`RESUME_OPTIONS`) changed."""
    path = run_dir / "config.json"
    if not path.is_file():
        raise SfmpairsError(f"{run_dir}: nothing to resume (no config.json); start a run with -o {run_dir}")
    saved = _read_run_config(path)
    inputs = {k: saved.pop(k, None) for k in INPUT_KEYS}
    # a run of an older sfmpairs: what its config lacks, as that version did it
    saved.setdefault("test_image_size", saved.get("image_size", TrainConf.image_size))
    try:
        conf = make_conf(TrainConf, {k: v for k, v in saved.items() if k in TrainConf.__dataclass_fields__})
        conf.check()
    except SfmpairsError as e:  # a setting out of range or choices
        raise SfmpairsError(f"{path}: {e}") from None
    fixed = sorted(k for k, v in options.items() if k not in RESUME_OPTIONS and v != getattr(conf, k, None))
    if fixed:
        raise SfmpairsError(
            f"--resume continues {run_dir} with its own settings; --{fixed[0].replace('_', '-')} "
            f"cannot change (only {', '.join('--' + k for k in RESUME_OPTIONS)} can); "
            f"start a new run with -o to change it"
        )
    changed = {k: v for k, v in options.items() if k in RESUME_OPTIONS and v != getattr(conf, k)}
    for k, v in changed.items():
        logger.info("resume: %s %s (was %s)", k, v, getattr(conf, k))
    if pairs is not None:  # the run's pair file, moved
        if inputs["pairs_sha256"] and file_sha256(pairs) != inputs["pairs_sha256"]:
            raise SfmpairsError(
                f"{pairs}: not the pair file {run_dir} trains on (another SHA-256); "
                f"start a new run with -o to train on it"
            )
        inputs["pairs"] = str(Path(pairs).resolve())
    if images_root is not None:
        inputs["images_root"] = str(Path(images_root).resolve())
    return dataclasses.replace(conf, **changed), inputs


def _type_name(hint) -> str:
    names = {str: "text", int: "an integer", float: "a number", bool: "true or false", type(None): "null"}
    return " or ".join(names.get(a, a.__name__) for a in typing.get_args(hint) or (hint,))


def _of_type(value, hint) -> bool:
    """Whether a JSON value is of a setting's type (an integer is a float too; true is no
    number)."""
    for kind in typing.get_args(hint) or (hint,):
        if kind is type(None):
            if value is None:
                return True
        elif kind in (int, float) and isinstance(value, bool):
            continue
        elif isinstance(value, int if kind is int else (int, float) if kind is float else kind):
            return True
    return False


def _read_run_config(path: Path) -> dict:
    """A run's ``config.json``, checked: a JSON object whose inputs and settings are of
    their types; one line naming the file (and line) otherwise."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SfmpairsError(f"{path}: line {e.lineno}: not JSON ({e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SfmpairsError(f"{path}: cannot read ({type(e).__name__})") from None
    if not isinstance(saved, dict):
        raise SfmpairsError(f"{path}: not a JSON object")
    hints = {
        **typing.get_type_hints(TrainConf),
        "pairs": str,
        "images_root": str | None,
        "pairs_sha256": str | None,
        "world_size": int | None,
    }
    for key, value in saved.items():
        if key in hints and not _of_type(value, hints[key]):
            raise SfmpairsError(f"{path}: {key} must be {_type_name(hints[key])}, not {json.dumps(value)[:40]}")
    if "pairs" not in saved:
        raise SfmpairsError(f"{path}: no pairs (the run's pair file)")
    return saved


def _images_root(inputs: dict, pairs: Path, contents: dict) -> Path:
    """The photos' folder: the one given, else the one the pair file records."""
    root = inputs["images_root"] or contents["images_root"] or None
    if root is None:
        raise SfmpairsError(f"{pairs}: no images root recorded; give --images-root")
    if not Path(root).is_dir():
        raise SfmpairsError(f"{root}: images root is not a folder")
    return Path(root).resolve()


def _set_lr(optimizer, scheduler, conf: TrainConf, epoch: int) -> None:
    """Epoch ``epoch``'s learning rates for the run's initial ``lr`` (the GeM exponent's
    ``p_lr_factor`` times higher), decayed by exp(-lr_decay) per epoch: used where
    --resume changes the lr."""
    bases = [conf.lr, conf.lr * conf.p_lr_factor]
    scheduler.base_lrs = bases
    for group, base in zip(optimizer.param_groups, bases):
        group["initial_lr"] = base
        group["lr"] = base * math.exp(-conf.lr_decay * epoch)


# ----------------------------------------------------------------------------- the run
def _start_network(conf: TrainConf, run_dir: Path, state: dict | None, device, main: bool = True):
    """The network to train (from ``last.pt`` when resuming, else from ``--weights``,
    ``--pretrained`` or random), the configuration with the network it holds, and where
    the run stands: ``(net, conf, start epoch, best val mAP, its epoch)``."""
    if state is not None:
        net, _ = load_checkpoint(run_dir / "last.pt", device)
        start, best = state["train"]["epoch"] + 1, state["train"]["best_map"]
        best_epoch = state["train"].get("best_epoch")  # runs of sfmpairs 0.1: read from best.pt
        if best is not None and best_epoch is None:
            best_epoch = read_checkpoint(run_dir / "best.pt").get("epoch")
            if best_epoch is None:
                raise SfmpairsError(f"{run_dir / 'best.pt'}: no epoch recorded (the run's best)")
        if main:
            _keep_metrics_before(run_dir, start)
        return net, conf, start, best, best_epoch
    if conf.weights:
        net, _ = load_checkpoint(conf.weights, device)
    else:
        net = build_network({k: getattr(conf, k) for k in NETWORK_KEYS}, pretrained=conf.pretrained)
    net.config.update(image_size=conf.test_image_size, train_image_size=conf.image_size)
    # the network trained, also from --weights
    conf = dataclasses.replace(
        conf, **{k: net.config[k] for k in NETWORK_KEYS}, pretrained=net.config.get("pretrained", False)
    )
    conf = dataclasses.replace(conf, margin=conf.margin_for(conf.arch))
    return net, conf, 0, None, None


def _training_tools(net, conf: TrainConf, device, state: dict | None, rng, start: int, path=None):
    """The optimizer, learning-rate schedule and gradient scaler, restored from the
    training state of ``path`` (``last.pt``) when resuming (and the random generators with
    them); a training state that does not fit: one line naming the file."""
    optimizer = _optimizer(net, conf)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=math.exp(-conf.lr_decay))
    scaler = torch.amp.GradScaler(
        device.type, enabled=extract_precision(device, conf) != "fp32" and device.type == "cuda"
    )
    if state is not None:
        try:
            optimizer.load_state_dict(state["train"]["optimizer"])
            scheduler.load_state_dict(state["train"]["scheduler"])
            if state["train"]["scaler"]:  # empty where it was off (a run on the CPU resumed on CUDA)
                scaler.load_state_dict(state["train"]["scaler"])
            _set_rng_state(rng, state["train"]["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
            raise SfmpairsError(
                f"{path}: a damaged sfmpairs checkpoint: its training state does not fit the network "
                f"({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''})"
            ) from None
        if optimizer.param_groups[0]["initial_lr"] != conf.lr:  # --resume --lr
            _set_lr(optimizer, scheduler, conf, start)
    return optimizer, scheduler, scaler


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(run_dir / "tensorboard"))
    except Exception:  # tensorboard not installed
        return None


@contextlib.contextmanager
def _stopped_with_the_cause(when: str, kept: str):
    """Failures a user can act on become :class:`SfmpairsError` naming when, what to do
    and which checkpoint is kept."""
    try:
        yield
    except NonFiniteDescriptors as e:
        fix = (
            "the network's activations overflow mixed precision: train with --no-amp"
            if e.reduced
            else "the network's weights hold NaN or infinity"
        )
        raise SfmpairsError(f"{when}: {str(e).split(';')[0]}; {fix} ({kept})") from None
    except SfmpairsError as e:
        raise SfmpairsError(f"{e} ({kept})") from None


@dataclasses.dataclass
class _Run:
    """What a run's epochs work with: its folder and settings, the pair file's arrays, the
    val ground truth, the photos, the network and its forward module (DDP under
    torchrun), the optimizer, schedule and scaler, the generator that draws the tuples
    (the same on every rank), the image cache, the ranks."""

    dir: Path
    conf: TrainConf
    data: dict
    val: tuple | None
    root: Path
    device: torch.device
    ranks: Ranks
    net: torch.nn.Module
    model: torch.nn.Module
    tools: tuple
    rng: np.random.Generator
    cache: ImageCache
    writer: object = None
    start: int = 0  # the first epoch to train
    best: float | None = None
    best_epoch: int | None = None


def _forward_module(net, device, ranks: Ranks):
    """:class:`TupleForward` of ``net``; under torchrun wrapped in
    DistributedDataParallel (which starts every rank from rank 0's weights and averages
    the gradients; batch statistics are frozen, so no buffers are broadcast)."""
    net.p.requires_grad_(net.config["pool"] == "gem")  # GeM's exponent, unused by the other poolings
    model = TupleForward(net)
    if not ranks.distributed:
        return model
    import warnings

    from torch.nn.parallel import DistributedDataParallel

    # channels-last weights give gradients of other strides than DDP's flat buckets: a
    # copy per step, not an error
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    return DistributedDataParallel(
        model,
        device_ids=[device] if device.type == "cuda" else None,
        broadcast_buffers=False,
        # timm models may hold weights their forward_features leaves out (ConvNeXt's head norm)
        find_unused_parameters=timm_name(net.config["arch"]) is not None,
    )


def _check_same_tuples(tuples: list, ranks: Ranks, epoch: int) -> None:
    """Every rank mines the epoch's tuples from the same gathered descriptors with the
    same generator; should they differ anyway (near-ties broken otherwise by another
    machine's arithmetic), the ranks would train on different batches: refuse."""
    if ranks.distributed:
        digest = hashlib.sha256(json.dumps(tuples).encode()).hexdigest()
        if len(set(ranks.gather(digest))) > 1:
            raise SfmpairsError(
                f"epoch {epoch}: the ranks mined different tuples (different machines' arithmetic "
                f"broke a tie otherwise); run the ranks on machines of one kind"
            )


def _run_epoch(run: _Run, epoch: int, kept: str) -> dict:
    """One epoch of the paper's loop: re-mine the tuples with the current network, train
    on them, validate. Returns the epoch's metrics; the failures a user can act on become
    :class:`SfmpairsError` naming what to do and which checkpoint is kept."""
    optimizer, scheduler, scaler = run.tools
    t0 = time.perf_counter()
    lr = optimizer.param_groups[0]["lr"]
    with _stopped_with_the_cause(f"epoch {epoch}", kept):
        tuples, stats = mine_epoch(run.net, run.data, run.conf, run.rng, run.device, run.root, run.ranks)
        if not tuples:  # every query or positive unreadable (--skip-bad): nothing to learn from
            raise SfmpairsError(
                f"epoch {epoch}: no tuple left to train on ({stats['skipped_images']} photos skipped as "
                f"unreadable with --skip-bad); check the photos under {run.root}"
            )
        _check_same_tuples(tuples, run.ranks, epoch)
        logger.debug("epoch %d: %d tuples mined in %.1f s", epoch, len(tuples), time.perf_counter() - t0)
        loss = train_epoch(
            run.net,
            tuples,
            run.data["names"],
            run.conf,
            optimizer,
            scaler,
            run.device,
            run.cache,
            epoch,
            run.model,
            run.ranks,
        )
        val_skipped = []
        val_map = validate(run.net, run.val, run.conf, run.device, run.root, run.ranks, val_skipped)
    scheduler.step()
    stats["skipped_images"] += sum(val_skipped)  # photos left out of mining and validation
    return {"epoch": epoch, "loss": loss, **stats, "val_map": val_map, "lr": lr, "seconds": time.perf_counter() - t0}


def _record_epoch(run: _Run, metrics: dict) -> None:
    """Rank 0 writes what an epoch leaves: ``best.pt`` if it is the best so far, its
    metrics line, then ``last.pt`` with the training state (a resume drops a metrics line
    newer than ``last.pt``), the tensorboard scalars and the run's plot."""
    epoch, val_map = metrics["epoch"], metrics["val_map"]
    improved = val_map is not None and (run.best is None or val_map > run.best)
    if improved:
        run.best, run.best_epoch = val_map, epoch
    if not run.ranks.main:
        return
    if improved:
        save_checkpoint(run.dir / "best.pt", run.net, epoch=epoch, val_map=val_map)
    _append_metrics(run.dir / "metrics.jsonl", metrics)
    optimizer, scheduler, scaler = run.tools
    save_checkpoint(
        run.dir / "last.pt",
        run.net,
        epoch=epoch,
        val_map=val_map,
        train={
            "epoch": epoch,
            "best_map": run.best,
            "best_epoch": run.best_epoch,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": _rng_state(run.rng),
        },
    )
    if run.writer is not None:
        for key in ("loss", "val_map", "positive_distance", "negative_distance", "lr"):
            if metrics[key] is not None:
                run.writer.add_scalar(key, metrics[key], epoch)
    try:
        plot_run(run.dir)  # metrics.png: loss, val mAP and learning rate so far
    except Exception as e:  # a picture never stops a run
        logger.warning("%s (no metrics.png this epoch)", e)


def _validate_before_training(run: _Run) -> None:
    """The val mAP of the network before training, as epoch -1 of ``metrics.jsonl``;
    ``best.pt`` holds these weights until an epoch does better (so that a run that does
    not help on the val split never leaves a worse ``best.pt`` than it started from)."""
    t0 = time.perf_counter()
    skipped = []
    with _stopped_with_the_cause("before training", _kept(run.dir)):
        val_map = validate(run.net, run.val, run.conf, run.device, run.root, run.ranks, skipped)
    run.best, run.best_epoch = val_map, BEFORE_TRAINING
    if run.ranks.main:
        seconds = time.perf_counter() - t0
        line = {"epoch": BEFORE_TRAINING, "loss": None, "val_map": val_map, "lr": None, "seconds": seconds}
        _append_metrics(run.dir / "metrics.jsonl", {**line, "skipped_images": sum(skipped)})
        save_checkpoint(run.dir / "best.pt", run.net, epoch=BEFORE_TRAINING, val_map=val_map)
    logger.info("before training: val mAP %.2f", 100 * val_map)


def _log_start(conf: TrainConf, data: dict, val, start: int, device, run_dir: Path, ranks: Ranks = ONE) -> None:
    dtype = training_dtype(device, conf)
    amp = f" ({str(dtype).replace('torch.', '')})" if dtype is not None else ""
    if ranks.distributed:
        amp += f", {ranks.world_size} ranks ({'NCCL' if device.type == 'cuda' else 'gloo'})"
    train_q = len(data["train/query"])
    logger.info(
        "train %s + %s on %s%s: %d of %d train queries and a pool of %d images per epoch, %d hard "
        "negatives, %d val queries, epochs %d-%d, at %d px (val at %d px) -> %s",
        conf.arch,
        conf.pool,
        device,
        amp,
        min(conf.query_size, train_q),
        train_q,
        min(conf.pool_size, len(data["train/images"])),
        conf.neg_num,
        0 if val is None else len(val[1]),
        start,
        conf.epochs - 1,
        conf.image_size,
        conf.test_image_size,
        run_dir,
    )
    logger.debug("options: %s", json.dumps(conf_dict(conf), default=str))


def _log_epoch(conf: TrainConf, m: dict) -> None:
    logger.info(
        "epoch %d (%d of %d): loss %.4f, val mAP %s, %.1f s",  # numbered from 0, as in metrics.jsonl
        m["epoch"],
        m["epoch"] + 1,
        conf.epochs,
        m["loss"],
        "-" if m["val_map"] is None else f"{100 * m['val_map']:.2f}",
        m["seconds"],
    )
    logger.debug(
        "epoch %d: lr %.3g, distances positive %.3f negative %.3f, %d queries, pool %d",
        m["epoch"],
        m["lr"],
        m["positive_distance"],
        m["negative_distance"],
        m["queries"],
        m["pool"],
    )


def train(
    pairs: str | Path | None,
    images_root: str | Path | None,
    run_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    on_epoch_end=None,
    **options,
) -> dict:
    """Fine-tune a retrieval network on a pair file; see the module docstring.

    ``options`` are :class:`~.options.TrainConf`'s settings (None: not given). With
    ``resume``, continue the run in ``run_dir`` from its ``last.pt`` (or from the start
    if no epoch finished); ``pairs`` and ``images_root`` default to the run's, and only
    ``epochs``, ``lr`` (the run's initial rate: epoch e then trains at lr
    exp(-lr_decay e)), ``device`` and ``workers`` may change. ``on_epoch_end(epoch,
    metrics)`` is called after each epoch's checkpoint is written. Returns the last
    epoch's metrics. Under ``torchrun`` every rank runs this, and rank 0 alone writes.
    """
    run_dir, options = Path(run_dir), given(options)
    main = environment_ranks().main  # rank 0 (the one process without torchrun) writes the folder
    lock, created = _lock_run_folder(run_dir, resume) if main else (None, False)
    try:
        if main:
            _settle(run_dir)  # a --overwrite killed before its first checkpoint: the run it replaced, back
        conf, inputs = (
            _resumed_run(run_dir, pairs, images_root, options)
            if resume
            else _new_run(pairs, images_root, run_dir, overwrite, options)
        )
        conf.check()
        device = resolve_device(conf.device)
        if main and overwrite and not resume:
            _set_aside(run_dir)
        ranks, joined = join(device.type)
        try:
            run = _open_run(run_dir, conf, inputs, resume, rank_device(device, ranks), ranks)
            return _epochs(run, on_epoch_end)
        finally:
            leave(joined)
    except BaseException:
        if main:
            _settle(run_dir)  # no epoch finished: the run --overwrite replaced, back
            if created and not (run_dir / "last.pt").exists():  # this run's own folder, with no epoch
                shutil.rmtree(run_dir, ignore_errors=True)
        raise
    finally:
        if lock is not None:
            _unlock_run_folder(run_dir, lock)


# ----------------------------------------------------------------------------- the run folder
RUN_FILES = ("config.json", "metrics.jsonl", "metrics.png", "last.pt", "best.pt", "tensorboard")
LOCK = ".lock"  # flock-ed by the train writing the folder
SET_ASIDE = ".replaced"  # --overwrite: the files of the run replaced, until the new run's first last.pt


def _lock_run_folder(run_dir: Path, resume: bool) -> tuple[int | None, bool]:
    """Make the run folder (a new run) and lock it for this process's lifetime: an
    exclusive ``flock`` on ``RUN/.lock``, which the system drops when the process ends,
    however it ends. Another train writing it: one line. Returns the lock's descriptor
    (None: no folder to resume, which :func:`_resumed_run` reports) and whether the folder
    was made here."""
    import fcntl

    if run_dir.exists() and not run_dir.is_dir():
        raise SfmpairsError(f"{run_dir}: not a folder")
    created = False
    if not resume:
        try:
            run_dir.mkdir(parents=True)
            created = True
        except FileExistsError:
            pass
        except OSError as e:
            raise SfmpairsError(f"{run_dir}: cannot make the run folder ({e.strerror})") from None
    elif not ((run_dir / "config.json").is_file() or (run_dir / SET_ASIDE).is_dir()):
        return None, False  # nothing to resume
    path = run_dir / LOCK
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as e:
            raise SfmpairsError(f"{run_dir}: cannot lock the run folder ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SfmpairsError(f"{run_dir}: another train is writing this folder") from None
        try:  # still the file at that path, not one the train that held it removed meanwhile
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd, created
        except FileNotFoundError:
            pass
        os.close(fd)
    raise SfmpairsError(f"{run_dir}: another train is writing this folder")


def _unlock_run_folder(run_dir: Path, fd: int) -> None:
    """Remove the lock file, then let the lock go (one that opened the file meanwhile sees
    it removed: :func:`_lock_run_folder`). A killed train leaves the file, without a lock."""
    try:
        (run_dir / LOCK).unlink()
    except FileNotFoundError:  # its run folder removed (a new run that failed)
        pass
    os.close(fd)


def _set_aside(run_dir: Path) -> None:
    """--overwrite: move the files of the run in ``run_dir`` into ``RUN/.replaced``, where
    they stay until the new run's first ``last.pt`` (:func:`_settle`)."""
    held = [name for name in RUN_FILES if (run_dir / name).exists()]
    if held:
        (run_dir / SET_ASIDE).mkdir()
        for name in held:
            (run_dir / name).rename(run_dir / SET_ASIDE / name)


def _settle(run_dir: Path) -> None:
    """After --overwrite: once the new run has written ``last.pt``, delete the files of
    the run it replaced; if it has not (it failed, or was killed), remove what it wrote and
    put them back."""
    aside = run_dir / SET_ASIDE
    if not aside.is_dir():
        return
    if (run_dir / "last.pt").exists():
        shutil.rmtree(aside)
        return
    for name in RUN_FILES:
        new, old = run_dir / name, aside / name
        if new.is_dir() and not new.is_symlink():
            shutil.rmtree(new)
        elif new.exists() or new.is_symlink():
            new.unlink()
        if old.exists() or old.is_symlink():
            old.rename(new)
    aside.rmdir()


def _kept(run_dir: Path) -> str:
    """Which checkpoint a run that stops now leaves."""
    if (run_dir / "last.pt").exists():
        return str(run_dir / "last.pt")
    if (run_dir / SET_ASIDE).is_dir():
        return f"none written yet; the run --overwrite replaced is put back in {run_dir}"
    return "none written yet"


def _check_run_folder(run_dir: Path, overwrite: bool) -> None:
    """A new run starts only in a folder without a run's files (they would be replaced),
    unless --overwrite."""
    if overwrite or not run_dir.is_dir():
        return
    if (run_dir / "last.pt").exists():  # an epoch finished: a run to keep
        raise SfmpairsError(
            f"{run_dir}: run folder exists (with last.pt); pass --overwrite "
            f"to start afresh, or --resume {run_dir} to continue it"
        )
    held = [name for name in RUN_FILES if (run_dir / name).exists()]
    if held:
        raise SfmpairsError(
            f"{run_dir}: the folder holds {held[0]}, which a new run would replace; pass --overwrite to "
            f"replace it, or --resume {run_dir} to continue a run that stopped before its first epoch"
        )


def _open_run(run_dir: Path, conf: TrainConf, inputs: dict, resume: bool, device, ranks: Ranks) -> _Run:
    """Everything the epochs need, read and checked before any work: the pair file (read
    once), the val ground truth, the training state when resuming, the network."""
    from sfmpairs.mining.pairfile import read_pair_file

    pairs = Path(inputs["pairs"])
    contents = read_pair_file(pairs)  # once: the run's tuples, its val ground truth, its images root
    root = _images_root(inputs, pairs, contents)
    inputs["images_root"] = str(root)
    data = _read_pairs(pairs, contents)
    val = check_trainable(pairs, data, conf, contents)
    # the training state on the CPU: the random generators' states must stay there
    last = run_dir / "last.pt"
    state = read_checkpoint(last, "cpu", training=True) if resume and last.is_file() else None
    if state is not None and state["train"]["epoch"] + 1 >= conf.epochs:
        raise SfmpairsError(
            f"{run_dir}: the run is finished ({state['train']['epoch'] + 1} of "
            f"{conf.epochs} epochs); pass --epochs N to train it longer"
        )
    torch.manual_seed(conf.seed)  # on every rank: the network starts alike (DDP checks it) and
    rng = np.random.default_rng(conf.seed)  # the tuples are drawn alike
    net, conf, start, best, best_epoch = _start_network(conf, run_dir, state, device, ranks.main)
    net = net.to(device).to(memory_format=torch.channels_last)
    model = _forward_module(net, device, ranks)
    tools = _training_tools(net, conf, device, state, rng, start, last)  # a state that does not fit: nothing written
    if ranks.main:
        _write_json(run_dir / "config.json", {**conf_dict(conf), **inputs, "world_size": ranks.world_size})
    run = _Run(
        run_dir,
        conf,
        data,
        val,
        root,
        device,
        ranks,
        net,
        model,
        tools,
        rng,
        ImageCache(root, conf.image_size, int(conf.cache_mb) << 20),
        _tensorboard(run_dir) if ranks.main else None,
        start,
        best,
        best_epoch,
    )
    return run


def _epochs(run: _Run, on_epoch_end) -> dict:
    """The epochs from where the run stands to ``--epochs``; the last one's metrics."""
    conf, last = run.conf, run.dir / "last.pt"
    _log_start(conf, run.data, run.val, run.start, run.device, run.dir, run.ranks)
    if run.start == 0 and run.val is not None:  # where training starts from: the baseline of the plot and best.pt
        _validate_before_training(run)
    metrics = {}
    for epoch in range(run.start, conf.epochs):
        metrics = _run_epoch(run, epoch, kept=_kept(run.dir))
        _record_epoch(run, metrics)
        if run.ranks.main:
            _settle(run.dir)  # after the first last.pt: the files of a run --overwrite replaced go
        _log_epoch(conf, metrics)
        if on_epoch_end is not None:
            on_epoch_end(epoch, metrics)
    if run.best is None:
        logger.info("done: %d epochs, no validation -> %s", conf.epochs, last)
    else:
        when = (
            "before training: no epoch did better"
            if run.best_epoch == BEFORE_TRAINING
            else f"at epoch {run.best_epoch}"
        )
        logger.info(
            "done: best val mAP %.2f %s -> %s (last epoch: %s)", 100 * run.best, when, run.dir / "best.pt", last
        )
    return metrics


def _keep_metrics_before(run_dir: Path, epoch: int) -> None:
    """Drop the lines of epochs from ``epoch`` on (a run stopped after writing an epoch's
    metrics but before its checkpoint redoes that epoch). ``metrics.jsonl`` is read as
    ``plot`` reads it (:func:`~sfmpairs.plot.read_metrics`): a damaged line is one line
    naming the file and line."""
    path = run_dir / "metrics.jsonl"
    if path.exists():
        epochs = read_metrics(run_dir)  # one per line that is not blank
        lines = [x for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
        _write_lines(path, [x for x, m in zip(lines, epochs) if m["epoch"] < epoch])
