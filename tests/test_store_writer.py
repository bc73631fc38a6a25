"""The SfM store written by a child process (sfm_io/store_writer.py) on large inputs:
the same store as one written in ingest's own process, and its faults one line with
nothing left behind."""

from __future__ import annotations

import shutil

import h5py
import pytest

from conftest import make_models
from sfmpairs import SfmpairsError
from sfmpairs.sfm_io import ingest as ingest_module
from sfmpairs.sfm_io import store_writer
from sfmpairs.sfm_io.ingest import ingest

pytestmark = pytest.mark.skipif(not hasattr(store_writer.os, "memfd_create"), reason="no memfd: always written here")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_models(tmp_path_factory.mktemp("models"), seed=4, scenes=5, images=30, points=1500)


class Spy(store_writer.ChildWriter):
    """A child writer that records itself, so that a test sees it ran."""

    made: list = []

    def __init__(self, *args):
        super().__init__(*args)
        Spy.made.append(self)


@pytest.fixture
def child(monkeypatch):
    """Every ingest written by a child process, in batches of about 5,000 observations,
    so that both buffers are used and reused."""
    Spy.made = []
    monkeypatch.setattr(store_writer, "CHILD_INPUT_BYTES", 0)
    monkeypatch.setattr(store_writer, "ChildWriter", Spy)
    monkeypatch.setattr(ingest_module, "APPEND_OBSERVATIONS", 5_000)
    return Spy


def _datasets(path):
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.update({name: obj[()]}) if isinstance(obj, h5py.Dataset) else None)
        attrs = {k: str(v) for k, v in f.attrs.items() if k not in ("created", "command")}
    return out, attrs


def test_child_and_this_process_write_the_same_store(models, tmp_path, child, monkeypatch):
    import os

    open_files = len(os.listdir("/proc/self/fd"))
    ingest(models, tmp_path / "child.h5")
    assert len(child.made) == 1 and child.made[0].proc.returncode == 0
    assert len(os.listdir("/proc/self/fd")) == open_files  # the buffers and pipes closed
    monkeypatch.setattr(store_writer, "CHILD_INPUT_BYTES", 1 << 62)
    ingest(models, tmp_path / "here.h5")
    assert len(child.made) == 1  # the second ingest wrote in this process
    a = _assert_same_stores(tmp_path / "child.h5", tmp_path / "here.h5")
    assert len(a["observations/point"]) > 3 * 5_000  # several batches: each buffer filled more than once


def _assert_same_stores(path_a, path_b) -> dict:
    """Both stores hold the same datasets, bit for bit, and the same attributes (but
    when and by which command they were made); the first's datasets."""
    (a, attrs_a), (b, attrs_b) = _datasets(path_a), _datasets(path_b)
    assert a.keys() == b.keys() and len(a) >= 30
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        if a[name].dtype.kind == "O":
            assert a[name].tolist() == b[name].tolist(), name
        else:
            assert a[name].tobytes() == b[name].tobytes(), name
    assert attrs_a == attrs_b
    return a


def test_an_error_while_reading_stops_the_child_and_leaves_nothing(models, tmp_path, child):
    bad = tmp_path / "bad" / "sparse" / "0"
    shutil.copytree(models[-1], bad)
    data = bytearray((bad / "points3D.bin").read_bytes())
    (bad / "points3D.bin").write_bytes(bytes(data[: len(data) // 2]))  # truncated
    (tmp_path / "out").mkdir()
    with pytest.raises(SfmpairsError, match="points3D.bin: truncated"):
        ingest([*models[:-1], bad], tmp_path / "out" / "sfm.h5")
    assert len(child.made) == 1 and child.made[0].proc.returncode is not None  # it ended
    assert list((tmp_path / "out").iterdir()) == []


def test_a_child_that_dies_midway_is_one_line_and_leaves_nothing(models, tmp_path, child, monkeypatch):
    class Dying(Spy):
        def append(self, parts):
            super().append(parts)
            if len(self.sent) == 2:  # both buffers handed over: the next batch waits for the child
                self.proc.kill()

    monkeypatch.setattr(store_writer, "ChildWriter", Dying)
    out = tmp_path / "out" / "sfm.h5"
    out.parent.mkdir()
    with pytest.raises(SfmpairsError, match=r"sfm.h5: the process writing it stopped \(exit status -9\); nothing"):
        ingest(models, out)
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize("how", ["killed", "no interpreter"])
def test_a_child_that_does_not_start_leaves_the_writing_here(models, tmp_path, child, monkeypatch, caplog, how):
    """The child ends before it says it started: ingest says so in its log and writes
    the store itself, the same store."""

    class Unborn(Spy):
        def __init__(self, *args):
            super().__init__(*args)
            self.proc.kill()

    if how == "killed":
        monkeypatch.setattr(store_writer, "ChildWriter", Unborn)
    else:
        monkeypatch.setattr(store_writer.sys, "executable", "/bin/false")  # runs, and exits 1 at once
    ingest(models, tmp_path / "a.h5")
    assert len(child.made) == 1 and "did not start" in caplog.text and "writing it in this process" in caplog.text
    monkeypatch.setattr(store_writer, "CHILD_INPUT_BYTES", 1 << 62)
    ingest(models, tmp_path / "b.h5")
    _assert_same_stores(tmp_path / "a.h5", tmp_path / "b.h5")


def test_a_path_object_in_sys_path_reaches_the_child(models, tmp_path, child, monkeypatch):
    from pathlib import Path

    monkeypatch.setattr(store_writer.sys, "path", [Path(store_writer.sys.path[0]), *store_writer.sys.path[1:]])
    ingest(models, tmp_path / "sfm.h5")
    assert child.made[0].local is None and child.made[0].proc.returncode == 0  # the child wrote it


def test_an_error_of_the_child_comes_back(models, tmp_path, child, monkeypatch):
    """The child's own failure (here a table it cannot write) is raised in ingest as one
    line naming the output, and the output is not left."""
    monkeypatch.setattr(ingest_module, "source_tables", lambda *a: {"models": {"name": [None, 1]}})
    out = tmp_path / "out" / "sfm.h5"
    out.parent.mkdir()
    with pytest.raises(SfmpairsError, match=r"sfm.h5: writing the SfM store failed \(\w+Error: .+\); nothing"):
        ingest(models, out)
    assert child.made[0].proc.returncode == 0
    assert list(out.parent.iterdir()) == []
