"""Helpers shared by every stage: errors, atomic output files, provenance, progress."""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

logger = logging.getLogger("sfmpairs")


class SfmpairsError(Exception):
    """A problem with the user's input: the CLI prints it on one line and exits 2.

    The message names the file and the problem, e.g. ``images.bin: truncated ...``.
    """

    exit_code = 2


def check_output_path(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse to overwrite a user's file unless asked; make sure the folder exists."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise SfmpairsError(f"{path}: output exists; pass --overwrite to replace it")
    if path.is_dir():
        raise SfmpairsError(f"{path}: output is a directory")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise SfmpairsError(f"{parent}: output folder does not exist")
    return path


# Errors of writing that mean the disk (or the user's quota, or a file-size limit) is
# full or the folder cannot be written: one line, not a traceback.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EIO}
# The same errors as h5py and torch.save report them (RuntimeError or OSError with
# HDF5's or PyTorch's own text).
_WRITE_MESSAGES = (
    "file write failed",
    "No space left on device",
    "File too large",
    "Disk quota exceeded",
    "unable to extend file",
    "unexpected pos",  # torch.save: a write that came up short
)


def write_failure(e: BaseException) -> str | None:
    """What went wrong, if ``e`` is a failure to write a file (a full disk, a
    file-size limit, a read-only or failing disk); None for anything else."""
    if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
        return e.strerror or os.strerror(e.errno)
    if isinstance(e, (OSError, RuntimeError)):
        text = str(e)
        for m in _WRITE_MESSAGES:
            if m in text:
                code = re.search(r"errno = (\d+)", text)
                return os.strerror(int(code.group(1))) if code else m
    return None


def _temp_prefix(path: Path) -> str:
    """The temporary files of ``path`` are ``.NAME.HOST-PID.XXXXXXXX.tmp``: unique per
    process, and those of a run that died (same host, no such process) are known."""
    return f".{path.name}.{socket.gethostname()}-"


def _remove_stale_temps(path: Path) -> None:
    """Remove the temporary files that killed runs left for ``path`` on this host."""
    prefix = _temp_prefix(path)
    for tmp in path.parent.glob(glob.escape(prefix) + "*.tmp"):
        pid = tmp.name[len(prefix) :].split(".", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                tmp.unlink()
        except OSError:  # alive, another user's
            pass


def _publish(tmp: Path, path: Path, overwrite: bool) -> None:
    """Move the finished ``tmp`` to ``path`` in one step. Without ``overwrite``, a file
    that appeared at ``path`` meanwhile (another run writing the same output) is never
    replaced: the hard link fails instead (no-replace, atomic)."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise SfmpairsError(
            f"{path}: output exists (written meanwhile by another run); pass --overwrite to replace it"
        ) from None
    except OSError as e:
        if write_failure(e) or not path.parent.is_dir():
            raise
        # a file system without hard links: the check and the rename are two steps
        if path.exists():
            raise SfmpairsError(f"{path}: output exists; pass --overwrite to replace it") from None
        os.replace(tmp, path)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it to ``path`` on success.

    On any exception the temporary file is removed, so a failed run leaves no partial
    output behind; a failure to write (a full disk, a file-size limit) becomes one line
    naming ``path``. Two runs writing ``path`` at once: each writes its own temporary
    file and, without ``overwrite``, the second to finish fails (the file is one run's
    whole output, never a mix). Temporary files of killed runs are removed.
    """
    path = check_output_path(path, overwrite)
    _remove_stale_temps(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f"{_temp_prefix(path)}{os.getpid()}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise SfmpairsError(f"{path}: cannot write ({e.strerror})") from None
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
    tmp = Path(tmp)
    try:
        yield tmp
        _publish(tmp, path, overwrite)
    except (OSError, RuntimeError) as e:
        reason = write_failure(e)
        if reason is None:
            raise
        raise SfmpairsError(f"{path}: cannot write ({reason}); nothing written") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike, overwrite: bool = False, scratch_in: Path | None = None):
    """Yield a fresh path (not yet made) to build a folder output in; it replaces
    ``target`` at the end, or vanishes on error, so a failed run leaves ``target`` as it
    was; a failure to write (a full disk) is one line naming ``target``. The scratch
    folder is made in ``scratch_in`` (default: ``target``'s folder)."""
    target = Path(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise SfmpairsError(f"{target}: folder exists and is not empty; pass --overwrite")
    scratch_in = Path(scratch_in) if scratch_in is not None else target.parent
    scratch, made = None, not scratch_in.exists()
    try:
        scratch_in.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.sfmpairs-", suffix=".tmp", dir=scratch_in))
        yield scratch / "out"
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        os.replace(scratch / "out", target)
    except OSError as e:
        raise SfmpairsError(
            f"{target}: cannot write ({write_failure(e) or e.strerror or e}); nothing written"
        ) from None
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        if made and not target.exists():  # the folder made for the scratch, left empty by a failure
            with contextlib.suppress(OSError):
                scratch_in.rmdir()


class _WriteGuard:
    """A binary file for h5py's file-object driver that never reports a failed write to
    HDF5: HDF5 2.0 crashes (segmentation fault) closing a file one of whose writes
    failed, a full disk included. The first error is kept and later writes are dropped;
    :func:`h5_output` raises it once HDF5 has let go of the file."""

    def __init__(self, path: Path):
        self.file = open(path, "w+b")  # noqa: SIM115 - closed by h5_output
        self.error: OSError | None = None

    def _guard(self, fn, *args, default=None):
        if self.error is None:
            try:
                return fn(*args)
            except OSError as e:
                self.error = e
        return default

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        self._guard(self.file.write, data)
        return n

    def readinto(self, buffer) -> int:
        return self.file.readinto(buffer)

    def read(self, size: int = -1) -> bytes:
        return self.file.read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.file.seek(offset, whence)

    def tell(self) -> int:
        return self.file.tell()

    def truncate(self, size: int | None = None) -> int:
        return self._guard(self.file.truncate, size, default=size)

    def flush(self) -> None:
        self._guard(self.file.flush)

    def close(self) -> None:
        self._guard(self.file.close)
        self.file.close()


@contextlib.contextmanager
def h5_output(tmp: str | os.PathLike):
    """An HDF5 file open for writing at ``tmp`` (the path :func:`atomic_output` gives),
    whose failed writes (a full disk) raise OSError after HDF5 has closed it, instead
    of crashing HDF5: ``with atomic_output(out) as tmp, h5_output(tmp) as h5: ...``."""
    import h5py

    guard = _WriteGuard(Path(tmp))
    try:
        with h5py.File(guard, "w") as h5:
            yield h5
    except Exception:
        guard.close()
        if guard.error is not None:  # the cause of whatever HDF5 made of it
            raise guard.error from None
        raise
    guard.close()
    if guard.error is not None:
        raise guard.error


def open_h5(path: str | os.PathLike, what: str, opener=None):
    """An HDF5 file open for reading (``opener``: h5py.File or a subclass); one line
    naming ``path`` where it is missing, a folder or not HDF5 (``what``: the file kind,
    e.g. "pair file")."""
    import h5py

    path = Path(path)
    try:
        return (opener or h5py.File)(path, "r")
    except FileNotFoundError:
        raise SfmpairsError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise SfmpairsError(f"{path}: is a folder, not a {what}") from None
    except OSError as e:
        raise SfmpairsError(f"{path}: not an HDF5 file ({one_line(e)})") from None


# What h5py raises reading a corrupt HDF5 file (a bad signature, an address past the end,
# a string that is not UTF-8, a message HDF5 does not know...).
H5_READ_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError, IndexError)


def one_line(e: BaseException, limit: int = 200) -> str:
    """An exception's message on one short line."""
    text = " ".join(str(e).split()).strip("'\"") or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def h5_errors(path, kind: str):
    """Reading an HDF5 file: whatever h5py raises on a corrupt or incomplete file becomes
    one line naming it, ``PATH: corrupt or incomplete KIND (h5py's message)``."""
    try:
        yield
    except SfmpairsError:
        raise
    except FileNotFoundError:
        raise SfmpairsError(f"{path}: no such file") from None
    except H5_READ_ERRORS as e:
        raise SfmpairsError(f"{path}: corrupt or incomplete {kind} ({one_line(e)})") from None


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def provenance_attrs(schema: str, schema_version: int, parameters: dict, inputs: list | dict) -> dict:
    """The attributes every file the tool writes carries: how it was made."""
    from . import __version__

    return {
        "schema": schema,
        "schema_version": schema_version,
        "tool": "sfmpairs",
        "tool_version": __version__,
        "created": now_iso(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "parameters": json.dumps(parameters, sort_keys=True, default=str),
        "inputs": json.dumps(inputs, sort_keys=True, default=str),
    }


def check_schema(attrs, path, schema: str, version: int, kind: str, hint: str = "") -> None:
    """The one check every reader makes of a file's ``schema`` and ``schema_version``
    attributes (stamped by :func:`provenance_attrs`): the right kind of file, and a
    version this sfmpairs reads (1 to ``version``). ``kind`` names the file in the
    message ("a pair file"), ``hint`` says what writes it."""
    from . import __version__

    found = attrs.get("schema")
    if found != schema:
        raise SfmpairsError(f"{path}: not {kind} (schema {found!r}, expected {schema!r}){hint}")
    found_version = attrs.get("schema_version")
    if not isinstance(found_version, (int, np.integer)) or not 1 <= found_version <= version:
        raise SfmpairsError(
            f"{path}: {kind} of schema version {found_version}; sfmpairs {__version__} reads versions 1 to {version}"
        )


def progress(iterable=None, *, total=None, desc: str = "", unit: str = "it", **kwargs):
    """A tqdm progress bar on stderr, shown unless logging is quiet or stderr is no tty;
    where it is not shown, the iterable itself (no tqdm set-up)."""
    disable = not logger.isEnabledFor(logging.INFO) or not sys.stderr.isatty()
    if disable and iterable is not None:
        return iterable
    from tqdm import tqdm

    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, leave=False, dynamic_ncols=True, **kwargs)
