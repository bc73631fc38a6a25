"""COLMAP's depth maps (``stereo/depth_maps/NAME.photometric.bin`` and
``NAME.geometric.bin`` in a dense workspace): a text header ``width&height&channels&``
followed by float32 values in column-major order (COLMAP's ``mvs::Mat``). A depth is the
distance along the camera's optical axis (z in camera coordinates); 0 means no depth.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from sfmpairs.common import SfmpairsError

_MAX_HEADER = 64  # three numbers and three '&' fit well within this
_MAX_SIDE = 1 << 16


def read_depth_map(path: str | os.PathLike) -> np.ndarray:
    """A COLMAP depth map as a float32 array of shape (height, width); one line naming
    the file where it is not one."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SfmpairsError(f"{path}: cannot read depth map ({e.strerror or e})") from None
    fields = data[:_MAX_HEADER].split(b"&", 3)
    try:
        if len(fields) < 4:
            raise ValueError
        width, height, channels = (int(f) for f in fields[:3])
    except ValueError:
        raise SfmpairsError(f"{path}: not a COLMAP depth map (no 'width&height&channels&' header)") from None
    if not (0 < width <= _MAX_SIDE and 0 < height <= _MAX_SIDE and channels == 1):
        raise SfmpairsError(f"{path}: depth map header {width}x{height}x{channels} is not one channel of a sane size")
    start = len(b"&".join(fields[:3])) + 1
    expected = width * height * 4
    if len(data) - start != expected:
        raise SfmpairsError(
            f"{path}: depth map of {width}x{height} needs {expected} bytes of values, has {len(data) - start}"
        )
    values = np.frombuffer(data, np.float32, width * height, start)
    return values.reshape(height, width).copy()  # column-major (width, height) = row-major (height, width)


def write_depth_map(path: str | os.PathLike, depth: np.ndarray) -> None:
    """Write ``depth`` (height, width) as COLMAP writes a depth map (non-finite and
    negative values become 0, COLMAP's 'no depth')."""
    depth = np.asarray(depth, np.float64)
    if depth.ndim != 2:
        raise ValueError(f"a depth map has two dimensions, got shape {depth.shape}")
    depth = np.where(np.isfinite(depth) & (depth > 0), depth, 0).astype(np.float32)
    height, width = depth.shape
    with open(path, "wb") as fh:
        fh.write(f"{width}&{height}&1&".encode())
        fh.write(np.ascontiguousarray(depth).tobytes())


def dense_workspace(model_path: str | os.PathLike) -> Path | None:
    """The COLMAP dense workspace a model folder sits in: the folder holding
    ``stereo/depth_maps`` that is the model folder itself, or the one above its
    ``sparse`` (a model at ``W/sparse`` or ``W/sparse/N``); None where there is none."""
    folder = Path(model_path)
    candidates = [folder]
    if folder.name == "sparse":
        candidates.append(folder.parent)
    if folder.parent.name == "sparse":
        candidates.append(folder.parent.parent)
    return next((w for w in candidates if (w / "stereo" / "depth_maps").is_dir()), None)


def geometric_depth_path(workspace: Path, image_name: str) -> Path:
    """Where COLMAP's stereo puts an image's geometric depth map."""
    return workspace / "stereo" / "depth_maps" / f"{image_name}.geometric.bin"


def depth_maps_in(workspace: Path, image_names) -> tuple[list, int]:
    """``(geometric, photometric)``: each image's geometric depth map in ``workspace``
    (None where it has none) and how many images have only a photometric one."""
    geometric, photometric = [], 0
    for name in image_names:
        path = geometric_depth_path(workspace, name)
        found = path.is_file()
        geometric.append(path if found else None)
        photometric += not found and (path.parent / f"{name}.photometric.bin").is_file()
    return geometric, photometric


def same_aspect(map_size: tuple[int, int], image_size: tuple[int, int]) -> bool:
    """Whether a map of ``map_size`` (width, height) is the image of ``image_size``
    scaled by one factor, each side rounded to within one pixel (as COLMAP's
    ``max_image_size`` scales both sides)."""
    (w, h), (W, H) = map_size, image_size
    return max((w - 1) / W, (h - 1) / H) <= min((w + 1) / W, (h + 1) / H)


def fit_depth(depth: np.ndarray, width: int, height: int, source: str | os.PathLike = "depth map") -> np.ndarray:
    """``depth`` at the image's size (height, width): as it is where it has that size,
    else resampled to the nearest pixel (COLMAP's stereo may run on smaller images,
    ``--PatchMatchStereo.max_image_size``); negative and non-finite values become 0 (no
    depth). A map of another aspect ratio belongs to another image: one line naming
    ``source`` and both sizes."""
    depth = np.where(np.isfinite(depth) & (depth > 0), depth, 0).astype(np.float32)
    h, w = depth.shape
    if (h, w) == (height, width):
        return depth
    if not same_aspect((w, h), (width, height)):
        raise SfmpairsError(
            f"{source}: depth map of {w}x{h} is not its image's {width}x{height} scaled (another aspect ratio): "
            "not a map of this model's image (export the model of the dense workspace the maps come from)"
        )
    rows = np.minimum(((np.arange(height) + 0.5) * h / height).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * w / width).astype(np.int64), w - 1)
    return depth[rows[:, None], cols[None, :]]


def write_depth_h5(path: str | os.PathLike, depth: np.ndarray, attrs: dict | None = None) -> None:
    """The HDF5 depth file MegaDepth's readers (D2-Net, LoFTR) open: a float32 (H, W)
    dataset named ``depth``, 0 where there is no depth."""
    from sfmpairs.common import h5_output

    with h5_output(path) as h5:  # a full disk: OSError, not a crash in HDF5
        h5.create_dataset("depth", data=np.asarray(depth, np.float32))
        for k, v in (attrs or {}).items():
            h5.attrs[k] = v
