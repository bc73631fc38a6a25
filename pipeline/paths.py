"""Names read from files (pair files, stores, manifests) that become paths.

Such names come from files a user may have received from elsewhere; joined to an output
folder, ``../x`` or ``/x`` would write outside it, and joined to a photo folder they
would read outside it. Every command checks them with :func:`check_relative_names`
before it builds a path from them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path, PurePosixPath, PureWindowsPath

from .common import SfmpairsError


def unsafe_name(name: str) -> bool:
    """Whether ``name`` is not a plain relative path that stays below its folder: empty,
    absolute (POSIX or Windows, drive or UNC), or with a ``..`` component (either slash)."""
    if not name or "\0" in name:
        return True
    if ".." not in name and ":" not in name and name[0] not in "/\\":
        return False  # the common case, quickly
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or windows.root:
        return True
    return ".." in posix.parts or ".." in windows.parts


def check_relative_names(names, source, what: str = "image name") -> None:
    """Refuse, in one line naming ``source`` (the file the names came from) and the
    first offending name, any name that :func:`unsafe_name` finds unsafe."""
    for name in names:
        if unsafe_name(str(name)):
            raise SfmpairsError(
                f"{source}: {what} {str(name)!r} is not a relative path below its folder (absolute or with '..')"
            )


def place_photo(src: Path, dst: Path, copy: bool = False) -> None:
    """Link (or copy) the photo ``src`` to ``dst``, making ``dst``'s folder: a link to
    ``src``'s resolved path (a relative one would dangle); one line if ``src`` is missing."""
    if not src.is_file():
        raise SfmpairsError(f"{src}: image not found (give --images-root)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    (shutil.copyfile if copy else os.symlink)(src.resolve(), dst)
