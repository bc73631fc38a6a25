"""``sfmpairs ingest``: COLMAP models to one HDF5 SfM store.

Every model becomes a cluster (or, with ``cluster_by="scene"``, the models of one
scene share one); pools and geometry stay per model, each in its own frame.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from sfmpairs.common import SfmpairsError, atomic_output, progress, provenance_attrs, threads_by_size
from sfmpairs.config import conf_dict, make_conf

from . import colmap_binary, colmap_pycolmap, colmap_text, reading_processes, store, store_writer
from .discover import MODEL_FILES, ModelSource, from_manifest, from_paths
from .model import Model
from .options import READERS, IngestConf
from .shared_names import drop_images, keepers
from .store import SCHEMA, SCHEMA_VERSION, model_columns

logger = logging.getLogger("sfmpairs.ingest")


def read_model(folder: str | os.PathLike, fmt: str, reader: str = "auto", threads: int | None = None) -> Model:
    """Read one model: the fast readers by default (on ``threads`` threads: None, a
    few), pycolmap with ``reader="pycolmap"``."""
    if reader == "pycolmap":
        return colmap_pycolmap.read_model(folder, fmt)
    if reader != "auto":
        raise SfmpairsError(f"unknown reader {reader!r} (choose from {', '.join(READERS)})")
    return (colmap_binary if fmt == "binary" else colmap_text).read_model(folder, threads)


def _image_prefixes(sources: list[ModelSource], images_root: Path | None, given: bool):
    """The images root of the store and each model's prefix of image names under it.

    A model whose photo folder is known gets the folder's path under the root; one
    whose photos are unknown gets its model name, unless the user gave the root
    (``given``: the COLMAP names are then taken as relative to it).
    """
    if images_root is None:
        known = [str(s.images_dir) for s in sources if s.images_dir]
        images_root = Path(os.path.commonpath(known)) if known else None
    else:
        images_root = Path(images_root).resolve()
    prefixes = []
    for s in sources:
        prefix = "" if given else s.name + "/"
        if images_root is not None and s.images_dir is not None:
            prefix = ""
            rel = os.path.relpath(s.images_dir, images_root)
            if rel.startswith(".."):
                logger.warning("%s: photos at %s are outside the images root %s", s.path, s.images_dir, images_root)
            elif rel != ".":
                prefix = Path(rel).as_posix() + "/"
        prefixes.append(prefix)
    return images_root, prefixes


def _inputs(sources: list[ModelSource]) -> list[dict]:
    out = []
    for s in sources:
        files = {}
        for p in _model_files(s):
            st = p.stat()
            files[p.name] = {"bytes": st.st_size, "mtime": int(st.st_mtime)}
        out.append(
            {"path": str(s.path.resolve()), "format": s.format, "name": s.name, "cluster": s.cluster, "files": files}
        )
    return out


@contextlib.contextmanager
def _small_pages():
    """Ask numpy for no transparent huge pages while ingesting.

    numpy advises the kernel to back large arrays with 2 MB pages. Ingest fills each
    of its large arrays once, so they gain nothing from it, and where memory is
    fragmented (another large process just exited) the kernel compacts memory to find
    them, which made ingest up to a third slower in benchmarks/bench_ingest.py.
    """
    try:
        from numpy._core.multiarray import _set_madvise_hugepage
    except ImportError:  # numpy < 2
        try:
            from numpy.core.multiarray import _set_madvise_hugepage
        except ImportError:
            _set_madvise_hugepage = None
    if _set_madvise_hugepage is None:
        yield
        return
    before = _set_madvise_hugepage(False)
    try:
        yield
    finally:
        _set_madvise_hugepage(before)


def gather_sources(paths, manifest, cluster_by: str) -> tuple[list[ModelSource], Path | None]:
    """The models to ingest, from a manifest and from paths (model folders or trees of
    them), names unique; and the manifest's images root (None without one)."""
    sources: list[ModelSource] = []
    manifest_root = None
    if manifest is not None:
        listed, manifest_root = from_manifest(manifest, cluster_by)
        sources += listed
    if isinstance(paths, (str, os.PathLike)):  # one path, not its characters
        paths = [paths]
    sources += from_paths(list(paths or []), cluster_by)
    if not sources:
        raise SfmpairsError("no input: give model paths or --manifest")
    seen = {}
    for s in sources:
        if s.name in seen:
            raise SfmpairsError(
                f"{s.path}: model name {s.name!r} is also that of {seen[s.name]}; name them in a manifest"
            )
        seen[s.name] = s.path
    return sources, manifest_root


def leave_shared_names(sources: list[ModelSource], prefixes: list[str], reader: str):
    """``--shared-names largest``: each image name (with its folder prefix) stays in the
    model with the most images only (the first given on a tie). Reads every model once
    for its names; returns the sources and prefixes of the models left with images, and
    for each the names it leaves."""
    names = []
    for src, prefix in zip(progress(sources, desc="names", unit="model"), prefixes):
        names.append([prefix + n for n in read_model(src.path, src.format, reader).names])
    keeper = keepers(names)
    leave = [{n for n in ns if keeper[n] != k} for k, ns in enumerate(names)]
    kept = []
    for k, src in enumerate(sources):
        if not leave[k]:
            kept.append(k)
            continue
        larger = sorted({sources[keeper[n]].name for n in leave[k]})
        if len(leave[k]) == len(names[k]) and names[k]:
            logger.warning(
                "%s: left out, all its %d images are in larger models (%s)", src.name, len(names[k]), ", ".join(larger)
            )
            continue
        kept.append(k)
        logger.warning(
            "%s: %d of its %d images left out, kept in larger models (%s)",
            src.name,
            len(leave[k]),
            len(names[k]),
            ", ".join(larger),
        )
    return [sources[k] for k in kept], [prefixes[k] for k in kept], [leave[k] for k in kept]


def _without(model: Model, names: list[str], leave: set[str]) -> tuple[Model, list[str]]:
    """The model without the images named in ``leave`` (and points left with fewer than 2)."""
    if not leave:
        return model, names
    keep = np.array([n not in leave for n in names], bool)
    return drop_images(model, keep), [n for n, k in zip(names, keep) if k]


# Models read ahead, each on a thread of its own: reading is compiled loops that
# release Python's lock, so two reads overlap each other and the writing (measured on
# the SfM-120k-shaped corpus, 8 runs each: median 7.06 s against 7.38 s with one, the
# spread 6.7 to 7.2 s against 6.8 to 9.2 s, for 50 MiB more at the peak)
READ_AHEAD = 2


def _model_files(src: ModelSource):
    """The files of a model that exist."""
    ext = "bin" if src.format == "binary" else "txt"
    return [p for f in (*MODEL_FILES, "rigs", "frames") if (p := src.path / f"{f}.{ext}").exists()]


def _bytes(src: ModelSource) -> int:
    """The size of a model's files (a file that vanished counts 0: its reading says so)."""
    total = 0
    for p in _model_files(src):
        with contextlib.suppress(OSError):
            total += p.stat().st_size
    return total


def model_columns_of(model: Model, task: dict) -> tuple[dict, tuple[int, int, int]]:
    """The store's rows of the model of ``task`` (see :func:`reading_tasks`), its points
    and observations numbered from 0, without the images it leaves to larger models;
    and its (images, points, observations)."""
    if model.num_images == 0:
        raise SfmpairsError(f"{task['path']}: empty model (no registered images)")
    model, names = _without(model, [task["prefix"] + n for n in model.names], task["leave"])
    columns = model_columns(model, task["model"], task["cluster"], names, 0, 0, task["width"])
    return columns, (model.num_images, model.num_points, len(model.point))


def reading_tasks(sources, prefixes, cluster_names, reader, leave=None, sizes=None) -> list[dict]:
    """What reading each model takes (:func:`model_columns_of`): its folder, format and
    reader, its threads (a model whose files are at most half the size of the
    largest's is read beside others, on one thread; a larger one on a few: measured on
    the SfM-120k-shaped corpus, every model on one thread against a few, 6 runs each:
    8.7 CPU s against 9.3), its names' prefix, the names it leaves (``leave``, see
    :func:`leave_shared_names`), its model and cluster index and the width of
    ``images/params``. ``sizes``: each model's bytes where the caller has them."""
    sizes = [_bytes(s) for s in sources] if sizes is None else sizes
    threads = threads_by_size(sizes)
    cluster_index = {c: i for i, c in enumerate(cluster_names)}
    width = store.max_params()
    return [
        {
            "path": src.path,
            "format": src.format,
            "reader": reader,
            "threads": threads[k],
            "prefix": prefixes[k],
            "leave": leave[k] if leave else set(),
            "model": k,
            "cluster": cluster_index[src.cluster],
            "width": width,
            "bytes": sizes[k],
        }
        for k, src in enumerate(sources)
    ]


def _read_ahead(tasks: list[dict]):
    """Each task's model as a batch of one, ``(columns, [sizes])``
    (:func:`model_columns_of`), in order, the
    next :data:`READ_AHEAD` models read on as many threads while the caller writes
    this one (READ_AHEAD + 1 models in memory at most). On an error, or when the
    caller stops, the reads under way are finished first (a thread cannot be stopped),
    those not begun are dropped."""

    def read(task: dict):
        return read_model(task["path"], task["format"], task["reader"], task["threads"])

    with ThreadPoolExecutor(READ_AHEAD) as ex:
        ahead = deque(ex.submit(read, tasks[k]) for k in range(min(READ_AHEAD, len(tasks))))
        try:
            for k in range(len(tasks)):
                model = ahead.popleft().result()
                if k + READ_AHEAD < len(tasks):
                    ahead.append(ex.submit(read, tasks[k + READ_AHEAD]))
                columns, counts = model_columns_of(model, tasks[k])
                yield columns, [counts]
                del model
        finally:
            ex.shutdown(wait=False, cancel_futures=True)  # reads not begun are dropped


@contextlib.contextmanager
def model_rows(tasks: list[dict], processes: bool):
    """``(rows, shared)``: ``rows`` an iterator of batches of consecutive models, in
    order, each as (columns, [(images, points, observations) of each model]) with the
    models numbered after those before them in the batch (:func:`model_columns_of`).
    Read in batches by other processes where ``processes`` and they can start
    (:func:`.reading_processes.can_fork`; ``shared`` True: the columns are views of
    shared memory, valid until the next batch is asked for), else one model a batch
    on threads of this process (:func:`_read_ahead`). On the way out, the reading
    stops."""
    readers = None
    if processes and reading_processes.can_fork():
        try:
            readers = reading_processes.ReadingProcesses(tasks, reading_processes.processes())
        except OSError as e:  # no process or shared memory to be had
            logger.warning("cannot start processes to read the models (%s); reading them on threads", e.strerror or e)
    if readers is not None:
        try:
            # asked for once a batch, and once more where a model after a batch's last failed
            yield iter(readers.next, None), True
        except BaseException:
            readers.close(kill=True)
            raise
        readers.close()
        return
    with contextlib.closing(_read_ahead(tasks)) as rows:
        yield rows, False


def renumber(columns: dict, point_offset: int, obs_offset: int) -> None:
    """Number the points and observations of a model or batch (from 0 in ``columns``)
    after those of the models before it, in place."""
    if point_offset:
        columns["observations/point"] += np.int32(point_offset)
    if obs_offset:
        columns["observations/indptr"] += obs_offset


APPEND_OBSERVATIONS = 1 << 22  # models are written in groups of about this many observations


def check_utf8(sources: list[ModelSource], prefixes: list[str]) -> None:
    """The store holds names and paths as UTF-8 text: a model whose folder's name is not
    (bytes the file system decoded as surrogates) is refused in one line, before any
    writing."""
    for src, prefix in zip(sources, prefixes):
        for text in (str(src.path.resolve()), src.name, src.cluster, prefix, str(src.images_dir or "")):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise SfmpairsError(
                    f"{os.fsencode(src.path)!r}: the path is not UTF-8 text, which the store needs; rename the folder"
                ) from None


def check_addition(src: ModelSource, names: list[str], names_seen: dict[str, str], points: int) -> None:
    """That the model of ``src`` may join the store: its image ``names`` are in no model
    before it (``names_seen``: name -> model, updated), and the store's ``points`` with
    it fit the store's point index."""
    for n in names:
        if n in names_seen:
            raise SfmpairsError(
                f"{src.path}: image name {n!r} is also in model {names_seen[n]}; give each model its "
                f"photo folder (--images-root or a manifest), or keep each photo in its largest model "
                f"(--shared-names largest)"
            )
        names_seen[n] = src.name
    if points > store.MAX_POINTS:
        raise SfmpairsError(
            f"{src.path}: the store numbers points with int32, at most {store.MAX_POINTS:,} in all, "
            f"and this model brings the total to {points:,}; ingest the models into several stores"
        )


def append_models(writer, sources: list[ModelSource], rows, shared: bool = False) -> tuple[dict, list]:
    """Append each model to the store being written (``writer``:
    :func:`~.store_writer.store_writer`'s), its rows from ``rows`` (:func:`model_rows`:
    batches of consecutive models; ``shared``: in shared memory); the totals and each
    model's (first image, first point, end image, end point). Image names (with their
    folder prefix) must be unique across models."""
    totals = {"images": 0, "points": 0, "observations": 0}
    names_seen: dict[str, str] = {}
    ranges = []
    pending, pending_observations = [], 0  # batches read, not yet written: small ones go together
    batch, counts, end = None, [], 0  # the batch of the models now, their sizes, its end
    for k, src in enumerate(progress(sources, desc="ingest", unit="model")):
        if k == end:
            if batch is not None:  # the last batch's models all joined
                pending, pending_observations = _write(writer, pending, pending_observations, batch, shared)
            batch = None  # no view of shared memory may outlive its batch
            batch, counts = next(rows)
            renumber(batch, totals["points"], totals["observations"])
            start, end, first = k, k + len(counts), 0  # first: the model's first image in the batch
        images, points, observations = counts[k - start]
        check_addition(src, batch["images/name"][first : first + images], names_seen, totals["points"] + points)
        first += images
        begin = (totals["images"], totals["points"])
        totals["images"] += images
        totals["points"] += points
        totals["observations"] += observations
        ranges.append((*begin, totals["images"], totals["points"]))
        logger.info(
            "%s: %d images, %d points, %d observations (%s)", src.name, images, points, observations, src.format
        )
    if batch is not None:
        pending, _ = _write(writer, pending, pending_observations, batch, shared)
    del batch
    writer.append(pending)
    return totals, ranges


def _write(writer, pending: list, pending_observations: int, batch: dict, shared: bool):
    """Write ``batch`` with the batches ``pending`` where they hold enough observations
    together (:data:`APPEND_OBSERVATIONS`) or where ``batch`` is in shared memory (the
    reading processes made it large enough), else keep it pending; the batches pending
    then, and their observations."""
    pending_observations += len(batch["observations/point"])
    if shared or pending_observations >= APPEND_OBSERVATIONS:
        writer.append([*pending, batch])
        return [], 0
    return [*pending, batch], pending_observations


def source_tables(sources: list[ModelSource], cluster_names: list[str], ranges: list) -> dict:
    """The store's ``clusters`` and ``models`` tables: where each came from."""
    cluster_index = {c: i for i, c in enumerate(cluster_names)}
    return {
        "clusters": {
            "name": cluster_names,
            "source": [";".join(str(s.path.resolve()) for s in sources if s.cluster == c) for c in cluster_names],
        },
        "models": {
            "name": [s.name for s in sources],
            "path": [str(s.path.resolve()) for s in sources],
            "format": [s.format for s in sources],
            "cluster": [cluster_index[s.cluster] for s in sources],
            "images_dir": [str(s.images_dir) if s.images_dir else "" for s in sources],
            "image_range": [(r[0], r[2]) for r in ranges],
            "point_range": [(r[1], r[3]) for r in ranges],
        },
    }


def ingest(
    paths: str | os.PathLike | list[str | os.PathLike] | None,
    output: str | os.PathLike,
    *,
    manifest: str | os.PathLike | None = None,
    images_root: str | os.PathLike | None = None,
    overwrite: bool = False,
    **options,
) -> dict:
    """Read COLMAP models and write the SfM store ``output``; returns a short summary.

    ``paths`` are model folders or trees of them (one path, str or PathLike, is taken
    as one); ``manifest`` a TOML file listing models (both may be given); ``options``:
    the settings of :class:`~.options.IngestConf`. Raises :class:`SfmpairsError` on bad
    input, leaving no output behind.
    """
    t0 = time.perf_counter()
    conf = make_conf(IngestConf, **options)
    conf.check()
    sources, manifest_root = gather_sources(paths, manifest, conf.cluster_by)
    root, prefixes = _image_prefixes(sources, images_root or manifest_root, images_root is not None)
    leave, given_sources = None, sources
    if conf.shared_names == "largest":
        sources, prefixes, leave = leave_shared_names(sources, prefixes, conf.reader)
    check_utf8(sources, prefixes)
    cluster_names = list(dict.fromkeys(s.cluster for s in sources))
    kept = {s.path for s in sources}  # a set: the list's ``in`` was quadratic in the models
    parameters = {
        **conf_dict(conf),
        "images_root": str(root) if root else None,
        "manifest": str(Path(manifest).resolve()) if manifest else None,
        # --shared-names largest: the models left out, all their images being in larger ones
        "left_out_models": [str(s.path.resolve()) for s in given_sources if s.path not in kept],
    }
    inputs = _inputs(sources)
    sizes = [sum(f["bytes"] for f in i["files"].values()) for i in inputs]  # each model's files, stat'ed once
    tasks = reading_tasks(sources, prefixes, cluster_names, conf.reader, leave, sizes)
    processes = sum(sizes) >= reading_processes.PROCESS_INPUT_BYTES
    with atomic_output(output, overwrite) as tmp, _small_pages(), model_rows(tasks, processes) as (rows, shared):
        # read by other processes, the models are written here; read on threads, by a child
        child = not shared and sum(sizes) >= store_writer.CHILD_INPUT_BYTES
        with store_writer.store_writer(tmp, output, child) as w:
            totals, ranges = append_models(w, sources, rows, shared)
            w.tables(source_tables(sources, cluster_names, ranges))
            provenance = provenance_attrs(SCHEMA, SCHEMA_VERSION, parameters, inputs)
            w.attrs({**provenance, "images_root": str(root) if root else ""})
    seconds = time.perf_counter() - t0
    logger.info(
        "wrote %s: %d clusters, %d models, %d images, %d points, %d observations in %.1f s",
        output,
        len(cluster_names),
        len(sources),
        totals["images"],
        totals["points"],
        totals["observations"],
        seconds,
    )
    return {"output": str(output), "clusters": len(cluster_names), "models": len(sources), **totals, "seconds": seconds}
