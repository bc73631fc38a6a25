"""Find COLMAP models under the user's paths or in a manifest, and name their clusters.

A *model folder* holds ``cameras``, ``images`` and ``points3D`` (``.bin`` or ``.txt``,
plus ``rigs``/``frames`` from COLMAP 3.12 on). A path may be one model folder, a
folder with ``sparse/0 .. sparse/N``, or any tree holding many models.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from ..common import SfmpairsError

MODEL_FILES = ("cameras", "images", "points3D")


@dataclass
class ModelSource:
    path: Path  # the model folder
    format: str  # "binary" or "text"
    name: str  # model name: its path relative to the input, e.g. "scene/sparse/0"
    cluster: str  # cluster name
    images_dir: Path | None  # folder of the model's photos, when known


def model_format(folder: Path) -> str | None:
    """ "binary" or "text" for a complete model folder, None for a folder with no model
    files; a clear error for a folder with only some of them."""
    present = {ext: [f for f in MODEL_FILES if (folder / f"{f}.{ext}").is_file()] for ext in ("bin", "txt")}
    for ext, fmt in (("bin", "binary"), ("txt", "text")):
        if len(present[ext]) == len(MODEL_FILES):
            return fmt
    for ext in ("bin", "txt"):
        if present[ext]:
            missing = [f"{f}.{ext}" for f in MODEL_FILES if f not in present[ext]]
            raise SfmpairsError(
                f"{folder / missing[0]}: missing (the folder has {', '.join(f + '.' + ext for f in present[ext])})"
            )
    return None


def find_model_folders(path: Path) -> list[tuple[Path, str]]:
    """Every model folder at or under ``path``, sorted by path."""
    if not path.exists():
        raise SfmpairsError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise SfmpairsError(f"{path}: not a directory (give a COLMAP model folder or a tree of them)")
    found = []
    for root, dirs, _files in os.walk(path):
        dirs.sort()
        fmt = model_format(Path(root))
        if fmt:
            found.append((Path(root), fmt))
    if not found:
        raise SfmpairsError(f"{path}: no COLMAP model found (expected cameras, images and points3D as .bin or .txt)")
    return found


def default_name(folder: Path, root: Path) -> str:
    """A model's name: its path relative to the input (with the input's own name when
    the input is a scene, ``scene/sparse/N``); for a lone model folder, the folder's
    name (with its scene for ``scene/sparse/N``)."""
    rel = folder.resolve().relative_to(root.resolve()).as_posix()
    if rel.split("/")[0] == "sparse":
        return f"{root.resolve().name}/{rel}"
    if rel != ".":
        return rel
    parts = folder.resolve().parts
    if len(parts) >= 3 and parts[-2] == "sparse":
        return "/".join(parts[-3:])
    return parts[-1]


def scene_of(name: str) -> str:
    """The scene of a model name: ``scene/sparse/3`` -> ``scene``."""
    parts = name.split("/")
    if len(parts) >= 2 and parts[-2] == "sparse":
        return "/".join(parts[:-2]) or name
    if parts[-1] == "sparse" and len(parts) > 1:
        return "/".join(parts[:-1])
    return name


def default_images_dir(folder: Path) -> Path | None:
    """The photos of a model: ``images/`` in the model folder, or beside ``sparse/``
    for a model at ``scene/sparse/N`` or ``scene/sparse``."""
    folder = folder.resolve()
    candidates = [folder / "images"]
    if folder.parent.name == "sparse":
        candidates.append(folder.parent.parent / "images")
    if folder.name == "sparse":
        candidates.append(folder.parent / "images")
    return next((c for c in candidates if c.is_dir()), None)


def from_paths(paths: list[str | Path], cluster_by: str = "model") -> list[ModelSource]:
    found = []
    for p in paths:
        root = Path(p)
        found += [(folder, fmt, default_name(folder, root)) for folder, fmt in find_model_folders(root)]
    names = _unique_names([(folder, name) for folder, _, name in found])
    sources = []
    for (folder, fmt, _), name in zip(found, names):
        cluster = name if cluster_by == "model" else scene_of(name)
        sources.append(ModelSource(folder, fmt, name, cluster, default_images_dir(folder)))
    return sources


def _unique_names(entries: list[tuple[Path, str]]) -> list[str]:
    """Lengthen clashing names with parent folders (``a/binary``, ``b/binary``)."""
    names = [name for _, name in entries]
    for _ in range(64):
        counts = {n: names.count(n) for n in names}
        clash = [i for i, n in enumerate(names) if counts[n] > 1]
        if not clash:
            break
        for i in clash:
            parts = entries[i][0].resolve().parts
            depth = len(names[i].split("/"))
            if depth < len(parts) - 1:
                names[i] = "/".join(parts[-depth - 1 :])
    return names


def from_manifest(manifest: str | Path, cluster_by: str = "model") -> tuple[list[ModelSource], Path | None]:
    """Models listed in a TOML manifest (format in docs/formats.md); paths relative to it.

    Returns the sources and the manifest's ``images_root`` (or None)."""
    manifest = Path(manifest)
    try:
        data = tomllib.loads(manifest.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SfmpairsError(f"{manifest}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SfmpairsError(f"{manifest}: cannot read ({e})") from None
    except tomllib.TOMLDecodeError as e:
        raise SfmpairsError(f"{manifest}: not valid TOML ({e})") from None
    base = manifest.parent
    entries = data.get("model")
    if not isinstance(entries, list) or not entries:
        raise SfmpairsError(f"{manifest}: no [[model]] entries")
    images_root = data.get("images_root")
    images_root = (base / images_root) if images_root else None
    sources = []
    for k, entry in enumerate(entries):
        if not isinstance(entry, dict) or "path" not in entry:
            raise SfmpairsError(f"{manifest}: [[model]] entry {k + 1} has no path")
        unknown = set(entry) - {"path", "cluster", "images", "name"}
        if unknown:
            raise SfmpairsError(f"{manifest}: [[model]] entry {k + 1} has unknown key {sorted(unknown)[0]!r}")
        root = base / entry["path"]
        folders = find_model_folders(root)
        for folder, fmt in folders:
            name = default_name(folder, root)
            if "name" in entry:
                rel = folder.resolve().relative_to(root.resolve()).as_posix()
                name = entry["name"] if rel == "." else f"{entry['name']}/{rel}"
            cluster = entry.get("cluster") or (name if cluster_by == "model" else scene_of(name))
            images = entry.get("images")
            images_dir = (base / images).resolve() if images else default_images_dir(folder)
            sources.append(ModelSource(folder, fmt, name, cluster, images_dir))
    return sources, images_root
