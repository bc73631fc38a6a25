"""The hloc export: pairs files with image names as hloc's steps look them up.

hloc names an image by its path relative to the ``image_dir`` its features were
extracted from; its ``triangulation`` and localisation look names up in a COLMAP
model (``{image.name: image_id}``). So:

- store-wide names (the default): relative to the store's images root, for retrieval
  and matching over every model at once (``image_dir`` = the images root);
- ``image_dir=DIR``: names relative to another folder the user extracted from;
- ``per_model=True``: one pairs file per model, names as that COLMAP model has them
  (``images/colmap_name`` of the SfM store), for mapping (``triangulation``) and
  localisation against the model, with ``image_dir`` = the model's photo folder.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..common import SfmpairsError


def pair_indices(p: dict, all_passing: bool = False, splits=("train", "val")) -> tuple[np.ndarray, np.ndarray]:
    """Image indices (query, other) of every query-positive pair of ``splits``
    (``all_passing``: every passing pool pair), in split then query order."""
    qs, js = [], []
    for split in splits:
        s = p["splits"].get(split)
        if s is None:
            continue
        if all_passing:
            qs.append(np.repeat(s["query"], s["pool_passes"].sum(1)))
            js.append(s["pool"][s["pool_passes"]])
        else:
            qs.append(s["query"])
            js.append(s["positive"])
    if not qs:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(qs).astype(np.int64), np.concatenate(js).astype(np.int64)


# A text format of one record a line, as names in it are checked (:func:`check_line_names`):
# the characters it cannot carry in a name, what they are, and the format.
class LineFormat(NamedTuple):
    forbidden: re.Pattern
    characters: str
    fmt: str


# hloc reads a pairs file line by line and splits each line at whitespace (str.split:
# any Unicode whitespace); a control character has no place in such a line either
HLOC_PAIRS = LineFormat(
    re.compile(r"[\s\x00-\x1f\x7f-\x9f]"),
    "whitespace or a control character",
    "hloc's pairs format (space-separated names, one pair a line)",
)
# A line of a tab-separated file: no tab, no line break (str.splitlines also breaks at
# \u2028 and \u2029), no control character; a space is fine
TSV = LineFormat(
    re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]"),
    "a tab, a line break or a control character",
    "a tab-separated file (one record a line)",
)


def check_line_names(names, indices, where, line: LineFormat = HLOC_PAIRS, fmt: str | None = None) -> None:
    """Refuse, in one line naming ``where`` (the file the names came from) and the name,
    the first of ``names[indices]`` that the text format ``line`` cannot carry (``fmt``:
    the file's own description, default the format's)."""
    for i in np.unique(np.asarray(indices, dtype=np.int64)):
        if line.forbidden.search(names[i]):
            raise SfmpairsError(
                f"{where}: image name {names[i]!r} holds {line.characters}, which {fmt or line.fmt} cannot carry"
            )


def _lines(names, q: np.ndarray, j: np.ndarray, where) -> str:
    check_line_names(names, np.concatenate([q, j]), where)
    lines = [f"{names[a]} {names[b]}" for a, b in zip(q, j)]
    return "\n".join(lines) + ("\n" if lines else "")


def names_under(p: dict, images_root: Path, image_dir: Path) -> np.ndarray:
    """The pair file's image names made relative to ``image_dir``; every photo must lie below it."""
    root, image_dir = Path(images_root).resolve(), Path(image_dir).resolve()
    rel = [Path(os.path.relpath(root / n, image_dir)).as_posix() for n in p["names"]]
    outside = [n for n in rel if n.startswith("../") or n == ".."]
    if outside:
        raise SfmpairsError(f"{image_dir}: {len(outside)} images lie outside it, e.g. {outside[0]}")
    return np.array(rel, dtype=object)


def write_pairs(p: dict, output: Path, names, all_passing: bool, source=None) -> dict:
    """One pairs file, ``name0 name1`` per line, with the given names (those of the pair
    file ``source``, which an error names)."""
    q, j = pair_indices(p, all_passing)
    output.write_text(_lines(names, q, j, source or output), encoding="utf-8")
    return {"pairs": len(q)}


def folder_name(name: str, taken: set) -> str:
    """A file or folder name for ``name`` (a model's, which may hold '/', '..', a NUL):
    anything but letters, digits, '-' and '_' replaced by '_' (``scene/sparse/0`` ->
    ``scene_sparse_0``), so it is one plain word that leaves no folder, made unique with
    ``_2``, ``_3``, ... among ``taken``, compared case-insensitively (as macOS and Windows
    disks compare names); it is added to ``taken``."""
    base = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_") or "model"
    folder, k = base, 1
    while folder.lower() in taken:
        k += 1
        folder = f"{base}_{k}"
    taken.add(folder.lower())
    return folder


def write_per_model(p: dict, folder: Path, store: dict, all_passing: bool) -> dict:
    """``folder/<model folder>/pairs.txt`` per model with pairs (names as the COLMAP
    model has them; the model folder: :func:`folder_name` of the model's name) and
    ``folder/models.json``: each model's name, pairs file, model folder and photo folder
    (hloc's ``reference_model`` and ``image_dir``)."""
    q, j = pair_indices(p, all_passing)
    model_of = store["images/model"]
    if np.any(model_of[q] != model_of[j]):  # pools are per model: cannot happen with sfmpairs files
        raise SfmpairsError("a pair spans two models; a per-model export cannot hold it")
    colmap = store["images/colmap_name"]
    entries, taken = [], set()
    for k, name in enumerate(store["models/name"]):
        mine = model_of[q] == k
        if not mine.any():
            continue
        rel = folder_name(name, taken)
        (folder / rel).mkdir()
        where = f"{store.get('path', 'the SfM store')}: model {name!r}"
        (folder / rel / "pairs.txt").write_text(_lines(colmap, q[mine], j[mine], where), encoding="utf-8")
        entries.append(
            {
                "model": name,
                "pairs_file": f"{rel}/pairs.txt",
                "pairs": int(mine.sum()),
                "model_path": store["models/path"][k],
                "image_dir": store["models/images_dir"][k],
            }
        )
    (folder / "models.json").write_text(json.dumps(entries, indent=1) + "\n", encoding="utf-8")
    return {"pairs": len(q), "models": len(entries)}
