"""The mining stage's configuration (``sfmpairs mine``), and the names of its rules:
plain data, so that the command line shows them quickly. Each default is written here
once; :func:`sfmpairs.mining.mine.mine` merges the caller's settings into it and records
it in the pair file.
"""

from __future__ import annotations

from dataclasses import dataclass

from sfmpairs.common import SfmpairsError
from sfmpairs.config import check_choices, setting

STRATEGIES = ("relaxed", "max-inliers", "mac")  # how the positive is picked from the pool M(q)
SCALE_MEASURES = ("depth", "bbox")  # how the scale change between two images is measured
EXPORT_FORMATS = ("cirtorch", "hloc", "csv", "megadepth")  # sfmpairs export --format


@dataclass(frozen=True)
class MineConf:
    strategy: str = setting("relaxed", "How the positive is picked from the pool M(q).", choices=STRATEGIES)
    pool_size: int = setting(100, "k, the images in M(q): nearest camera centres in q's model.", short="-k")
    min_inlier_ratio: float = setting(0.2, "relaxed: co-observed points / points of q, at least.")
    max_scale_change: float = setting(1.5, "relaxed: scale change, at most (1: same scale).")
    scale_measure: str = setting(
        "depth",
        "depth: median ratio of apparent point sizes; bbox: ratio of the co-observed points' bounding boxes.",
        choices=SCALE_MEASURES,
    )
    min_co_observed: int = setting(1, "A positive shares at least this many 3D points with q.")
    queries_per_cluster: int | None = setting(
        None,
        "Queries drawn per cluster (0: every eligible image).",
        default_text="the paper's: a tenth of a cluster of up to 300 images, 30 for larger ones",
    )
    val_fraction: float = setting(0.2, "Fraction of clusters in the val split.")
    val_clusters: tuple[str, ...] | None = setting(
        None, "Comma-separated cluster names for the val split (instead of --val-fraction)."
    )
    negatives: int = setting(5, "Hard negatives per query (with --descriptors), at most one per cluster.")
    seed: int = setting(0, "Random seed.")

    def check(self) -> None:
        """Refuse settings outside their range, naming the option."""
        check_choices(self)
        checks = [
            (self.pool_size >= 1, "--pool-size must be at least 1"),
            (0 <= self.min_inlier_ratio <= 1, "--min-inlier-ratio must be in [0, 1]"),
            (self.max_scale_change >= 1, "--max-scale-change must be at least 1"),
            (self.min_co_observed >= 1, "--min-co-observed must be at least 1"),
            (
                self.queries_per_cluster is None or self.queries_per_cluster >= 0,
                "--queries-per-cluster must be 0 (all) or more",
            ),
            (0 <= self.val_fraction < 1, "--val-fraction must be in [0, 1)"),
            (self.negatives >= 0, "--negatives must be 0 or more"),
        ]
        for ok, message in checks:
            if not ok:
                raise SfmpairsError(message)


def parse_overlaps(text: str) -> tuple[float, ...]:
    """ "0.1,0.3,0.5,0.7" -> (0.1, 0.3, 0.5, 0.7)."""
    try:
        return tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise SfmpairsError("give comma-separated numbers") from None


@dataclass(frozen=True)
class ExportConf:
    copy: bool = setting(False, "cirtorch, megadepth: copy the photos instead of linking them.")
    all_passing: bool = setting(
        False, "hloc: every passing pool pair, not only query-positive; cirtorch: so too for its whitening pairs."
    )
    per_model: bool = setting(
        False,
        "hloc: -o is a folder of one pairs file per model, names as the COLMAP model has them (mapping, localisation).",
    )
    neg_num: int = setting(
        5,
        "cirtorch: the --neg-num its train.py will run with (its default: 5); a split with "
        "fewer clusters than it + 1 is warned of.",
    )
    strict: bool = setting(False, "cirtorch: refuse a split with fewer clusters than --neg-num + 1 instead of warning.")
    loftr_overlaps: tuple[float, ...] = setting(
        (0.1, 0.3, 0.5, 0.7),
        "megadepth: overlap bin edges of LoFTR's index files (one file per bin and scene); the scene "
        "files' pair_infos hold the pairs from the first edge to the last.",
        parse=parse_overlaps,
    )
    d2net_points: bool = setting(
        True,
        "megadepth: write D2-Net's per-image point tables (points3D_id_to_2D, points3D_id_to_ndepth; "
        "its training reads them, LoFTR does not; about 0.5 KB per observation in memory).",
    )

    def check(self) -> None:
        """Refuse settings outside their range, naming the option."""
        edges = self.loftr_overlaps
        if len(edges) < 2 or any(not 0 <= e <= 1 for e in edges) or list(edges) != sorted(set(edges)):
            raise SfmpairsError("--loftr-overlaps must be two or more increasing values in [0, 1]")
