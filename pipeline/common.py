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


def check_output_path(path: str | os.PathLike, overwrite: bool, inputs=()) -> Path:
    """Refuse to overwrite a user's file unless asked, or to write over one of the
    command's ``inputs``; make sure the folder exists."""
    path = Path(path)
    with _cannot_write(path):
        return _check_output_path(path, overwrite, inputs)


@contextlib.contextmanager
def _cannot_write(path: Path):
    """What the checks of an output path meet from the file system (a name too long
    for it, a folder that cannot be searched): one line naming ``path``."""
    try:
        yield
    except OSError as e:
        raise SfmpairsError(f"{path}: cannot write ({e.strerror or e})") from None


def _check_output_path(path: Path, overwrite: bool, inputs) -> Path:
    check_not_input(path, inputs)
    if (path.exists() or path.is_symlink()) and not overwrite:  # a dangling link too
        raise SfmpairsError(f"{path}: output exists; pass --overwrite to replace it")
    if path.is_dir():
        raise SfmpairsError(f"{path}: output is a directory")
    parent = path.parent if str(path.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise SfmpairsError(f"{parent}: is a file, not a folder (the output's folder)")
    if not parent.is_dir():
        raise SfmpairsError(f"{parent}: output folder does not exist")
    return path


def check_not_input(output: str | os.PathLike, inputs) -> None:
    """Refuse an ``output`` that is one of ``inputs`` (the same file under any name, e.g.
    ``mine sfm.h5 -o sfm.h5 --overwrite``): writing it would destroy what is read."""
    if not os.path.exists(output):
        return
    for given in inputs:
        with contextlib.suppress(OSError, ValueError, TypeError):
            if given is not None and os.path.samefile(output, given):
                raise SfmpairsError(f"{output}: output is the input {given}; write it elsewhere")


# Errors of writing that mean the disk (or the user's quota, or a file-size limit) is
# full or the folder cannot be written: one line, not a traceback.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EIO}
# The same errors as h5py and torch.save report them (RuntimeError or OSError with
# HDF5's or PyTorch's own text).
_WRITE_MESSAGES = {  # text in a library's error -> the reason given (None: the text itself)
    "file write failed": None,
    "No space left on device": None,
    "File too large": None,
    "Disk quota exceeded": None,
    "unable to extend file": None,
    # torch.save, whose writer does not say why a write came up short
    "unexpected pos": "a write came up short: a full disk, a quota or a file-size limit?",
}


def write_failure(e: BaseException) -> str | None:
    """What went wrong, if ``e`` is a failure to write a file (a full disk, a
    file-size limit, a read-only or failing disk); None for anything else."""
    if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
        return e.strerror or os.strerror(e.errno)
    if isinstance(e, (OSError, RuntimeError)):
        text = str(e)
        for m, reason in _WRITE_MESSAGES.items():
            if m in text:
                code = re.search(r"errno = (\d+)", text)
                return os.strerror(int(code.group(1))) if code else reason or m
    return None


# The longest PID (Linux's PID_MAX_LIMIT, 4194304) and what mkstemp adds after the prefix
_PID_DIGITS = 7
_TEMP_TAIL = ".XXXXXXXX.tmp"


def _name_max(folder: Path) -> int:
    """The longest file name, in bytes, that ``folder``'s file system takes (255 where
    it cannot be asked)."""
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, TypeError):
        return 255


def _temp_prefix(path: Path, where: Path | None = None) -> str:
    """The temporary files of ``path`` are ``.NAME.HOST-PID.XXXXXXXX.tmp``: unique per
    process, and those of a run that died (same host, no such process) are known.
    Where that would pass the longest file name of ``where`` (default: ``path``'s
    folder), NAME is cut and ends with ``~`` and 8 hex digits of its hash (the same for
    every run writing ``path``, so that leftovers are still found)."""
    host = socket.gethostname()
    name = path.name
    room = _name_max(where or path.parent) - len(os.fsencode(f"..{host}-")) - _PID_DIGITS - len(_TEMP_TAIL)
    if len(os.fsencode(name)) > room:
        tag = "~" + hashlib.sha256(os.fsencode(name)).hexdigest()[:8]
        while name and len(os.fsencode(name + tag)) > room:  # whole characters: UTF-8 stays UTF-8
            name = name[:-1]
        name += tag
    return f".{name}.{host}-"


def _remove_stale_temps(path: Path, where: Path | None = None) -> None:
    """Remove the temporary files (or scratch folders, :func:`atomic_folder`) that
    killed runs left for ``path`` on this host, in ``where`` (default: its folder)."""
    prefix = _temp_prefix(path, where)
    for tmp in (where or path.parent).glob(glob.escape(prefix) + "*.tmp"):
        pid = tmp.name[len(prefix) :].split(".", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
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
def atomic_output(path: str | os.PathLike, overwrite: bool = False, inputs=()) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it to ``path`` on success.

    On any exception the temporary file is removed, so a failed run leaves no partial
    output behind; a failure to write (a full disk, a file-size limit) becomes one line
    naming ``path``. Two runs writing ``path`` at once: each writes its own temporary
    file and, without ``overwrite``, the second to finish fails (the file is one run's
    whole output, never a mix). Temporary files of killed runs are removed. ``path`` is
    never one of ``inputs`` (:func:`check_not_input`).
    """
    path = check_output_path(path, overwrite, inputs)
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


# What the folder outputs of sfmpairs hold (synth, reconstruct, export): with
# --overwrite, a folder is replaced only if it is empty or holds one of these, never a
# folder of the user's (their photos, their project).
FOLDER_MARKERS = ("world.json", "reconstruct.json", "export.json")


def _real_path(target: Path) -> Path:
    """``target`` absolute with the links of its folders resolved, but not a link at
    ``target`` itself (replacing a link replaces the link, not what it points to)."""
    if target.name in ("", ".."):
        return target.resolve()
    return target.parent.resolve() / target.name


def _refuse_holding(target: Path, real: Path, inputs) -> None:
    """Replacing the folder ``target`` (at ``real``) must not delete the current folder
    or one of ``inputs``: refused if it is, or holds, one of them."""
    held = [(Path.cwd(), "the current folder")] + [(Path(i).resolve(), f"the input {i}") for i in inputs if i]
    for path, what in held:
        if path == real or real in path.parents:
            raise SfmpairsError(f"{target}: output folder holds {what}; write the output elsewhere")


def check_folder_output(target: str | os.PathLike, overwrite: bool, inputs=()) -> Path:
    """The folder output ``target`` may be replaced: it is not, nor holds, the current
    folder or one of ``inputs``; without ``overwrite`` it is absent or an empty folder;
    with it, also a folder an earlier run wrote (:data:`FOLDER_MARKERS`), a file or a
    link. Otherwise one line naming ``target`` and why. Returns its real path."""
    target = Path(target)
    with _cannot_write(target):
        return _check_folder_output(target, overwrite, inputs)


def _check_folder_output(target: Path, overwrite: bool, inputs) -> Path:
    real = _real_path(target)
    if real.is_dir() and not real.is_symlink():
        _refuse_holding(target, real, inputs)
        if next(real.iterdir(), None) is None:
            return real  # empty
        if not overwrite:
            raise SfmpairsError(f"{target}: folder exists and is not empty; pass --overwrite")
        if not any((real / m).is_file() for m in FOLDER_MARKERS):
            raise SfmpairsError(
                f"{target}: folder is not an sfmpairs output (no {', '.join(FOLDER_MARKERS)}); "
                "--overwrite replaces only those: remove it yourself or choose another folder"
            )
    elif (real.exists() or real.is_symlink()) and not overwrite:
        raise SfmpairsError(f"{target}: output exists; pass --overwrite to replace it")
    return real


def _publish_folder(new: Path, real: Path, target: Path, overwrite: bool, aside: Path) -> None:
    """Move the finished folder ``new`` to ``real``. With ``overwrite``, what is there
    (the old output, checked replaceable) is first moved ``aside`` (into the scratch
    folder, deleted with it) and put back if ``new`` cannot be moved in: an interrupted
    --overwrite keeps the old output or the new, never neither. Without it the rename
    replaces at most an empty folder: it fails on what another run published meanwhile."""
    if overwrite and (real.exists() or real.is_symlink()):
        os.rename(real, aside)
        try:
            os.rename(new, real)
        except BaseException:
            os.rename(aside, real)
            raise
        return
    try:
        os.rename(new, real)
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise
        raise SfmpairsError(
            f"{target}: output exists (written meanwhile by another run); pass --overwrite to replace it"
        ) from None


@contextlib.contextmanager
def atomic_folder(
    target: str | os.PathLike, overwrite: bool = False, scratch_in: Path | None = None, inputs=()
) -> Iterator[Path]:
    """Yield a fresh path (not yet made) to build a folder output in; it replaces
    ``target`` at the end, or vanishes on error, so a failed run leaves ``target`` as it
    was; a failure to write (a full disk) is one line naming ``target``.

    ``target`` is never the current folder or a folder holding it or one of ``inputs``
    (the paths the command reads); with ``overwrite`` it may be a folder an earlier run
    wrote (it holds one of :data:`FOLDER_MARKERS`), without it only an empty one
    (:func:`check_folder_output`). The scratch folder, ``.NAME.HOST-PID.XXXXXXXX.tmp``
    as :func:`atomic_output` names its files, is made in ``scratch_in`` (default:
    ``target``'s folder); those of killed runs are removed. Without ``overwrite``, an
    output that another run publishes meanwhile is not replaced (one line)."""
    target = Path(target)
    real = check_folder_output(target, overwrite, inputs)
    scratch_in = Path(scratch_in) if scratch_in is not None else real.parent
    scratch, made = None, not scratch_in.exists()
    try:
        scratch_in.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(real, scratch_in)
        prefix = f"{_temp_prefix(real, scratch_in)}{os.getpid()}."
        scratch = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=scratch_in))
        yield scratch / "out"
        real.parent.mkdir(parents=True, exist_ok=True)
        if overwrite:  # what is there now, perhaps not what was there at the start
            check_folder_output(target, overwrite, inputs)
        _publish_folder(scratch / "out", real, target, overwrite, scratch / "old")
    except OSError as e:
        raise SfmpairsError(
            f"{target}: cannot write ({write_failure(e) or e.strerror or e}); nothing written"
        ) from None
    finally:
        if scratch is not None:  # with the old output, once replaced
            shutil.rmtree(scratch, ignore_errors=True)
        if made and not real.exists():  # the folder made for the scratch, left empty by a failure
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
        h5 = (opener or h5py.File)(path, "r")
    except FileNotFoundError:
        raise SfmpairsError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise SfmpairsError(f"{path}: is a folder, not a {what}") from None
    except OSError as e:
        if "signature not found" in str(e):  # HDF5's words for "not HDF5 at all"
            raise SfmpairsError(f"{path}: not an HDF5 file (expected: {what})") from None
        raise SfmpairsError(f"{path}: not an HDF5 file ({one_line(e)})") from None
    try:
        with h5_errors(path, what):
            check_self_contained(h5, path)
    except SfmpairsError:
        h5.close()
        raise
    return h5


def check_self_contained(h5, path) -> None:
    """Refuse an HDF5 file that reads other files: an external link, a dataset whose
    data is kept in another file (external storage) or a virtual dataset. Crafted, they
    read any file of the machine into the output, or block for ever on a FIFO. Only the
    links and the datasets' headers are read, not their data."""
    import h5py

    failed = []

    def other_file(name, link):  # returning a value stops the visit
        try:
            if isinstance(link, h5py.ExternalLink):
                return name, link.filename
            if isinstance(link, h5py.HardLink) and isinstance(obj := h5[name], h5py.Dataset):
                if obj.external:
                    return name, obj.external[0][0]
                if obj.is_virtual:
                    return name, obj.virtual_sources()[0].file_name
        except H5_READ_ERRORS as e:  # raised here, inside HDF5's visit, it would become a SystemError
            failed.append(e)
            return "corrupt"
        return None

    try:
        found = h5.visititems_links(other_file)
    except SystemError:  # corrupt metadata, met by HDF5's own walk of the links
        raise OSError("its groups and links cannot be walked") from None
    if failed:
        raise failed[0]
    if found is not None:
        raise SfmpairsError(
            f"{path}: {found[0]} reads another file ({found[1]}); sfmpairs reads self-contained files only"
        )


# What h5py raises reading a corrupt HDF5 file (a bad signature, an address past the end,
# a string that is not UTF-8, a message HDF5 does not know...; AttributeError: a table that
# is a group or a named datatype, not a dataset, has no ``asstr``, ``shape``...).
H5_READ_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError)


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
    except MemoryError:  # a dataset declared huge: a few bytes of a crafted file
        raise SfmpairsError(f"{path}: corrupt or crafted {kind} (declares a dataset too large to read)") from None
    except H5_READ_ERRORS as e:
        raise SfmpairsError(f"{path}: corrupt or incomplete {kind} ({one_line(e)})") from None


def threads_by_size(sizes) -> list[int | None]:
    """The threads of each item of work that runs beside others (ingest's models read
    ahead, mine's models pooled at once): one for an item of at most half the largest's
    size, since it shares the cores with the others; None (a few, the callee's choice)
    for a larger one, which runs mostly alone."""
    sizes = [int(x) for x in sizes]
    alone = max(sizes, default=0) // 2
    return [None if x > alone else 1 for x in sizes]


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
