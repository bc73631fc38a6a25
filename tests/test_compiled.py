"""sfmpairs.compiled: numba's disk cache where it can write one, compiled in each
process where it cannot (a read-only install with an unwritable home)."""

from __future__ import annotations

from types import SimpleNamespace

import numba
import numpy as np


def _total(a):
    s = 0.0
    for x in a:
        s += x
    return s


def test_compiled_without_a_cache_folder(monkeypatch):
    """numba refuses ``cache=True`` at decoration when it finds no folder to write
    (RuntimeError: no locator available): the function is compiled without a cache
    rather than the module failing to import."""
    from sfmpairs import compiled as module

    real, asked = numba.njit, []

    def njit(**options):
        asked.append(options)
        if options.get("cache"):
            raise RuntimeError("cannot cache function '_total': no locator available for file '...'")
        return real(**options)

    monkeypatch.setattr(module, "numba", SimpleNamespace(njit=njit))
    total = module.compiled(_total)
    assert total(np.arange(5.0)) == 10.0
    assert asked == [{"nogil": True, "cache": True}, {"nogil": True}]


def test_compiled_is_cached_and_releases_the_lock():
    from sfmpairs.compiled import compiled

    total = compiled(_total)
    assert total(np.arange(4.0)) == 6.0
    assert total.targetoptions["nogil"] and total._cache.__class__.__name__ == "FunctionCache"
