"""``sfmpairs reconstruct``: COLMAP models from a folder of photos, with pycolmap.

SIFT features (GPU where pycolmap has CUDA), exhaustive, sequential or vocabulary-tree
matching, incremental mapping. Writes ``OUTPUT/database.db``, the models at
``OUTPUT/sparse/0 .. N`` and a link ``OUTPUT/images`` to the photos, so that
``sfmpairs ingest OUTPUT`` reads them (every separate model becomes a cluster, or one
per scene with ``--cluster-by scene``).

Realistic sizes on 2 CPU cores, photos at most 1600 px: 10 to 50 photos take seconds to
a few minutes with exhaustive matching (which grows with the square of the number of
photos); use ``sequential`` for video frames and ``vocab-tree`` beyond a few hundred.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from sfmpairs.common import SfmpairsError
from sfmpairs.config import make_conf

from .options import MATCHERS, ReconstructConf

logger = logging.getLogger("sfmpairs.reconstruct")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".ppm", ".pgm"}


def list_photos(images_dir: Path) -> list[Path]:
    """The photos under ``images_dir`` (at least two)."""
    if not images_dir.is_dir():
        raise SfmpairsError(f"{images_dir}: not a folder of photos")
    photos = [p for p in images_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES]
    if len(photos) < 2:
        raise SfmpairsError(f"{images_dir}: needs at least two photos, found {len(photos)}")
    return photos


def check_settings(conf: ReconstructConf, vocab_tree) -> None:
    from .model import camera_model_ids

    if conf.matcher not in MATCHERS:
        raise SfmpairsError(f"unknown matcher {conf.matcher!r} (choose {', '.join(MATCHERS)})")
    if conf.camera_model not in camera_model_ids():
        raise SfmpairsError(f"unknown camera model {conf.camera_model!r}")
    if conf.matcher == "vocab-tree" and (vocab_tree is None or not Path(vocab_tree).is_file()):
        raise SfmpairsError(
            f"{vocab_tree or '--vocab-tree'}: the vocab-tree matcher needs a vocabulary "
            f"tree file (COLMAP's, e.g. vocab_tree_flickr100K_words32K.bin)"
        )


def extract_features(db: Path, images_dir: Path, conf: ReconstructConf, device) -> None:
    """SIFT features of every photo into the database."""
    import pycolmap

    reader = pycolmap.ImageReaderOptions()
    reader.camera_model = conf.camera_model
    extraction = pycolmap.FeatureExtractionOptions()
    extraction.max_image_size = conf.max_image_size
    mode = pycolmap.CameraMode.SINGLE if conf.single_camera else pycolmap.CameraMode.AUTO
    pycolmap.extract_features(
        db, images_dir, camera_mode=mode, reader_options=reader, extraction_options=extraction, device=device
    )


def match_features(db: Path, conf: ReconstructConf, vocab_tree, device) -> None:
    """Matches and two-view geometries of the pairs the matcher proposes."""
    import pycolmap

    if conf.matcher == "exhaustive":
        pycolmap.match_exhaustive(db, device=device)
    elif conf.matcher == "sequential":
        pairing = pycolmap.SequentialPairingOptions()
        pairing.overlap = conf.overlap
        pycolmap.match_sequential(db, pairing_options=pairing, device=device)
    else:
        pairing = pycolmap.VocabTreePairingOptions()
        pairing.vocab_tree_path = str(vocab_tree)
        pycolmap.match_vocabtree(db, pairing_options=pairing, device=device)


def map_models(db: Path, images_dir: Path, output: Path) -> dict[str, int]:
    """Incremental mapping into ``output/sparse/N`` (binary); registered images per model."""
    import pycolmap

    (output / "sparse").mkdir(exist_ok=True)
    models = pycolmap.incremental_mapping(db, images_dir, output / "sparse")
    if not models:
        raise SfmpairsError(f"{images_dir}: no model could be reconstructed (too few matching photos)")
    registered = {}
    for idx, rec in sorted(models.items()):
        folder = output / "sparse" / str(idx)
        folder.mkdir(parents=True, exist_ok=True)
        rec.write_binary(str(folder))
        registered[str(idx)] = rec.num_reg_images()
    return registered


def reconstruct(
    images_dir: str | Path,
    output: str | Path,
    *,
    vocab_tree: str | Path | None = None,
    overwrite: bool = False,
    **options,
) -> dict:
    """Reconstruct ``images_dir`` into ``output``; returns the registered images per
    model. ``options``: the settings of :class:`~.options.ReconstructConf`."""
    import pycolmap

    conf = make_conf(ReconstructConf, **options)
    images_dir, output = Path(images_dir).resolve(), Path(output)
    photos = list_photos(images_dir)
    check_settings(conf, vocab_tree)
    if output.exists() and any(output.iterdir()):
        if not overwrite:
            raise SfmpairsError(f"{output}: folder exists and is not empty; pass --overwrite")
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)
    db = output / "database.db"
    # COLMAP's own log (glog) only with -vv
    pycolmap.logging.minloglevel = 0 if logger.isEnabledFor(logging.DEBUG) else 2
    device = {"auto": pycolmap.Device.auto, "cpu": pycolmap.Device.cpu, "cuda": pycolmap.Device.cuda}.get(
        conf.device, pycolmap.Device.auto
    )
    t0 = time.perf_counter()
    logger.info("1/3 features of %d photos in %s", len(photos), images_dir)
    extract_features(db, images_dir, conf, device)
    logger.info("2/3 %s matching", conf.matcher)
    match_features(db, conf, vocab_tree, device)
    logger.info("3/3 incremental mapping")
    registered = map_models(db, images_dir, output)
    link = output / "images"
    if not link.exists():
        os.symlink(images_dir, link, target_is_directory=True)
    seconds = time.perf_counter() - t0
    logger.info(
        "%d models, %s registered of %d photos, in %.0f s",
        len(registered),
        "+".join(str(v) for v in registered.values()),
        len(photos),
        seconds,
    )
    return {"photos": len(photos), "models": registered, "seconds": seconds}
