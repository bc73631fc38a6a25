"""The ``sfmpairs`` command: a thin layer over the Python API of each stage."""

from __future__ import annotations

import functools
import logging
import os
import sys

# The network's OpenMP threads share the cores with the DataLoader worker processes that
# decode and resize images; OpenMP threads that spin while they wait take the cores from
# them. Passive waiting makes extraction about 10 % faster on 2 cores (benchmarks/
# bench_extract.py) and training no slower. OpenMP reads this when torch loads, so it is
# set before anything imports torch; set OMP_WAIT_POLICY yourself to override it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import click  # noqa: E402

from . import __version__  # noqa: E402
from .common import SfmpairsError  # noqa: E402


def _fail_cleanly(fn):
    """Bad input: one line on stderr naming the file and the problem, exit code 2."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SfmpairsError as e:
            click.echo(f"sfmpairs: error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("sfmpairs: interrupted", err=True)
            sys.exit(130)
    return wrapper


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is now (test runners swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _set_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    log = logging.getLogger("sfmpairs")
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(level)


def _verbosity(fn):
    """-v/-q on every command too, so that ``sfmpairs ingest -q ...`` works."""
    def callback(ctx, param, value):
        if value:
            state = ctx.ensure_object(dict)
            state[param.name] = value
            _set_logging(state.get("verbose", 0), state.get("quiet", False))
        return value
    fn = click.option("-v", "--verbose", count=True, expose_value=False, callback=callback,
                      help="More logging (-vv for debug).")(fn)
    fn = click.option("-q", "--quiet", is_flag=True, expose_value=False, callback=callback,
                      help="Only warnings and errors; no progress bars.")(fn)
    return fn


class _PipelineOrder(click.Group):
    """List the commands in the order they are defined (the pipeline's), not A-Z."""

    def list_commands(self, ctx):
        return list(self.commands)


@click.group(cls=_PipelineOrder, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sfmpairs")
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors; no progress bars.")
@click.pass_context
def main(ctx, verbose: int, quiet: bool):
    """Matching and non-matching image pairs from COLMAP Structure-from-Motion models,
    for training image-retrieval CNNs (Radenovic, Tolias and Chum).

    Typical use: sfmpairs ingest COLMAP_DIR -o sfm.h5; sfmpairs mine sfm.h5 -o
    pairs.h5; sfmpairs train --pairs pairs.h5 -o run; sfmpairs evaluate --pairs
    pairs.h5 --model run/best.pt -o report.json. Try sfmpairs demo.
    """
    ctx.ensure_object(dict).update(verbose=verbose, quiet=quiet)
    _set_logging(verbose, quiet)


@main.command()
@click.argument("paths", nargs=-1, type=click.Path(path_type=str))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="The SfM store to write (HDF5).")
@click.option("--manifest", type=click.Path(dir_okay=False),
              help="TOML file listing models, cluster names and image folders.")
@click.option("--images-root", type=click.Path(file_okay=False),
              help="Folder the stored image names are relative to "
                   "(default: the common folder of the models' photos).")
@click.option("--cluster-by", type=click.Choice(["model", "scene"]), default="model",
              show_default=True,
              help="One cluster per model, or one per scene (scene/sparse/N share one).")
@click.option("--reader", type=click.Choice(["auto", "pycolmap"]), default="auto",
              show_default=True,
              help="auto: the fast readers; pycolmap: the slower reference reader.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@_verbosity
@_fail_cleanly
def ingest(paths, output, manifest, images_root, cluster_by, reader, overwrite):
    """COLMAP models (PATHS: model folders or trees of them) to one HDF5 SfM store.

    Each model becomes a cluster named after its path. Binary and text models, with
    or without rigs/frames (COLMAP 3.12+), are read.
    """
    from .sfm_io.ingest import ingest as run

    if not paths and not manifest:
        raise SfmpairsError("no input: give model paths or --manifest")
    run(list(paths), output, manifest=manifest, images_root=images_root,
        cluster_by=cluster_by, reader=reader, overwrite=overwrite)


@main.command()
@click.argument("store", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="The pair file to write (HDF5).")
@click.option("--strategy", type=click.Choice(["relaxed", "max-inliers", "mac"]),
              default="relaxed", show_default=True,
              help="How the positive is picked from the pool M(q).")
@click.option("--pool-size", "-k", type=int, default=100, show_default=True,
              help="Images in M(q): nearest camera centres in q's model.")
@click.option("--min-inlier-ratio", type=float, default=0.2, show_default=True,
              help="relaxed: co-observed points / points of q, at least.")
@click.option("--max-scale-change", type=float, default=1.5, show_default=True,
              help="relaxed: scale change, at most (1: same scale).")
@click.option("--scale-measure", type=click.Choice(["depth", "bbox"]), default="depth",
              show_default=True, help="depth: median ratio of apparent point sizes; "
              "bbox: ratio of the co-observed points' bounding boxes.")
@click.option("--min-co-observed", type=int, default=1, show_default=True,
              help="A positive shares at least this many 3D points with q.")
@click.option("--queries-per-cluster", type=int, default=None,
              help="Queries drawn per cluster (default: 10%% of a cluster of up to 300 "
                   "images, 30 for larger ones; 0: every eligible image).")
@click.option("--val-fraction", type=float, default=0.2, show_default=True,
              help="Fraction of clusters in the val split.")
@click.option("--val-clusters", type=str, default=None,
              help="Comma-separated cluster names for the val split (instead of --val-fraction).")
@click.option("--descriptors", type=click.Path(dir_okay=False),
              help="HDF5 descriptors keyed by image name: for --strategy mac and hard negatives.")
@click.option("--negatives", type=int, default=5, show_default=True,
              help="Hard negatives per query (with --descriptors), at most one per cluster.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@_verbosity
@_fail_cleanly
def mine(store, output, strategy, pool_size, min_inlier_ratio, max_scale_change, scale_measure,
         min_co_observed, queries_per_cluster, val_fraction, val_clusters, descriptors,
         negatives, seed, overwrite):
    """Pools, positives and hard negatives from an SfM store, into a pair file.

    For each query q, the pool M(q) holds the images of q's model with the nearest
    camera centres; the positive is picked from it by STRATEGY; hard negatives are the
    most similar images of other clusters (needs --descriptors).
    """
    from .mining.mine import mine as run

    run(store, output, descriptors=descriptors, overwrite=overwrite, strategy=strategy,
        pool_size=pool_size, min_inlier_ratio=min_inlier_ratio,
        max_scale_change=max_scale_change, scale_measure=scale_measure,
        min_co_observed=min_co_observed, queries_per_cluster=queries_per_cluster,
        val_fraction=val_fraction,
        val_clusters=[c.strip() for c in val_clusters.split(",")] if val_clusters else None,
        negatives=negatives, seed=seed)


_precision = click.option(
    "--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
    help="Forward pass: auto = float16 on CUDA, bfloat16 on CPUs that compute it natively, "
         "else float32; fp32 = exact.")


def _scales(text: str) -> tuple[float, ...]:
    try:
        scales = tuple(float(s) for s in text.split(","))
    except ValueError:
        raise SfmpairsError(f"--multiscale {text!r}: give comma-separated numbers, e.g. 1,0.7071,0.5") from None
    if not scales or any(s <= 0 for s in scales):
        raise SfmpairsError(f"--multiscale {text!r}: scales must be positive")
    return scales


@main.command()
@click.option("--model", required=True, type=click.Path(dir_okay=False), help="A checkpoint (.pt).")
@click.option("--store", type=click.Path(dir_okay=False),
              help="Describe every image of this SfM store (photos under its images root).")
@click.option("--images-root", type=click.Path(file_okay=False), help="Folder of the photos.")
@click.option("--list", "image_list", type=click.Path(dir_okay=False),
              help="Text file of image names (relative to --images-root), one per line.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="The descriptor file to write (HDF5).")
@click.option("--image-size", type=int, default=None,
              help="Longer side in pixels (never up-scaled); default: the checkpoint's.")
@click.option("--multiscale", default="1", show_default=True,
              help="Scales, combined by the generalised mean with the network's p, e.g. 1,0.7071,0.5.")
@click.option("--whitening", type=click.Path(dir_okay=False), help="Apply a whitening file (sfmpairs whiten).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@_precision
@click.option("--batch-size", type=int, default=16, show_default=True, help="Images per batch (same size).")
@click.option("--workers", type=int, default=None, help="DataLoader workers (default: cores - 1, at most 4).")
@click.option("--skip-bad", is_flag=True, help="Skip missing or corrupt images (listed in the output).")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@_verbosity
@_fail_cleanly
def extract(model, store, images_root, image_list, output, image_size, multiscale, whitening,
            device, precision, batch_size, workers, skip_bad, overwrite):
    """Global descriptors of images with a checkpoint, keyed by image name."""
    from .train.extract import extract as run

    run(model, output, store=store, images_root=images_root, image_list=image_list,
        image_size=image_size, scales=_scales(multiscale), device=device, precision=precision,
        batch_size=batch_size, workers=workers, skip_bad=skip_bad, whitening=whitening,
        overwrite=overwrite)


@main.command()
@click.option("--descriptors", required=True, type=click.Path(dir_okay=False), help="Descriptor file.")
@click.option("--pairs", required=True, type=click.Path(dir_okay=False), help="Pair file (train split).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Whitening file.")
@click.option("--method", type=click.Choice(["lw", "pca"]), default="lw", show_default=True,
              help="lw: learned from matching pairs; pca: PCA whitening.")
@click.option("--dim", type=int, default=None, help="Output dimension (default: the input's).")
@click.option("--all-passing", is_flag=True,
              help="Learn from every passing pool pair, not only query-positive pairs.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@_verbosity
@_fail_cleanly
def whiten(descriptors, pairs, output, method, dim, all_passing, overwrite):
    """Learn a whitening (Lw or PCA) to apply in extract (--whitening)."""
    from .train.whiten import whiten as run

    r = run(descriptors, pairs, output, method=method, dim=dim, all_passing=all_passing, overwrite=overwrite)
    click.echo(f"wrote {r['output']}: {r['method']} whitening to {r['dim']} dimensions")


@main.command()
@click.option("--pairs", type=click.Path(dir_okay=False), help="Evaluate on this pair file's val split.")
@click.option("--gnd", type=click.Path(dir_okay=False), help="Or on revisited Oxford/Paris ground truth (gnd_*.pkl).")
@click.option("--descriptors", type=click.Path(dir_okay=False), help="Precomputed descriptor file.")
@click.option("--model", type=click.Path(dir_okay=False), help="Or a checkpoint to extract with.")
@click.option("--store", type=click.Path(dir_okay=False), help="The SfM store (default: the pair file's).")
@click.option("--images-root", type=click.Path(file_okay=False), help="Folder of the photos (with --model).")
@click.option("--min-covisible", type=int, default=1, show_default=True,
              help="Positive: shares at least this many 3D points with the query.")
@click.option("--positives", type=click.Choice(["covisible", "relaxed"]), default="covisible",
              show_default=True, help="covisible: --min-covisible; relaxed: passes the relaxed filter.")
@click.option("--qe", type=int, default=0, show_default=True, help="alpha query expansion: neighbours (0: off).")
@click.option("--qe-alpha", type=float, default=3.0, show_default=True, help="alpha of alpha-QE.")
@click.option("--image-size", type=int, default=None, help="With --model: longer side in pixels.")
@click.option("--multiscale", default="1", show_default=True, help="With --model: scales.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@_precision
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="JSON report.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@_verbosity
@_fail_cleanly
def evaluate(pairs, gnd, descriptors, model, store, images_root, min_covisible, positives, qe,
             qe_alpha, image_size, multiscale, device, precision, output, overwrite):
    """mAP and mean precision at 1, 5, 10: on a pair file's val split, or on the
    revisited Oxford and Paris protocol (Easy, Medium, Hard)."""
    from .train.evaluate import evaluate as run

    run(output, pairs=pairs, gnd=gnd, descriptors=descriptors, model=model, store=store,
        images_root=images_root, min_covisible=min_covisible, positives=positives, qe=qe,
        qe_alpha=qe_alpha, image_size=image_size, scales=_scales(multiscale), device=device,
        precision=precision, overwrite=overwrite)


@main.command()
@click.option("--pairs", type=click.Path(dir_okay=False), help="Pair file (sfmpairs mine).")
@click.option("--images-root", type=click.Path(file_okay=False),
              help="Folder of the photos (default: the one the pair file records).")
@click.option("-o", "--output", "run_dir", type=click.Path(file_okay=False),
              help="Run folder: config.json, metrics.jsonl, last.pt, best.pt.")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False),
              help="Continue the run in this folder from its last.pt.")
@click.option("--arch", default="resnet50", show_default=True, help="Backbone (see sfmpairs extract --help).")
@click.option("--pool", type=click.Choice(["mac", "spoc", "gem", "rmac"]), default="gem", show_default=True)
@click.option("--whitening", type=int, default=None, help="Add a learnable whitening to this dimension.")
@click.option("--pretrained", is_flag=True, help="Start from torchvision's ImageNet weights.")
@click.option("--weights", type=click.Path(dir_okay=False), help="Start from a checkpoint.")
@click.option("--epochs", type=int, default=None, help="Epochs [30].")
@click.option("--query-size", type=int, default=None, help="Training queries per epoch [2000].")
@click.option("--pool-size", type=int, default=None, help="Negative pool per epoch [20000].")
@click.option("--neg-num", type=int, default=None, help="Hard negatives per tuple [5].")
@click.option("--batch-size", type=int, default=None, help="Tuples per batch [5].")
@click.option("--image-size", type=int, default=None, help="Longer side of training images [362].")
@click.option("--loss", type=click.Choice(["contrastive", "triplet"]), default=None, help="[contrastive]")
@click.option("--margin", type=float, default=None, help="Loss margin [0.7 alexnet, 0.75 vgg16, else 0.85].")
@click.option("--optimizer", type=click.Choice(["adam", "sgd"]), default=None, help="[adam]")
@click.option("--lr", type=float, default=None, help="Learning rate [1e-6]; GeM p: 10x.")
@click.option("--lr-decay", type=float, default=None, help="lr *= exp(-DECAY) per epoch [0.1].")
@click.option("--weight-decay", type=float, default=None, help="[1e-6]")
@click.option("--momentum", type=float, default=None, help="SGD momentum [0.9].")
@click.option("--seed", type=int, default=None, help="Random seed [0].")
@click.option("--device", default=None, help="auto, cpu or cuda [auto].")
@click.option("--amp/--no-amp", default=None, help="Mixed precision (default: on for CUDA).")
@click.option("--workers", type=int, default=None, help="DataLoader workers for mining.")
@click.option("--skip-bad", is_flag=True, default=None, help="Skip missing or corrupt images.")
@click.option("--overwrite", is_flag=True, help="Start afresh in an existing run folder.")
@_verbosity
@_fail_cleanly
def train(pairs, images_root, run_dir, resume_dir, arch, pool, whitening, pretrained, weights, epochs,
          query_size, pool_size, neg_num, batch_size, image_size, loss, margin, optimizer, lr, lr_decay,
          weight_decay, momentum, seed, device, amp, workers, skip_bad, overwrite):
    """Fine-tune a retrieval network with hard examples re-mined every epoch.

    Each epoch draws queries and a negative pool, picks positives by the pair file's
    strategy, mines hard negatives with the current network, trains on the tuples with
    the contrastive loss and validates on the val split.
    """
    from .train.train import train as run

    if resume_dir:
        run(pairs, images_root, resume_dir, resume=True, epochs=epochs, device=device, workers=workers)
        return
    if not run_dir:
        raise SfmpairsError("give -o RUN_DIR (or --resume RUN_DIR)")
    run(pairs, images_root, run_dir, overwrite=overwrite, arch=arch, pool=pool, whitening=whitening,
        pretrained=pretrained, weights=weights, epochs=epochs, query_size=query_size,
        pool_size=pool_size, neg_num=neg_num, batch_size=batch_size, image_size=image_size,
        loss=loss, margin=margin, optimizer=optimizer, lr=lr, lr_decay=lr_decay,
        weight_decay=weight_decay, momentum=momentum, seed=seed, device=device, amp=amp,
        workers=workers, skip_bad=skip_bad)


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@_verbosity
@_fail_cleanly
def info(file):
    """Summarise any file sfmpairs writes: contents, schema and how it was made."""
    from .info import summary

    click.echo(summary(file))


@main.command()
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Folder to write.")
@click.option("--clusters", type=int, default=12, show_default=True, help="Places (one COLMAP model each).")
@click.option("--images-per-cluster", type=int, default=40, show_default=True)
@click.option("--image-size", default="320x240", show_default=True, help="WIDTHxHEIGHT of the photos.")
@click.option("--points", type=int, default=3000, show_default=True, help="3D points sampled per cluster.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Write into a folder that is not empty.")
@_verbosity
@_fail_cleanly
def synth(output, clusters, images_per_cluster, image_size, points, seed, overwrite):
    """A synthetic world: textured building corners, rendered photos, exact COLMAP models.

    Writes OUTPUT/cluster_XX/images/*.jpg and OUTPUT/cluster_XX/sparse/0 per cluster,
    and OUTPUT/world.json with the exact geometry; `sfmpairs ingest OUTPUT` reads it.
    """
    from .sfm_io.world import synth as run

    try:
        w, h = (int(v) for v in image_size.lower().split("x"))
    except ValueError:
        raise SfmpairsError(f"--image-size {image_size!r}: give WIDTHxHEIGHT, e.g. 320x240") from None
    run(output, clusters=clusters, images_per_cluster=images_per_cluster, image_size=(w, h),
        seed=seed, overwrite=overwrite, points=points)
    click.echo(f"wrote {clusters} clusters of {images_per_cluster} photos to {output}")


@main.command()
@click.argument("images_dir", type=click.Path(file_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False),
              help="Folder for database.db, sparse/0..N and a link to the photos.")
@click.option("--matcher", type=click.Choice(["exhaustive", "sequential", "vocab-tree"]),
              default="exhaustive", show_default=True,
              help="exhaustive: every pair (small sets); sequential: video frames; vocab-tree: large sets.")
@click.option("--camera-model", default="SIMPLE_RADIAL", show_default=True, help="COLMAP camera model.")
@click.option("--single-camera", is_flag=True, help="All photos share one camera.")
@click.option("--max-image-size", type=int, default=1600, show_default=True,
              help="Longer side for feature extraction.")
@click.option("--vocab-tree", type=click.Path(dir_okay=False), help="Vocabulary tree file for vocab-tree.")
@click.option("--overlap", type=int, default=10, show_default=True, help="sequential: neighbours matched.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda (where pycolmap has it).")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it is not empty.")
@_verbosity
@_fail_cleanly
def reconstruct(images_dir, output, matcher, camera_model, single_camera, max_image_size, vocab_tree,
                overlap, device, overwrite):
    """COLMAP models from a folder of photos (pycolmap: SIFT, matching, incremental mapping).

    Every separate model becomes a cluster when ingested: sfmpairs ingest OUTPUT.
    """
    from .sfm_io.reconstruct import reconstruct as run

    r = run(images_dir, output, matcher=matcher, camera_model=camera_model, single_camera=single_camera,
            max_image_size=max_image_size, vocab_tree=vocab_tree, overlap=overlap, device=device,
            overwrite=overwrite)
    click.echo(f"{len(r['models'])} models from {r['photos']} photos; registered: "
               + ", ".join(f"sparse/{k}: {v}" for k, v in r["models"].items()))


@main.command()
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="tuples.png or tuples.html.")
@click.argument("pairs", type=click.Path(dir_okay=False))
@click.option("--images-root", type=click.Path(file_okay=False),
              help="Folder of the photos (default: the one the pair file records).")
@click.option("--split", type=click.Choice(["train", "val"]), default="train", show_default=True)
@click.option("--query", default=None, help="Show this query (its image name) only.")
@click.option("--count", type=int, default=6, show_default=True, help="Tuples sampled.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--embed", is_flag=True, help="HTML: embed thumbnails instead of linking the photos.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@_verbosity
@_fail_cleanly
def show(output, pairs, images_root, split, query, count, seed, embed, overwrite):
    """A picture (.png) or page (.html) of mined tuples: query, positive and negatives
    side by side with cluster names, inlier ratio, scale change and camera distance."""
    from .show import show as run

    rows = run(pairs, images_root, output, split=split, query=query, count=count, seed=seed, embed=embed,
               overwrite=overwrite)
    click.echo(f"wrote {output}: {len(rows)} tuples")


@main.command()
@click.argument("pairs", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["cirtorch", "hloc", "csv"]), required=True,
              help="cirtorch: the authors' training database; hloc: a pairs text file; csv: every statistic.")
@click.option("-o", "--output", required=True, type=click.Path(),
              help="cirtorch: a data folder; hloc, csv: a file.")
@click.option("--images-root", type=click.Path(file_okay=False),
              help="cirtorch: where the photos are (default: the one the pair file records).")
@click.option("--copy", is_flag=True, help="cirtorch: copy the photos instead of linking them.")
@click.option("--all-passing", is_flag=True, help="hloc: every passing pool pair, not only query-positive.")
@click.option("--overwrite", is_flag=True, help="Replace an existing export.")
@_verbosity
@_fail_cleanly
def export(pairs, fmt, output, images_root, copy, all_passing, overwrite):
    """Pair files for other frameworks: cnnimageretrieval-pytorch, hloc, pandas (CSV)."""
    from .mining.export import export as run

    r = run(pairs, output, fmt, images_root=images_root, copy=copy, all_passing=all_passing, overwrite=overwrite)
    click.echo(f"wrote {fmt} export to {output}: " + ", ".join(f"{k} {v}" for k, v in r.items()))


@main.command()
@click.option("--workdir", type=click.Path(file_okay=False), default="sfmpairs-demo",
              show_default=True, help="Folder for the demo's inputs and outputs.")
@click.option("--epochs", type=int, default=6, show_default=True, help="Training epochs.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or auto.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@click.option("--overwrite", is_flag=True, help="Reuse a WORKDIR that is not empty.")
@_verbosity
@_fail_cleanly
def demo(workdir, epochs, device, seed, overwrite):
    """The whole pipeline on a synthetic world it makes itself, in a few minutes on CPU.

    Renders a world of textured places with exact COLMAP models, ingests it, mines
    relaxed pairs, evaluates a randomly initialised resnet18, trains it, evaluates it
    again, mines hard negatives with it and draws a picture of mined tuples; prints the
    val mAP before and after training.
    """
    from .demo import run_demo
    from .train.extract import resolve_device

    run_demo(workdir, seed=seed, epochs=epochs, device=str(resolve_device(device)), overwrite=overwrite)


if __name__ == "__main__":  # pragma: no cover
    main()
