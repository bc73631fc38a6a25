"""Names read from files (pair files, stores, manifests) that become paths.

Such names come from files a user may have received from elsewhere; joined to an output
folder, ``../x`` or ``/x`` would write outside it, and joined to a photo folder they
would read outside it. Every command checks them with :func:`check_relative_names`
before it builds a path from them.
"""

from __future__ import annotations

from pathlib import PurePosixPath, PureWindowsPath

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
