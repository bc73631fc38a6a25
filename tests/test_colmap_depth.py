"""COLMAP's depth-map files against the layout COLMAP's own read_write_dense.py
reads (header ``width&height&channels&``, float32 column-major over (width, height))."""

from __future__ import annotations

import numpy as np
import pytest

from sfmpairs.common import SfmpairsError
from sfmpairs.sfm_io.colmap_depth import read_depth_map, write_depth_map


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
