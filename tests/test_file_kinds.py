"""Every file kind is stamped with its schema and version, and every reader checks both
with the one helper (sfmpairs.common.check_schema)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from sfmpairs import SfmpairsError
from sfmpairs.mining.pairfile import read_pair_file
from sfmpairs.retrieval.descriptors import read_descriptors, write_descriptors
from sfmpairs.retrieval.whiten import read_whitening
from sfmpairs.sfm_io.store import read_store


def with_attrs(src, dst, **attrs):
    with h5py.File(src, "r") as f, h5py.File(dst, "w") as g:
        for key in f:
            f.copy(key, g)
        g.attrs.update(f.attrs)
        g.attrs.update(attrs)
    return dst


def test_every_reader_refuses_a_newer_version_and_another_kind(small_world, tmp_path):
    d = np.eye(4, dtype=np.float32)
    names = np.array(["a", "b", "c", "d"], dtype=object)
    write_descriptors(tmp_path / "d.h5", names, d, {"schema": "sfmpairs/descriptors", "schema_version": 1})
    with h5py.File(tmp_path / "w.h5", "w") as f:
        f["mean"], f["projection"] = np.zeros(4), np.eye(4)
        f.attrs.update(schema="sfmpairs/whitening", schema_version=1, method="pca")
    kinds = [
        (read_store, small_world / "sfm.h5", "an SfM store"),
        (read_pair_file, small_world / "pairs.h5", "a pair file"),
        (lambda p: read_descriptors(p, names), tmp_path / "d.h5", "a descriptor file"),
        (read_whitening, tmp_path / "w.h5", "a whitening file"),
    ]
    for read, path, kind in kinds:
        read(path)  # as written: fine
        newer = with_attrs(path, tmp_path / "newer.h5", schema_version=99)
        with pytest.raises(
            SfmpairsError, match=f"newer.h5: {kind} of schema version 99; sfmpairs .* reads versions 1 to"
        ):
            read(newer)
        other = with_attrs(path, tmp_path / "other.h5", schema="sfmpairs/something-else")
        with pytest.raises(SfmpairsError, match=f"other.h5: not {kind} \\(schema 'sfmpairs/something-else'"):
            read(other)


def test_descriptors_from_another_tool_are_read(tmp_path):
    """No schema attribute at all: a user's own descriptors, keyed by name."""
    with h5py.File(tmp_path / "theirs.h5", "w") as f:
        f.create_dataset("names", data=["x.jpg", "y.jpg"], dtype=h5py.string_dtype("utf-8"))
        f["descriptors"] = np.array([[0.6, 0.8], [1.0, 0.0]], np.float32)
    got = read_descriptors(tmp_path / "theirs.h5", np.array(["y.jpg", "x.jpg"], dtype=object))
    np.testing.assert_array_equal(got, np.array([[1.0, 0.0], [0.6, 0.8]], np.float32))
