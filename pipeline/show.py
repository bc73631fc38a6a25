"""``sfmpairs show``: pictures of what was mined, as a PNG or an HTML page.

Each row is a tuple: the query, its positive and its hard negatives, side by side, with
the cluster name and, under pool members, the inlier ratio, scale change and camera
distance (under negatives: the similarity). The HTML page works offline: it refers to
the photos by relative paths, or embeds thumbnails (``embed=True``).
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path

import numpy as np

from .common import SfmpairsError, atomic_output
from .paths import check_relative_names

TILE = 200


def tuple_rows(
    pairs: str | Path, split: str = "train", query: str | None = None, count: int = 6, seed: int = 0
) -> list[list[dict]]:
    """The tuples to show: for each chosen query, [query, positive, negatives...] as
    dicts of ``role``, ``index``, ``name``, ``cluster`` and the statistics."""
    from sfmpairs.mining.pairfile import read_pair_file

    p = read_pair_file(pairs)
    check_relative_names(p["names"], pairs)  # photos are read and linked as images_root / name
    if split not in p["splits"] or len(p["splits"][split]["query"]) == 0:
        raise SfmpairsError(f"{pairs}: the {split} split has no queries")
    names, cluster_names, cluster, g = p["names"], p["cluster_names"], p["cluster"], p["splits"][split]
    q_all = g["query"]
    if query is not None:
        hits = np.flatnonzero(names[q_all] == query)
        if not len(hits):
            other = [o for o in p["splits"] if o != split and np.any(names[p["splits"][o]["query"]] == query)]
            hint = f" (it is a query of the {other[0]} split: add --split {other[0]})" if other else ""
            raise SfmpairsError(f"{pairs}: {query!r} is not a query of the {split} split{hint}")
        chosen = hits[:1]
    else:
        rng = np.random.default_rng(seed)
        chosen = np.sort(rng.choice(len(q_all), min(count, len(q_all)), replace=False))
    rows = []
    for k in chosen:
        q, p, pool = int(q_all[k]), int(g["positive"][k]), g["pool"][k]

        def entry(role, img, sim=None):
            e = {"role": role, "index": img, "name": str(names[img]), "cluster": str(cluster_names[cluster[img]])}
            slot = np.flatnonzero(pool == img)
            if len(slot):
                s = slot[0]
                e.update(
                    inlier_ratio=float(g["pool_inlier_ratio"][k, s]),
                    scale_change=float(g["pool_scale_change"][k, s]),
                    distance=float(g["pool_distance"][k, s]),
                    co_observed=int(g["pool_co_observed"][k, s]),
                )
            if sim is not None:
                e["similarity"] = float(sim)
            return e

        row = [entry("query", q), entry("positive", p)]
        if "negatives" in g:
            for n, s in zip(g["negatives"][k], g["negative_similarity"][k]):
                if n >= 0:
                    row.append(entry("negative", int(n), s))
        rows.append(row)
    return rows


def caption(e: dict) -> list[str]:
    lines = [e["role"], e["cluster"][:28]]
    if "inlier_ratio" in e:
        lines.append(f"inliers {e['inlier_ratio']:.2f} scale {e['scale_change']:.2f}")
        lines.append(f"distance {e['distance']:.2f}")
    if "similarity" in e:
        lines.append(f"similarity {e['similarity']:.3f}")
    return lines


def _thumbnail(root: Path, name: str, tile: int):
    from PIL import Image

    from sfmpairs.retrieval.images import open_rgb

    img = Image.new("RGB", (tile, tile * 3 // 4), (60, 60, 60))
    try:
        src = open_rgb(root / name)
        src.thumbnail((tile, tile * 3 // 4))
        img.paste(src, ((tile - src.width) // 2, (tile * 3 // 4 - src.height) // 2))
    except (SfmpairsError, OSError, ValueError):
        pass  # a grey tile for a missing or broken photo
    return img


def write_png(rows, images_root, path, tile: int = TILE) -> None:
    """A grid: one tuple per row, a tile and its caption per image."""
    from PIL import Image, ImageDraw

    root = Path(images_root)
    h_img, h_text = tile * 3 // 4, 58
    cols = max(len(r) for r in rows)
    canvas = Image.new("RGB", (cols * tile, len(rows) * (h_img + h_text)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, row in enumerate(rows):
        y = i * (h_img + h_text)
        for j, e in enumerate(row):
            canvas.paste(_thumbnail(root, e["name"], tile), (j * tile, y))
            colour = {"query": (0, 0, 160), "positive": (0, 120, 0), "negative": (170, 0, 0)}[e["role"]]
            for n, line in enumerate(caption(e)):
                draw.text((j * tile + 4, y + h_img + 2 + 13 * n), line, fill=colour)
    canvas.save(path, format="PNG")


def write_html(rows, images_root, path, embed: bool = False) -> None:
    """A self-contained page; photos by relative path (or embedded thumbnails)."""
    root, folder = Path(images_root).resolve(), Path(path).resolve().parent
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>sfmpairs: mined tuples</title>",
        "<style>body{font-family:sans-serif} table{border-collapse:collapse} td{padding:4px;"
        "vertical-align:top;font-size:12px} img{max-width:200px;max-height:150px;display:block}"
        ".query{color:#00a}.positive{color:#070}.negative{color:#a00}</style></head><body>",
        "<h1>Mined tuples</h1><table>",
    ]
    for row in rows:
        parts.append("<tr>")
        for e in row:
            if embed:
                buf = io.BytesIO()
                _thumbnail(root, e["name"], TILE).save(buf, format="JPEG", quality=85)
                src = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
            else:
                src = Path(os.path.relpath(root / e["name"], folder)).as_posix()
            stats = "".join(
                f"<span class='stat' data-key='{k}'>{k.replace('_', ' ')} {e[k]:.4f}</span><br>"
                for k in ("inlier_ratio", "scale_change", "distance", "similarity")
                if k in e
            )
            parts.append(
                f"<td class='{e['role']}' data-name='{html.escape(e['name'])}'>"
                f"<img src='{html.escape(src)}' alt='{html.escape(e['name'])}'>"
                f"<b>{e['role']}</b><br>{html.escape(e['cluster'])}<br>{html.escape(e['name'])}<br>{stats}</td>"
            )
        parts.append("</tr>")
    parts.append("</table></body></html>")
    Path(path).write_text("\n".join(parts), encoding="utf-8")


def show(
    pairs,
    images_root,
    output,
    *,
    split: str = "train",
    query: str | None = None,
    count: int = 6,
    seed: int = 0,
    embed: bool = False,
    overwrite: bool = False,
) -> list:
    """Write a picture (``.png``) or page (``.html``) of sampled mined tuples."""
    output = Path(output)
    if output.suffix.lower() not in (".png", ".html", ".htm"):
        raise SfmpairsError(f"{output}: give a .png or .html output")
    rows = tuple_rows(pairs, split, query, count, seed)
    if images_root is None:
        from sfmpairs.mining.pairfile import read_pair_file

        images_root = read_pair_file(pairs)["images_root"] or None
        if images_root is None:
            raise SfmpairsError(f"{pairs}: no images root recorded; give --images-root")
    with atomic_output(output, overwrite) as tmp:
        if output.suffix.lower() == ".png":
            write_png(rows, images_root, tmp)
        else:
            write_html(rows, images_root, tmp, embed)  # tmp sits beside output: same relative paths
    return rows
