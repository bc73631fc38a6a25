"""Pictures of training runs and retrieval results.

- :func:`read_metrics`: a run folder's ``metrics.jsonl``, checked, as a list of dicts;
- :func:`run_figure`: training loss, val mAP and learning rate per epoch, several runs
  overlaid (a ``matplotlib.figure.Figure``);
- :func:`plot_runs`: that figure as a PNG comparing runs (``sfmpairs plot RUN...``);
- :func:`plot_run`: ``run_dir/metrics.png`` for one run, rewritten after every epoch;
- :func:`retrieval_figure`: for a few queries, the top-k results of several result sets
  (before and after training) side by side, each framed by its ground truth.

Matplotlib is used through its object-oriented API on the Agg canvas only (no pyplot,
no display). Every PNG is written atomically and carries its provenance in its text
metadata (``PIL.Image.open(png).text``).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import numpy as np

from .common import SfmpairsError, atomic_output, check_output_path, provenance_attrs

logger = logging.getLogger("sfmpairs.plot")

# frame colours of the retrieval picture (RGB 0-255), by ground-truth label
LABEL_COLOURS = {"positive": (0, 170, 0), "junk": (150, 150, 150), "negative": (215, 0, 0)}
QUERY_COLOUR = (30, 70, 200)
PLACEHOLDER = (205, 205, 205)  # the fill of a photo that could not be opened
DPI = 100
BASELINE_EPOCH = -1  # metrics.jsonl: the network before training (its val mAP only)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The epochs of a training run: ``run_dir/metrics.jsonl``, one dict per line.

    Every line must be a JSON object with an integer ``epoch`` (increasing from line to
    line), a number ``loss``, a positive number ``lr`` and ``val_map`` a number or null
    (missing reads as null); the other keys are kept as they are. Epoch -1 is the
    network before training (:data:`BASELINE_EPOCH`): its val mAP, loss and lr null. Raises
    :class:`SfmpairsError` naming the file (and line) and the problem.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise SfmpairsError(f"{run_dir}: run folder not found")
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SfmpairsError(f"{path}: not found (not a training run folder, or no epoch finished yet)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SfmpairsError(f"{path}: cannot read ({e})") from None
    epochs: list[dict] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            m = json.loads(line)
        except json.JSONDecodeError as e:
            raise SfmpairsError(f"{path}: line {n}: not JSON ({e.msg})") from None
        if not isinstance(m, dict):
            raise SfmpairsError(f"{path}: line {n}: not a JSON object")
        m.setdefault("val_map", None)
        if not isinstance(m.get("epoch"), int) or isinstance(m.get("epoch"), bool) or m["epoch"] < BASELINE_EPOCH:
            raise SfmpairsError(f"{path}: line {n}: epoch must be an integer >= -1, not {m.get('epoch')!r}")
        if epochs and m["epoch"] <= epochs[-1]["epoch"]:
            raise SfmpairsError(f"{path}: line {n}: epoch {m['epoch']} after epoch {epochs[-1]['epoch']}")
        if m["epoch"] == BASELINE_EPOCH:  # before training: no loss, no learning rate
            m.update(loss=None, lr=None)
        elif not _is_number(m.get("loss")):
            raise SfmpairsError(f"{path}: line {n}: loss must be a number, not {m.get('loss')!r}")
        elif not _is_number(m.get("lr")) or not m["lr"] > 0:
            raise SfmpairsError(f"{path}: line {n}: lr must be a positive number, not {m.get('lr')!r}")
        if m["val_map"] is not None and not _is_number(m["val_map"]):
            raise SfmpairsError(f"{path}: line {n}: val_map must be a number or null, not {m['val_map']!r}")
        epochs.append(m)
    if not epochs:
        raise SfmpairsError(f"{path}: no epochs recorded")
    return epochs


def _tex_safe(text: str) -> str:
    """``text`` shown as it is by matplotlib (a ``$`` would start mathtext)."""
    return text.replace("$", r"\$")


def run_figure(runs: dict[str, list[dict]]):
    """Three panels sharing the epoch axis: training loss, val mAP (%) and learning rate
    (log scale), one colour per run, a legend of the run labels (the keys of ``runs``,
    values as :func:`read_metrics` returns them).

    On every panel, line ``i`` (``ax.get_lines()[i]``) is run ``i``, also where it has
    no point to show (epochs without validation are left out of the mAP panel). Returns
    a ``matplotlib.figure.Figure`` on an Agg canvas; save it with ``fig.savefig``. A
    ``$`` in a label is escaped (``\\$``) so that it shows as it is.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if not runs:
        raise ValueError("run_figure: no runs to plot")
    fig = Figure(figsize=(13, 3.8), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_map, ax_lr = fig.subplots(1, 3, sharex=True)
    has_map = False
    for i, (label, metrics) in enumerate(runs.items()):
        style = {"color": f"C{i % 10}", "marker": "o", "markersize": 3, "linewidth": 1.5}
        trained = [m for m in metrics if m["epoch"] != BASELINE_EPOCH]
        ax_loss.plot([m["epoch"] for m in trained], [m["loss"] for m in trained], label=_tex_safe(label), **style)
        val = [(m["epoch"], 100 * m["val_map"]) for m in metrics if m.get("val_map") is not None]
        has_map |= bool(val)
        ax_map.plot([e for e, _ in val], [v for _, v in val], **style)
        ax_lr.plot([m["epoch"] for m in trained], [m["lr"] for m in trained], **style)
    ax_loss.set_title("training loss")
    ax_map.set_title("val mAP (%); epoch -1: before training")
    ax_lr.set_title("learning rate")
    ax_lr.set_yscale("log")
    if not has_map:
        ax_map.text(0.5, 0.5, "no validation", transform=ax_map.transAxes, ha="center", va="center", color="0.4")
    for ax in (ax_loss, ax_map, ax_lr):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
    ax_loss.legend(loc="best", fontsize="small")
    return fig


def _run_labels(run_dirs: list[Path]) -> list[str]:
    """The run folders' names; equal names get their parent folder's name in front, and
    whatever is still equal a number."""
    full = [d.resolve() for d in run_dirs]
    labels = [p.name or str(p) for p in full]
    labels = [f"{p.parent.name}/{p.name}" if labels.count(x) > 1 else x for p, x in zip(full, labels)]
    seen: dict[str, int] = {}
    out = []
    for x in labels:
        seen[x] = seen.get(x, 0) + 1
        out.append(x if labels.count(x) == 1 else f"{x} [{seen[x]}]")
    return out


def _png_metadata(schema: str, title: str, description: str, parameters: dict, inputs) -> dict:
    """PNG text chunks: a title and description, and :func:`provenance_attrs`."""
    from . import __version__

    attrs = provenance_attrs(schema, 1, parameters, inputs)
    attrs["schema_version"] = str(attrs["schema_version"])
    return {"Title": title, "Description": description, "Software": f"sfmpairs {__version__}", **attrs}


def check_png(output) -> Path:
    output = Path(output)
    if output.suffix.lower() != ".png":
        raise SfmpairsError(f"{output}: give a .png output")
    return output


def plot_runs(run_dirs, output: str | os.PathLike, labels: list[str] | None = None, overwrite: bool = False) -> Path:
    """One PNG comparing training runs (:func:`run_figure`) at ``output``.

    ``labels`` name the runs in the legend (default: each run folder's name, with its
    parent folder's name where two are equal); they must differ. Refuses to replace
    ``output`` unless ``overwrite``; writes nothing if a run cannot be read. Returns
    ``output``.
    """
    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise SfmpairsError("plot: give at least one run folder")
    output = check_output_path(check_png(output), overwrite)
    if labels is None:
        labels = _run_labels(run_dirs)
    elif len(labels) != len(run_dirs):
        raise SfmpairsError(f"plot: {len(labels)} labels for {len(run_dirs)} runs")
    runs = {}
    for label, d in zip(labels, run_dirs):
        if label in runs:
            raise SfmpairsError(f"plot: the label {label!r} is given twice")
        runs[label] = read_metrics(d)
    fig = run_figure(runs)
    meta = _png_metadata(
        "sfmpairs/plot-runs",
        "sfmpairs training runs",
        "training loss, val mAP (%) and learning rate (log scale) per epoch of each run",
        {"labels": list(labels)},
        [str(d / "metrics.jsonl") for d in run_dirs],
    )
    with atomic_output(output, overwrite) as tmp:
        fig.savefig(tmp, format="png", metadata=meta)
    return output


def plot_run(run_dir: str | os.PathLike) -> Path:
    """Write ``run_dir/metrics.png``, the curves of one run (its folder's name in the
    legend), replacing the previous one atomically: training calls it after every
    epoch. Raises :class:`SfmpairsError` if the metrics cannot be read. Returns the
    path written."""
    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir)
    fig = run_figure({_run_labels([run_dir])[0]: metrics})
    output = run_dir / "metrics.png"
    meta = _png_metadata(
        "sfmpairs/plot-runs",
        "sfmpairs training run",
        "training loss, val mAP (%) and learning rate (log scale) per epoch",
        {"epochs": len(metrics)},
        [str(run_dir / "metrics.jsonl")],
    )
    with atomic_output(output, overwrite=True) as tmp:
        fig.savefig(tmp, format="png", metadata=meta)
    return output


def _tile(path, name: str, thumb: int) -> tuple[np.ndarray, bool]:
    """A ``thumb`` x ``thumb`` RGB tile and whether the photo was read: its thumbnail
    centred on white, or a grey placeholder (with a warning) when the photo is missing or
    unreadable."""
    from PIL import Image

    from sfmpairs.retrieval.images import open_rgb

    tile = Image.new("RGB", (thumb, thumb), (255, 255, 255))
    try:
        if path is None:
            raise SfmpairsError(f"{name}: no photo path given")
        img = open_rgb(path)
        img.thumbnail((thumb, thumb))
    except (SfmpairsError, OSError, ValueError, Image.DecompressionBombError) as e:
        logger.warning("%s; drawn as a placeholder", e)
        return np.full((thumb, thumb, 3), PLACEHOLDER, np.uint8), False
    tile.paste(img, ((thumb - img.width) // 2, (thumb - img.height) // 2))
    return np.asarray(tile), True


def _ap_text(ap) -> str:
    if ap is None or not math.isfinite(float(ap)):
        return "AP -"
    return f"AP {100 * ap:.1f}%"


def _short(name: str, chars: int) -> str:
    name = str(name)
    return name if len(name) <= chars else "…" + name[-(chars - 1) :]


def _wrap(name: str, chars: int, lines: int = 3) -> list[str]:
    """``name`` in lines of ``chars`` characters, at most ``lines`` (its end kept)."""
    parts = [name[i : i + chars] for i in range(0, len(name), chars)] or [""]
    if len(parts) > lines:
        parts = parts[-lines:]
        parts[0] = "…" + parts[0][1:]
    return parts


def _check_rows(rows: list[dict], thumb: int) -> None:
    if not rows:
        raise ValueError("retrieval_figure: no rows")
    if thumb < 16:
        raise ValueError(f"retrieval_figure: thumb {thumb} is too small")
    for row in rows:
        for res in row["results"]:
            for _, name, label in res["top"]:
                if label not in LABEL_COLOURS:
                    raise ValueError(
                        f"retrieval_figure: {name}: label {label!r} is not one of {', '.join(LABEL_COLOURS)}"
                    )


def _grid_layout(rows: list[dict], thumb: int) -> dict:
    """Where things go, in pixels from the top left: a framed tile is ``cell`` wide, the
    tiles ``step`` apart; each result set's block starts at ``block_x``."""
    n_sets = max(len(r["results"]) for r in rows)
    ks = [max((len(r["results"][s]["top"]) for r in rows if s < len(r["results"])), default=0) for s in range(n_sets)]
    frame = max(3, thumb // 24)
    lay = {
        "thumb": thumb,
        "frame": frame,
        "cell": thumb + 2 * frame,
        "margin": 10,
        "gap": max(16, thumb // 4),  # between the query and the blocks, and between blocks
        "head": 22,
        "caption": 16,  # text above a row's tiles (titles, AP), and below each tile (its name)
        "legend_h": 30,
    }
    lay["step"] = lay["cell"] + 6
    lay["row_h"] = lay["head"] + lay["cell"] + lay["caption"] + 8
    block_x = [lay["margin"] + lay["step"] + lay["gap"]]
    for k in ks[:-1]:
        block_x.append(block_x[-1] + k * lay["step"] + lay["gap"])
    width = block_x[-1] + ks[-1] * lay["step"] + lay["margin"] if ks else lay["margin"] + lay["step"]
    lay.update(
        block_x=block_x,
        width=max(width, 420),
        height=lay["legend_h"] + len(rows) * lay["row_h"] + 10,
        chars=max(8, lay["cell"] // 6),
    )  # the characters of a caption (about 6 pixels each at 7 points)
    return lay


def _paint_grid(rows: list[dict], lay: dict):
    """The grid's pixels (framed tiles on white), its texts ``(x, y, text, options)`` and
    the positions of the tiles drawn as placeholders ``(x, y, name)``."""
    canvas = np.full((lay["height"], lay["width"], 3), 255, np.uint8)
    texts, placeholders = [], []
    cell, frame, thumb, chars = lay["cell"], lay["frame"], lay["thumb"], lay["chars"]
    bold = {"ha": "left", "va": "bottom", "fontsize": 9, "fontweight": "bold"}

    def put(x, y, path, name, colour, caption_text):
        canvas[y : y + cell, x : x + cell] = colour
        tile, ok = _tile(path, name, thumb)
        if not ok:
            placeholders.append((x, y, name))
        canvas[y + frame : y + frame + thumb, x + frame : x + frame + thumb] = tile
        texts.append((x + cell / 2, y + cell + 2, caption_text, {"ha": "center", "va": "top", "fontsize": 7}))

    for i, row in enumerate(rows):
        y0 = lay["legend_h"] + i * lay["row_h"]
        y = y0 + lay["head"]
        name = str(row.get("query_name", ""))
        texts.append((lay["margin"], y - 4, "query", bold))
        put(lay["margin"], y, row.get("query"), name, QUERY_COLOUR, _short(name, chars))
        for x0, res in zip(lay["block_x"], row["results"]):
            texts.append((x0, y - 4, f"{res.get('title', '')}   {_ap_text(res.get('ap'))}".strip(), bold))
            for j, (path, rname, label) in enumerate(res["top"]):
                rank = f"{j + 1}. "
                put(
                    x0 + j * lay["step"],
                    y,
                    path,
                    str(rname),
                    LABEL_COLOURS[label],
                    rank + _short(rname, chars - len(rank)),
                )
    return canvas, texts, placeholders


def retrieval_grid(rows: list[dict], thumb: int = 128):
    """The figure of :func:`retrieval_figure` (see there for ``rows``): a
    ``matplotlib.figure.Figure`` on an Agg canvas, one pixel per pixel at its dpi. Its
    texts (``fig.texts``) are the row headings (``"query"``, each set's ``"<title>   AP
    42.0%"``), the tiles' captions (``"1. <name>"``) and the placeholders' ``"missing\\n<name>"``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    _check_rows(rows, thumb)
    lay = _grid_layout(rows, thumb)
    canvas, texts, placeholders = _paint_grid(rows, lay)
    width, height, cell = lay["width"], lay["height"], lay["cell"]
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    fig.figimage(canvas, 0, 0, origin="upper")
    for x, y, text, opts in texts:
        fig.text(x / width, 1 - y / height, text, parse_math=False, **opts)
    for x, y, name in placeholders:
        fig.text(
            (x + cell / 2) / width,
            1 - (y + cell / 2) / height,
            "\n".join(["missing", *_wrap(name, lay["chars"])]),
            ha="center",
            va="center",
            fontsize=7,
            color="0.25",
            parse_math=False,
        )
    handles = [
        Patch(facecolor=np.array(c) / 255, edgecolor="none", label=label)
        for label, c in [("query", QUERY_COLOUR), *LABEL_COLOURS.items()]
    ]
    fig.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(lay["margin"] / width, 1),
        ncol=4,
        fontsize=8,
        frameon=False,
        handlelength=1.2,
        borderaxespad=0.2,
    )
    return fig


def retrieval_figure(rows: list[dict], output: str | os.PathLike, overwrite: bool = False, thumb: int = 128) -> Path:
    """A PNG grid of retrieval results: one row per query, the query's thumbnail, then
    for each result set (e.g. before and after training) its top-k thumbnails, each in a
    thick frame by its ground truth (positive green, junk grey, negative red; the query
    blue), the set's title and the query's AP (in percent) above its block.

    ``rows``: one dict per query, ``{"query": path or None, "query_name": str,
    "results": [{"title": str, "ap": float in 0..1 (None or NaN: no positives), "top":
    [(path or None, name, label), ...]}, ...]}``, ``label`` one of positive, junk,
    negative. A photo that is missing or unreadable is drawn as a grey placeholder with
    its name, and logged as a warning (logger ``sfmpairs.plot``). The picture is about
    (1 + sets x k) x (thumb + 16) pixels wide and (thumb + 56) pixels high a query.
    Refuses to replace ``output`` unless ``overwrite``. Returns ``output``.
    """
    output = check_output_path(check_png(output), overwrite)
    fig = retrieval_grid(rows, thumb)
    titles = [res.get("title", "") for res in max((r["results"] for r in rows), key=len)]
    ks = sorted({len(res["top"]) for r in rows for res in r["results"]})
    meta = _png_metadata(
        "sfmpairs/retrieval-picture",
        "sfmpairs retrieval results",
        f"per query: the query, then the top-k of each result set ({', '.join(map(str, titles))}) framed by "
        "ground truth (green positive, grey junk, red negative; blue the query), the query's AP in percent",
        {"thumb": thumb, "queries": len(rows), "k": ks[-1] if ks else 0},
        [str(r.get("query_name", "")) for r in rows],
    )
    with atomic_output(output, overwrite) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, metadata=meta)
    return output


def read_report(path: str | os.PathLike) -> dict:
    """An evaluation report (``sfmpairs evaluate -o report.json``) on a pair file's val
    split, with each query's AP and top results."""
    path = Path(path)
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise SfmpairsError(f"{path}: no such file") from None
    except (OSError, ValueError) as e:
        raise SfmpairsError(f"{path}: not an evaluation report ({e})") from None
    if not isinstance(report, dict) or "per_query_top" not in report or "per_query_ap" not in report:
        raise SfmpairsError(
            f"{path}: not an evaluation report of a val split with each query's results "
            f"(sfmpairs evaluate --pairs ... -o report.json writes them)"
        )
    return report


def retrieval_rows(
    reports: dict[str, dict], images_root: str | os.PathLike | None = None, count: int = 6, k: int = 5
) -> list[dict]:
    """The rows of :func:`retrieval_figure` from evaluation reports (title -> report) of
    the same val split: ``count`` queries with positives, evenly spread over the
    queries (not chosen by their results), each with the top ``k`` results of every
    report. Photos are looked up under ``images_root``
    (default: the first report's)."""
    first = next(iter(reports.values()))
    root = Path(images_root or first.get("images_root") or ".")
    common = [
        q
        for q in first["per_query_top"]
        if all(q in r["per_query_top"] and r["per_query_ap"].get(q) is not None for r in reports.values())
    ]
    if not common:
        raise SfmpairsError("the reports share no val query with positives: evaluations of the same pair file?")
    picks = [common[i] for i in np.unique(np.linspace(0, len(common) - 1, min(count, len(common))).round().astype(int))]
    rows = []
    for q in picks:
        results = []
        for title, report in reports.items():
            top = [(root / name, name, label) for name, label in report["per_query_top"][q]][:k]
            results.append({"title": title, "ap": report["per_query_ap"][q], "top": top})
        rows.append({"query": root / q, "query_name": q, "results": results})
    return rows


def compare_retrieval(
    report_files,
    output: str | os.PathLike,
    labels: list[str] | None = None,
    images_root: str | os.PathLike | None = None,
    count: int = 6,
    k: int = 5,
    overwrite: bool = False,
) -> Path:
    """:func:`retrieval_figure` of evaluation reports side by side (e.g. before and after
    training): ``sfmpairs plot before.json after.json -o retrieval.png``."""
    report_files = [Path(f) for f in report_files]
    check_output_path(check_png(output), overwrite)
    labels = labels or [f.stem for f in report_files]
    if len(labels) != len(report_files) or len(set(labels)) != len(labels):
        raise SfmpairsError(f"plot: give one distinct label for each of the {len(report_files)} reports")
    reports = {label: read_report(f) for label, f in zip(labels, report_files)}
    return retrieval_figure(retrieval_rows(reports, images_root, count, k), output, overwrite=overwrite)
