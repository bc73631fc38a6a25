"""Bad input: one line naming the file and the problem, exit code 2, no output file."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from sfmpairs.cli import main


@pytest.fixture
def model(synthetic_models, tmp_path):
    """A private copy of a binary synthetic model to break."""
    dst = tmp_path / "model"
    shutil.copytree(synthetic_models["shared-cameras"] / "binary", dst)
    return dst


@pytest.fixture
def text_model(synthetic_models, tmp_path):
    dst = tmp_path / "text"
    shutil.copytree(synthetic_models["shared-cameras"] / "text", dst)
    return dst


def run_cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stderr, result.stdout


def assert_clean_failure(tmp_path, args, *expect):
    out = tmp_path / "out.h5"
    code, err, _ = run_cli("ingest", *args, "-o", out)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sfmpairs: error: "), err
    for text in expect:
        assert text in lines[0], lines[0]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.h5")]
    return lines[0]


def test_missing_file(model, tmp_path):
    (model / "points3D.bin").unlink()
    assert_clean_failure(tmp_path, [model], "points3D.bin", "missing")


def test_directory_in_place_of_a_file(model, tmp_path):
    (model / "cameras.bin").unlink()
    (model / "cameras.bin").mkdir()
    assert_clean_failure(tmp_path, [model], "cameras.bin", "missing")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file(model, tmp_path):
    (model / "images.bin").chmod(0)
    assert_clean_failure(tmp_path, [model], "images.bin", "cannot read")


@pytest.mark.parametrize("name", ["cameras.bin", "images.bin", "points3D.bin", "frames.bin"])
def test_truncated_binary(model, tmp_path, name):
    data = (model / name).read_bytes()
    (model / name).write_bytes(data[: len(data) * 2 // 3])
    assert_clean_failure(tmp_path, [model], name, "truncated")


@pytest.mark.parametrize(
    "name,what",
    [("images.bin", "images"), ("points3D.bin", "3D points"), ("cameras.bin", "cameras"), ("frames.bin", "frames")],
)
def test_corrupt_count(model, tmp_path, name, what):
    data = bytearray((model / name).read_bytes())
    data[:8] = struct.pack("<Q", 2**40)
    (model / name).write_bytes(bytes(data))
    assert_clean_failure(tmp_path, [model], name, "corrupt", what)


def _camera_heads(data: bytes) -> list[int]:
    """The byte offset of each record of cameras.bin (parsed here, independently)."""
    from sfmpairs.sfm_io.model import camera_models

    (n,), off, heads = struct.unpack_from("<Q", data), 8, []
    for _ in range(n):
        heads.append(off)
        off += 24 + 8 * camera_models()[struct.unpack_from("<i", data, off + 4)[0]][1]
    return heads


def _break_camera(data: bytearray, edit: str) -> None:
    last = _camera_heads(bytes(data))[-1]
    if edit == "unknown model":
        struct.pack_into("<i", data, last + 4, 999)
    elif edit == "params past the end":  # the last camera as FULL_OPENCV: 12 parameters
        struct.pack_into("<i", data, last + 4, 6)
    elif edit == "zero width":
        struct.pack_into("<Q", data, last + 8, 0)
    elif edit == "NaN parameter":
        struct.pack_into("<d", data, last + 24, float("nan"))
    elif edit == "repeated id":
        struct.pack_into("<I", data, last, struct.unpack_from("<I", data, 8)[0])


@pytest.mark.parametrize(
    "edit,expect",
    [
        ("unknown model", "unknown camera model id 999"),
        ("params past the end", "truncated: parameters of camera"),
        ("zero width", "invalid size 0x"),
        ("NaN parameter", "non-finite parameters"),
        ("repeated id", "appears twice"),
    ],
)
def test_corrupt_camera_record(synthetic_models, tmp_path, edit, expect):
    """A broken record of a cameras.bin of many cameras (one per image): its own
    problem, named in one line."""
    model = tmp_path / "model"
    shutil.copytree(synthetic_models["per-image-cameras"] / "binary", model)
    data = bytearray((model / "cameras.bin").read_bytes())
    assert len(_camera_heads(bytes(data))) > 2
    _break_camera(data, edit)
    (model / "cameras.bin").write_bytes(bytes(data))
    assert_clean_failure(tmp_path, [model], "cameras.bin", expect)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps (Linux)")
@pytest.mark.parametrize("edit", ["unknown model", "params past the end", "zero width"])
def test_a_refused_cameras_file_is_closed(synthetic_models, tmp_path, edit):
    """The file a reader refuses is no longer mapped while its error is kept (by a
    caller, a logger, a future): no view of the map outlives the read."""
    from sfmpairs import SfmpairsError
    from sfmpairs.sfm_io.colmap_binary import read_cameras

    path = tmp_path / "cameras.bin"
    data = bytearray((synthetic_models["per-image-cameras"] / "binary" / "cameras.bin").read_bytes())
    _break_camera(data, edit)
    path.write_bytes(bytes(data))
    with pytest.raises(SfmpairsError) as kept:
        read_cameras(path)
    assert kept.value is not None and str(path) not in Path("/proc/self/maps").read_text()


def test_float32_positions_are_read_as_they_are(mined, tmp_path):
    """A store whose points are float32 (another writer's, valid): read whole and
    mined, with no warning from the check of their range (1e150 cast to float32
    overflowed)."""
    import warnings

    from sfmpairs.sfm_io.store import read_store

    _replace(mined / "sfm.h5", "points/xyz", lambda v: v.astype(np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_store(mined / "sfm.h5")["points/xyz"].dtype == np.float32
    code, err, _ = run_cli("mine", mined / "sfm.h5", "-o", tmp_path / "p.h5")
    assert code == 0, err


def _first_image(data: bytes) -> tuple[int, int, int]:
    """(id, byte offset of its name, of its 2D point count) of images.bin's first image."""
    name = 8 + 64
    return struct.unpack_from("<I", data, 8)[0], name, data.index(b"\0", name) + 1


@pytest.mark.parametrize("edit", ["unterminated name", "count past the end", "name not UTF-8"])
def test_corrupt_image_record(model, tmp_path, edit):
    data = bytearray((model / "images.bin").read_bytes())
    image, name, count = _first_image(bytes(data))
    if edit == "unterminated name":  # no NUL within 4,096 bytes of the name's start
        data[name:] = b"a" * 5000
        expect = f"name of image {image} is not terminated"
    elif edit == "count past the end":
        struct.pack_into("<Q", data, count, 2**40)
        expect = f"2D points of image {image}"
    else:
        data[name] = 0xFF
        expect = f"name of image {image} is not UTF-8"
    (model / "images.bin").write_bytes(bytes(data))
    assert_clean_failure(tmp_path, [model], "images.bin", expect)


@pytest.mark.parametrize("track", [2**40, 2**63 + 5])
def test_track_past_the_end(model, tmp_path, track):
    """A 3D point whose track length leaves the file: the record named."""
    data = bytearray((model / "points3D.bin").read_bytes())
    struct.pack_into("<Q", data, 8 + 43, track)  # the first record's track length
    (model / "points3D.bin").write_bytes(bytes(data))
    assert_clean_failure(tmp_path, [model], "points3D.bin", "3D point record 0 runs past the end")


def test_trailing_garbage(model, tmp_path):
    with open(model / "points3D.bin", "ab") as f:
        f.write(b"\0" * 5)
    assert_clean_failure(tmp_path, [model], "points3D.bin", "unexpected bytes")


@pytest.mark.parametrize("value", [1e300, float("nan")])
def test_non_finite_2d_point(model, tmp_path, value):
    """A 2D position float32 cannot hold (or NaN): the clean error, no RuntimeWarning
    (warnings are errors in the tests)."""
    from sfmpairs.sfm_io.colmap_binary import _File, _image_headers

    f = _File(model / "images.bin")
    heads = _image_headers(f)
    f.close()
    start, count = int(heads["points"][0]), int(heads["counts"][0])
    data = (model / "images.bin").read_bytes()
    ids = [struct.unpack_from("<Q", data, start + 24 * k + 16)[0] for k in range(count)]
    k = next(k for k, i in enumerate(ids) if i != 2**64 - 1)  # a 2D point of a 3D point
    with open(model / "images.bin", "r+b") as fh:
        fh.seek(start + 24 * k + 8)  # its y
        fh.write(struct.pack("<d", value))
    assert_clean_failure(tmp_path, [model], "images.bin", "non-finite 2D point position")


def test_empty_file(model, tmp_path):
    (model / "images.bin").write_bytes(b"")
    assert_clean_failure(tmp_path, [model], "images.bin", "empty file")


def test_empty_model(model, tmp_path):
    for name in ("images.bin", "points3D.bin", "frames.bin"):
        (model / name).write_bytes(struct.pack("<Q", 0))
    assert_clean_failure(tmp_path, [model], str(model), "empty model")


def _edit_line(path: Path, index: int, edit):
    lines = path.read_text().splitlines()
    data = [i for i, line in enumerate(lines) if line and not line.startswith("#")]
    lines[data[index]] = edit(lines[data[index]])
    path.write_text("\n".join(lines) + "\n")
    return data[index] + 1


@pytest.mark.parametrize(
    "name,index,edit,expect",
    [
        ("cameras.txt", 0, lambda s: s.replace("PINHOLE", "PINHOLEX", 1), "unknown camera model"),
        ("cameras.txt", 1, lambda s: " ".join(s.split()[:-1]), "parameters"),
        ("images.txt", 0, lambda s: "x" + s, "bad image id"),
        ("images.txt", 0, lambda s: s.replace(".", ",", 1), "bad number"),
        ("images.txt", 1, lambda s: s + " 1.0", "triples"),
        ("points3D.txt", 2, lambda s: " ".join(s.split()[:5]), "expected"),
        ("points3D.txt", 0, lambda s: s + " 7", "pairs"),
    ],
)
def test_text_model_bad_lines(text_model, tmp_path, name, index, edit, expect):
    lineno = _edit_line(text_model / name, index, edit)
    assert_clean_failure(tmp_path, [text_model], f"{name} line {lineno}", expect)


def test_text_observation_of_a_missing_point(text_model, tmp_path):
    path = text_model / "points3D.txt"
    lines = path.read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    del lines[first]
    path.write_text("\n".join(lines) + "\n")
    assert_clean_failure(tmp_path, [text_model], "images.txt", "observes 3D point", "does not have")


def test_text_track_mismatch(text_model, tmp_path):
    _edit_line(text_model / "points3D.txt", 0, lambda s: " ".join(s.split()[:-2]))
    assert_clean_failure(tmp_path, [text_model], "points3D.txt", "track of 3D point")


def test_path_with_no_model(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_clean_failure(tmp_path, [tmp_path / "empty"], "no COLMAP model found")


def test_path_that_does_not_exist(tmp_path):
    assert_clean_failure(tmp_path, [tmp_path / "nope"], "nope", "no such file")


def test_output_exists(model, tmp_path):
    out = tmp_path / "out.h5"
    out.write_bytes(b"precious")
    code, err, _ = run_cli("ingest", model, "-o", out)
    assert code == 2 and "out.h5: output exists; pass --overwrite" in err
    assert out.read_bytes() == b"precious"
    code, err, _ = run_cli("ingest", model, "-o", out, "--overwrite")
    assert code == 0, err


def test_output_folder_missing(model, tmp_path):
    code, err, _ = run_cli("ingest", model, "-o", tmp_path / "no" / "out.h5")
    assert code == 2 and "output folder does not exist" in err


@pytest.mark.parametrize(
    "text,expect",
    [
        ("[[model]\npath = 'x'", "not valid TOML"),
        ("title = 'no models'", "no [[model]] entries"),
        ("[[model]]\ncluster = 'a'", "has no path"),
        ("[[model]]\npath = 'm'\ncolour = 'red'", "unknown key 'colour'"),
    ],
)
def test_bad_manifest(tmp_path, text, expect):
    manifest = tmp_path / "m.toml"
    manifest.write_text(text)
    assert_clean_failure(tmp_path, ["--manifest", manifest], "m.toml", expect)


def test_cli_subprocess_exit_code_and_one_line(model, tmp_path):
    """The installed command, as a user runs it."""
    (model / "images.bin").write_bytes(b"\x01")
    exe = Path(sys.executable).with_name("sfmpairs")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "sfmpairs.cli"]
    proc = subprocess.run([*cmd, "ingest", str(model), "-o", str(tmp_path / "o.h5")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "images.bin" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o.h5").exists()


@pytest.fixture
def mined(tmp_path):
    from conftest import synth_and_mine

    val = [f"cluster_0{k}/sparse/0" for k in (2, 3)]
    return synth_and_mine(
        tmp_path / "m", clusters=4, image_size=(48, 36), seed=0, points=200, descriptor_seed=0, val_clusters=val
    )


def _edit(path: Path, key: str, fn) -> None:
    import h5py

    with h5py.File(path, "r+") as f:
        v = f[key][()]
        f[key][...] = fn(v)


def _replace(path: Path, key: str, fn) -> None:
    """The dataset ``key`` of the HDF5 file ``path`` replaced by ``fn`` of its values
    (any shape or dtype: a valid file of the wrong make)."""
    import h5py

    with h5py.File(path, "r+") as f:
        v = f[key][()]
        del f[key]
        f[key] = fn(v)


@pytest.mark.parametrize(
    "key,fn,expect",
    [
        ("images/tvec", lambda v: v[:, :2], ", 2), not ("),
        ("models/point_range", lambda v: v[:-1], "models/point_range has shape (3, 2), not (4, 2)"),
        ("models/path", lambda v: np.stack([v, v], 1), "models/path has shape (4, 2), not (4,)"),
        ("points/xyz", lambda v: v[None], "points/xyz has shape (1, "),
        ("clusters/name", lambda v: np.arange(len(v)), "clusters/name holds integers, not text"),
        ("observations/indptr", lambda v: v.astype(np.uint64), "holds unsigned integers, not integers"),
        ("images/focal", lambda v: v.astype(np.int64), "images/focal holds integers, not floats"),
        ("images/centre", lambda v: v * 1e300, "images/centre not finite, or beyond 1e150"),
        ("observations/xy", lambda v: v[:-1], "observations/xy has shape"),
    ],
)
def test_mis_shaped_store_tables(mined, tmp_path, key, fn, expect):
    """A store that is valid HDF5 but one of whose tables has the wrong dimensions, rows
    or kind of values (bench_faults' store:shapes found tracebacks in mine and the
    exports): one line naming the table, nothing written."""
    _replace(mined / "sfm.h5", key, fn)
    code, err, _ = run_cli("mine", mined / "sfm.h5", "-o", tmp_path / "p.h5")
    assert code == 2 and err.count("sfmpairs: error:") == 1 and expect in err and "Traceback" not in err, err
    assert key in err
    assert not (tmp_path / "p.h5").exists()


@pytest.mark.parametrize(
    "key,fn,expect",
    [
        ("observations/point", lambda v: v + 10**6, "observations/point out of range"),
        # the last model's only: read after others (the dataset opened once)
        ("observations/point", lambda v: np.r_[v[:-3], v[-3:] + 10**6], "observations/point out of range"),
        ("observations/indptr", lambda v: v[::-1], "observations/indptr is no index"),
        ("images/cluster", lambda v: v + 99, "images/cluster out of range"),
        ("images/centre", lambda v: v * float("nan"), "images/centre not finite"),
    ],
)
def test_corrupt_store_tables(mined, tmp_path, key, fn, expect):
    """Tables that disagree (values a byte flip could make): one line, not an IndexError."""
    _edit(mined / "sfm.h5", key, fn)
    code, err, _ = run_cli("mine", mined / "sfm.h5", "-o", tmp_path / "p.h5")
    assert code == 2 and err.count("sfmpairs: error:") == 1 and expect in err and "Traceback" not in err, err
    assert not (tmp_path / "p.h5").exists()


@pytest.mark.parametrize(
    "key,fn,expect",
    [
        ("train/positive", lambda v: v + 10**6, "train/positive: image indices out of range"),
        ("images/cluster", lambda v: v - 99, "images/cluster out of range"),
        ("val/gt_indptr", lambda v: v[::-1], "val/gt_indptr is no index"),
    ],
)
def test_corrupt_pair_file_tables(mined, tmp_path, key, fn, expect):
    _edit(mined / "pairs.h5", key, fn)
    code, err, _ = run_cli("export", mined / "pairs.h5", "--format", "csv", "-o", tmp_path / "p.csv")
    assert code == 2 and err.count("sfmpairs: error:") == 1 and expect in err and "Traceback" not in err, err


def test_whitening_of_another_dimension(mined, tmp_path):
    import h5py

    code, err, _ = run_cli(
        "whiten", "--descriptors", mined / "d.h5", "--pairs", mined / "pairs.h5", "-o", tmp_path / "w.h5"
    )
    assert code == 0, err
    with h5py.File(tmp_path / "w.h5", "r+") as f:  # a whitening for 9-d descriptors
        p = f["projection"][()]
        del f["mean"], f["projection"]
        f["mean"], f["projection"] = np.zeros(9), np.zeros((len(p), 9))
    args = ["evaluate", "--pairs", mined / "pairs.h5", "--descriptors", mined / "d.h5", "--whitening"]
    code, err, _ = run_cli(*args, tmp_path / "w.h5", "-o", tmp_path / "r.json")
    assert code == 2 and "w.h5: whitening of 9-d descriptors, these are 8-d" in err and "Traceback" not in err, err
