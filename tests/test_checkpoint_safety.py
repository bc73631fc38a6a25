"""Checkpoints and weights files from elsewhere run no code when read (issue 17, item 10):
``torch.load(weights_only=True)``; what sfmpairs writes is tensors and plain data."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from sfmpairs import SfmpairsError
from sfmpairs.cli import main
from sfmpairs.retrieval.network import (
    CHECKPOINT_SCHEMA,
    build_network,
    convert_checkpoint,
    load_checkpoint,
    read_checkpoint,
    read_weights_file,
    save_checkpoint,
)


class WritesAMarker:
    """Unpickling calls ``open(marker, "w")``: a file appears if the load runs it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class RunsAShellCommand:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def crafted_checkpoint(path, payload) -> None:
    net = build_network({"arch": "resnet18"})
    torch.save(
        {"schema": CHECKPOINT_SCHEMA, "config": dict(net.config), "state_dict": net.state_dict(), "x": payload}, path
    )


@pytest.mark.parametrize("kind", [WritesAMarker, RunsAShellCommand], ids=["open", "os.system"])
def test_a_crafted_checkpoint_is_refused_in_one_line_and_runs_nothing(tmp_path, kind):
    marker = tmp_path / "marker"
    crafted_checkpoint(tmp_path / "evil.pt", kind(marker))
    with pytest.raises(SfmpairsError) as e:
        load_checkpoint(tmp_path / "evil.pt")
    text = str(e.value)
    assert "evil.pt: refused" in text and "\n" not in text
    assert ("open" if kind is WritesAMarker else "system") in text
    assert not marker.exists()
    # the commands that read checkpoints: one line, exit 2, nothing run, no output
    (tmp_path / "list.txt").write_text("a.jpg\n")
    extract = ["extract", "--model", tmp_path / "evil.pt", "--images-root", tmp_path, "--list", tmp_path / "list.txt"]
    for args in (["info", tmp_path / "evil.pt"], [*extract, "-o", tmp_path / "d.h5"]):
        r = CliRunner().invoke(main, [str(a) for a in args])
        assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and "refused" in r.stderr, r.stderr
        assert not marker.exists() and not (tmp_path / "d.h5").exists()
    # the file is live: an unsafe load would have run it (the check above can fail)
    if kind is WritesAMarker:
        torch.load(tmp_path / "evil.pt", weights_only=False)
        assert marker.exists()


def test_a_crafted_weights_file_is_refused_too(tmp_path):
    marker = tmp_path / "marker"
    state = build_network({"arch": "resnet18"}).features.state_dict()
    torch.save({**state, "evil": WritesAMarker(marker)}, tmp_path / "w.pth")
    with pytest.raises(SfmpairsError, match=r"w\.pth: refused: loading it would call .*open"):
        read_weights_file(tmp_path / "w.pth")
    assert not marker.exists()


def test_weights_files_and_checkpoints_are_read_by_one_safe_load(tmp_path):
    """read_weights_file and read_checkpoint share one load (network.load_plain): a file
    missing, junk, cut short or crafted gives each the same one line, but for what the file
    should have been; a broken .safetensors file is one line too."""
    marker = tmp_path / "marker"
    save_checkpoint(tmp_path / "good.pt", build_network({"arch": "resnet18"}))
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    torch.save({"conv1.weight": WritesAMarker(marker)}, tmp_path / "evil.pt")
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    lines = {}
    for read, what in ((read_weights_file, "a weights file"), (read_checkpoint, "a checkpoint")):
        for name in ("missing.pt", "junk.pt", "cut.pt", "evil.pt"):
            with pytest.raises(SfmpairsError) as e:
                read(tmp_path / name)
            assert "\n" not in str(e.value)
            lines.setdefault(name, set()).add(str(e.value).replace(what, "WHAT"))
    assert all(len(v) == 1 for v in lines.values()), lines
    assert lines["missing.pt"] == {f"{tmp_path / 'missing.pt'}: no such file"}
    assert lines["junk.pt"].pop().startswith(f"{tmp_path / 'junk.pt'}: not WHAT")
    assert lines["cut.pt"].pop().startswith(f"{tmp_path / 'cut.pt'}: not WHAT (")
    assert "evil.pt: refused: loading it would call" in lines["evil.pt"].pop() and not marker.exists()
    with pytest.raises(SfmpairsError, match=r"broken\.safetensors: not a weights file \(\w+\)$"):
        read_weights_file(tmp_path / "broken.safetensors")
    with pytest.raises(SfmpairsError, match=r"missing\.safetensors: no such file$"):
        read_weights_file(tmp_path / "missing.safetensors")


def test_what_save_checkpoint_writes_loads_with_weights_only(tmp_path):
    """numpy values (as an evaluation may give) are written as plain numbers and tensors."""
    net = build_network({"arch": "resnet18"})
    extra = {"val_map": np.float64(0.5), "train": {"epoch": np.int64(3), "a": np.arange(3), "t": (np.float32(1),)}}
    save_checkpoint(tmp_path / "c.pt", net, **extra)
    state = torch.load(tmp_path / "c.pt", weights_only=True)  # no safe globals added
    assert type(state["val_map"]) is float and type(state["train"]["epoch"]) is int
    assert torch.equal(state["train"]["a"], torch.arange(3)) and state["train"]["t"] == (1.0,)
    assert read_checkpoint(tmp_path / "c.pt")["val_map"] == 0.5


def test_a_checkpoint_with_numpy_values_is_refused_with_the_conversion_and_converts(tmp_path):
    """What an unsafe writer could have left (numpy scalars pickled as numpy objects):
    refused, with the command that converts it; converted, it loads."""
    net = build_network({"arch": "resnet18"})
    state = {
        "schema": CHECKPOINT_SCHEMA,
        "config": dict(net.config),
        "state_dict": net.state_dict(),
        "val_map": np.float64(0.25),
    }
    torch.save(state, tmp_path / "old.pt")
    with pytest.raises(SfmpairsError, match=r"old\.pt: refused: loading it would call numpy.*convert_checkpoint"):
        read_checkpoint(tmp_path / "old.pt")
    convert_checkpoint(tmp_path / "old.pt", tmp_path / "new.pt")
    assert read_checkpoint(tmp_path / "new.pt")["val_map"] == 0.25
    with pytest.raises(SfmpairsError, match="not an sfmpairs checkpoint"):
        torch.save({"a": 1}, tmp_path / "other.pt")
        convert_checkpoint(tmp_path / "other.pt", tmp_path / "x.pt")


class _RunsCode:
    def __reduce__(self):
        import builtins

        return (builtins.exec, ("import pathlib; pathlib.Path(__import__('os').environ['SFMPAIRS_MARK']).touch()",))


def test_imagenet_weights_in_the_hub_cache_are_read_as_data_only(tmp_path, monkeypatch):
    """torchvision's --pretrained reads the hub cache: a file put there that would run
    code on unpickling is refused in one line and runs nothing; wrong shapes are one line."""
    from sfmpairs.retrieval.network import build_network, hub_file

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    monkeypatch.setenv("SFMPAIRS_MARK", str(tmp_path / "ran"))
    cache = hub_file("resnet18")
    cache.parent.mkdir(parents=True)
    torch.save({"conv1.weight": _RunsCode()}, cache)
    with pytest.raises(SfmpairsError, match="refused") as info:
        build_network({"arch": "resnet18"}, pretrained=True)
    assert str(cache) in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "ran").exists()
    torch.save({"conv1.weight": torch.zeros(3, 3)}, cache)
    with pytest.raises(SfmpairsError, match="conv1.weight"):
        build_network({"arch": "resnet18"}, pretrained=True)


def _hint(path) -> str:
    """The conversion command the refusal of ``path`` suggests, as a shell runs it here."""
    with pytest.raises(SfmpairsError) as e:
        read_checkpoint(path)
    text = str(e.value)
    assert "\n" not in text and ": python -c " in text, text
    return shlex.quote(sys.executable) + " -c " + text.split(": python -c ", 1)[1]


def test_the_suggested_conversion_runs_nothing_of_a_crafted_checkpoint(tmp_path):
    """The author of a file decides which global its refusal names first: numpy first,
    sfmpairs suggested convert_checkpoint, which loaded with weights_only=False and ran
    the payload. Conversion now reads numbers and arrays only."""
    marker = tmp_path / "marker"
    net = build_network({"arch": "resnet18"})
    payloads = {
        "scalar-first": [np.float64(1.0), RunsAShellCommand(marker)],
        "dtype-first": [np.dtype("O"), RunsAShellCommand(marker)],
        "array-first": [np.arange(3), WritesAMarker(marker)],
    }
    for name, payload in payloads.items():
        path = tmp_path / f"{name}.pt"
        torch.save({"schema": CHECKPOINT_SCHEMA, "config": dict(net.config), "x": payload}, path)
        command = _hint(path)
        r = subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True, text=True)
        assert r.returncode != 0 and "refused" in r.stderr, (name, r.stderr)
        assert not marker.exists() and not (tmp_path / "new.pt").exists(), name
        with pytest.raises(SfmpairsError, match=rf"{name}\.pt: refused: it holds .*, not only the numbers") as e:
            convert_checkpoint(path, tmp_path / "x.pt")
        assert "\n" not in str(e.value) and not marker.exists() and not (tmp_path / "x.pt").exists()
    torch.load(tmp_path / "scalar-first.pt", weights_only=False)  # the payload is live
    assert marker.exists()


def test_an_old_checkpoint_with_numpy_values_converts_by_the_suggested_command(tmp_path):
    """Numpy scalars and arrays (what an old writer could leave) convert to plain numbers
    and tensors; the command quotes the path for the shell and for Python."""
    net = build_network({"arch": "resnet18"})
    folder = tmp_path / 'it\'s a "run" $(touch pwned)'
    folder.mkdir()
    extra = {"val_map": np.float64(0.25), "train": {"epoch": np.int64(3), "a": np.arange(3, dtype=np.float32)}}
    state = {"schema": CHECKPOINT_SCHEMA, "config": dict(net.config), "state_dict": net.state_dict(), **extra}
    torch.save(state, folder / "old.pt")
    r = subprocess.run(_hint(folder / "old.pt"), shell=True, cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "pwned").exists()
    new = read_checkpoint(tmp_path / "new.pt")
    assert type(new["val_map"]) is float and new["val_map"] == 0.25 and type(new["train"]["epoch"]) is int
    assert torch.equal(new["train"]["a"], torch.arange(3, dtype=torch.float32))
    load_checkpoint(tmp_path / "new.pt")


def test_a_checkpoint_pickled_by_numpy_1_converts(tmp_path):
    """numpy 1.x named its functions numpy.core.multiarray.*; numpy 2 numpy._core.*."""
    import zipfile

    torch.save({"schema": CHECKPOINT_SCHEMA, "v": np.float64(0.5), "a": np.arange(3)}, tmp_path / "np2.pt")
    with zipfile.ZipFile(tmp_path / "np2.pt") as zin, zipfile.ZipFile(tmp_path / "np1.pt", "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("data.pkl"):
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            zout.writestr(info, data)
    with pytest.raises(SfmpairsError, match=r"would call numpy\.core\.multiarray\.scalar.*convert_checkpoint"):
        read_checkpoint(tmp_path / "np1.pt")
    convert_checkpoint(tmp_path / "np1.pt", tmp_path / "new.pt")
    state = torch.load(tmp_path / "new.pt", weights_only=True)
    assert state["v"] == 0.5 and torch.equal(state["a"], torch.arange(3))
