"""``sfmpairs reconstruct``: COLMAP models from a folder of photos, with pycolmap.

SIFT features (GPU where pycolmap has CUDA); exhaustive, sequential, vocabulary-tree or
retrieval matching (each photo with its most similar photos by global descriptors: a
bag of visual words over its SIFT features, :mod:`.bag_of_words`, or a network of
sfmpairs' own extraction; see :mod:`.pairs_from_retrieval`); incremental mapping. The
folder may hold photos of many places, in any tree of subfolders: each place becomes a
model of its own.

The mapper can leave small models that share photos with a larger one. Each photo is
kept in its largest model only (:mod:`.shared_names`), and models with fewer than
``min_model_size`` registered photos are dropped, each drop logged and recorded, so
that ``sfmpairs ingest OUTPUT`` always accepts the output. Writes ``OUTPUT/database.db``,
the models at ``OUTPUT/sparse/0 .. N``, a link ``OUTPUT/images`` to the photos and
``OUTPUT/reconstruct.json`` (how it was made, what was dropped, the time of each
stage); with ``retrieval``, also the pairs matched: those retrieved
(``OUTPUT/pairs-retrieval.txt``) and, with ``expand``, those of photos that share a
verified neighbour (``OUTPUT/pairs-expanded.txt``).
The folder appears only when everything has worked.

Sizes on 2 CPU cores (benchmarks/bench_reconstruct.py): exhaustive matching grows with
the square of the number of photos and suits up to a few hundred; ``retrieval`` (or
``vocab-tree`` with COLMAP's tree file) beyond; ``sequential`` for video frames.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sqlite3
import time
from pathlib import Path

import numpy as np

from sfmpairs.common import SfmpairsError, atomic_folder, one_line, provenance_attrs
from sfmpairs.config import conf_dict, make_conf

from .options import ReconstructConf
from .shared_names import by_size, deregister, keepers

logger = logging.getLogger("sfmpairs.reconstruct")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".ppm", ".pgm"}
SCHEMA, SCHEMA_VERSION = "sfmpairs/reconstruct", 1
PAIRS_FILE = "pairs-retrieval.txt"
EXPANDED_FILE = "pairs-expanded.txt"


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

    conf.check()
    if conf.camera_model not in camera_model_ids():
        raise SfmpairsError(f"unknown camera model {conf.camera_model!r}")
    if conf.matcher == "vocab-tree" and (vocab_tree is None or not Path(vocab_tree).is_file()):
        raise SfmpairsError(
            f"{vocab_tree or '--vocab-tree'}: the vocab-tree matcher needs a vocabulary "
            f"tree file (COLMAP's, e.g. vocab_tree_flickr100K_words32K.bin)"
        )
    if conf.checkpoint is not None and not Path(conf.checkpoint).is_file():
        raise SfmpairsError(f"{conf.checkpoint}: no such checkpoint file")


def check_names(images_dir: Path, photos: list[Path], conf: ReconstructConf) -> None:
    """Photo names the matcher can take: COLMAP's pair list (retrieval) splits its
    lines at spaces; said before the hours of extraction, not after."""
    if conf.matcher != "retrieval":
        return
    spaced = [name for p in photos if " " in (name := p.relative_to(images_dir).as_posix())]
    if spaced:
        raise SfmpairsError(
            f"{images_dir / spaced[0]}: a photo name with a space cannot go in COLMAP's pair list "
            f"(--matcher retrieval; {len(spaced)} such photos); rename them, or use another matcher"
        )


def extract_features(db: Path, images_dir: Path, photos: list[Path], conf: ReconstructConf, device) -> None:
    """SIFT features of the photos (only those: other files in the folder are left
    alone) into the database."""
    import pycolmap

    reader = pycolmap.ImageReaderOptions()
    reader.camera_model = conf.camera_model
    extraction = pycolmap.FeatureExtractionOptions()
    extraction.max_image_size = conf.max_image_size
    mode = pycolmap.CameraMode.SINGLE if conf.single_camera else pycolmap.CameraMode.AUTO
    names = sorted(p.relative_to(images_dir).as_posix() for p in photos)
    pycolmap.extract_features(
        db,
        images_dir,
        image_names=names,
        camera_mode=mode,
        reader_options=reader,
        extraction_options=extraction,
        device=device,
    )


def database_names(db: Path) -> list[str]:
    """The names of the photos in COLMAP's database, sorted."""
    with contextlib.closing(sqlite3.connect(db)) as con:
        return sorted(name for (name,) in con.execute("SELECT name FROM images"))


def pair_counts(db: Path) -> dict[str, int]:
    """Pairs matched and pairs with a verified two-view geometry, from the database."""
    with contextlib.closing(sqlite3.connect(db)) as con:
        matched = con.execute("SELECT COUNT(*) FROM matches").fetchone()[0]
        verified = con.execute("SELECT COUNT(*) FROM two_view_geometries WHERE rows > 0").fetchone()[0]
    return {"pairs_matched": int(matched), "pairs_verified": int(verified)}


def select_pairs(db: Path, images_dir: Path, work: Path, conf: ReconstructConf) -> int:
    """retrieval: the pairs to match into ``work/pairs-retrieval.txt``; their number."""
    from .bag_of_words import bow_descriptors
    from .pairs_from_retrieval import global_descriptors, retrieval_pairs, write_pair_list

    names = database_names(db)
    if conf.descriptor == "bow" or (conf.descriptor == "auto" and conf.checkpoint is None):
        desc = bow_descriptors(db, names, {"branching": conf.vocabulary, "seed": conf.seed})
    else:
        desc = global_descriptors(images_dir, names, conf.checkpoint, conf.retrieval_image_size, conf.device)
    pairs = retrieval_pairs(desc, conf.num_neighbours, conf.sequential)
    write_pair_list(work / PAIRS_FILE, names, pairs)
    logger.info(
        "%d pairs of %d photos (%d most similar%s each; exhaustive: %d)",
        len(pairs),
        len(names),
        conf.num_neighbours,
        f" + {conf.sequential} next" if conf.sequential else "",
        len(names) * (len(names) - 1) // 2,
    )
    return len(pairs)


def database_pairs(db: Path, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The pairs matched and the pairs verified (two-view geometry with inliers) in
    COLMAP's database, as (M, 2) indices into ``names``."""
    index = {name: i for i, name in enumerate(names)}
    with contextlib.closing(sqlite3.connect(db)) as con:
        of_id = {image_id: index[name] for image_id, name in con.execute("SELECT image_id, name FROM images")}
        out = []
        for query in ("SELECT pair_id FROM matches", "SELECT pair_id FROM two_view_geometries WHERE rows > 0"):
            ids = np.array([p for (p,) in con.execute(query)], np.int64).reshape(-1)
            a, b = np.divmod(ids, 2147483647)  # COLMAP's pair id: image_id1 * (2^31 - 1) + image_id2
            out.append(np.array([[of_id[x], of_id[y]] for x, y in zip(a.tolist(), b.tolist())], np.int64))
    return out[0].reshape(-1, 2), out[1].reshape(-1, 2)


def expand_matches(db: Path, work: Path, conf: ReconstructConf, device) -> int:
    """retrieval: ``conf.expand`` rounds of matching the photos that share a verified
    neighbour (:func:`.pairs_from_retrieval.two_hop_pairs`); the pairs are added to
    ``work/pairs-expanded.txt``. Returns their number."""
    from .pairs_from_retrieval import two_hop_pairs, write_pair_list

    names = database_names(db)
    (work / EXPANDED_FILE).touch()
    total = 0
    for r in range(conf.expand):
        matched, verified = database_pairs(db, names)
        new = two_hop_pairs(verified, matched, len(names), conf.num_neighbours)
        logger.info("round %d: %d pairs of photos that share a verified neighbour", r + 1, len(new))
        if not len(new):
            break
        write_pair_list(work / ".round.txt", names, new)
        match_features(db, conf, None, device, work / ".round.txt")
        with open(work / EXPANDED_FILE, "a", encoding="utf-8") as f:
            f.write((work / ".round.txt").read_text())
        (work / ".round.txt").unlink()
        total += len(new)
    return total


def match_features(db: Path, conf: ReconstructConf, vocab_tree, device, pairs_file: Path | None = None) -> None:
    """Matches and two-view geometries of the pairs the matcher proposes; the
    geometric check's RANSAC seeded by ``conf.seed``."""
    import pycolmap

    verification = pycolmap.TwoViewGeometryOptions()
    verification.ransac.random_seed = conf.seed
    common = {"verification_options": verification, "device": device}
    if conf.matcher == "exhaustive":
        pycolmap.match_exhaustive(db, **common)
    elif conf.matcher == "sequential":
        pairing = pycolmap.SequentialPairingOptions()
        pairing.overlap = conf.overlap
        pycolmap.match_sequential(db, pairing_options=pairing, **common)
    elif conf.matcher == "retrieval":
        pairing = pycolmap.ImportedPairingOptions()
        pairing.match_list_path = str(pairs_file)
        pycolmap.match_image_pairs(db, pairing_options=pairing, **common)
    else:
        pairing = pycolmap.VocabTreePairingOptions()
        pairing.vocab_tree_path = str(vocab_tree)
        pycolmap.match_vocabtree(db, pairing_options=pairing, **common)


# COLMAP's mapper is asked to keep every model it makes (it drops none under this
# size): sfmpairs applies --min-model-size itself in clean_models, where each drop is
# logged and recorded (COLMAP's own minimum dropped models without a word)
MAPPER_MIN_MODEL_SIZE = 1


def mapper_options(num_photos: int, seed: int = 0):
    """The incremental mapper's options: COLMAP's, except that

    - it keeps every model it makes (:data:`MAPPER_MIN_MODEL_SIZE`): models under
      ``--min-model-size`` are dropped by :func:`clean_models`, and said so;
    - it may make as many models as the photos allow: every model it keeps starts from
      two photos of no other model, so at most ``num_photos // 2`` (COLMAP stops at 50:
      a folder of more places lost the rest);
    - it may try as many starts: each try, a model kept or a start given up, counts
      against ``init_num_trials`` (COLMAP's 200) in each of the mapper's passes, which
      bounded the models too (past 200 places, the places left were lost whatever
      ``max_num_models`` allowed); it is at least twice ``max_num_models``. The mapper
      still stops at once when no start is left to try;
    - its random choices (RANSAC, the order of tries) are seeded by ``seed``
      (``--seed``; COLMAP's -1 seeds them from the clock), so that a run can be repeated.
    """
    import pycolmap

    options = pycolmap.IncrementalPipelineOptions()
    options.min_model_size = MAPPER_MIN_MODEL_SIZE
    options.max_num_models = max(options.max_num_models, num_photos // 2)
    options.init_num_trials = max(options.init_num_trials, 2 * options.max_num_models)
    options.random_seed = seed
    return options


def map_models(db: Path, images_dir: Path, work: Path, options) -> list:
    """Incremental mapping (:func:`mapper_options`): the mapper's models, in its order."""
    import pycolmap

    models = pycolmap.incremental_mapping(db, images_dir, work / "mapper", options)
    shutil.rmtree(work / "mapper", ignore_errors=True)
    if not models:
        raise SfmpairsError(f"{images_dir}: no model could be reconstructed (too few matching photos)")
    return [models[k] for k in sorted(models)]


def clean_models(models: list, min_model_size: int) -> tuple[list, list[dict]]:
    """Each photo in its largest model only, and models left with fewer than
    ``min_model_size`` registered photos dropped (:func:`.shared_names.keepers`): the
    models kept and a record of each drop. Every model kept, whether it lost photos or
    not, loses its 3D points seen by fewer than two photos (:func:`.shared_names.deregister`)."""
    names = [sorted(img.name for img in rec.images.values() if img.has_pose) for rec in models]
    keeper = keepers(names, min_model_size)
    rank = {k: r for r, k in enumerate(by_size(names))}
    kept, dropped = [], []
    for k, rec in enumerate(models):
        if any(keeper.get(n) == k for n in names[k]):
            elsewhere = {n for n in names[k] if keeper[n] != k}
            deregister(rec, elsewhere)
            kept.append(rec)
            if elsewhere:
                logger.info("mapper model %d: %d of its photos are in a larger model, kept there", k, len(elsewhere))
            continue
        larger = sum(rank[keeper[n]] < rank[k] for n in names[k] if n in keeper)
        smaller = sum(rank[keeper[n]] > rank[k] for n in names[k] if n in keeper)
        why = f"fewer than --min-model-size {min_model_size} photos"
        if larger:
            why = f"{larger} of its photos in a larger model, {len(names[k]) - larger} left: " + why
        if smaller:
            why += f"; {smaller} of its photos kept by a smaller model"
        dropped.append({"mapper_model": k, "photos": len(names[k]), "in_larger_model": larger, "why": why})
        logger.warning("dropped mapper model %d of %d photos (%s)", k, len(names[k]), why)
    return kept, dropped


def write_models(models: list, work: Path, images_dir: Path, min_model_size: int) -> dict[str, int]:
    """The models at ``work/sparse/0 .. N`` (binary); registered photos per model."""
    if not models:
        raise SfmpairsError(
            f"{images_dir}: no model of at least {min_model_size} registered photos; "
            f"lower --min-model-size to keep smaller ones"
        )
    registered = {}
    for k, rec in enumerate(models):
        folder = work / "sparse" / str(k)
        folder.mkdir(parents=True)
        rec.write_binary(str(folder))
        registered[str(k)] = rec.num_reg_images()
    return registered


class Stages:
    """Times each stage and logs its start: ``with stages("matching", "..."):``; an
    error of pycolmap's (a RuntimeError from C++: e.g. a full disk, "No registered
    database factory succeeded") becomes one line naming ``output`` and the stage."""

    def __init__(self, total: int, output: Path):
        self.total, self.output, self.seconds = total, output, {}

    @contextlib.contextmanager
    def __call__(self, name: str, message: str):
        logger.info("%d/%d %s", len(self.seconds) + 1, self.total, message)
        t0 = time.perf_counter()
        try:
            yield
        except RuntimeError as e:
            raise SfmpairsError(
                f"{self.output}: pycolmap stopped in the {name} stage: {one_line(e)} (a full disk, or a folder "
                f"that cannot be written?)"
            ) from None
        finally:
            self.seconds[name] = round(time.perf_counter() - t0, 3)


def run_stages(
    images_dir: Path, photos: list[Path], work: Path, output: Path, conf: ReconstructConf, vocab_tree
) -> dict:
    """Features, pairs (retrieval), matching, mapping and cleaning into ``work``."""
    import pycolmap

    db = work / "database.db"
    # COLMAP's own log (glog) only with -vv
    pycolmap.logging.minloglevel = 0 if logger.isEnabledFor(logging.DEBUG) else 2
    device = {"auto": pycolmap.Device.auto, "cpu": pycolmap.Device.cpu, "cuda": pycolmap.Device.cuda}.get(
        conf.device, pycolmap.Device.auto
    )
    retrieval = conf.matcher == "retrieval"
    expand = retrieval and conf.expand > 0
    stages = Stages(4 + retrieval + expand, output)
    with stages("features", f"SIFT features of {len(photos)} photos in {images_dir}"):
        extract_features(db, images_dir, photos, conf, device)
    if retrieval:
        with stages("pairs", "pairs from global descriptors"):
            select_pairs(db, images_dir, work, conf)
    with stages("matching", f"{conf.matcher} matching"):
        match_features(db, conf, vocab_tree, device, work / PAIRS_FILE)
    if expand:
        with stages("expansion", f"matching photos that share a verified neighbour ({conf.expand} rounds at most)"):
            expand_matches(db, work, conf, device)
    with stages("mapping", "incremental mapping"):
        models = map_models(db, images_dir, work, mapper_options(len(photos), conf.seed))
    with stages("cleaning", f"each photo in one model, models of at least {conf.min_model_size} photos"):
        kept, dropped = clean_models(models, conf.min_model_size)
        registered = write_models(kept, work, images_dir, conf.min_model_size)
    in_models = {img.name for rec in kept for img in rec.images.values() if img.has_pose}
    # the photos COLMAP could not read are in no model and not in its database either
    unregistered = sorted({p.relative_to(images_dir).as_posix() for p in photos} - in_models)
    return {
        "photos": len(photos),
        "models": registered,
        "registered": sum(registered.values()),
        "unregistered": unregistered,
        "mapper_models": len(models),
        "dropped": dropped,
        **pair_counts(db),
        "stages": stages.seconds,
    }


def log_summary(result: dict, output: Path) -> None:
    """The end of the log: models, photos registered and not, time per stage."""
    dropped = result["dropped"]
    logger.info(
        "%s: %d models (%s photos), %d of %d photos registered, %d not (listed in reconstruct.json); "
        "%d mapper models dropped; %d pairs matched, %d verified",
        output,
        len(result["models"]),
        "+".join(str(v) for v in result["models"].values()),
        result["registered"],
        result["photos"],
        result["photos"] - result["registered"],
        len(dropped),
        result["pairs_matched"],
        result["pairs_verified"],
    )
    logger.info(
        "time: %s; total %.1f s",
        ", ".join(f"{k} {v:.1f} s" for k, v in result["stages"].items()),
        result["seconds"],
    )


def reconstruct(
    images_dir: str | Path,
    output: str | Path,
    *,
    vocab_tree: str | Path | None = None,
    overwrite: bool = False,
    **options,
) -> dict:
    """Reconstruct ``images_dir`` into ``output``; returns a summary: ``photos``,
    ``models`` (registered photos per model folder), ``registered``, ``unregistered``
    (names), ``dropped`` (the mapper's models dropped, and why), pairs matched and
    verified, ``stages`` (seconds each) and ``seconds``. ``options``: the settings of
    :class:`~.options.ReconstructConf`."""
    t0 = time.perf_counter()
    conf = make_conf(ReconstructConf, **options)
    images_dir, output = Path(images_dir).resolve(), Path(output)
    photos = list_photos(images_dir)
    check_settings(conf, vocab_tree)
    check_names(images_dir, photos, conf)
    with atomic_folder(output, overwrite, inputs=[images_dir]) as work:
        work.mkdir()
        result = run_stages(images_dir, photos, work, output, conf, vocab_tree)
        os.symlink(images_dir, work / "images", target_is_directory=True)
        result["seconds"] = round(time.perf_counter() - t0, 3)
        parameters = {**conf_dict(conf), "vocab_tree": str(Path(vocab_tree).resolve()) if vocab_tree else None}
        record = provenance_attrs(SCHEMA, SCHEMA_VERSION, parameters, {"images_dir": str(images_dir)})
        record.update(parameters=parameters, inputs={"images_dir": str(images_dir)}, summary=result)
        (work / "reconstruct.json").write_text(json.dumps(record, indent=1) + "\n")
    log_summary(result, output)
    return result
