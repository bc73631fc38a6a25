"""Writing the SfM store: in ingest's own process, or in a child process while ingest
reads the next models.

Where ingest reads COLMAP models on threads of its own (a large input in a process
that cannot fork its reading processes, :mod:`.reading_processes`), it appends their
rows to the store as it goes. HDF5
writes through a Python file object (:func:`~sfmpairs.common.h5_output`, so that a
full disk cannot crash it), and each of its writes waits for Python's lock, which the
reading threads hold for a while at a time: on the SfM-120k-shaped corpus reading and
writing overlapped hardly at all (4.5 s of reading and 3.8 s of writing took 8.5 s).
A child process has a lock of its own. Ingest hands it each batch of rows through
shared memory (two Linux memfd buffers, used in turn: one is filled while the child
writes the other; no copy through a pipe) and goes on reading.

Where memfd is missing (macOS, Windows) or the input is small (the child's start,
about 0.2 s, would cost more than it saves), the store is written in the process
itself, by the same functions (:class:`LocalWriter`). Both write the same bytes.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import pickle
import signal
import subprocess
import sys
import tempfile
from collections import deque
from pathlib import Path

import numpy as np

from sfmpairs.common import SfmpairsError, h5_output, one_line

from .store import _LAYOUT, append_columns, create_store, max_params, write_table

logger = logging.getLogger("sfmpairs.ingest")

CHILD_INPUT_BYTES = 1 << 30  # inputs of at least this many bytes (1 GiB of COLMAP files) are written by a child
_ALIGN = 64
# the numeric datasets' types (text goes pickled)
_DTYPES = {name: np.dtype(dtype) for name, dtype, _, _ in _LAYOUT if np.dtype(dtype).kind != "O"}
_DTYPES["observations/indptr"] = np.dtype(np.int64)


class LocalWriter:
    """The store's writes done in this process, into the open HDF5 file ``h5``."""

    def __init__(self, h5):
        self.h5 = h5

    def append(self, parts: list[dict]) -> None:
        """Append the rows of consecutive models (:func:`~.store.model_columns`)."""
        append_columns(self.h5, parts)

    def tables(self, tables: dict[str, dict]) -> None:
        """Write whole tables: ``{group: {column: values}}``."""
        for group, columns in tables.items():
            write_table(self.h5, group, columns)

    def attrs(self, attrs: dict) -> None:
        self.h5.attrs.update(attrs)


@contextlib.contextmanager
def local_writer(tmp: Path, width: int):
    """A new store at ``tmp`` (``width``: of ``images/params``) written in this process:
    its :class:`LocalWriter`; the store is closed, and a failed write raised
    (:func:`~sfmpairs.common.h5_output`), when the block ends."""
    with h5_output(tmp) as h5:
        create_store(h5, width)
        yield LocalWriter(h5)


@contextlib.contextmanager
def store_writer(tmp: Path, output: Path, child: bool):
    """A writer of a new store at ``tmp`` (the temporary path of ``output``, named in
    errors): a :class:`ChildWriter` where ``child`` is asked and memfd exists, else a
    :class:`LocalWriter`. The store is complete when the block ends without error."""
    writer = None
    if child and hasattr(os, "memfd_create"):
        # no process to be had (no memfd left, no interpreter to start): written here
        with contextlib.suppress(OSError, TypeError, ValueError):
            writer = ChildWriter(tmp, output)
    if writer is None:
        with local_writer(tmp, max_params()) as writer:
            yield writer
        return
    try:
        yield writer
        writer.finish()
    finally:
        writer.stop()


class ChildWriter:
    """The store's writes done by a child process (:func:`serve`), the rows handed over
    in shared memory. Errors of the child (a full disk included) are raised here, as
    they would be in this process. A child that cannot start (its interpreter cannot
    import sfmpairs, say) is said in the log, and the store is written in this
    process instead (:meth:`_started`, at the first write, by when the child has had
    the time it needs to start)."""

    def __init__(self, tmp: Path, output: Path):
        self.tmp, self.output = tmp, output
        self.local: LocalWriter | None = None  # the fallback, where the child did not start
        self.started = False
        self.opened = contextlib.ExitStack()  # the fallback's open store
        self.sent: deque[int] = deque()  # slots handed to the child and not yet written
        self.next = 0
        # the child imports sfmpairs from where this process did, whatever set up its path
        paths = [os.fspath(p) for p in sys.path if isinstance(p, (str, os.PathLike))]
        code = f"import sys; sys.path[:] = {paths!r}; from sfmpairs.sfm_io.store_writer import serve; serve()"
        self.errors = tempfile.TemporaryFile()  # the child's standard error, for the message
        self.slots = []
        try:
            for _ in range(2):
                self.slots.append(os.memfd_create("sfmpairs-store-rows"))
            self.proc = subprocess.Popen(
                [sys.executable, "-c", code, str(tmp), str(max_params()), *map(str, self.slots)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self.errors,
                pass_fds=self.slots,
                start_new_session=True,  # a ^C stops ingest, which stops it; no traceback of its own
            )
        except BaseException:
            self._close_files()
            raise

    def _started(self) -> bool:
        """Whether the child writes the store: its first reply, once, says it started;
        where it ended without one, the store is opened here (:attr:`local`)."""
        if not self.started:
            self.started = True
            try:
                reply = pickle.load(self.proc.stdout)
            except (EOFError, pickle.UnpicklingError):
                logger.warning(
                    "%s: the process to write it did not start (exit status %s%s); writing it in this process",
                    self.output,
                    self.proc.wait(),
                    self._last_error(),
                )
                self.local = self.opened.enter_context(local_writer(self.tmp, max_params()))
            else:
                if reply[0] == "error":
                    self._raise(reply)
        return self.local is None

    def append(self, parts: list[dict]) -> None:
        if not self._started():
            self.local.append(parts)
            return
        if not parts:
            return
        slot = self.next
        self.next = 1 - slot
        while slot in self.sent:  # the child still writes from it
            self._reply()
        order, layout, strings, size = list(parts[0]), [], {}, 0
        for name in order:
            values = [p[name] for p in parts]
            if isinstance(values[0], list):
                strings[name] = [v for vs in values for v in vs]
                continue
            shape = (sum(len(v) for v in values), *np.shape(values[0])[1:])
            layout.append((name, _DTYPES[name].str, shape, size))
            size += -(-int(np.prod(shape)) * _DTYPES[name].itemsize // _ALIGN) * _ALIGN
        fd = self.slots[slot]
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
        if size:
            # numpy's arrays over an mmap do not keep it open: no view may outlive it (a
            # read after the close is a crash, not an error)
            with mmap.mmap(fd, size) as buffer:
                for name, dtype, shape, offset in layout:
                    out = np.ndarray(shape, dtype, buffer=buffer, offset=offset)
                    np.concatenate([p[name] for p in parts], out=out, casting="unsafe")
                    del out  # no view may outlive the mapping
        self._send(("append", slot, size, order, layout, strings))
        self.sent.append(slot)

    def tables(self, tables: dict[str, dict]) -> None:
        if self._started():
            self._send(("tables", tables))
        else:
            self.local.tables(tables)

    def attrs(self, attrs: dict) -> None:
        if self._started():
            self._send(("attrs", attrs))
        else:
            self.local.attrs(attrs)

    def finish(self) -> None:
        """Let the child close the store, and wait for it; its error, if any, raised."""
        if not self._started():
            self.opened.close()  # a full disk raises here, as h5_output does
            return
        self._send(("close",))
        while self._reply() != "closed":
            pass

    def stop(self) -> None:
        """End the child (it stops at the end of its input) and free the buffers."""
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        with contextlib.suppress(Exception):  # after an error: the fallback's store closed, whatever it says
            self.opened.close()
        self._close_files()

    def _close_files(self) -> None:
        for fd in self.slots:
            os.close(fd)
        self.slots = []
        self.errors.close()

    def _last_error(self) -> str:
        """The last line the child wrote to its standard error, as ``": line"``, or ``""``."""
        self.errors.seek(0)
        lines = [line.strip() for line in self.errors.read()[-4000:].decode("utf-8", "replace").splitlines()]
        lines = [line for line in lines if line]
        return f": {lines[-1]}" if lines else ""

    def _send(self, message) -> None:
        try:
            pickle.dump(message, self.proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            self.proc.stdin.flush()
        except (BrokenPipeError, ConnectionResetError):
            self._reply()  # the child's error, if it said one
            raise self._died() from None

    def _reply(self) -> str:
        """The child's next reply: an acknowledged slot is free again; an error raised."""
        try:
            reply = pickle.load(self.proc.stdout)
        except (EOFError, pickle.UnpicklingError):
            raise self._died() from None
        if reply[0] == "written":
            self.sent.popleft()
        elif reply[0] == "error":
            self._raise(reply)
        return reply[0]

    def _raise(self, reply) -> None:
        """The child's error, raised here as it would have been raised in this process."""
        _, kind, errno, text = reply
        if kind == "OSError":
            raise OSError(errno, text)
        if kind == "SfmpairsError":
            raise SfmpairsError(text)
        raise SfmpairsError(f"{self.output}: writing the SfM store failed ({kind}: {text}); nothing written")

    def _died(self) -> SfmpairsError:
        code = self.proc.wait()
        return SfmpairsError(
            f"{self.output}: the process writing it stopped (exit status {code}{self._last_error()}); nothing written"
        )


def serve() -> None:
    """The child's side of :class:`ChildWriter`: ``sys.argv`` holds the store's path,
    the width of ``images/params`` and the two buffers' file descriptors; messages
    come pickled on standard input, replies go pickled to standard output. The end of
    its input without ``close`` (ingest stopped or was killed) ends it, the store
    unfinished."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a ^C stops ingest, which stops the child
    tmp, width, slots = sys.argv[1], int(sys.argv[2]), [int(fd) for fd in sys.argv[3:]]
    inbox, outbox = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing but replies on the reply channel

    def reply(*message) -> None:
        pickle.dump(message, outbox, protocol=pickle.HIGHEST_PROTOCOL)
        outbox.flush()

    try:
        with local_writer(tmp, width) as writer:
            reply("ready")
            while True:
                message = pickle.load(inbox)
                if message[0] == "append":
                    _, slot, size, order, layout, strings = message
                    _append(writer, slots[slot], size, order, layout, strings)
                    reply("written")
                elif message[0] == "tables":
                    writer.tables(message[1])
                elif message[0] == "attrs":
                    writer.attrs(message[1])
                else:
                    break
    except (EOFError, BrokenPipeError):  # ingest stopped, or was killed
        return
    except BaseException as e:  # noqa: BLE001 - every error goes back to ingest, which names the file
        kind = "OSError" if isinstance(e, OSError) else type(e).__name__  # PermissionError too: its errno says
        with contextlib.suppress(BrokenPipeError):
            reply("error", kind, getattr(e, "errno", None), getattr(e, "strerror", None) or one_line(e))
        return
    with contextlib.suppress(BrokenPipeError):
        reply("closed")


def _append(writer: LocalWriter, fd: int, size: int, order: list, layout: list, strings: dict) -> None:
    """One batch of rows from the buffer ``fd``, as :meth:`ChildWriter.append` laid it
    out, written dataset by dataset in the order ``order`` (that of this process)."""
    buffer = mmap.mmap(fd, size, prot=mmap.PROT_READ) if size else None
    try:  # the views die before the mapping closes (see ChildWriter.append)
        columns = {name: np.ndarray(shape, dt, buffer=buffer, offset=offset) for name, dt, shape, offset in layout}
        columns.update(strings)
        writer.append([{name: columns[name] for name in order}])
        del columns
    finally:
        if buffer is not None:
            buffer.close()
