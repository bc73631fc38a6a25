"""Shared fixtures: real COLMAP models from the shared data folder, synthetic models."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SFMPAIRS_DATA", REPO.parent / "shared" / "data"))
COLMAP = DATA / "colmap"


def doc_example(heading: str) -> str:
    """The first Python block after ``heading`` in docs/formats.md; it must run
    without sfmpairs."""
    doc = (REPO / "docs" / "formats.md").read_text()
    code = re.search(re.escape(heading) + r".*?```python\n(.*?)```", doc, re.S).group(1)
    assert "sfmpairs" not in code
    return code


def cli(*args):
    """The sfmpairs command run in this process (click's runner); arguments as strings."""
    from click.testing import CliRunner

    from sfmpairs.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def one_error_line(r, *expect) -> str:
    """The run failed cleanly: exit 2, one error line containing ``expect``, no traceback."""
    errors = [line for line in r.stderr.splitlines() if line.startswith("sfmpairs: error:")]
    assert r.exit_code == 2, (r.exit_code, r.stderr, r.exception)
    assert len(errors) == 1 and all(e in errors[0] for e in expect), r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    return errors[0]


def synth_and_mine(
    root: Path,
    *,
    clusters: int,
    image_size: tuple[int, int],
    seed: int,
    points: int,
    descriptor_seed: int,
    **mine_options,
) -> Path:
    """A rendered world in ``root/w``, its store ``root/sfm.h5``, random unit
    descriptors ``root/d.h5`` (8-d) and pairs ``root/pairs.h5`` mined with them."""
    from sfmpairs.mining.mine import mine
    from sfmpairs.retrieval.descriptors import write_descriptors
    from sfmpairs.sfm_io.ingest import ingest
    from sfmpairs.sfm_io.store import read_store
    from sfmpairs.synthetic.world import synth

    synth(root / "w", clusters=clusters, images_per_cluster=6, image_size=image_size, seed=seed, points=points)
    ingest([root / "w"], root / "sfm.h5")
    names = read_store(root / "sfm.h5", keys=["images/name"])["images/name"]
    d = np.random.default_rng(descriptor_seed).normal(size=(len(names), 8)).astype(np.float32)
    write_descriptors(root / "d.h5", names, d / np.linalg.norm(d, axis=1, keepdims=True), {})
    mine(root / "sfm.h5", root / "pairs.h5", descriptors=root / "d.h5", **mine_options)
    return root


def make_models(folder: Path, seed: int = 0, scenes: int = 4, images: int = 40, points: int = 2000) -> list[Path]:
    """Random COLMAP models without photos, one per scene, at ``folder/scene_K/sparse/0``
    (quick geometry for tests)."""
    from sfmpairs.synthetic.models import random_reconstruction, write_model

    paths = []
    for k in range(scenes):
        rec = random_reconstruction(
            images, points, track_length=6, seed=seed * 1000 + k, camera_models=("SIMPLE_RADIAL", "PINHOLE")
        )
        path = folder / f"scene_{k:02d}" / "sparse" / "0"
        write_model(rec, path)
        paths.append(path)
    return paths


def real_model_dirs() -> list[Path]:
    if not COLMAP.is_dir():
        return []
    return sorted(p.parent for p in COLMAP.glob("*/sparse/*/cameras.bin"))


def needs_real_data():
    return pytest.mark.skipif(
        not COLMAP.is_dir(),
        reason=f"real COLMAP models not found at {COLMAP} (set SFMPAIRS_DATA to the folder holding colmap/)",
    )


REAL_MODELS = real_model_dirs()
REAL_IDS = [str(p.relative_to(COLMAP)) for p in REAL_MODELS]


@pytest.fixture(scope="session")
def colmap_root() -> Path:
    if not COLMAP.is_dir():
        pytest.skip(f"real COLMAP models not found at {COLMAP} (set SFMPAIRS_DATA)")
    return COLMAP


MODEL_FIELDS = (
    "image_ids",
    "camera_ids",
    "qvec",
    "tvec",
    "width",
    "height",
    "point_ids",
    "xyz",
    "indptr",
    "point",
    "xy",
    "track_length",
)


def assert_models_equal(a, b) -> None:
    """Bit-for-bit equality of two sfm_io.model.Model."""
    for key in MODEL_FIELDS:
        x, y = getattr(a, key), getattr(b, key)
        assert x.dtype == y.dtype, key
        assert np.array_equal(x, y), key
    assert a.names == b.names
    assert a.camera_model == b.camera_model
    assert len(a.params) == len(b.params)
    for p, q in zip(a.params, b.params):
        assert np.array_equal(p, q)


@pytest.fixture(scope="session")
def synthetic_models(tmp_path_factory):
    """Synthetic models written with pycolmap, binary and text: every camera model
    pycolmap knows, shared and per-image cameras, odd ids."""
    from sfmpairs.sfm_io.model import camera_models
    from sfmpairs.synthetic.models import random_reconstruction, write_model

    all_models = tuple(name for name, _, _ in camera_models().values())
    root = tmp_path_factory.mktemp("synthetic")
    out = {}
    for key, kwargs in {
        "per-image-cameras": dict(
            num_images=len(all_models) + 3,
            num_points=400,
            track_length=5,
            camera_models=all_models,
            shared_cameras=False,
            seed=1,
        ),
        "shared-cameras": dict(
            num_images=30,
            num_points=600,
            track_length=4,
            camera_models=("PINHOLE", "SIMPLE_RADIAL", "OPENCV"),
            seed=2,
            id_start=1000,
            id_step=7,
        ),
    }.items():
        rec = random_reconstruction(**kwargs)
        for fmt in ("binary", "text"):
            write_model(rec, root / key / fmt, fmt)
        out[key] = root / key
    return out


@pytest.fixture(scope="session")
def small_world(tmp_path_factory):
    """Rendered-free: six synthetic scenes with random photos (one colour theme per
    scene), ingested and mined."""
    from PIL import Image

    from sfmpairs.mining.mine import mine
    from sfmpairs.sfm_io.ingest import ingest
    from sfmpairs.sfm_io.store import read_store

    root = tmp_path_factory.mktemp("train")
    make_models(root / "colmap", seed=5, scenes=6, images=12, points=600)
    ingest([root / "colmap"], root / "sfm.h5")  # no photos known: names are model/name
    s = read_store(root / "sfm.h5", keys=["images/name", "images/cluster"])
    rng = np.random.default_rng(0)
    for name, c in zip(s["images/name"], s["images/cluster"]):
        path = root / "photos" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        base = np.array([40 * c, 255 - 40 * c, (90 * c) % 255])
        img = np.clip(base + rng.normal(0, 40, (48, 64, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(path)
    mine(root / "sfm.h5", root / "pairs.h5", queries_per_cluster=0, val_fraction=0.34, max_scale_change=3.0)
    return root


# a short training run on small_world
SMALL = dict(
    arch="resnet18",
    epochs=3,
    image_size=48,
    test_image_size=48,
    query_size=12,
    pool_size=30,
    lr=1e-4,
    batch_size=3,
    neg_num=3,
    workers=0,
    device="cpu",
)
