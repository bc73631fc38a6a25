"""Ingest's models read by other processes (sfm_io/reading_processes.py) on large
inputs: the same store as models read on threads (the path every other ingest test
checks against pycolmap), errors in the models' order, one line and nothing left when
a reading process dies, and no reading process outliving ingest."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from test_store_writer import _assert_same_stores

from conftest import make_models
from sfmpairs import SfmpairsError
from sfmpairs.sfm_io import reading_processes
from sfmpairs.sfm_io.ingest import ingest

pytestmark = pytest.mark.skipif(not reading_processes.can_fork(), reason="no memfd or fork: read on threads")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Six models of different sizes, the fourth a text model."""
    from sfmpairs.synthetic.models import random_reconstruction, write_model

    folder = tmp_path_factory.mktemp("models")
    paths = make_models(folder, seed=7, scenes=5, images=25, points=1200)
    text = folder / "scene_text" / "sparse" / "0"
    write_model(random_reconstruction(14, 500, 4, seed=99), text, fmt="text")
    return [*paths[:3], text, *paths[3:]]


class Spy(reading_processes.ReadingProcesses):
    """Reading processes that record themselves, so that a test sees they ran."""

    made: list = []

    def __init__(self, *args):
        super().__init__(*args)
        Spy.made.append(self)


def _model_bytes(path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.suffix in (".bin", ".txt"))


@pytest.fixture
def processes(monkeypatch):
    """Every ingest read by processes, in batches of ``BATCH_BYTES`` (set by the test)."""
    Spy.made = []
    monkeypatch.setattr(reading_processes, "PROCESS_INPUT_BYTES", 0)
    monkeypatch.setattr(reading_processes, "ReadingProcesses", Spy)
    return monkeypatch


def _threads(monkeypatch):
    """Ingests from here on read on threads."""
    monkeypatch.setattr(reading_processes, "PROCESS_INPUT_BYTES", 1 << 62)


@pytest.mark.parametrize("batch", ["one model", "three models", "all"])
def test_processes_and_threads_write_the_same_store(models, tmp_path, processes, batch):
    sizes = [_model_bytes(m) for m in models]
    limit = {"one model": 1, "three models": sum(sizes[:3]), "all": 1 << 40}[batch]
    processes.setattr(reading_processes, "BATCH_BYTES", limit)
    open_files = len(os.listdir("/proc/self/fd"))
    ingest(models, tmp_path / "processes.h5")
    (made,) = Spy.made
    assert len(made.batches) == {"one model": 6, "three models": 2, "all": 1}[batch]
    assert made.procs == [] and len(os.listdir("/proc/self/fd")) == open_files  # ended, buffers and pipes closed
    _threads(processes)
    ingest(models, tmp_path / "threads.h5")
    assert len(Spy.made) == 1
    _assert_same_stores(tmp_path / "processes.h5", tmp_path / "threads.h5")


@pytest.fixture(scope="module")
def overlapping(tmp_path_factory):
    """Three models at ``root/mK``: m1's first 15 image names are also m0's (m0 is
    larger and keeps them), m2 shares none."""
    from sfmpairs.synthetic.models import random_reconstruction, write_model

    root = tmp_path_factory.mktemp("overlapping")
    for k, (images, id_start) in enumerate([(30, 5), (20, 50), (10, 200)]):
        write_model(random_reconstruction(images, 600, 3, id_start=id_start, seed=k), root / f"m{k}")
    return root, [root / f"m{k}" for k in range(3)]


def test_shared_names_leave_the_same_images(overlapping, tmp_path, processes):
    """Models that share image names (the images root given: the names are COLMAP's,
    not prefixed), each name kept in the largest model."""
    import h5py

    root, given = overlapping
    processes.setattr(reading_processes, "BATCH_BYTES", 1)
    ingest(given, tmp_path / "processes.h5", images_root=root, shared_names="largest")
    assert len(Spy.made) == 1
    with h5py.File(tmp_path / "processes.h5") as f:
        assert [int((f["images/model"][()] == k).sum()) for k in range(3)] == [30, 5, 10]
    _threads(processes)
    ingest(given, tmp_path / "threads.h5", images_root=root, shared_names="largest")
    _assert_same_stores(tmp_path / "processes.h5", tmp_path / "threads.h5")


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("batch", [1, 1 << 40])
def test_a_bad_model_is_the_same_one_line_and_leaves_nothing(models, tmp_path, processes, batch):
    processes.setattr(reading_processes, "BATCH_BYTES", batch)
    given = [tmp_path / "in" / f"m{k}" for k in range(len(models))]
    for src, dst in zip(models, given):
        shutil.copytree(src, dst)
    _truncate(given[2] / "points3D.bin")
    (tmp_path / "out").mkdir()
    with pytest.raises(SfmpairsError) as by_processes:
        ingest(given, tmp_path / "out" / "sfm.h5")
    assert len(Spy.made) == 1 and Spy.made[0].procs == []
    _threads(processes)
    with pytest.raises(SfmpairsError) as by_threads:
        ingest(given, tmp_path / "out" / "sfm.h5")
    assert str(by_processes.value) == str(by_threads.value)
    assert "m2/points3D.bin: truncated" in str(by_processes.value)
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("first", ["duplicate", "truncated"])
def test_errors_come_in_the_models_order(models, tmp_path, processes, first):
    """Model 1's error comes before model 2's, in one batch as on threads: a name
    model 1 shares with model 0 (checked in ingest's process) and a truncated file
    of model 2 (found by a reading process), or the other way round."""
    processes.setattr(reading_processes, "BATCH_BYTES", 1 << 40)
    given = [tmp_path / "in" / f"m{k}" for k in range(3)]
    shutil.copytree(models[0], given[0])
    dup, bad = (1, 2) if first == "duplicate" else (2, 1)
    shutil.copytree(models[0], given[dup])  # the same names as model 0
    shutil.copytree(models[1], given[bad])
    _truncate(given[bad] / "images.bin")
    expected = "is also in model m0" if first == "duplicate" else "m1/images.bin: truncated"
    for _ in ("processes", "threads"):
        with pytest.raises(SfmpairsError, match=expected):
            ingest(given, tmp_path / "sfm.h5", images_root=tmp_path / "in" / "m0")
        _threads(processes)
    assert len(Spy.made) == 1
    assert not (tmp_path / "sfm.h5").exists()


def test_a_reading_process_that_dies_is_one_line_and_leaves_nothing(models, tmp_path, processes):
    processes.setattr(reading_processes, "BATCH_BYTES", 1)
    real = reading_processes.read_batch

    def dying(tasks):  # runs in the reading process
        if tasks[0]["model"] == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(tasks)

    processes.setattr(reading_processes, "read_batch", dying)
    out = tmp_path / "out" / "sfm.h5"
    out.parent.mkdir()
    with pytest.raises(SfmpairsError, match=r"scene_text/sparse/0: the process reading it stopped \(exit status -9\)"):
        ingest(models, out)
    assert Spy.made[0].procs == []
    assert list(out.parent.iterdir()) == []


def test_another_thread_here_reads_on_threads(models, tmp_path, processes):
    """A process with threads of its own is not forked (a fork can deadlock on a lock
    another thread holds): the models are read on threads, the same store."""
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        ingest(models, tmp_path / "a.h5")
    finally:
        stop.set()
        other.join()
    assert Spy.made == []
    ingest(models, tmp_path / "b.h5")
    assert len(Spy.made) == 1
    _assert_same_stores(tmp_path / "a.h5", tmp_path / "b.h5")


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return out


def test_no_reading_process_outlives_a_killed_ingest(models, tmp_path):
    """ingest killed (-9) while its reading processes are busy: they end at once."""
    code = textwrap.dedent(
        f"""
        import time
        from sfmpairs.sfm_io import reading_processes
        from sfmpairs.sfm_io.ingest import ingest
        reading_processes.PROCESS_INPUT_BYTES = 0
        reading_processes.BATCH_BYTES = 1
        reading_processes.read_batch = lambda tasks: time.sleep(600)
        ingest({[str(m) for m in models]!r}, {str(tmp_path / "sfm.h5")!r})
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 60
        count = reading_processes.processes()  # one a core, 2 to 4 (the 6 models, one a batch, make 6 batches)
        while len(children := _children(proc.pid)) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(children) == count, children
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{c}") and _alive(c) for c in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(os.path.exists(f"/proc/{c}") and _alive(c) for c in children)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, ended but not yet reaped by init, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_batches_by_hand():
    tasks = [{"bytes": b} for b in (10, 50, 70, 200, 5, 5, 100)]
    old = reading_processes.BATCH_BYTES
    try:
        reading_processes.BATCH_BYTES = 100
        got = [[t["bytes"] for t in batch] for batch in reading_processes.batches(tasks)]
    finally:
        reading_processes.BATCH_BYTES = old
    assert got == [[10, 50, 70], [200], [5, 5, 100]]


def test_no_room_for_a_reading_process_buffer_is_one_line(models, tmp_path, processes):
    """A reading process that cannot grow its shared buffer (memory, a file-size
    limit): ingest says it in one line naming the output, and leaves nothing."""
    import errno

    processes.setattr(reading_processes, "BATCH_BYTES", 1)
    real = reading_processes.pack

    def full(parts, fd, buffer):  # runs in the reading process
        if parts[0]["images/model"][0] == 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(parts, fd, buffer)

    processes.setattr(reading_processes, "pack", full)
    out = tmp_path / "out" / "sfm.h5"
    out.parent.mkdir()
    with pytest.raises(SfmpairsError, match=r"sfm.h5: cannot write \(No space left on device\); nothing written"):
        ingest(models, out)
    assert list(out.parent.iterdir()) == []


def test_processes_that_cannot_start_leave_the_reading_to_threads(models, tmp_path, processes, caplog):
    """No process to be had (here: no shared memory): said in the log, the models read
    on threads, the same store."""
    import errno

    def no_memfd(name):
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    processes.setattr(reading_processes.os, "memfd_create", no_memfd)
    ingest(models, tmp_path / "a.h5")
    assert "cannot start processes to read the models (Too many open files); reading them on threads" in caplog.text
    processes.undo()
    ingest(models, tmp_path / "b.h5")
    _assert_same_stores(tmp_path / "a.h5", tmp_path / "b.h5")


def test_tiny_batches_and_more_batches_than_asked_at_the_start(models, tmp_path, processes):
    """Models of a few hundred bytes of rows (under a page: a buffer's first use maps a
    page of a file truncated to the rows), and more batches than the processes are
    asked for at the start (each asked for again as the one before is written):
    the same store as on threads."""
    from sfmpairs.synthetic.models import random_reconstruction, write_model

    processes.setattr(reading_processes, "BATCH_BYTES", 1)
    given = []
    for k in range(3):
        given.append(tmp_path / "in" / f"tiny{k}")
        write_model(random_reconstruction(2, 4, 2, seed=k), given[-1])
    for copy in range(3):
        for m in models[:2]:
            given.append(tmp_path / "in" / f"copy{copy}_{m.parents[1].name}")
            shutil.copytree(m, given[-1])
    ingest(given, tmp_path / "processes.h5")
    (made,) = Spy.made
    assert len(made.batches) == 9 > made.count * (reading_processes.SLOTS + 1)
    _threads(processes)
    ingest(given, tmp_path / "threads.h5")
    _assert_same_stores(tmp_path / "processes.h5", tmp_path / "threads.h5")


def _ingest_here(args):
    models, out = args
    ingest(models, out)
    return out


def test_a_pool_worker_reads_on_threads(models, tmp_path, processes):
    """A multiprocessing Pool's worker may not have children of its own: it reads on
    threads, the same store."""
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(1) as pool:
        pool.apply(_ingest_here, ((models, tmp_path / "a.h5"),))
    ingest(models, tmp_path / "b.h5")
    assert len(Spy.made) == 1  # in this process only
    _assert_same_stores(tmp_path / "a.h5", tmp_path / "b.h5")


def test_tqdms_monitor_thread_does_not_stop_the_fork():
    """A progress bar leaves tqdm's monitor thread running; another thread does stop it."""
    from tqdm import tqdm
    from tqdm._monitor import TMonitor

    monitor = TMonitor(tqdm, 10)
    try:
        assert reading_processes.can_fork()
        stop = threading.Event()
        other = threading.Thread(target=stop.wait)
        other.start()
        assert not reading_processes.can_fork()
        stop.set()
        other.join()
    finally:
        monitor.exit()


def test_asks_stay_small_whatever_the_names_left_out(overlapping, tmp_path, processes):
    """Ingest's requests to the reading processes are a few bytes (the processes have
    the batches from the fork), so that ingest never waits to send one while a
    process waits to send it a reply: a request that carried a batch's names to
    leave out (--shared-names) filled the pipe, both sides waiting for ever."""
    import pickle

    sent = []

    class Measured(Spy):
        def _send(self, p, message):
            sent.append(len(pickle.dumps(message)))
            super()._send(p, message)

    processes.setattr(reading_processes, "ReadingProcesses", Measured)
    processes.setattr(reading_processes, "BATCH_BYTES", 1)
    root, given = overlapping
    ingest(given, tmp_path / "sfm.h5", images_root=root, shared_names="largest")
    assert len(sent) >= 2 * len(given) - 1 and max(sent) < 100  # asks and frees
