"""Ingest's models read by other processes, so that large inputs keep every core busy.

Reading a COLMAP model is compiled loops and numpy work. On threads of one process
they share Python's lock and the process's memory map: reading the SfM-120k-shaped
corpus took 2.3 to 2.9 s on two threads against 2.4 to 2.7 s on one, and two
processes took 1.6 to 1.8 s (2 cores). So, on large inputs, ingest forks a few
reading processes (:func:`processes`) and hands them the models in batches of
consecutive ones (about :data:`BATCH_BYTES` of COLMAP files; batch j to process j mod
n). Each reads its batch's models, leaves out the images ``--shared-names`` gives to
larger models, and lays out the batch's rows of the store
(:func:`~.store.model_columns`, numbered within the batch) in one of its two
shared-memory buffers (Linux memfd: no copy through a pipe). Ingest's own process
takes the batches in order, checks each model's names, numbers the rows after those
of the batches before, and writes them to the store straight from the buffer.

On the corpus (2 cores) ingest took 3.8 to 4.5 s this way, keeping 1.7 cores busy,
against 5.0 to 5.9 s and 1.4 cores with the models read on threads and the store
written by a child process (:mod:`.store_writer`); the store is bit for bit the same.
Batches of 128 MiB were faster than 32 or 64 MiB (each batch is one write of the
store, and fewer batches leave fewer buffers to copy) and used 440 MiB against 590
with 256 MiB.

Where memfd or fork is missing (macOS, Windows), the process has threads of its own
(:func:`can_fork`) or the input is small, the models are read on threads of ingest's
own process instead (:func:`~.ingest.model_rows`). Both give the same store.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import multiprocessing
import os
import signal
import threading
from collections import deque

import numpy as np

from sfmpairs.common import SfmpairsError, one_line, write_failure

# inputs of at least this many bytes of COLMAP files are read by processes (measured on
# parts of the corpus, 3 runs each: 629 MB took 1.1 to 1.3 s against 1.4 to 1.8 s on
# threads, 280 MB 0.9 to 1.0 s against 0.8 to 0.9 s, the processes loading the
# compiled loops each)
PROCESS_INPUT_BYTES = 1 << 29
_ALIGN = 64
SLOTS = 2  # shared-memory buffers of each reading process: one is filled while ingest writes the other


def processes() -> int:
    """How many reading processes: one a core, two at least (ingest's own process
    writes beside them), four at most (ingest's one process writes what they read;
    measured on 2 cores only)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(2, min(4, cores))


def pack(parts: list[dict], fd: int, buffer: "_Buffer") -> tuple:
    """Lay out the columns of consecutive models (``parts``, each numbered after those
    before it), concatenated, in the shared-memory file ``fd`` (mapped by ``buffer``,
    grown as needed): ``(size, layout, strings)``, ``layout`` giving each array's
    (name, dtype, shape, byte offset) and ``strings`` the lists of text."""
    layout, strings, size = [], {}, 0
    for name, values in parts[0].items():
        if isinstance(values, list):
            strings[name] = [v for p in parts for v in p[name]]
            continue
        shape = (sum(len(p[name]) for p in parts), *np.shape(values)[1:])
        layout.append((name, values.dtype.str, shape, size))
        size += -(-int(np.prod(shape)) * values.dtype.itemsize // _ALIGN) * _ALIGN
    view = buffer.map(size, fd)
    for name, dtype, shape, offset in layout:
        out = np.ndarray(shape, dtype, buffer=view, offset=offset)
        np.concatenate([p[name] for p in parts], out=out)
        del out
    del view
    return size, layout, strings


def unpack(view, layout: list, strings: dict) -> dict:
    """The columns :func:`pack` laid out, as views of ``view`` (which must outlive them)."""
    columns = {name: np.ndarray(shape, dtype, buffer=view, offset=offset) for name, dtype, shape, offset in layout}
    columns.update(strings)
    return columns


class _Buffer:
    """One memfd mapped once and mapped again only when it must grow, so that its
    pages are faulted in once, not at every model."""

    def __init__(self):
        self.mapping: mmap.mmap | None = None

    def map(self, size: int, fd: int, grow: bool = True) -> memoryview:
        """A view of the first ``size`` bytes (the file grown to them where ``grow``)."""
        if self.mapping is None or len(self.mapping) < size:
            self.close()
            length = max(size, mmap.PAGESIZE) if grow else size  # a page at least, where it grows
            if grow and os.fstat(fd).st_size < length:
                os.ftruncate(fd, length)
            self.mapping = mmap.mmap(fd, length) if size else None
        return memoryview(self.mapping)[:size] if self.mapping is not None else memoryview(b"")

    def close(self) -> None:
        if self.mapping is not None:
            self.mapping.close()
            self.mapping = None


BATCH_BYTES = 1 << 27  # consecutive models are read as one batch of about this many bytes of COLMAP files


def read_batch(tasks: list[dict]) -> tuple[list[dict], list[tuple[int, int, int]], BaseException | None]:
    """The store's rows of consecutive models (``tasks``: what :func:`~.ingest.reading_tasks`
    gives), each numbered after those before it in the batch; each one's (images,
    points, observations); and the error of the first model that could not be read
    (None: none), the models after it not read."""
    from .ingest import model_columns_of, read_model, renumber

    parts, counts, points, observations = [], [], 0, 0
    for task in tasks:
        try:
            model = read_model(task["path"], task["format"], task["reader"], task["threads"])
            columns, count = model_columns_of(model, task)
        except Exception as e:  # noqa: BLE001 - given back to ingest, which raises it in its turn
            return parts, counts, e
        del model
        renumber(columns, points, observations)
        parts.append(columns)
        counts.append(count)
        points += count[1]
        observations += count[2]
    return parts, counts, None


def batches(tasks: list[dict]) -> list[list[dict]]:
    """Consecutive tasks in groups of about :data:`BATCH_BYTES` of COLMAP files (a model
    larger than that alone)."""
    out, size = [], BATCH_BYTES
    for task in tasks:
        if size >= BATCH_BYTES:
            out.append([])
            size = 0
        out[-1].append(task)
        size += task["bytes"]
    return out


def _error(e: BaseException) -> tuple:
    """An error as (kind, errno, text), to be raised again in ingest (:func:`_raise`)."""
    kind = "OSError" if isinstance(e, OSError) else type(e).__name__
    text = str(e) if isinstance(e, SfmpairsError) else getattr(e, "strerror", None) or one_line(e)
    return kind, getattr(e, "errno", None), text


def _raise(error: tuple, path) -> None:
    """Raise here the error :func:`_error` gave (``path``: the model's folder)."""
    kind, errno, text = error
    if kind == "OSError" and write_failure(OSError(errno, text)):  # no room for the buffer: said as ingest's output's
        raise OSError(errno, text)
    if kind == "OSError":
        raise SfmpairsError(f"{path}: reading the model into shared memory failed ({text})")
    if kind == "SfmpairsError":
        raise SfmpairsError(text)
    raise SfmpairsError(f"{path}: reading the model failed ({kind}: {text})")


def can_fork() -> bool:
    """Whether reading processes can start here: Linux (memfd, fork) and this process
    on one thread, since a process forked from several threads can deadlock on a lock
    another thread held (a Jupyter kernel, a program's own threads)."""
    if not hasattr(os, "memfd_create") or "fork" not in multiprocessing.get_all_start_methods():
        return False
    if multiprocessing.current_process().daemon:  # a Pool's worker: it may have no children
        return False
    return not [t for t in threading.enumerate() if t is not threading.main_thread() and not _tqdm_monitor(t)]


def _tqdm_monitor(thread: threading.Thread) -> bool:
    """Whether ``thread`` is tqdm's monitor, which a progress bar leaves running: it
    only sleeps and looks at the bars, and holds no lock the forked processes take."""
    try:
        from tqdm._monitor import TMonitor
    except ImportError:
        return False
    return isinstance(thread, TMonitor)


class ReadingProcesses:
    """Processes that read the models of ``tasks`` (:func:`~.ingest.reading_tasks`) in
    batches of consecutive models (:func:`batches`), batch j by process j mod n;
    :meth:`next` gives the batches in order, as views of shared memory valid until
    the next call.

    They are forked from this process (its modules and compiled loops already loaded:
    no start-up of their own), before the store is opened; see :func:`can_fork`."""

    def __init__(self, tasks: list[dict], count: int):
        self.batches = batches(tasks)
        self.count = min(count, max(1, len(self.batches)))
        self.asked = 0  # batches asked for
        self.taken = 0  # batches given out
        # a model's error, where its batch came with the models before it only: raised
        # at the next call, once those have been checked
        self.error = None
        self.procs, self.conns, self.slots, self.buffers = [], [], [], []
        self.held: tuple[int, int] | None = None  # (process, slot) of the batch given out last
        fork = multiprocessing.get_context("fork")
        try:
            for _ in range(self.count):
                fds = [os.memfd_create("sfmpairs-model-rows") for _ in range(SLOTS)]
                self.slots.append(fds)
                self.buffers.append([_Buffer() for _ in fds])
                here, there = fork.Pipe()
                # the process closes this process's ends of every pipe it inherits, so
                # that each process sees the end of its input when this one ends
                proc = fork.Process(
                    target=serve, args=(there, fds, [*self.conns, here], os.getpid(), self.batches), daemon=True
                )
                proc.start()
                there.close()
                self.conns.append(here)
                self.procs.append(proc)
            for _ in range(min(len(self.batches), self.count * (SLOTS + 1))):  # each busy, its buffers to fill
                self._ask()
        except BaseException:
            self.close()
            raise

    def _ask(self) -> None:
        j = self.asked
        self._send(j % self.count, ("read", j))  # the process has the batches from the fork: small asks
        self.asked += 1

    def _send(self, p: int, message) -> None:
        try:
            self.conns[p].send(message)
        except OSError:  # the process ended
            raise self._died(p) from None

    def next(self) -> tuple[dict, list[tuple[int, int, int]]]:
        """The next batch's columns (views of shared memory) and each of its models'
        (images, points, observations); the error of a model, raised here as it
        would be in this process, in its turn (after the models before it)."""
        self.release()
        if self.error is not None:
            _raise(*self.error)
        j, p = self.taken, self.taken % self.count
        try:
            _, slot, size, layout, strings, counts, error = self.conns[p].recv()
        except (EOFError, OSError):
            raise self._died(p) from None
        self.taken += 1
        self.held = (p, slot)
        if error is not None:
            self.error = (error, self.batches[j][len(counts)]["path"])
            if not counts:
                _raise(*self.error)
        view = self.buffers[p][slot].map(size, self.slots[p][slot], grow=False)
        return unpack(view, layout, strings), counts

    def release(self) -> None:
        """Give the buffer of the batch given out last back to its process (no view of
        it may be left), and ask for the next batch."""
        if self.held is None:
            return
        p, slot = self.held
        self.held = None
        self._send(p, ("free", slot))
        if self.asked < len(self.batches):
            self._ask()

    def _died(self, p: int) -> SfmpairsError:
        """The error of process ``p`` ended, naming the first model of the batch it was
        reading (its first not given out)."""
        self.procs[p].join()
        j = self.taken + (p - self.taken) % self.count
        batch = self.batches[min(j, len(self.batches) - 1)]
        what = (
            f"{batch[0]['path']}"
            if len(batch) == 1
            else f"{batch[0]['path']} (or a model after it, to {batch[-1]['path']})"
        )
        return SfmpairsError(
            f"{what}: the process reading it stopped (exit status {self.procs[p].exitcode}); nothing written"
        )

    def close(self, kill: bool = False) -> None:
        """End the processes (they stop at the end of their input; ``kill``: at once,
        on an error or ^C, their reading no longer needed) and free the buffers."""
        for conn in self.conns:
            conn.close()
        for proc in self.procs:
            if kill:
                proc.kill()
            proc.join(timeout=60)
            if proc.exitcode is None:
                proc.kill()
                proc.join()
        for buffers in self.buffers:
            for b in buffers:
                with contextlib.suppress(BufferError):  # a view left by an error: freed with it
                    b.close()
        for fds in self.slots:
            for fd in fds:
                os.close(fd)
        self.procs, self.conns, self.slots, self.buffers = [], [], [], []


def _end_with(parent: int) -> None:
    """Have Linux kill this process when ``parent`` ends, killed included (where
    prctl is missing, it ends at the end of its input, once its batch is read)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it ended before that
        os._exit(0)


def serve(conn, fds: list[int], inherited: list, parent: int, batches: list) -> None:
    """A reading process (:class:`ReadingProcesses`): requests come on ``conn``
    (``("read", j)``: read ``batches[j]``; ``("free", slot)``), replies go back on it;
    ``fds`` are its buffers; ``inherited``: the other pipes' ends it got from the fork,
    closed; ``parent``: ingest's process. The end of its input, or of ingest, ends it.
    The requests are small, so that ingest never waits to send one while this process
    waits to send a reply (a batch's names can fill a pipe)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a ^C stops ingest, which stops this
    _end_with(parent)
    for c in inherited:
        c.close()
    buffers = [_Buffer() for _ in fds]
    free = deque(range(len(fds)))
    waiting: deque = deque()  # read requests that came while waiting for a free buffer

    def receive():
        message = conn.recv()
        if message[0] == "free":
            free.append(message[1])
            return None
        return message

    try:
        while True:
            message = waiting.popleft() if waiting else receive()
            if message is None:
                continue
            parts, counts, error = read_batch(batches[message[1]])
            while not free:
                if (request := receive()) is not None:
                    waiting.append(request)
            slot = free.popleft()
            try:
                size, layout, strings = pack(parts, fds[slot], buffers[slot]) if parts else (0, [], {})
            except Exception as e:  # noqa: BLE001 - no room for the buffer (a file-size limit, memory)
                size, layout, strings, counts, error = 0, [], {}, [], e
            del parts
            conn.send(("batch", slot, size, layout, strings, counts, None if error is None else _error(error)))
    except (EOFError, OSError):  # ingest is done, stopped, or was killed
        return
