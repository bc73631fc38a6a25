"""Every command: bad input gives one line naming the file and the problem, exit code 2,
no traceback and no output."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from sfmpairs.cli import main


@pytest.mark.parametrize(
    "args,expect",
    [
        (["mine", "{tmp}/missing.h5", "-o", "{out}"], "missing.h5: no such file"),
        (
            [
                "extract",
                "--model",
                "{tmp}/missing.pt",
                "--images-root",
                "{tmp}",
                "--list",
                "{tmp}/l.txt",
                "-o",
                "{out}",
            ],
            "l.txt: cannot read",
        ),
        (
            ["whiten", "--descriptors", "{tmp}/d.h5", "--pairs", "{tmp}/missing.h5", "-o", "{out}"],
            "missing.h5: no such file",
        ),
        (
            ["evaluate", "--pairs", "{tmp}/missing.h5", "--descriptors", "{tmp}/d.h5", "-o", "{out}"],
            "missing.h5: no such file",
        ),
        (["evaluate", "--descriptors", "{tmp}/d.h5", "-o", "{out}"], "give one of --pairs or --gnd"),
        (
            ["train", "--pairs", "{tmp}/missing.h5", "--images-root", "{tmp}", "-o", "{out}"],
            "missing.h5: no such file",
        ),
        (["synth", "-o", "{out}", "--image-size", "big"], "--image-size 'big'"),
        (["reconstruct", "{tmp}", "-o", "{out}"], "needs at least two photos"),
        (["show", "{tmp}/missing.h5", "-o", "{tmp}/x.gif"], "x.gif: give a .png or .html output"),
        (["show", "{tmp}/missing.h5", "-o", "{out}.png"], "missing.h5: no such file"),
        (["export", "{tmp}/missing.h5", "--format", "hloc", "-o", "{out}"], "missing.h5: no such file"),
        (["info", "{tmp}/missing.h5"], "missing.h5: no such file"),
        (["ingest", "{tmp}/nowhere", "-o", "{out}"], "nowhere: no such file or directory"),
    ],
)
def test_bad_input_everywhere(tmp_path, args, expect):
    out = tmp_path / "out"
    r = CliRunner().invoke(main, [a.format(tmp=tmp_path, out=out) for a in args])
    errors = [line for line in r.stderr.splitlines() if line.startswith("sfmpairs: error:")]
    assert r.exit_code == 2, r.stderr
    assert len(errors) == 1 and expect in errors[0], r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert not out.exists() and not (tmp_path / "out.png").exists()
