"""The decorator of sfmpairs' few compiled loops (numba): see docs/architecture.md."""

from __future__ import annotations

import numba


def compiled(fn):
    """``fn`` compiled with numba, releasing Python's lock while it runs, and cached on
    disk (beside its module, or in the user's cache folder) so that later processes
    load it in a fraction of a second. Where numba finds no folder it may write (a
    read-only install with an unwritable home, as in some containers), compiled anew
    in each process rather than failing at import."""
    try:
        return numba.njit(nogil=True, cache=True)(fn)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return numba.njit(nogil=True)(fn)
