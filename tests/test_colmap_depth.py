"""COLMAP's depth-map files against the layout COLMAP's own read_write_dense.py
reads (header ``width&height&channels&``, float32 column-major over (width, height))."""

from __future__ import annotations

import numpy as np
import pytest

from sfmpairs.common import SfmpairsError
from sfmpairs.sfm_io.colmap_depth import fit_depth, read_depth_map, write_depth_map


def colmap_script_read(path):
    """What COLMAP's scripts/python/read_write_dense.py does, written from its description."""
    data = open(path, "rb").read()
    width, height, channels = (int(v) for v in data.split(b"&")[:3])
    start = data.index(b"&", data.index(b"&", data.index(b"&") + 1) + 1) + 1
    array = np.frombuffer(data[start:], np.float32).reshape((width, height, channels), order="F")
    return np.transpose(array, (1, 0, 2)).squeeze(axis=2)


def test_layout_written_by_hand(tmp_path):
    path = tmp_path / "a.jpg.geometric.bin"
    path.write_bytes(b"3&2&1&" + np.array([1, 2, 3, 4, 5, 6], np.float32).tobytes())
    expected = np.array([[1, 2, 3], [4, 5, 6]], np.float32)  # row y, column x
    np.testing.assert_array_equal(colmap_script_read(path), expected)
    np.testing.assert_array_equal(read_depth_map(path), expected)


def test_write_then_read_like_colmap(tmp_path):
    depth = np.random.default_rng(0).uniform(1, 9, (5, 7))
    depth[0, 0], depth[1, 1], depth[2, 2] = np.inf, np.nan, -1.0
    path = tmp_path / "b.bin"
    write_depth_map(path, depth)
    got = colmap_script_read(path)
    assert got.shape == (5, 7)
    assert got[0, 0] == got[1, 1] == got[2, 2] == 0
    mask = np.ones_like(depth, bool)
    mask[[0, 1, 2], [0, 1, 2]] = False
    np.testing.assert_allclose(got[mask], depth[mask], rtol=1e-6)
    np.testing.assert_array_equal(read_depth_map(path), got)


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"", "no 'width&height&channels&' header"),
        (b"3&2&", "no 'width&height&channels&' header"),
        (b"x&2&1&" + bytes(24), "no 'width&height&channels&' header"),
        (b"3&2&3&" + bytes(72), "not one channel"),
        (b"0&2&1&", "not one channel"),
        (b"3&2&1&" + bytes(20), "needs 24 bytes of values, has 20"),
        (b"3&2&1&" + bytes(28), "needs 24 bytes of values, has 28"),
    ],
)
def test_bad_depth_maps_are_one_line_naming_the_file(tmp_path, content, problem):
    path = tmp_path / "bad.geometric.bin"
    path.write_bytes(content)
    with pytest.raises(SfmpairsError, match=problem) as info:
        read_depth_map(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "image, map_size",
    [
        ((64, 48), (64, 48)),
        ((64, 48), (32, 24)),  # stereo at half size
        ((1600, 1199), (800, 600)),  # 599.5 rounded up
        ((1600, 1199), (800, 599)),  # ... or down
        ((1199, 1600), (599, 800)),
        ((3, 1000), (2, 500)),  # a thin image: 1.5 px within one pixel
    ],
)
def test_fit_depth_takes_maps_of_the_same_aspect_ratio(image, map_size):
    width, height = image
    depth = np.arange(map_size[0] * map_size[1], dtype=np.float32).reshape(map_size[1], map_size[0]) + 1
    got = fit_depth(depth, width, height, "x.geometric.bin")
    assert got.shape == (height, width)
    # nearest pixel, worked out here: pixel (r, c) takes the map's pixel its centre lies in
    r, c = height - 1, width - 1
    assert got[r, c] == depth[int((r + 0.5) * map_size[1] / height), int((c + 0.5) * map_size[0] / width)]
    assert got[0, 0] == depth[0, 0]


@pytest.mark.parametrize("map_size", [(64, 64), (48, 64), (68, 48), (32, 26)])
def test_fit_depth_refuses_another_aspect_ratio(tmp_path, map_size):
    path = tmp_path / "a.jpg.geometric.bin"
    with pytest.raises(SfmpairsError) as info:
        fit_depth(np.ones(map_size[::-1], np.float32), 64, 48, path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: depth map of {map_size[0]}x{map_size[1]} ")
    assert "64x48" in message
