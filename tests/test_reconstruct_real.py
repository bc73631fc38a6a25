"""``reconstruct`` on real photos of three places mixed in one folder (issue 16 item 2):
the README's photos-to-pairs commands run as written through the command line, each
model holds photos of one place only, most photos are registered, and the retrieval
matcher matches only the pairs it selected.

The photos: 12 of each of three places from the shared COLMAP data, longer side 400 px
(about 20 s per reconstruction on two shared cores). Skipped where the data is absent.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import COLMAP, REPO

PLACES = {"drinks-can": 1, "dorm-desk": 2, "eyedrop-box": 1}  # place: take every Nth photo
PER_PLACE, SIDE = 12, 400
MARKER = "photos-to-pairs-own"

pytestmark = pytest.mark.skipif(
    not all((COLMAP / p / "images").is_dir() for p in PLACES),
    reason=f"real photos of {', '.join(PLACES)} not found under {COLMAP} (set SFMPAIRS_DATA)",
)


def readme_block(marker: str) -> list[str]:
    """The command lines of the README's block ``marker``."""
    m = re.search(rf"<!-- {marker} -->\s*```sh\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    assert m, f"no <!-- {marker} --> block in README.md"
    return [line for line in m.group(1).splitlines() if line.strip()]


def place_of(name: str) -> str:
    return name.split("__")[0]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """A folder ``photos`` of the three places' photos, downscaled, named place__photo."""
    from PIL import Image

    root = tmp_path_factory.mktemp("mixed")
    (root / "photos").mkdir()
    for place, step in PLACES.items():
        for p in sorted((COLMAP / place / "images").iterdir())[::step][:PER_PLACE]:
            with Image.open(p) as im:
                im = im.convert("RGB")
                im.thumbnail((SIDE, SIDE))
                im.save(root / "photos" / f"{place}__{p.stem}.jpg", quality=90)
    return root


def run(line: str, cwd: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(shlex.split(line), cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{line}\n{proc.stderr[-2000:]}"


@pytest.fixture(scope="module")
def readme_run(photos) -> Path:
    lines = readme_block(MARKER)
    assert any(line.startswith("sfmpairs reconstruct photos") for line in lines)
    for line in lines:
        run(line, photos)
    return photos


def model_names(models: Path) -> list[set[str]]:
    """The registered photo names of each model, read with pycolmap."""
    import pycolmap

    out = []
    for folder in sorted((models / "sparse").iterdir(), key=lambda p: int(p.name)):
        rec = pycolmap.Reconstruction(str(folder))
        out.append({img.name for img in rec.images.values() if img.has_pose})
    return out


def check_pure(names: list[set[str]], min_registered: float, num_places: int = len(PLACES)) -> None:
    """Each model one place; each photo in one model; most photos registered."""
    places = [{place_of(n) for n in model} for model in names]
    assert all(len(p) == 1 for p in places), places
    registered = [n for model in names for n in model]
    assert len(registered) == len(set(registered))
    assert len(registered) >= min_registered * PER_PLACE * num_places, len(registered)


def test_readme_commands_run_on_a_mixed_real_folder(readme_run):
    import h5py

    from sfmpairs.sfm_io.store import read_store

    s = read_store(readme_run / "sfm.h5", observations=False)
    assert len(s["images/name"]) == len(set(s["images/name"])) >= 0.8 * PER_PLACE * len(PLACES)
    # one cluster per place, each cluster's photos of one place
    clusters = {}
    for name, c in zip(s["images/name"], s["images/cluster"]):
        clusters.setdefault(int(c), set()).add(place_of(name))
    assert all(len(p) == 1 for p in clusters.values()) and len(clusters) == len(PLACES)
    with h5py.File(readme_run / "pairs.h5") as f:
        assert f.attrs["schema"] == "sfmpairs/pairs" and len(f["train/query"]) > 0
    assert "<img" in (readme_run / "tuples.html").read_text()


def test_models_are_pure_with_most_photos_registered(readme_run):
    check_pure(model_names(readme_run / "models"), 0.8)


@pytest.mark.parametrize("descriptor", ["bow", "network"])
def test_retrieval_matches_only_the_selected_pairs(photos, tmp_path, descriptor):
    """The pairs matched are the retrieved ones and those of the expansion round, with
    either kind of global descriptor."""
    from sfmpairs.sfm_io.reconstruct import reconstruct

    two = list(PLACES)[:2]  # two places, to keep it quick
    (tmp_path / "photos").mkdir()
    for p in (photos / "photos").iterdir():
        if place_of(p.name) in two:
            (tmp_path / "photos" / p.name).symlink_to(p)
    out = reconstruct(
        tmp_path / "photos",
        tmp_path / "models",
        matcher="retrieval",
        descriptor=descriptor,
        num_neighbours=5,
        retrieval_image_size=256,
    )
    check_pure(model_names(tmp_path / "models"), 0.8, len(two))

    def listed(name):
        return {tuple(sorted(line.split(" "))) for line in (tmp_path / "models" / name).read_text().splitlines()}

    retrieved, expanded = listed("pairs-retrieval.txt"), listed("pairs-expanded.txt")
    n = PER_PLACE * len(two)
    assert len(retrieved) <= n * 5 and retrieved.isdisjoint(expanded)
    assert out["pairs_matched"] == len(retrieved | expanded) < n * (n - 1) // 2
    with contextlib.closing(sqlite3.connect(tmp_path / "models" / "database.db")) as con:
        names = dict(con.execute("SELECT image_id, name FROM images"))
        matched = set()
        for (pair_id,) in con.execute("SELECT pair_id FROM matches"):  # COLMAP's pair id: id1 * 2^31 - 1 + id2
            a, b = divmod(pair_id, 2147483647)
            matched.add(tuple(sorted((names[a], names[b]))))
    assert matched == retrieved | expanded
    # the retrieved neighbours are mostly of the same place (the network: even with random weights)
    same = sum(place_of(a) == place_of(b) for a, b in retrieved)
    assert same >= 0.8 * len(retrieved)
    # photos verified with a third see the same place
    assert all(place_of(a) == place_of(b) for a, b in expanded)
