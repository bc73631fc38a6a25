"""Where outputs go (review 17): a folder output never replaces the current folder, an
input or a folder sfmpairs did not write; a folder written meanwhile by another run is
not replaced; an interrupted --overwrite keeps the old output or the new; scratch
folders of killed runs are removed; an output is never one of the command's inputs; an
HDF5 file that declares a huge dataset or reads other files is one line."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import cli, one_error_line
from sfmpairs import SfmpairsError
from sfmpairs.common import atomic_folder, check_output_path, open_h5

SYNTH = ["--clusters", "1", "--images-per-cluster", "2", "--image-size", "32x24", "--points", "50"]


def tree(folder: Path) -> dict:
    """Every file under ``folder`` (hidden ones too) and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def build(target, text: str, **kwargs) -> None:
    """A folder output holding ``export.json`` (an sfmpairs output) with ``text``."""
    with atomic_folder(target, **kwargs) as work:
        work.mkdir()
        (work / "export.json").write_text(text)


# ------------------------------------------------------ what --overwrite may replace
def test_synth_never_replaces_the_current_folder(tmp_path, monkeypatch):
    """``synth -o . --overwrite`` emptied the current folder; now one line, nothing touched
    (with or without --overwrite, and for a folder above the current one)."""
    (tmp_path / "thesis.tex").write_text("years of work")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    for out in (".", ".."):
        one_error_line(cli("synth", "-o", out, *SYNTH, "--overwrite"), f"{out}: output folder holds the current")
    one_error_line(cli("synth", "-o", ".", *SYNTH), ".: output folder holds the current folder")  # empty
    one_error_line(cli("synth", "-o", "..", *SYNTH), "..: output folder holds the current folder")
    assert (tmp_path / "thesis.tex").read_text() == "years of work" and (tmp_path / "sub").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub", "thesis.tex"]
    assert "earlier sfmpairs run" in cli("synth", "--help").output  # the help says what --overwrite replaces


def test_reconstruct_never_replaces_the_folder_of_its_photos(tmp_path):
    """COLMAP's layout, ``reconstruct project/images -o project --overwrite``: the photos
    were deleted; now one line before any work."""
    photos = tmp_path / "project" / "images"
    photos.mkdir(parents=True)
    for k in range(3):
        (photos / f"{k}.jpg").write_bytes(b"photo %d" % k)
    before = tree(tmp_path)
    for extra in ((), ("--overwrite",)):
        one_error_line(cli("reconstruct", photos, "-o", tmp_path / "project", *extra), "holds the input")
    assert tree(tmp_path) == before


def test_overwrite_replaces_only_folders_sfmpairs_wrote(tmp_path):
    """--overwrite replaces an empty folder or an earlier output (export.json,
    world.json, reconstruct.json in it); a user's folder, or one that holds an input, is
    refused in one line and left as it was."""
    user = tmp_path / "user"
    (user / "photos").mkdir(parents=True)
    (user / "photos" / "a.jpg").write_bytes(b"jpg")
    with pytest.raises(SfmpairsError, match=r"user: folder is not an sfmpairs output \(no world.json"):
        build(user, "new", overwrite=True)
    assert tree(user) == {"photos/a.jpg": b"jpg"}
    build(tmp_path / "out", "first")
    (tmp_path / "out" / "pairs.h5").write_bytes(b"an input kept in the output")
    with pytest.raises(SfmpairsError, match="out: output folder holds the input .*pairs.h5"):
        build(tmp_path / "out", "second", overwrite=True, inputs=[tmp_path / "out" / "pairs.h5"])
    build(tmp_path / "out", "second", overwrite=True)  # an earlier output, no input in it
    assert tree(tmp_path / "out") == {"export.json": b"second"}
    (tmp_path / "empty").mkdir()
    build(tmp_path / "empty", "third")  # an empty folder, even without --overwrite
    assert tree(tmp_path / "empty") == {"export.json": b"third"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "out", "user"]  # no scratch left


# ------------------------------------------------ two runs, interruptions, killed runs
def test_a_folder_written_meanwhile_is_not_replaced(tmp_path):
    """Two runs building one folder: without --overwrite the first to finish wins and the
    other fails in one line, leaving the winner's folder whole; with it the last wins."""
    out = tmp_path / "out"
    with pytest.raises(SfmpairsError, match="out: output exists .written meanwhile by another run"):
        with atomic_folder(out) as first:
            first.mkdir()
            (first / "export.json").write_text("first")
            build(out, "second")  # the other run publishes first
    assert tree(out) == {"export.json": b"second"}
    build(out, "third", overwrite=True)
    assert tree(out) == {"export.json": b"third"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_interrupted_overwrite_keeps_the_old_output_or_the_new(tmp_path, monkeypatch):
    """Ctrl-C while the new folder is moved in: the old output is back in place. Ctrl-C
    while the old one is deleted (a large folder takes a while): the new one is in place,
    whole. (Before: the old was deleted first, then the new moved in, so both were lost.)"""
    import sfmpairs.common as common

    out = tmp_path / "out"
    build(out, "old")
    (out / "ims").mkdir()
    for k in range(10):
        (out / "ims" / f"{k}.jpg").write_bytes(b"old photo")
    old = tree(out)
    real_rename, real_replace, real_rmtree = os.rename, os.replace, shutil.rmtree

    def moving_in_interrupted(move):
        def patched(src, dst, *args, **kwargs):
            if Path(dst) == out and Path(src).name == "out":  # the new folder, moved in
                raise KeyboardInterrupt
            return move(src, dst, *args, **kwargs)

        return patched

    monkeypatch.setattr(common.os, "rename", moving_in_interrupted(real_rename))
    monkeypatch.setattr(common.os, "replace", moving_in_interrupted(real_replace))
    with pytest.raises(KeyboardInterrupt):
        build(out, "new", overwrite=True)
    assert tree(out) == old
    monkeypatch.setattr(common.os, "rename", real_rename)
    monkeypatch.setattr(common.os, "replace", real_replace)

    def deleting_interrupted(path, *args, **kwargs):  # half the files deleted, then Ctrl-C
        files = sorted(p for p in Path(path).rglob("*") if p.is_file())
        for f in files[: len(files) // 2]:
            f.unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(common.shutil, "rmtree", deleting_interrupted)
    with pytest.raises(KeyboardInterrupt):
        build(out, "new", overwrite=True)
    monkeypatch.setattr(common.shutil, "rmtree", real_rmtree)
    assert tree(out) == {"export.json": b"new"}


def test_scratch_folders_of_killed_runs_are_removed(tmp_path):
    """A folder output killed while it builds leaves its scratch folder; the next run
    writing that output removes those of runs no longer alive on this machine (named as
    the temporary files of file outputs are), not those of live runs or other hosts."""
    host = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.{host}-{dead.pid}.abcd1234.tmp"  # a run that was killed
    alive = tmp_path / f".out.{host}-{os.getppid()}.abcd1234.tmp"  # one still running
    other = tmp_path / f".out.otherhost-{dead.pid}.abcd1234.tmp"  # another machine's
    for scratch in (stale, alive, other):
        (scratch / "out" / "ims").mkdir(parents=True)
        (scratch / "out" / "ims" / "a.jpg").write_bytes(b"partial")
    seen = []
    with atomic_folder(tmp_path / "out") as work:
        seen.append(work.parent.name)  # this run's scratch, named the same way
        work.mkdir()
    assert not stale.exists() and alive.exists() and other.exists()
    assert seen[0].startswith(f".out.{host}-{os.getpid()}.") and seen[0].endswith(".tmp")


# ------------------------------------------------------------------ long names
# Output names at and near the longest a file name may be (255 bytes): ASCII, and UTF-8
# of two bytes a character (their temporary names are cut on a character's boundary)
LONG_NAMES = {"236": "n" * 232 + ".png", "255": "n" * 251 + ".png", "utf8": "é" * 125 + "x.png"}


@pytest.mark.parametrize("kind", LONG_NAMES)
def test_long_output_names(tmp_path, kind):
    """A file output (``plot``) and a folder output (``synth``) named with up to 255
    bytes are written: their temporary file and scratch folder names, which add the
    host, the PID and a random part, used to pass the limit (a 236-byte name failed)."""
    import json

    name = LONG_NAMES[kind]
    assert len(name.encode()) == (236 if kind == "236" else 255)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "loss": 0.5, "lr": 1e-4}) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    r = cli("plot", tmp_path / "run", "-o", out / name)
    assert r.exit_code == 0, r.stderr
    r = cli("synth", "-o", out / name.replace(".png", "_"), *SYNTH)
    assert r.exit_code == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted([name, name.replace(".png", "_")])
    assert (out / name).stat().st_size > 1000 and (out / name.replace(".png", "_") / "world.json").is_file()


def _killed_while_writing(path: Path, folder: bool) -> None:
    """A run killed (os._exit) while it writes ``path``: it leaves its temporary file or
    scratch folder."""
    code = (
        "import os, sys; from pathlib import Path; from sfmpairs.common import atomic_folder, atomic_output\n"
        "path = Path(sys.argv[1])\n"
        "if sys.argv[2] == 'folder':\n"
        "    with atomic_folder(path) as work:\n"
        "        work.mkdir(); (work / 'a').write_bytes(b'partial'); os._exit(9)\n"
        "with atomic_output(path) as tmp:\n"
        "    tmp.write_bytes(b'partial'); os._exit(9)\n"
    )
    p = subprocess.run([sys.executable, "-c", code, str(path), "folder" if folder else "file"], capture_output=True)
    assert p.returncode == 9, p.stderr.decode()[-2000:]


@pytest.mark.parametrize("kind", LONG_NAMES)
def test_long_names_temporaries_and_leftovers_of_killed_runs(tmp_path, kind):
    """For long names too, the temporary file or scratch folder fits in a file name, and
    what killed runs left is removed by the next run writing that output (the cut name
    is the same for every run); an output with another long name sharing the same first
    200 bytes has temporaries of its own name. A name past the limit is one line."""
    from sfmpairs.common import atomic_output

    name = LONG_NAMES[kind]
    for folder in (False, True):
        where = tmp_path / ("folder" if folder else "file")
        where.mkdir()
        target = where / name
        other = where / (name[:-6] + "y" + name[-5:])  # another output, the same beginning
        for path in (target, target, other):
            _killed_while_writing(path, folder)
        left = sorted(p.name for p in where.iterdir())
        # the second killed run removed the first's leftover, not the other output's
        assert len(left) == 2 and all(n.startswith(".") and n.endswith(".tmp") for n in left), left
        assert all(len(n.encode()) <= 255 for n in left)
        seen = []
        if folder:
            with atomic_folder(target) as work:
                seen.append(work.parent.name)
                work.mkdir()
        else:
            with atomic_output(target) as tmp:
                seen.append(tmp.name)
                tmp.write_bytes(b"whole")
        assert len(seen[0].encode()) <= 255 and seen[0].endswith(".tmp")
        after = sorted(p.name for p in where.iterdir())
        assert len(after) == 2 and name in after, after  # the output and the other output's leftover
        (other_left,) = [n for n in after if n != name]
        assert other_left in left
    for folder in (False, True):  # past the limit: one line, nothing written
        with pytest.raises(SfmpairsError, match="cannot write .File name too long"):
            if folder:
                with atomic_folder(tmp_path / ("w" * 300)) as work:
                    work.mkdir()
            else:
                with atomic_output(tmp_path / ("w" * 300)) as tmp:
                    tmp.write_bytes(b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder"]


# --------------------------------------------------------------- output == input
@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    from sfmpairs.sfm_io.ingest import ingest
    from sfmpairs.synthetic.world import synth

    root = tmp_path_factory.mktemp("outputs")
    synth(root / "w", clusters=4, images_per_cluster=6, image_size=(32, 24), seed=0, points=100)
    ingest([root / "w"], root / "sfm.h5")
    return root / "sfm.h5"


def test_an_output_that_is_an_input_is_refused(store, tmp_path):
    """``mine sfm.h5 -o sfm.h5 --overwrite`` replaced the store with the pairs mined from
    it; now one line before any work, also where the output is a link to the input."""
    sfm = tmp_path / "sfm.h5"
    shutil.copy(store, sfm)
    digest = hashlib.sha256(sfm.read_bytes()).hexdigest()
    os.symlink(sfm, tmp_path / "link.h5")
    for out in (sfm, tmp_path / "link.h5"):
        one_error_line(cli("mine", sfm, "-o", out, "--overwrite"), f"{out}: output is the input {sfm}")
    assert hashlib.sha256(sfm.read_bytes()).hexdigest() == digest
    assert cli("mine", sfm, "-o", tmp_path / "pairs.h5").exit_code == 0  # another name: fine


def test_output_paths_checked_before_the_work(tmp_path):
    """A dangling link as output is an existing output (it was found only when the
    finished file was moved in); an output folder that is a file is said to be one."""
    os.symlink(tmp_path / "elsewhere.h5", tmp_path / "dangling.h5")
    with pytest.raises(SfmpairsError, match="dangling.h5: output exists; pass --overwrite"):
        check_output_path(tmp_path / "dangling.h5", overwrite=False)
    check_output_path(tmp_path / "dangling.h5", overwrite=True)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SfmpairsError, match="afile: is a file, not a folder"):
        check_output_path(tmp_path / "afile" / "p.h5", overwrite=False)


# ------------------------------------------------------------ crafted HDF5 files
def test_a_dataset_declared_huge_is_one_line(tmp_path):
    """A few KB of HDF5 declaring an 8 TiB dataset: one line, not a MemoryError."""
    from sfmpairs.retrieval.descriptors import read_descriptors

    path = tmp_path / "d.h5"
    with h5py.File(path, "w") as f:
        f["names"] = np.array(["a.jpg", "b.jpg"], dtype=h5py.string_dtype())
        f.create_dataset("descriptors", shape=(2, 2**40), dtype="f4", chunks=(1, 1024))
    assert path.stat().st_size < 100_000
    with pytest.raises(SfmpairsError, match="d.h5: .*declares a dataset too large to read"):
        read_descriptors(path, np.array(["a.jpg"]))


def _reads_another_file(path: Path, kind: str, tmp_path: Path) -> None:
    """A descriptor file whose ``names`` reads another file (``kind``)."""
    secret = tmp_path / "secret.txt"
    secret.write_text("API_KEY=0123456789abcdef\n")
    with h5py.File(path, "w") as f:
        f["descriptors"] = np.eye(2, dtype=np.float32)
        if kind == "external storage":
            f.create_dataset("names", shape=(2,), dtype="S4", external=[(str(secret), 0, 8)])
        elif kind == "fifo":
            os.mkfifo(tmp_path / "fifo")  # reading it blocks for ever
            f.create_dataset("names", shape=(2,), dtype="S4", external=[(str(tmp_path / "fifo"), 0, 8)])
        elif kind == "external link":
            with h5py.File(tmp_path / "other.h5", "w") as g:
                g["private"] = np.array(["private/a.jpg", "private/b.jpg"], dtype=h5py.string_dtype())
            f["names"] = h5py.ExternalLink(str(tmp_path / "other.h5"), "private")
        else:  # a virtual dataset
            with h5py.File(tmp_path / "other.h5", "w") as g:
                g["private"] = np.array([b"a.jp", b"b.jp"], dtype="S4")
            layout = h5py.VirtualLayout(shape=(2,), dtype="S4")
            layout[:] = h5py.VirtualSource(str(tmp_path / "other.h5"), "private", shape=(2,))
            f.create_virtual_dataset("names", layout)


@pytest.mark.parametrize("kind", ["external storage", "fifo", "external link", "virtual dataset"])
def test_hdf5_files_that_read_other_files_are_refused(tmp_path, kind):
    """External raw-data storage, external links and virtual datasets make reading one
    file read another (any file of the machine, into the output) or block for ever (a
    FIFO): refused when the file is opened, in one line naming it, before any data is
    read. Run in a child process: before, the FIFO case hung."""
    path = tmp_path / "d.h5"
    _reads_another_file(path, kind, tmp_path)
    code = (
        "import sys, numpy as np\n"
        "from sfmpairs.retrieval.descriptors import read_descriptors\n"
        "read_descriptors(sys.argv[1], np.array(['a.jpg']))\n"
    )
    p = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "SfmpairsError" in p.stderr, p.stderr[-2000:]
    assert f"{path}: names reads another file ({tmp_path}/" in p.stderr, p.stderr[-2000:]
    with pytest.raises(SfmpairsError, match="reads another file"):
        open_h5(path, "descriptor file")
