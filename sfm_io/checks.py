"""The checks every COLMAP reader makes of a model's values: one line naming the file
and the problem (:class:`~sfmpairs.common.SfmpairsError`)."""

from __future__ import annotations

import numpy as np

from sfmpairs.common import SfmpairsError


def check_unique(ids: np.ndarray, what: str, where: str) -> None:
    s = np.sort(ids)
    dup = s[1:][s[1:] == s[:-1]]
    if len(dup):
        raise SfmpairsError(f"{where}: {what} id {int(dup[0])} appears twice")


def check_finite(a: np.ndarray, what: str, where: str) -> None:
    if not np.all(np.isfinite(a)):
        raise SfmpairsError(f"{where}: non-finite {what}")


def check_pose_quaternions(qvec: np.ndarray, where: str) -> None:
    check_finite(qvec, "image pose", where)
    with np.errstate(over="ignore", invalid="ignore"):
        norms = np.linalg.norm(qvec, axis=1)
    bad = np.flatnonzero(np.abs(norms - 1.0) > 1e-3)
    if len(bad):
        raise SfmpairsError(
            f"{where}: pose quaternion of image row {int(bad[0])} is not of unit length (norm {norms[bad[0]]:.6g})"
        )
