"""The configurations of the input stages (``sfmpairs ingest``, ``reconstruct``): plain
data, so that the command line shows them quickly. Each default is written here once.
"""

from __future__ import annotations

from dataclasses import dataclass

from sfmpairs.common import SfmpairsError
from sfmpairs.config import setting

CLUSTER_BY = ("model", "scene")
READERS = ("auto", "pycolmap")
MATCHERS = ("exhaustive", "sequential", "vocab-tree")


@dataclass(frozen=True)
class IngestConf:
    cluster_by: str = setting(
        "model", "One cluster per model, or one per scene (scene/sparse/N share one).", choices=CLUSTER_BY
    )
    reader: str = setting("auto", "auto: the fast readers; pycolmap: the slower reference reader.", choices=READERS)

    def check(self) -> None:
        if self.cluster_by not in CLUSTER_BY:
            raise SfmpairsError(f"unknown --cluster-by {self.cluster_by!r} (choose {' or '.join(CLUSTER_BY)})")
        if self.reader not in READERS:
            raise SfmpairsError(f"unknown reader {self.reader!r} (choose from {', '.join(READERS)})")


@dataclass(frozen=True)
class ReconstructConf:
    matcher: str = setting(
        "exhaustive",
        "exhaustive: every pair (small sets); sequential: video frames; vocab-tree: large sets.",
        choices=MATCHERS,
    )
    camera_model: str = setting("SIMPLE_RADIAL", "COLMAP camera model.")
    single_camera: bool = setting(False, "All photos share one camera.")
    max_image_size: int = setting(1600, "Longer side for feature extraction.")
    overlap: int = setting(10, "sequential: neighbours matched.")
    device: str = setting("auto", "auto, cpu or cuda (where pycolmap has it).")
