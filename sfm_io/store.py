"""The SfM store: every model of a dataset in one HDF5 file (schema in docs/formats.md).

Written into resizable datasets a few models at a time (small models together, since
HDF5's cost per write dominates for them), so that ingesting many models needs memory
for the largest one and a few million observations only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np

from ..common import SfmpairsError, check_schema, h5_errors, open_h5

if TYPE_CHECKING:
    from .model import Model

SCHEMA = "sfmpairs/sfm-store"
SCHEMA_VERSION = 1

_STR = h5py.string_dtype("utf-8")
_IMAGE_CHUNK = 4096
_OBS_CHUNK = 1 << 19
MAX_POINTS = 2**31 - 1  # observations/point is int32


# .model is imported where it is used: the process that writes the store for ingest
# (store_writer.py) needs neither it nor the compiled code it loads (numba, 100 MB)


def max_params() -> int:
    """The width of ``images/params``: the most parameters of any camera model."""
    from .model import camera_models

    return max(n for _, n, _ in camera_models().values())


# (group/name, dtype, shape after the first axis, chunk rows)
_LAYOUT = [
    ("images/name", _STR, (), _IMAGE_CHUNK),
    ("images/colmap_name", _STR, (), _IMAGE_CHUNK),
    ("images/model", np.int32, (), _IMAGE_CHUNK),
    ("images/cluster", np.int32, (), _IMAGE_CHUNK),
    ("images/colmap_id", np.uint32, (), _IMAGE_CHUNK),
    ("images/camera_colmap_id", np.uint32, (), _IMAGE_CHUNK),
    ("images/camera_model", _STR, (), _IMAGE_CHUNK),
    ("images/params", np.float64, (None,), _IMAGE_CHUNK),  # width filled in create_store
    ("images/num_params", np.uint8, (), _IMAGE_CHUNK),
    ("images/focal", np.float64, (), _IMAGE_CHUNK),
    ("images/width", np.int64, (), _IMAGE_CHUNK),
    ("images/height", np.int64, (), _IMAGE_CHUNK),
    ("images/qvec", np.float64, (4,), _IMAGE_CHUNK),
    ("images/tvec", np.float64, (3,), _IMAGE_CHUNK),
    ("images/rotation", np.float64, (3, 3), _IMAGE_CHUNK),
    ("images/centre", np.float64, (3,), _IMAGE_CHUNK),
    ("points/xyz", np.float64, (3,), _OBS_CHUNK),
    ("points/track_length", np.int32, (), _OBS_CHUNK),
    ("points/colmap_id", np.uint64, (), _OBS_CHUNK),
    ("points/model", np.int32, (), _OBS_CHUNK),
    ("observations/point", np.int32, (), _OBS_CHUNK),
    ("observations/xy", np.float32, (2,), _OBS_CHUNK),
]
# where the models came from (ingest's source_tables): (group/name, dtype, shape after the first axis)
_SOURCES = [
    ("clusters/name", _STR, ()),
    ("clusters/source", _STR, ()),
    ("models/name", _STR, ()),
    ("models/path", _STR, ()),
    ("models/format", _STR, ()),
    ("models/cluster", np.int64, ()),
    ("models/images_dir", _STR, ()),
    ("models/image_range", np.int64, (2,)),
    ("models/point_range", np.int64, (2,)),
]


def create_store(h5: h5py.File, width: int) -> None:
    """Empty, resizable datasets for :func:`append_columns` (``width``: of
    ``images/params``, :func:`max_params`)."""
    for name, dtype, tail, chunk in _LAYOUT:
        tail = (width,) if tail == (None,) else tail
        h5.create_dataset(name, shape=(0, *tail), maxshape=(None, *tail), dtype=dtype, chunks=(chunk, *tail))
    h5.create_dataset("observations/indptr", data=np.zeros(1, np.int64), maxshape=(None,), chunks=(_IMAGE_CHUNK,))


def model_columns(
    model: Model, model_index: int, cluster_index: int, names: list[str], point_offset: int, obs_offset: int, width: int
) -> dict:
    """One model's rows of every dataset of the store (``width``: of ``images/params``),
    its points numbered from ``point_offset`` and its observations from ``obs_offset``
    (the points and observations of the models before it)."""
    from .model import camera_centres, focal_lengths, param_table, quat_to_rotmat

    n, m = model.num_images, model.num_points
    params = param_table(model.params, width)
    rotation = quat_to_rotmat(model.qvec)
    point = model.point
    if point_offset:
        point = point + np.int32(point_offset)
    return {
        "images/name": names,
        "images/colmap_name": model.names,
        "images/model": np.full(n, model_index, np.int32),
        "images/cluster": np.full(n, cluster_index, np.int32),
        "images/colmap_id": model.image_ids,
        "images/camera_colmap_id": model.camera_ids,
        "images/camera_model": model.camera_model,
        "images/params": params,
        "images/num_params": np.array([len(p) for p in model.params], np.uint8),
        "images/focal": focal_lengths(model.camera_model, params),
        "images/width": model.width,
        "images/height": model.height,
        "images/qvec": model.qvec,
        "images/tvec": model.tvec,
        "images/rotation": rotation,
        "images/centre": camera_centres(model.qvec, model.tvec, rotation),
        "points/xyz": model.xyz,
        "points/track_length": model.track_length,
        "points/colmap_id": model.point_ids,
        "points/model": np.full(m, model_index, np.int32),
        "observations/xy": model.xy,
        "observations/point": point,
        "observations/indptr": model.indptr[1:] + obs_offset,
    }


def append_columns(h5: h5py.File, parts: list[dict]) -> None:
    """Append the rows ``parts`` (:func:`model_columns` of consecutive models) to the
    store's datasets: one resize and one write per dataset, however many models, as
    HDF5's cost per call dominates for small models."""
    if not parts:
        return
    for name in parts[0]:
        values = [p[name] for p in parts]
        if isinstance(values[0], list):
            values = [v for vs in values for v in vs]
        else:
            values = values[0] if len(values) == 1 else np.concatenate(values)  # one: no copy
        ds = h5[name]
        n = len(ds)
        ds.resize(n + len(values), axis=0)
        if len(values):
            ds[n:] = values


def write_table(h5: h5py.File, group: str, columns: dict) -> None:
    for key, values in columns.items():
        values = list(values) if isinstance(values, (list, tuple)) else values
        if len(values) and isinstance(values[0], str):
            h5.create_dataset(f"{group}/{key}", data=values, dtype=_STR)
        else:
            h5.create_dataset(f"{group}/{key}", data=np.asarray(values))


_FINITE = ("images/centre", "images/qvec", "images/tvec", "images/rotation", "points/xyz")
_LARGEST = 1e150  # a coordinate beyond: its square overflows (distances, depths), so the store is corrupt


def _not_finite(v) -> bool:
    """Whether a pose or position table ``v`` holds a value no model has: not finite, or
    so large that a distance computed from it is not."""
    return isinstance(v, np.ndarray) and v.dtype.kind == "f" and not (np.abs(v, dtype=np.float64) < _LARGEST).all()


class _CheckedDataset(h5py.Dataset):
    """A dataset of a store whose reads turn h5py's errors on a corrupt file into one
    line naming the file (the store is read model by model, after :func:`open_store`).
    ``where`` names the file, ``key`` the dataset; ``limit``: for observations/point,
    the store's number of points (looked up at the first read)."""

    def __init__(self, bind, where: str, key: str):
        super().__init__(bind)
        self.where, self.key, self.limit = where, key, None

    def __getitem__(self, args, new_dtype=None):
        with h5_errors(self.where, "SfM store"):
            v = super().__getitem__(args, new_dtype)
            name = self.key
            if name == "observations/point" and np.size(v):
                if self.limit is None:
                    self.limit = self.file["points/xyz"].shape[0]
                if v.min() < 0 or v.max() >= self.limit:
                    raise SfmpairsError(f"{self.where}: corrupt SfM store ({name} out of range)")
            if name in _FINITE and _not_finite(v):
                raise SfmpairsError(f"{self.where}: corrupt SfM store ({name} not finite, or beyond 1e150)")
            return v


class _StoreFile(h5py.File):
    """An SfM store open for reading: its datasets are :class:`_CheckedDataset`, each
    opened once (mining reads a few of them for each of thousands of models)."""

    def __getitem__(self, name):
        opened = self.__dict__.setdefault("_opened", {})
        if name in opened:
            return opened[name]
        with h5_errors(self.filename, "SfM store"):
            obj = super().__getitem__(name)
            if not isinstance(obj, h5py.Dataset):
                return obj
            opened[name] = _CheckedDataset(obj.id, self.filename, obj.name.lstrip("/"))
            return opened[name]


def open_store(path: str | Path) -> h5py.File:
    """Open an SfM store for reading; a clear error for anything else, and for a
    corrupt file when its datasets are read."""
    path = Path(path)
    h5 = open_h5(path, "SfM store", _StoreFile)
    try:
        with h5_errors(path, "SfM store"):
            check_schema(h5.attrs, path, SCHEMA, SCHEMA_VERSION, "an SfM store", " (sfmpairs ingest writes them)")
    except SfmpairsError:
        h5.close()
        raise
    return h5


def read_store(path: str | Path, observations: bool = True, keys: list[str] | None = None) -> dict:
    """The store's datasets as numpy arrays (strings decoded), plus ``attrs``: all of
    them, or those named in ``keys``; ``observations=False`` leaves out the
    co-observation table but for ``observations/indptr``. The tables are checked
    against each other (:func:`check_store`): a corrupt store is one line."""
    out, tables = {}, {}  # tables: every dataset's (shape, dtype), whether read or not
    with open_store(path) as h5, h5_errors(path, "SfM store"):
        h5.visititems(
            lambda name, obj: (
                tables.update({str(name): (obj.shape, obj.dtype)}) if isinstance(obj, h5py.Dataset) else None
            )
        )
        check_tables(path, tables)  # before reading: each table as sfmpairs reads it

        def visit(name, obj):
            name = name if isinstance(name, str) else name.decode("utf-8", "replace")  # a corrupt name
            if isinstance(obj, h5py.Dataset):
                if keys is not None and name not in keys:
                    return
                if not observations and name.startswith("observations/") and name != "observations/indptr":
                    return
                out[name] = obj.asstr()[()] if h5py.check_string_dtype(obj.dtype) else obj[()]

        h5.visititems(visit)
        out["attrs"] = {k: (v.item() if hasattr(v, "item") else v) for k, v in h5.attrs.items()}
        for key in ("parameters", "inputs"):
            if key in out["attrs"]:
                out["attrs"][key] = json.loads(out["attrs"][key])
    check_store(path, out, tables)
    return out


def _rows(tables: dict, key: str, default=None):
    return tables[key][0][0] if key in tables and len(tables[key][0]) else default


def check_tables(path, tables: dict) -> None:
    """Every table of the store that sfmpairs reads has its dimensions, its number of
    rows (that of its group: images, points, observations, models, clusters) and its
    kind of values (text, integers, floats); ``tables``: name -> (shape, dtype) of each
    dataset. A missing table is refused too, but for the descriptive ones of models and
    clusters (path, format, source, images_dir), which older stores may lack."""
    rows = {group: _rows(tables, key) for group, key in _GROUP_ROWS.items()}
    rows["indptr"] = None if rows["images"] is None else rows["images"] + 1
    for name, dtype, tail in _EXPECTED:
        if name not in tables:
            if name.split("/")[1] in _OPTIONAL:
                continue
            raise SfmpairsError(f"{path}: corrupt SfM store (no {name})")
        shape, found = tables[name]
        width = (*tail[:-1], shape[-1]) if tail == (None,) and len(shape) == 2 else tail  # params: any width
        want = rows["indptr" if name == "observations/indptr" else name.split("/")[0]]
        if len(shape) != 1 + len(tail) or shape[1:] != width or (want is not None and shape[0] != want):
            expect = ", ".join(str(d) for d in (want if want is not None else "n", *width))
            raise SfmpairsError(
                f"{path}: corrupt SfM store ({name} has shape {shape}, not ({expect}{',' * (not width)}))"
            )
        if _kind(found) != _kind(np.dtype(dtype)):
            raise SfmpairsError(
                f"{path}: corrupt SfM store ({name} holds {_kind(found)}, not {_kind(np.dtype(dtype))})"
            )


def _kind(dtype: np.dtype) -> str:
    if h5py.check_string_dtype(dtype):
        return "text"
    return {"i": "integers", "u": "unsigned integers", "f": "floats"}.get(dtype.kind, f"{dtype} values")


_EXPECTED = (
    [(name, dtype, tail) for name, dtype, tail, _ in _LAYOUT] + _SOURCES + [("observations/indptr", np.int64, ())]
)
_GROUP_ROWS = {
    "images": "images/name",
    "points": "points/xyz",
    "observations": "observations/point",
    "models": "models/name",
    "clusters": "clusters/name",
}
_OPTIONAL = ("path", "format", "source", "images_dir")


def check_store(path, s: dict, tables: dict) -> None:
    """The store's tables agree with each other (their shapes and kinds of values were
    checked before reading, :func:`check_tables`): observations/indptr a valid CSR index over
    observations/point, indices of models, clusters and points in range, poses
    finite; what is read is checked, what is not is checked by shape."""
    n = _rows(tables, "images/name")
    num_points = _rows(tables, "points/xyz", 0)
    num_obs = _rows(tables, "observations/point", 0)
    ranges = {
        "images/model": _rows(tables, "models/name"),
        "images/cluster": _rows(tables, "clusters/name"),
        "models/cluster": _rows(tables, "clusters/name"),
        "points/model": _rows(tables, "models/name"),
        "observations/point": num_points,
    }
    for key, limit in ranges.items():
        v = s.get(key)
        if v is not None and len(v) and limit is not None and (v.min() < 0 or v.max() >= limit):
            raise SfmpairsError(f"{path}: corrupt SfM store ({key} out of range)")
    for key, total in (("models/image_range", n), ("models/point_range", num_points)):
        r = s.get(key)
        if r is not None and (r.ndim != 2 or r.shape[1] != 2 or np.any(r[:, 0] > r[:, 1]) or r.min(initial=0) < 0):
            raise SfmpairsError(f"{path}: corrupt SfM store ({key} is no range)")
        if r is not None and r.max(initial=0) > total:
            raise SfmpairsError(f"{path}: corrupt SfM store ({key} out of range)")
    indptr = s.get("observations/indptr")
    if indptr is not None and (
        len(indptr) != n + 1 or indptr[0] != 0 or indptr[-1] != num_obs or np.any(np.diff(indptr) < 0)
    ):
        raise SfmpairsError(f"{path}: corrupt SfM store (observations/indptr is no index of observations/point)")
    for key in _FINITE:
        if _not_finite(s.get(key)):
            raise SfmpairsError(f"{path}: corrupt SfM store ({key} not finite, or beyond 1e150)")
