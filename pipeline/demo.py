"""``sfmpairs demo``: the pipeline end to end on data it makes itself, in a minute.

Today it covers the stages that exist (synthetic COLMAP models -> ingest -> mine ->
info); each new stage joins it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .common import SfmpairsError

logger = logging.getLogger("sfmpairs.demo")


def make_models(folder: Path, seed: int = 0, scenes: int = 4, images: int = 40,
                points: int = 2000) -> list[Path]:
    """Random COLMAP models, one per scene, at ``folder/scene_K/sparse/0``."""
    from .sfm_io.synthetic import random_reconstruction, write_model

    paths = []
    for k in range(scenes):
        rec = random_reconstruction(images, points, track_length=6, seed=seed * 1000 + k,
                                    camera_models=("SIMPLE_RADIAL", "PINHOLE"))
        path = folder / f"scene_{k:02d}" / "sparse" / "0"
        write_model(rec, path)
        paths.append(path)
    return paths


def run_demo(workdir: str | Path, seed: int = 0, overwrite: bool = False) -> dict:
    from .info import summary
    from .mining.mine import mine
    from .sfm_io.ingest import ingest

    workdir = Path(workdir)
    store, pairs = workdir / "sfm.h5", workdir / "pairs.h5"
    for out in (store, pairs):
        if out.exists() and not overwrite:
            raise SfmpairsError(f"{out}: output exists; pass --overwrite to replace it")
    colmap = workdir / "colmap"
    logger.info("1. writing synthetic COLMAP models to %s", colmap)
    make_models(colmap, seed=seed)
    logger.info("2. ingest: %s -> %s", colmap, store)
    result = ingest([colmap], store, overwrite=overwrite)
    logger.info("3. mine (relaxed): %s -> %s", store, pairs)
    result.update(mine(store, pairs, strategy="relaxed", seed=seed, val_fraction=0.25,
                       overwrite=overwrite))
    print(summary(store))
    print()
    print(summary(pairs))
    print(f"\nOutputs: COLMAP models in {colmap}, SfM store {store}, pairs {pairs}")
    return result
