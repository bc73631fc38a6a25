"""Run folders that train never destroys or mixes, and damaged run folders and
checkpoints refused in one line (review 17): --overwrite keeps the old run until the new
one has its first checkpoint; a folder holding a run's files needs --overwrite; one train
at a time per folder (a lock that dies with its process); a damaged config.json,
metrics.jsonl or last.pt stops --resume in one line naming the file."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner

from conftest import SMALL
from sfmpairs import SfmpairsError
from sfmpairs.cli import main
from sfmpairs.retrieval.network import build_network, load_checkpoint, save_checkpoint
from sfmpairs.train.train import train

FAST = {**SMALL, "epochs": 1, "image_size": 32, "test_image_size": 32, "query_size": 6, "pool_size": 12}
FAST["neg_num"] = 1


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line(result, *expected):
    """The command failed with exit 2 and one error line holding ``expected``."""
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and "Traceback" not in result.stderr, result.stderr
    errors = [x for x in lines if x.startswith("sfmpairs: error:")]
    assert len(errors) == 1 and all(e in errors[0] for e in expected), result.stderr
    return errors[0]


def contents(folder):
    """Every file under ``folder`` but the lock, with its bytes."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


@pytest.fixture(scope="module")
def finished(small_world, tmp_path_factory):
    """A run of one epoch (resume it with epochs=2)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    train(small_world / "pairs.h5", small_world / "photos", run, **FAST)
    return run


def copy_run(finished, tmp_path, name="run"):
    shutil.copytree(finished, tmp_path / name)
    return tmp_path / name


def resume_args(run):
    return ["train", "--resume", run, "--epochs", 2]


# ----------------------------------------------------------------------------- --overwrite
def test_a_failed_overwrite_puts_the_old_run_back(small_world, finished, tmp_path, monkeypatch):
    """--overwrite replaced last.pt, best.pt and the metrics before training; a new run
    that then failed left config.json alone and said "(none written yet)"."""
    import sfmpairs.train.train as T

    run = copy_run(finished, tmp_path)
    before = contents(run)

    def broken(*args, **kwargs):
        raise SfmpairsError("a photo: cannot decode image")

    monkeypatch.setattr(T, "mine_epoch", broken)
    with pytest.raises(SfmpairsError, match=r"\(none written yet; the run --overwrite replaced is put back in "):
        train(small_world / "pairs.h5", small_world / "photos", run, overwrite=True, **{**FAST, "seed": 1})
    assert contents(run) == before and not (run / ".replaced").exists()
    # a kill (nothing put back on the way out): the next train on the folder puts it back first
    monkeypatch.setattr(T, "_settle", lambda run_dir: None)
    with pytest.raises(SfmpairsError):
        train(small_world / "pairs.h5", small_world / "photos", run, overwrite=True, **{**FAST, "seed": 1})
    assert (run / ".replaced" / "last.pt").exists() and not (run / "last.pt").exists()
    assert json.loads((run / "config.json").read_text())["seed"] == 1  # the killed run's
    monkeypatch.undo()
    train(None, None, run, resume=True, epochs=2)  # resumes the old run, not the killed one
    assert not (run / ".replaced").exists() and json.loads((run / "config.json").read_text())["seed"] == 0
    epochs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in epochs] == [-1, 0, 1]
    assert (run / "metrics.jsonl").read_bytes().startswith(before["metrics.jsonl"])


def test_an_overwrite_drops_the_old_run_once_its_first_checkpoint_is_written(
    small_world, finished, tmp_path, monkeypatch
):
    """While the new run validates before training, the old run's checkpoints are still
    there (set aside); after its first last.pt, only the new run's files are."""
    import sfmpairs.train.train as T

    run = copy_run(finished, tmp_path)
    old = contents(run)
    kept, seen = [], []
    validate = T.validate

    def spy(*args, **kwargs):
        if not kept:  # before training: both old checkpoints, unchanged, somewhere in the folder
            now = {name.split("/")[-1]: data for name, data in contents(run).items()}
            kept.append(all(now.get(name) == old[name] for name in ("last.pt", "best.pt", "metrics.jsonl")))
        return validate(*args, **kwargs)

    def after_epoch(epoch, metrics):  # last.pt of epoch 0 is written: the old run is gone
        seen.append(sorted(contents(run)))

    monkeypatch.setattr(T, "validate", spy)
    train(small_world / "pairs.h5", small_world / "photos", run, overwrite=True, on_epoch_end=after_epoch, **FAST)
    assert kept == [True]
    assert seen == [["best.pt", "config.json", "last.pt", "metrics.jsonl", "metrics.png"]]
    assert contents(run)["last.pt"] != old["last.pt"]
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [-1, 0]


def test_a_new_run_refuses_a_folder_holding_a_runs_files(small_world, tmp_path):
    """Without --overwrite, a folder without last.pt had its config.json replaced and its
    metrics.jsonl deleted."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"my": "own settings"}')
    (mine / "metrics.jsonl").write_text('{"epoch": 0, "mine": true}\n')
    before = contents(mine)
    args = ["train", "--pairs", small_world / "pairs.h5", "--images-root", small_world / "photos", "-o", mine]
    args += ["--epochs", 1, "--neg-num", 1, "--image-size", 32, "--test-image-size", 32, "--query-size", 6]
    args += ["--pool-size", 12, "--arch", "resnet18", "--workers", 0, "--device", "cpu"]
    line = one_line(cli(*args), str(mine), "holds config.json", "--overwrite", "--resume")
    assert "\n" not in line
    assert contents(mine) == before and sorted(os.listdir(mine)) == ["config.json", "metrics.jsonl"]  # no .lock


# ----------------------------------------------------------------------------- one train per folder
HOLD_THE_LOCK = """
import fcntl, os, sys, time
os.makedirs(sys.argv[1], exist_ok=True)
fd = os.open(os.path.join(sys.argv[1], ".lock"), os.O_CREAT | os.O_RDWR)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_train_on_a_folder_in_use_stops_at_once_and_a_killed_ones_lock_is_gone(
    small_world, finished, tmp_path
):
    run = copy_run(finished, tmp_path)
    before = contents(run)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_THE_LOCK, str(run)], stdout=subprocess.PIPE, start_new_session=True
    )
    try:
        assert holder.stdout.readline() == b"locked\n"
        new = ["train", "--pairs", small_world / "pairs.h5", "-o", run, "--overwrite", "--arch", "resnet18"]
        for args in (resume_args(run), new):
            t = time.perf_counter()
            one_line(cli(*args), f"{run}: another train is writing this folder")
            assert time.perf_counter() - t < 30  # at once, not after waiting
        assert contents(run) == before
        # a new folder made by the second run is not removed by its failure either
        other = tmp_path / "other"
        holder2 = subprocess.Popen(
            [sys.executable, "-c", HOLD_THE_LOCK, str(other)], stdout=subprocess.PIPE, start_new_session=True
        )
        assert holder2.stdout.readline() == b"locked\n"
        one_line(cli("train", "--pairs", small_world / "pairs.h5", "-o", other), "another train is writing")
        assert other.is_dir()
        os.killpg(holder2.pid, signal.SIGKILL)
        holder2.wait()
    finally:
        os.killpg(holder.pid, signal.SIGKILL)  # kill -9: the system drops the lock
        holder.wait()
    assert (run / ".lock").exists()  # left by the killed holder, without a lock
    train(None, None, run, resume=True, epochs=2)  # stops nothing
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [-1, 0, 1]


def test_train_holds_the_lock_for_the_whole_run(small_world, tmp_path):
    run = tmp_path / "run"
    refused = []

    def second_train(epoch, metrics):
        with pytest.raises(SfmpairsError, match="another train is writing this folder") as e:
            train(small_world / "pairs.h5", small_world / "photos", run, overwrite=True, **FAST)
        refused.append(str(e.value))

    train(small_world / "pairs.h5", small_world / "photos", run, on_epoch_end=second_train, **{**FAST, "epochs": 2})
    assert len(refused) == 2 and not (run / ".lock").exists()  # removed when the run ends
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [-1, 0, 1]


# ----------------------------------------------------------------------------- damaged run folders
def _cut(text):
    return text[:50]


@pytest.mark.parametrize(
    "damage, expected",
    [
        (_cut, r"config\.json: line \d+: not JSON"),
        (lambda text: "[1, 2]", r"config\.json: not a JSON object"),
        (lambda text: json.dumps({**json.loads(text), "pairs": None}), r"config\.json: pairs must be text, not null"),
        (lambda text: json.dumps({**json.loads(text), "epochs": "x"}), r"config\.json: epochs must be an integer"),
        (lambda text: json.dumps({**json.loads(text), "pool": "max"}), r"config\.json: unknown --pool 'max'"),
    ],
    ids=["cut", "list", "pairs-null", "epochs-text", "unknown-pool"],
)
def test_resume_refuses_a_damaged_config_json_in_one_line(finished, tmp_path, damage, expected):
    run = copy_run(finished, tmp_path)
    (run / "config.json").write_text(damage((run / "config.json").read_text()))
    before = contents(run)
    line = one_line(cli(*resume_args(run)))
    assert re.search(f"{re.escape(str(run))}/{expected}", line), line
    assert contents(run) == before


@pytest.mark.parametrize(
    "extra, expected",
    [('{"epoch": 1, "lo', "line 3: not JSON"), ('{"loss": 1}', "line 3: epoch must be an integer")],
    ids=["cut", "no-epoch"],
)
def test_resume_refuses_a_damaged_metrics_line_in_one_line(finished, tmp_path, extra, expected):
    run = copy_run(finished, tmp_path)
    with open(run / "metrics.jsonl", "a") as f:
        f.write(extra + "\n")
    before = contents(run)
    one_line(cli(*resume_args(run)), f"{run / 'metrics.jsonl'}: {expected}")
    assert contents(run) == before


def _without(key):
    def damage(state):
        del state["train"][key]

    return damage


@pytest.mark.parametrize(
    "damage, expected",
    [
        (_without("best_map"), "the training state (train) lacks best_map"),
        (lambda s: s.update(train=5), "train is int, not a dict"),
        (lambda s: s["train"].update(epoch="1"), "train epoch must be an integer >= 0, not '1'"),
        (lambda s: s["train"].update(rng={"numpy": {}}), "train rng must be a dict with a torch state"),
        (lambda s: s["train"]["optimizer"].update(param_groups=[]), "its training state does not fit the network"),
        (lambda s: s["train"]["rng"]["numpy"].update(bit_generator="nope"), "its training state does not fit"),
    ],
    ids=["no-best_map", "train-int", "epoch-text", "no-torch-rng", "optimizer-groups", "numpy-rng"],
)
def test_resume_refuses_a_damaged_training_state_in_one_line(finished, tmp_path, damage, expected):
    run = copy_run(finished, tmp_path)
    state = torch.load(run / "last.pt", weights_only=True)
    damage(state)
    torch.save(state, run / "last.pt")
    before = contents(run)
    one_line(cli(*resume_args(run)), f"{run / 'last.pt'}: a damaged sfmpairs checkpoint", expected)
    assert contents(run) == before


# ----------------------------------------------------------------------------- damaged checkpoints
CHECKPOINT_DAMAGE = {
    "no-config": (lambda s: s.pop("config"), "no config"),
    "config-list": (lambda s: s.update(config=[1, 2]), "config is list, not a dict"),
    "state_dict-text": (lambda s: s.update(state_dict="x"), "state_dict is not a dict of named tensors"),
    "arch-int": (lambda s: s["config"].update(arch=5), "config arch must be text, not 5"),
    "image_size-text": (lambda s: s["config"].update(image_size="big"), "config image_size must be a positive"),
    "mean-short": (lambda s: s["config"].update(mean=[0.5]), "config mean must be 3 numbers"),
    "whitening-text": (lambda s: s["config"].update(whitening="yes"), "config whitening must be null or a positive"),
    "epoch-text": (lambda s: s.update(epoch="x"), "epoch must be an integer, not 'x'"),
    "val_map-text": (lambda s: s.update(val_map="high"), "val_map must be null or a number"),
}


@pytest.mark.parametrize("case", CHECKPOINT_DAMAGE)
def test_checkpoints_with_damaged_content_are_one_line_for_every_reader(small_world, tmp_path, case):
    """A checkpoint that torch reads (tensors and plain data) but whose content is not what
    sfmpairs wrote: KeyError, TypeError, AttributeError or RuntimeError before."""
    damage, expected = CHECKPOINT_DAMAGE[case]
    save_checkpoint(tmp_path / "good.pt", build_network({"arch": "resnet18"}), epoch=0, val_map=0.5)
    state = torch.load(tmp_path / "good.pt", weights_only=True)
    damage(state)
    torch.save(state, tmp_path / "bad.pt")
    prefix = f"{tmp_path / 'bad.pt'}: a damaged sfmpairs checkpoint: "
    with pytest.raises(SfmpairsError) as e:
        load_checkpoint(tmp_path / "bad.pt")
    assert str(e.value).startswith(prefix + expected), str(e.value)
    one_line(cli("info", tmp_path / "bad.pt"), prefix + expected)
    extract = ["extract", "--model", tmp_path / "bad.pt", "--store", small_world / "sfm.h5", "-o", tmp_path / "d.h5"]
    one_line(cli(*extract, "--images-root", small_world / "photos"), prefix + expected)
    assert not (tmp_path / "d.h5").exists()
    # a run resumed from it, and a new one starting from it (--weights)
    run = tmp_path / "run"
    with pytest.raises(SfmpairsError, match="a damaged sfmpairs checkpoint"):
        options = {k: v for k, v in FAST.items() if k != "arch"}
        train(small_world / "pairs.h5", small_world / "photos", run, weights=tmp_path / "bad.pt", **options)
    assert not run.exists()


def test_weights_that_do_not_fit_name_the_keys(tmp_path):
    """load_state_dict's first line only said "Error(s) in loading state_dict"."""
    save_checkpoint(tmp_path / "c.pt", build_network({"arch": "resnet18"}))
    state = torch.load(tmp_path / "c.pt", weights_only=True)
    state["state_dict"]["features.0.weight"] = torch.zeros(2)
    del state["state_dict"]["features.1.bias"]
    torch.save(state, tmp_path / "c.pt")
    with pytest.raises(SfmpairsError) as e:
        load_checkpoint(tmp_path / "c.pt")
    text = str(e.value)
    assert text.startswith(f"{tmp_path / 'c.pt'}: not resnet18 weights: 1 missing key (features.1.bias)"), text
    assert "features.0.weight: file (2,), network (64, 3, 7, 7)" in text and "\n" not in text
    state["config"]["arch"] = "resnet9"
    torch.save(state, tmp_path / "c.pt")
    with pytest.raises(SfmpairsError, match=r"c\.pt: unknown architecture 'resnet9'"):
        load_checkpoint(tmp_path / "c.pt")
