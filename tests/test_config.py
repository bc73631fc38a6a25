"""Each stage's configuration: one dataclass holds the defaults; the command line's options
come from it, pass on only what the user gave, and every output records the settings."""

from __future__ import annotations

import dataclasses
import json

import h5py
import pytest
from click.testing import CliRunner

from sfmpairs.cli import main
from sfmpairs.common import SfmpairsError
from sfmpairs.config import conf_dict, make_conf
from sfmpairs.mining.options import ExportConf, MineConf
from sfmpairs.retrieval.options import EvaluateConf, ExtractConf, WhitenConf
from sfmpairs.sfm_io.options import IngestConf, ReconstructConf
from sfmpairs.train.options import TrainConf

STAGES = {
    "ingest": IngestConf,
    "reconstruct": ReconstructConf,
    "mine": MineConf,
    "extract": ExtractConf,
    "evaluate": EvaluateConf,
    "whiten": WhitenConf,
    "train": TrainConf,
    "export": ExportConf,
}


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def options_of(command: str) -> dict:
    """--option -> click parameter, of a command."""
    cmd = main.commands[command]
    return {opt: p for p in cmd.params for opt in p.opts if opt.startswith("--")}


@pytest.mark.parametrize("command", STAGES)
def test_every_setting_is_an_option_with_help_and_its_default(command):
    cls, opts = STAGES[command], options_of(command)
    ctx = main.commands[command].make_context(command, ["--help"], resilient_parsing=True)
    for f in dataclasses.fields(cls):
        if not f.metadata["cli"]:
            continue
        name = "--" + (f.metadata["name"] or f.name).replace("_", "-")
        assert name in opts, f"sfmpairs {command}: no {name} for {cls.__name__}.{f.name}"
        param = opts[name]
        assert param.default is None  # "not given": the class supplies the default
        record = param.get_help_record(ctx)[1]
        assert f.metadata["help"] in record
        if not (f.type == "bool" and f.default is False):
            assert "[default: " in record, record


def test_the_help_shows_the_paper_defaults():
    """Values written here by hand from the paper and the authors' code, not read from
    the classes: a default changed by mistake in the class shows here."""
    help_text = " ".join(invoke("mine", "--help").output.split())
    for expected in (
        "k, the images in M(q): nearest camera centres in q's model. [default: 100]",
        "[default: relaxed]",
        "relaxed: scale change, at most (1: same scale). [default: 1.5]",
        "relaxed: co-observed points / points of q, at least. [default: 0.2]",
    ):
        assert expected in help_text
    help_text = " ".join(invoke("train", "--help").output.split())
    for expected in (
        "Training queries per epoch. [default: 2000]",
        "negative pool per epoch. [default: 20000]",
        "[default: 0.7 alexnet, 0.75 vgg16, else 0.85]",
        "training and mining. [default: 362]",
        "[default: on with CUDA, off on the CPU]",
    ):
        assert expected in help_text
    help_text = " ".join(invoke("extract", "--help").output.split())
    assert "e.g. 1,0.7071,0.5. [default: 1]" in help_text


def test_make_conf_merges_and_refuses_unknown_names():
    conf = make_conf(MineConf, {"pool_size": 7}, seed=3, val_clusters=["a", "b"])
    assert (conf.pool_size, conf.seed, conf.strategy, conf.val_clusters) == (7, 3, "relaxed", ("a", "b"))
    with pytest.raises(SfmpairsError, match="unknown option 'pool_sise'"):
        make_conf(MineConf, pool_sise=7)
    assert conf_dict(conf)["val_clusters"] == ["a", "b"]  # JSON-ready


def test_train_and_evaluate_share_the_device_settings_of_extract():
    assert TrainConf.device == ExtractConf.device == EvaluateConf.device == "auto"
    assert issubclass(TrainConf, ExtractConf.__mro__[-2])  # DeviceConf, written once


def test_the_command_line_passes_only_what_was_given_and_the_file_records_it(small_world, tmp_path):
    """`mine` with two options: the pair file records those two and the class's defaults
    for the rest, as attributes and in its parameters."""
    out = tmp_path / "pairs.h5"
    r = invoke(
        "mine", small_world / "sfm.h5", "-o", out, "-k", 9, "--val-clusters", "scene_00/sparse/0, scene_01/sparse/0"
    )
    assert r.exit_code == 0, r.output
    with h5py.File(out) as f:
        parameters = json.loads(f.attrs["parameters"])
        assert f.attrs["pool_size"] == 9 and f.attrs["strategy"] == "relaxed"
        assert list(f.attrs["val_clusters"]) == ["scene_00/sparse/0", "scene_01/sparse/0"]
    expected = {**conf_dict(MineConf()), "pool_size": 9, "val_clusters": ["scene_00/sparse/0", "scene_01/sparse/0"]}
    assert {k: parameters[k] for k in expected} == expected


def test_comma_separated_settings_are_checked_with_a_one_line_error(tmp_path, small_world):
    r = invoke(
        "extract",
        "--arch",
        "resnet18",
        "--images-root",
        tmp_path,
        "--list",
        tmp_path / "l.txt",
        "-o",
        tmp_path / "d.h5",
        "--multiscale",
        "1,x",
    )
    assert (
        r.exit_code == 2
        and r.output.strip() == "sfmpairs: error: --multiscale '1,x': give comma-separated numbers, e.g. 1,0.7071,0.5"
    )
    assert not (tmp_path / "d.h5").exists()
    r = invoke("mine", small_world / "sfm.h5", "-o", tmp_path / "p.h5", "--val-clusters", " , ")
    assert r.exit_code == 2 and r.output.strip() == "sfmpairs: error: --val-clusters ' , ': give at least one value"


def test_a_value_equal_to_nothing_is_still_given(small_world, tmp_path):
    """0 and off are values, not "not given": they reach the stage over its defaults."""
    out = tmp_path / "pairs.h5"
    assert invoke("mine", small_world / "sfm.h5", "-o", out, "--val-fraction", 0, "--seed", 0).exit_code == 0
    with h5py.File(out) as f:
        assert f.attrs["val_fraction"] == 0 and "val" not in f["clusters/split"].asstr()[()]
    assert make_conf(TrainConf, amp=False).amp is False and make_conf(TrainConf, amp=None).amp is None
    assert make_conf(MineConf, seed=None).seed == 0  # None: not given (the Python API's way too)


def test_the_evaluation_report_and_the_run_record_their_settings(small_world, tmp_path):
    from conftest import SMALL
    from sfmpairs.retrieval.evaluate import evaluate
    from sfmpairs.train.train import train

    run = tmp_path / "run"
    train(small_world / "pairs.h5", small_world / "photos", run, **{**SMALL, "epochs": 1, "margin": None})
    config = json.loads((run / "config.json").read_text())
    assert {f.name for f in dataclasses.fields(TrainConf)} <= set(config)
    assert config["margin"] == 0.85 and config["query_size"] == SMALL["query_size"]  # resolved, and as given
    assert (run / "metrics.png").is_file()  # the run's plot, written after the epoch
    report = evaluate(
        tmp_path / "r.json",
        pairs=small_world / "pairs.h5",
        model=run / "last.pt",
        qe=2,
        images_root=small_world / "photos",
        device="cpu",
        workers=0,
    )
    assert report["settings"] == {**conf_dict(EvaluateConf()), "qe": 2, "device": "cpu", "workers": 0}


@pytest.mark.parametrize(
    "hint, text, expected",
    [
        (tuple[float, ...], "1,0.5", (1.0, 0.5)),
        (tuple[float, ...] | None, "0.25", (0.25,)),
        (tuple[int, ...], "3, 4", (3, 4)),
        (tuple[str, ...] | None, "a,b", ("a", "b")),
    ],
)
def test_comma_separated_settings_parse_to_their_item_type(hint, text, expected):
    from dataclasses import make_dataclass

    from sfmpairs.config import make_conf, setting

    Conf = make_dataclass("Conf", [("values", hint, setting(None, "Values."))], frozen=True)
    got = make_conf(Conf, values=text).values
    assert got == expected and [type(v) for v in got] == [type(v) for v in expected]


@pytest.mark.parametrize("command", STAGES)
def test_a_value_outside_the_choices_is_one_line_naming_the_option(command):
    import dataclasses

    from sfmpairs.config import make_conf

    cls = STAGES[command]
    fields = [f for f in dataclasses.fields(cls) if f.metadata.get("choices")]
    for f in fields:
        option = "--" + (f.metadata.get("name") or f.name).replace("_", "-")
        with pytest.raises(SfmpairsError, match=f"unknown {option} 'nope' \\(choose from {f.metadata['choices'][0]}"):
            make_conf(cls, **{f.name: "nope"})
        make_conf(cls, **{f.name: f.metadata["choices"][-1]})  # every choice is taken
