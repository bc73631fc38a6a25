"""The README's commands, run exactly as shown, as subprocesses in a temporary folder."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import h5py

from conftest import REPO


def block(marker: str) -> list[str]:
    text = (REPO / "README.md").read_text()
    m = re.search(rf"<!-- {marker} -->\s*```sh\n(.*?)```", text, re.S)
    assert m, marker
    return [line for line in m.group(1).splitlines() if line.strip()]


def run(line: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(shlex.split(line), cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{line}\n{proc.stderr[-2000:]}"
    return proc


def test_readme_photos_to_pairs(tmp_path):
    for line in block("photos-to-pairs"):
        run(line, tmp_path)
    with h5py.File(tmp_path / "pairs.h5") as f:
        assert f.attrs["schema"] == "sfmpairs/pairs" and len(f["train/query"]) >= 10
    with h5py.File(tmp_path / "sfm.h5") as f:
        assert len(f["images/name"]) >= 14  # most of the 20 photos registered
    assert "<img" in (tmp_path / "tuples.html").read_text()


def test_readme_demo(tmp_path):
    """The main job: the README's command after the install (`sfmpairs demo`)."""
    (main_line,) = block("main-command")
    demo = main_line.split("&&")[-1].strip()
    assert demo.startswith("sfmpairs demo")
    proc = run(demo, tmp_path)
    m = re.search(r"val mAP before training ([\d.]+), after ([\d.]+)", proc.stdout)
    assert m and float(m.group(2)) > float(m.group(1)) + 5  # training helps, clearly
    work = tmp_path / "sfmpairs-demo"
    for name in ("sfm.h5", "pairs.h5", "tuples.png", "run/best.pt", "eval_after.json"):
        assert (work / name).exists(), name
