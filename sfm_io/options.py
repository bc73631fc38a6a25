"""The configurations of the input stages (``sfmpairs ingest``, ``reconstruct``): plain
data, so that the command line shows them quickly. Each default is written here once.
"""

from __future__ import annotations

from dataclasses import dataclass

from sfmpairs.common import SfmpairsError
from sfmpairs.config import check_choices, setting

CLUSTER_BY = ("model", "scene")
READERS = ("auto", "pycolmap")
MATCHERS = ("exhaustive", "sequential", "vocab-tree", "retrieval")
DESCRIPTORS = ("auto", "bow", "network")
SHARED_NAMES = ("refuse", "largest")


@dataclass(frozen=True)
class IngestConf:
    cluster_by: str = setting(
        "model", "One cluster per model, or one per scene (scene/sparse/N share one).", choices=CLUSTER_BY
    )
    reader: str = setting("auto", "auto: the fast readers; pycolmap: the slower reference reader.", choices=READERS)
    shared_names: str = setting(
        "refuse",
        "A photo in several models: refuse (an error naming it), or largest: keep it in the model with the most "
        "photos only (the first given on a tie), dropping it and the 3D points left with fewer than 2 photos from "
        "the others.",
        choices=SHARED_NAMES,
    )

    def check(self) -> None:
        check_choices(self)


@dataclass(frozen=True)
class ReconstructConf:
    matcher: str = setting(
        "exhaustive",
        "exhaustive: every pair (up to a few hundred photos); sequential: video frames; vocab-tree: with COLMAP's "
        "vocabulary tree file; retrieval: each photo with its most similar photos by global descriptors.",
        choices=MATCHERS,
    )
    camera_model: str = setting("SIMPLE_RADIAL", "COLMAP camera model.")
    single_camera: bool = setting(False, "All photos share one camera.")
    max_image_size: int = setting(1600, "Longer side for feature extraction.")
    overlap: int = setting(10, "sequential: neighbours matched.")
    num_neighbours: int = setting(20, "retrieval: most similar photos matched with each photo.")
    sequential: int = setting(
        0, "retrieval: also match each photo with the next N in name order (photos taken in order, e.g. video)."
    )
    expand: int = setting(
        1,
        "retrieval: rounds of also matching photos that share a verified neighbour (at most --num-neighbours new "
        "pairs per photo a round; 0: the retrieved pairs only).",
    )
    descriptor: str = setting(
        "auto",
        "retrieval: the global descriptors: bow, a bag of visual words over the photos' SIFT features (as the "
        "paper; needs no weights); network, an sfmpairs --checkpoint or else resnet18 + GeM off the shelf with "
        "random weights; auto: network where --checkpoint is given, else bow.",
        choices=DESCRIPTORS,
    )
    vocabulary: int = setting(
        256,
        "retrieval, bow: branching of the two-level vocabulary tree, at most (words: up to its square; fewer for "
        "a small collection, about 20 SIFT descriptors a word).",
    )
    seed: int = setting(
        0,
        "Seed of COLMAP's random choices (the geometric check's RANSAC, the mapper's) and, with retrieval and bow, "
        "of the vocabulary's k-means. Runs are then much alike, not always identical: COLMAP's threads number the "
        "photos in the order they finish, and its mapper on several threads does not always give the same result.",
    )
    checkpoint: str | None = setting(
        None,
        "retrieval: sfmpairs checkpoint for the global descriptors.",
        default_text="none: --descriptor auto takes the bag of words",
        metavar="FILE",
    )
    retrieval_image_size: int = setting(256, "retrieval: longer side of the photos the global descriptors see.")
    min_model_size: int = setting(
        10,
        "Models with fewer registered photos (after each photo is kept in its largest model only) are dropped, "
        "and said so in the log and reconstruct.json (COLMAP's mapper itself keeps every model it makes).",
    )
    device: str = setting("auto", "auto, cpu or cuda (where pycolmap has it).", choices=("auto", "cpu", "cuda"))

    def check(self) -> None:
        for ok, message in (
            (self.overlap >= 1, "--overlap must be at least 1"),
            (self.num_neighbours >= 1, "--num-neighbours must be at least 1"),
            (self.sequential >= 0, "--sequential must be 0 or more"),
            (self.expand >= 0, "--expand must be 0 or more"),
            (self.retrieval_image_size >= 32, "--retrieval-image-size must be at least 32"),
            (self.vocabulary >= 2, "--vocabulary must be at least 2"),
            (self.seed >= 0, "--seed must be 0 or more"),
            (not (self.descriptor == "bow" and self.checkpoint), "--checkpoint is for --descriptor network"),
            (self.min_model_size >= 1, "--min-model-size must be at least 1"),
            (self.max_image_size >= 32, "--max-image-size must be at least 32"),
        ):
            if not ok:
                raise SfmpairsError(message)
