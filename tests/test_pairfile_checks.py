"""A pair file whose tables have the right row counts but not the documented shapes
(docs/formats.md), or whose image names repeat: every reader refuses it in one line
naming the file (exit 2, nothing written), never an IndexError or a wrong output later."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import synth_and_mine
from sfmpairs.cli import main


@pytest.fixture(scope="module")
def mined(tmp_path_factory):
    return synth_and_mine(
        tmp_path_factory.mktemp("checks"),
        clusters=4,
        image_size=(48, 36),
        seed=3,
        points=300,
        descriptor_seed=0,
        negatives=2,
        queries_per_cluster=0,
        val_clusters=["cluster_03/sparse/0"],
        max_scale_change=3,
    )


def _replace(f, key, data):
    del f[key]
    f[key] = data


def _narrow_passes(f):
    _replace(f, "train/pool_passes", f["train/pool_passes"][()][:, :2])


def _flat_negatives(f):  # 1-D, one per query: the right row count
    _replace(f, "train/negatives", f["train/negatives"][()][:, 0])
    _replace(f, "train/negative_similarity", f["train/negative_similarity"][()][:, 0])


def _flat_inlier_ratio(f):
    _replace(f, "train/pool_inlier_ratio", f["train/pool_inlier_ratio"][()][:, 0])


def _fewer_similarities(f):  # (Q, 1) for (Q, 2) negatives: show would drop one silently
    _replace(f, "train/negative_similarity", f["train/negative_similarity"][()][:, :1])


def _padding_passes(f):  # a passing slot whose image is the padding -1: hloc would write names[-1]
    pool = f["train/pool"][()]
    pool[f["train/pool_passes"][()]] = -1
    _replace(f, "train/pool", pool)


def _duplicate_name(f):
    names = list(f["images/name"].asstr()[()])
    names[1] = names[0]
    _replace(f, "images/name", np.array(names, dtype=h5py.string_dtype()))


CASES = {
    "pool_passes of 2 columns": (_narrow_passes, "train/pool_passes of shape"),
    "negatives 1-D": (_flat_negatives, "is 1-D, not 2-D"),
    "pool_inlier_ratio 1-D": (_flat_inlier_ratio, "train/pool_inlier_ratio is 1-D, not 2-D"),
    "fewer similarities than negatives": (_fewer_similarities, "train/negative_similarity of shape"),
    "padding marked as passing": (_padding_passes, "train/pool_passes"),
    "an image name twice": (_duplicate_name, "more than once"),
}


def _commands(root, pairs, out):
    return {
        "export csv": ["export", pairs, "--format", "csv", "-o", out / "p.csv"],
        "export hloc --all-passing": ["export", pairs, "--format", "hloc", "--all-passing", "-o", out / "p.txt"],
        "show": ["show", pairs, "-o", out / "t.png"],
        "whiten --all-passing": [
            *("whiten", "--descriptors", root / "d.h5", "--pairs", pairs, "-o", out / "w.h5"),
            *("--all-passing", "--method", "pca", "--dim", "4"),
        ],
    }


@pytest.mark.parametrize("case", list(CASES))
def test_misshapen_pair_file_is_one_line_in_every_reader(mined, tmp_path, case):
    edit, expect = CASES[case]
    pairs = tmp_path / "pairs.h5"
    shutil.copy(mined / "pairs.h5", pairs)
    with h5py.File(pairs, "r+") as f:
        edit(f)
    out = tmp_path / "out"
    out.mkdir()
    for name, args in _commands(mined, pairs, out).items():
        r = CliRunner().invoke(main, [str(a) for a in args])
        errors = [line for line in r.stderr.splitlines() if line.startswith("sfmpairs: error:")]
        assert r.exit_code == 2 and len(errors) == 1, (name, r.exit_code, r.stderr, r.exception)
        assert str(pairs) in errors[0] and "corrupt pair file" in errors[0] and expect in errors[0], (name, errors)
        assert "Traceback" not in r.stderr, (name, r.stderr)
        assert not list(out.iterdir()), (name, list(out.iterdir()))  # nothing written, no provenance


def test_the_mined_file_passes_every_check(mined, tmp_path):
    """The checks refuse nothing sfmpairs writes: the same four commands succeed."""
    for name, args in _commands(mined, mined / "pairs.h5", tmp_path).items():
        r = CliRunner().invoke(main, [str(a) for a in args])
        assert r.exit_code == 0, (name, r.stderr, r.exception)
