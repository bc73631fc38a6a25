"""Helpers shared by every stage: errors, atomic output files, provenance, progress."""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
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


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it over ``path`` on success.

    On any exception the temporary file is removed, so a failed run leaves no partial
    output behind.
    """
    path = check_output_path(path, overwrite)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
    tmp = Path(tmp)
    try:
        yield tmp
        if path.exists() and not overwrite:  # appeared while we worked
            raise SfmpairsError(f"{path}: output exists; pass --overwrite to replace it")
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


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
