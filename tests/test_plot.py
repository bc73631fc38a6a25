"""``sfmpairs.plot``: the curves of training runs and the retrieval picture show the
numbers they are given, and their PNGs follow the output rules (atomic, no overwrite
unless asked, provenance in the metadata).

The references are written by hand here: metrics files with known numbers, solid-colour
photos whose frames are found back by pixel sampling in the saved PNG."""

from __future__ import annotations

import json
import logging
import math
import time

import numpy as np
import pytest
from PIL import Image

import sfmpairs
from sfmpairs import SfmpairsError
from sfmpairs.plot import plot_run, plot_runs, read_metrics, retrieval_figure, retrieval_grid, run_figure

# two runs by hand: run "a" validated at epochs 0 and 2 only, run "b" never
RUN_A = [
    {
        "epoch": 0,
        "loss": 0.9,
        "val_map": 0.25,
        "lr": 1e-6,
        "seconds": 3.0,
        "positive_distance": 0.5,
        "negative_distance": 0.9,
        "queries": 10,
        "pool": 40,
    },
    {
        "epoch": 1,
        "loss": 0.7,
        "val_map": None,
        "lr": 1e-7,
        "seconds": 3.1,
        "positive_distance": 0.4,
        "negative_distance": 1.0,
        "queries": 10,
        "pool": 40,
    },
    {
        "epoch": 2,
        "loss": 0.4,
        "val_map": 0.5,
        "lr": 1e-8,
        "seconds": 2.9,
        "positive_distance": 0.3,
        "negative_distance": 1.1,
        "queries": 10,
        "pool": 40,
    },
]
RUN_B = [
    {"epoch": 0, "loss": 1.5, "val_map": None, "lr": 2e-6},
    {"epoch": 1, "loss": 1.25, "val_map": None, "lr": 1e-6},
]


def write_run(folder, records, extra_lines=()):
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in records] + list(extra_lines)
    (folder / "metrics.jsonl").write_text("".join(x + "\n" for x in lines))
    return folder


def files_in(folder):
    return sorted(p.name for p in folder.iterdir())


# --- read_metrics ---------------------------------------------------------------------------------------------


def test_read_metrics_returns_the_lines(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    # a blank line in the middle is allowed; a line without val_map reads as null
    (run / "metrics.jsonl").write_text(
        '{"epoch": 0, "loss": 0.9, "val_map": 0.25, "lr": 1e-06, "queries": 10}\n'
        "\n"
        '{"epoch": 3, "loss": 0.5, "lr": 5e-07}\n'
    )
    assert read_metrics(run) == [
        {"epoch": 0, "loss": 0.9, "val_map": 0.25, "lr": 1e-6, "queries": 10},
        {"epoch": 3, "loss": 0.5, "val_map": None, "lr": 5e-7},
    ]


@pytest.mark.parametrize(
    "content, problem",
    [
        ('{"epoch": 0, "loss": 0.9, "val_map": null, "lr": 1e-6}\n{"epoch": 1, "loss": 0.8, "va', "line 2: not JSON"),
        ("[1, 2]\n", "line 1: not a JSON object"),
        ('{"epoch": 0, "loss": "big", "val_map": null, "lr": 1e-6}\n', "line 1: loss must be a number"),
        ('{"epoch": 0.5, "loss": 1, "val_map": null, "lr": 1e-6}\n', "line 1: epoch must be an integer"),
        ('{"epoch": 0, "loss": 1, "val_map": null, "lr": 0}\n', "line 1: lr must be a positive number"),
        ('{"epoch": 0, "loss": 1, "val_map": "high", "lr": 1e-6}\n', "line 1: val_map must be a number or null"),
        ('{"epoch": 1, "loss": 1, "lr": 1e-6}\n{"epoch": 1, "loss": 1, "lr": 1e-6}\n', "line 2: epoch 1 after epoch 1"),
        ("\n", "no epochs recorded"),
    ],
)
def test_read_metrics_bad_lines_name_the_file_and_line(tmp_path, content, problem):
    (tmp_path / "metrics.jsonl").write_text(content)
    with pytest.raises(SfmpairsError) as e:
        read_metrics(tmp_path)
    assert str(e.value).startswith(f"{tmp_path / 'metrics.jsonl'}: {problem}")
    assert "\n" not in str(e.value)


def test_the_line_before_training_has_a_val_map_only(tmp_path):
    """Epoch -1 (the network before training): on the mAP panel, not on loss or lr."""
    (tmp_path / "metrics.jsonl").write_text(
        '{"epoch": -1, "loss": null, "val_map": 0.4, "lr": null}\n'
        '{"epoch": 0, "loss": 0.9, "val_map": 0.6, "lr": 1e-4}\n'
    )
    metrics = read_metrics(tmp_path)
    loss, val, lr = run_figure({"r": metrics}).axes
    np.testing.assert_array_equal(val.get_lines()[0].get_xdata(), [-1, 0])
    np.testing.assert_allclose(val.get_lines()[0].get_ydata(), [40, 60])
    np.testing.assert_array_equal(loss.get_lines()[0].get_xdata(), [0])
    np.testing.assert_array_equal(lr.get_lines()[0].get_xdata(), [0])
    (tmp_path / "metrics.jsonl").write_text('{"epoch": -2, "loss": null, "val_map": 0.4, "lr": null}\n')
    with pytest.raises(SfmpairsError, match="epoch must be an integer >= -1"):
        read_metrics(tmp_path)


def test_read_metrics_missing_folder_or_file(tmp_path):
    with pytest.raises(SfmpairsError, match=f"^{tmp_path / 'nowhere'}: run folder not found$"):
        read_metrics(tmp_path / "nowhere")
    with pytest.raises(SfmpairsError, match=f"^{tmp_path / 'metrics.jsonl'}: not found"):
        read_metrics(tmp_path)


# --- run_figure -----------------------------------------------------------------------------------------------


def test_run_figure_draws_the_numbers(tmp_path):
    fig = run_figure({"run a": RUN_A, "run b": RUN_B})
    loss, val, lr = fig.axes
    assert [ax.get_title() for ax in fig.axes] == [
        "training loss",
        "val mAP (%); epoch -1: before training",
        "learning rate",
    ]
    # one line a run on every panel, in the order given
    assert [len(ax.get_lines()) for ax in fig.axes] == [2, 2, 2]
    np.testing.assert_array_equal(loss.get_lines()[0].get_xdata(), [0, 1, 2])
    np.testing.assert_allclose(loss.get_lines()[0].get_ydata(), [0.9, 0.7, 0.4])
    np.testing.assert_array_equal(loss.get_lines()[1].get_xdata(), [0, 1])
    np.testing.assert_allclose(loss.get_lines()[1].get_ydata(), [1.5, 1.25])
    # mAP in percent, epoch 1 (null) left out; run b has no validation: an empty line
    np.testing.assert_array_equal(val.get_lines()[0].get_xdata(), [0, 2])
    np.testing.assert_allclose(val.get_lines()[0].get_ydata(), [25.0, 50.0])
    assert len(val.get_lines()[1].get_xdata()) == 0
    np.testing.assert_allclose(lr.get_lines()[0].get_ydata(), [1e-6, 1e-7, 1e-8])
    np.testing.assert_allclose(lr.get_lines()[1].get_ydata(), [2e-6, 1e-6])
    assert lr.get_yscale() == "log" and loss.get_yscale() == "linear" and val.get_yscale() == "linear"
    # one colour a run, the same on the three panels
    for ax in fig.axes:
        assert ax.get_lines()[0].get_color() == loss.get_lines()[0].get_color()
        assert ax.get_lines()[1].get_color() == loss.get_lines()[1].get_color()
    assert loss.get_lines()[0].get_color() != loss.get_lines()[1].get_color()
    legend = loss.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["run a", "run b"]
    # the epoch axis is shared and its ticks are whole epochs (3 epochs would get 0.25 steps otherwise)
    fig.canvas.draw()
    assert val.get_xlim() == loss.get_xlim() == lr.get_xlim()
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), ticks


def test_run_figure_without_validation_says_so():
    fig = run_figure({"b": RUN_B})
    assert "no validation" in [t.get_text() for t in fig.axes[1].texts]
    assert "no validation" not in [t.get_text() for t in run_figure({"a": RUN_A}).axes[1].texts]


# --- plot_runs and plot_run -----------------------------------------------------------------------------------


def test_plot_runs_writes_a_png_with_its_provenance(tmp_path):
    a = write_run(tmp_path / "exp1" / "run", RUN_A)
    b = write_run(tmp_path / "exp2" / "run", RUN_B)  # the same folder name: told apart by the parent's
    c = write_run(tmp_path / "exp2" / "other", RUN_B)
    out = tmp_path / "compare.png"
    assert plot_runs([a, b, c], out) == out
    with Image.open(out) as img:
        assert img.format == "PNG" and img.width > 600 and img.height > 200
        text = dict(img.text)
    assert text["tool_version"] == sfmpairs.__version__ and text["tool"] == "sfmpairs"
    assert "val mAP" in text["Description"] and "learning rate" in text["Description"]
    assert json.loads(text["inputs"]) == [str(a / "metrics.jsonl"), str(b / "metrics.jsonl"), str(c / "metrics.jsonl")]
    assert json.loads(text["parameters"])["labels"] == ["exp1/run", "exp2/run", "other"]
    assert files_in(tmp_path) == ["compare.png", "exp1", "exp2"]  # no temporary file left


def test_plot_runs_labels(tmp_path):
    a = write_run(tmp_path / "a", RUN_A)
    out = plot_runs([a], tmp_path / "one.png", labels=["baseline"])
    with Image.open(out) as img:
        assert json.loads(img.text["parameters"])["labels"] == ["baseline"]
    with pytest.raises(SfmpairsError, match="2 labels for 1 runs"):
        plot_runs([a], tmp_path / "two.png", labels=["x", "y"])
    with pytest.raises(SfmpairsError, match="give a .png output"):
        plot_runs([a], tmp_path / "runs.pdf")
    assert not (tmp_path / "two.png").exists() and not (tmp_path / "runs.pdf").exists()


def test_plot_runs_refuses_to_overwrite(tmp_path):
    a = write_run(tmp_path / "a", RUN_A)
    out = tmp_path / "runs.png"
    out.write_bytes(b"the user's file")
    with pytest.raises(SfmpairsError, match="output exists; pass --overwrite"):
        plot_runs([a], out)
    assert out.read_bytes() == b"the user's file"
    plot_runs([a], out, overwrite=True)
    with Image.open(out) as img:
        assert img.format == "PNG"
    assert files_in(tmp_path) == ["a", "runs.png"]


def test_plot_runs_bad_run_leaves_no_output(tmp_path):
    a = write_run(tmp_path / "a", RUN_A)
    bad = write_run(tmp_path / "bad", RUN_B, extra_lines=['{"epoch": 2, "loss": '])
    out = tmp_path / "runs.png"
    with pytest.raises(SfmpairsError, match=f"^{bad / 'metrics.jsonl'}: line 3: not JSON"):
        plot_runs([a, bad], out)
    assert not out.exists()
    assert files_in(tmp_path) == ["a", "bad"]


def test_plot_runs_failing_render_leaves_no_partial_file(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    def broken_savefig(self, fname, **kwargs):
        with open(fname, "wb") as fh:
            fh.write(b"\x89PNG half a picture")
        raise RuntimeError("renderer died")

    a = write_run(tmp_path / "a", RUN_A)
    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(RuntimeError, match="renderer died"):
        plot_runs([a], tmp_path / "runs.png")
    with pytest.raises(RuntimeError, match="renderer died"):
        plot_run(a)
    assert files_in(tmp_path) == ["a"]
    assert files_in(a) == ["metrics.jsonl"]


def test_plot_run_replaces_its_picture_quickly(tmp_path):
    run = write_run(tmp_path / "run", RUN_A[:1])
    assert plot_run(run) == run / "metrics.png"
    with Image.open(run / "metrics.png") as img:
        assert json.loads(img.text["parameters"]) == {"epochs": 1}
    write_run(run, RUN_A)  # two more epochs: the picture is replaced without --overwrite
    plot_run(run)
    with Image.open(run / "metrics.png") as img:
        assert json.loads(img.text["parameters"]) == {"epochs": 3}
    assert files_in(run) == ["metrics.jsonl", "metrics.png"]
    # after every epoch of a training: well under a second for 30 epochs (the fastest of 3, on a busy machine)
    write_run(
        run,
        [
            {"epoch": e, "loss": 1 / (e + 1), "val_map": e / 40 if e % 2 else None, "lr": 1e-6 * math.exp(-0.1 * e)}
            for e in range(30)
        ],
    )
    seconds = []
    for _ in range(3):
        t0 = time.perf_counter()
        plot_run(run)
        seconds.append(time.perf_counter() - t0)
    assert min(seconds) < 1.0, seconds


# --- the retrieval picture ------------------------------------------------------------------------------------

MAGENTA = (255, 0, 255)  # the photos: a colour no frame, placeholder or background has
THUMB = 48


def is_green(p):
    return p[1] > 120 and p[0] < 80 and p[2] < 80


def is_red(p):
    return p[0] > 150 and p[1] < 60 and p[2] < 60


def is_neutral(p, low, high):
    return low <= p[0] <= high and abs(int(p[0]) - int(p[1])) < 8 and abs(int(p[1]) - int(p[2])) < 8


def is_grey(p):  # a junk frame: mid grey
    return is_neutral(p, 100, 180)


def is_placeholder(p):  # a missing photo: light grey, neither white nor a junk frame
    return is_neutral(p, 185, 235)


def is_blue(p):
    return p[2] > 150 and p[0] < 100 and p[1] < 120


def runs_of(mask):
    """(start, end) of the runs of True in a 1-d mask, end exclusive."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return list(zip(edges[::2], edges[1::2]))


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "photo.png"
    Image.new("RGB", (100, 100), MAGENTA).save(path)  # square: its thumbnail fills the tile
    return path


def test_retrieval_figure_frames_by_ground_truth(tmp_path, photo):
    rows = [
        {
            "query": photo,
            "query_name": "q.jpg",
            "results": [
                {
                    "title": "untrained",
                    "ap": 0.42,
                    "top": [(photo, "p1.jpg", "negative"), (photo, "p2.jpg", "positive")],
                },
                {"title": "trained", "ap": 0.875, "top": [(photo, "p2.jpg", "positive"), (photo, "p3.jpg", "junk")]},
            ],
        }
    ]
    out = tmp_path / "retrieval.png"
    assert retrieval_figure(rows, out, thumb=THUMB) == out
    with Image.open(out) as img:
        assert img.format == "PNG"
        text = dict(img.text)
        px = np.asarray(img.convert("RGB"))
    assert text["tool_version"] == sfmpairs.__version__
    assert "untrained" in text["Description"] and "trained" in text["Description"]
    assert json.loads(text["inputs"]) == ["q.jpg"]
    # the photos, found back by their colour: 5 tiles in one row, left to right
    magenta = np.all(px == MAGENTA, axis=2)
    ys = np.flatnonzero(magenta.any(axis=1))
    assert len(ys) == THUMB
    y = int(ys.mean())
    tiles = runs_of(magenta[y])
    assert [e - s for s, e in tiles] == [THUMB] * 5
    # the frame just left and right of each photo: query, negative, positive | positive, junk
    checks = [is_blue, is_red, is_green, is_green, is_grey]
    for (start, end), check in zip(tiles, checks):
        assert check(px[y, start - 2]) and check(px[y, end + 1]), (check.__name__, px[y, start - 2], px[y, end + 1])
        assert check(px[ys[0] - 2, (start + end) // 2])  # and above it


def test_retrieval_grid_titles_and_ap_in_percent(photo):
    rows = [
        {
            "query": photo,
            "query_name": "q.jpg",
            "results": [
                {"title": "untrained", "ap": 0.42, "top": [(photo, "a.jpg", "negative")]},
                {"title": "trained", "ap": 0.875, "top": [(photo, "b$1$", "positive")]},
                {"title": "no positives", "ap": float("nan"), "top": []},
            ],
        }
    ]
    texts = [t.get_text() for t in retrieval_grid(rows, thumb=THUMB).texts]
    assert "untrained   AP 42.0%" in texts and "trained   AP 87.5%" in texts and "no positives   AP -" in texts
    assert "1. a.jpg" in texts and "1. b$1$" in texts and "q.jpg" in texts


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def test_retrieval_figure_missing_photo_is_a_placeholder(tmp_path, photo):
    # a handler of its own on the plot's logger: whatever the CLI's tests did to logging
    heard, log = _Records(), logging.getLogger("sfmpairs.plot")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    rows = [
        {
            "query": photo,
            "query_name": "q.jpg",
            "results": [
                {
                    "title": "trained",
                    "ap": 1.0,
                    "top": [
                        (photo, "here.jpg", "positive"),
                        (tmp_path / "gone.jpg", "gone.jpg", "negative"),
                        (None, "unknown.jpg", "junk"),
                        (broken, "broken.jpg", "negative"),
                    ],
                }
            ],
        }
    ]
    out = tmp_path / "retrieval.png"
    log.addHandler(heard)
    try:
        retrieval_figure(rows, out, thumb=THUMB)
    finally:
        log.removeHandler(heard)
    warnings = [r.getMessage() for r in heard.records]
    assert len(warnings) == 3, warnings
    assert "gone.jpg: image not found" in warnings[0] and "unknown.jpg" in warnings[1]
    assert "broken.jpg: cannot decode image" in warnings[2]
    assert all("placeholder" in w for w in warnings)
    with Image.open(out) as img:
        px = np.asarray(img.convert("RGB"))
    magenta = np.all(px == MAGENTA, axis=2)
    ys = np.flatnonzero(magenta.any(axis=1))
    y = int(ys[0]) + 2  # near the tiles' top: above the placeholders' text
    assert len(runs_of(magenta[y])) == 2  # the query and here.jpg
    grey_runs = runs_of(np.array([is_placeholder(p) for p in px[y]]))
    assert [e - s for s, e in grey_runs] == [THUMB] * 3, grey_runs  # three placeholders the size of a photo
    frames = [px[y, s - 2] for s, _ in grey_runs]  # each still framed by its label: negative, junk, negative
    assert is_red(frames[0]) and is_grey(frames[1]) and is_red(frames[2]), frames
    texts = [t.get_text() for t in retrieval_grid(rows, thumb=THUMB).texts]
    missing = [t.split("\n") for t in texts if t.startswith("missing")]  # the name wrapped under "missing"
    assert [(t[0], "".join(t[1:])) for t in missing] == [
        ("missing", "gone.jpg"),
        ("missing", "unknown.jpg"),
        ("missing", "broken.jpg"),
    ]


def test_retrieval_figure_output_rules(tmp_path, photo):
    rows = [
        {
            "query": photo,
            "query_name": "q.jpg",
            "results": [{"title": "t", "ap": 0.5, "top": [(photo, "a.jpg", "positive")]}],
        }
    ]
    out = tmp_path / "retrieval.png"
    out.write_bytes(b"the user's file")
    with pytest.raises(SfmpairsError, match="output exists; pass --overwrite"):
        retrieval_figure(rows, out, thumb=THUMB)
    assert out.read_bytes() == b"the user's file"
    retrieval_figure(rows, out, overwrite=True, thumb=THUMB)
    with Image.open(out) as img:
        assert img.format == "PNG"
    bad = [{**rows[0], "results": [{"title": "t", "ap": 0.5, "top": [(photo, "a.jpg", "relevant")]}]}]
    with pytest.raises(ValueError, match="a.jpg: label 'relevant' is not one of positive, junk, negative"):
        retrieval_figure(bad, tmp_path / "bad.png", thumb=THUMB)
    assert files_in(tmp_path) == ["photo.png", "retrieval.png"]


# ----------------------------------------------------------------------------- wired into the tool
def test_plot_command_overlays_runs_and_refuses_a_mix(tmp_path):
    from click.testing import CliRunner

    from sfmpairs.cli import main

    for name, losses in (("a", [0.5, 0.3]), ("b", [0.6, 0.2])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text(
            "".join(
                json.dumps({"epoch": e, "loss": x, "val_map": 0.5, "lr": 1e-4}) + "\n" for e, x in enumerate(losses)
            )
        )
    r = CliRunner().invoke(main, ["plot", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(tmp_path / "c.png")])
    assert r.exit_code == 0, r.output
    with Image.open(tmp_path / "c.png") as img:
        assert json.loads(img.text["parameters"])["labels"] == ["a", "b"]
    (tmp_path / "r.json").write_text("{}")
    r = CliRunner().invoke(main, ["plot", str(tmp_path / "a"), str(tmp_path / "r.json"), "-o", str(tmp_path / "d.png")])
    assert r.exit_code == 2 and "not both" in r.output and not (tmp_path / "d.png").exists()


def test_evaluate_picture_frames_each_result_by_the_pair_files_ground_truth(small_world, tmp_path):
    """The report's top results carry labels that agree with the pair file's own val
    ground truth (val/gt_image: images sharing points; same cluster otherwise: junk), and
    evaluate --picture draws them; `sfmpairs plot` compares two reports."""
    import h5py
    from click.testing import CliRunner

    from sfmpairs.cli import main
    from sfmpairs.common import provenance_attrs
    from sfmpairs.retrieval.descriptors import SCHEMA, SCHEMA_VERSION, write_descriptors
    from sfmpairs.retrieval.evaluate import evaluate

    with h5py.File(small_world / "pairs.h5") as f:
        all_names = f["images/name"].asstr()[()]
    reports = []
    for k in range(2):  # random descriptors: rankings that mix positives, junk and negatives
        d = np.random.default_rng(k).normal(size=(len(all_names), 16))
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        write_descriptors(tmp_path / f"d{k}.h5", all_names, d, provenance_attrs(SCHEMA, SCHEMA_VERSION, {}, {}))
        reports.append(
            evaluate(
                tmp_path / f"r{k}.json",
                pairs=small_world / "pairs.h5",
                descriptors=tmp_path / f"d{k}.h5",
                images_root=small_world / "photos",
                picture=tmp_path / f"p{k}.png",
            )
        )
    with h5py.File(small_world / "pairs.h5") as f:
        names = f["images/name"].asstr()[()]
        cluster = f["images/cluster"][()]
        q, indptr, gt = f["val/query"][()], f["val/gt_indptr"][()], f["val/gt_image"][()]
    index = {n: i for i, n in enumerate(names)}
    d0 = np.random.default_rng(0).normal(size=(len(all_names), 16))  # the first report's descriptors, again,
    d0 = (d0 / np.linalg.norm(d0, axis=1, keepdims=True)).astype(np.float32).astype(np.float64)  # as stored
    val_images = np.flatnonzero(np.isin(cluster, cluster[q]))  # the val split: the clusters of its queries
    checked = 0
    for i, qi in enumerate(q):
        # the order: by inner product, by brute force, the query itself left out
        others = val_images[val_images != qi]
        expected_top = names[others[np.argsort(-(d0[others] @ d0[qi]), kind="stable")[:10]]]
        assert [n for n, _ in reports[0]["per_query_top"][names[qi]]] == list(expected_top)
        positives = set(names[gt[indptr[i] : indptr[i + 1]]])
        for name, label in reports[0]["per_query_top"][names[qi]]:
            expected = (
                "positive" if name in positives else "junk" if cluster[index[name]] == cluster[qi] else "negative"
            )
            assert label == expected, (names[qi], name)
            checked += 1
    assert checked == 10 * len(q) and {"positive", "junk", "negative"} == {
        label for top in reports[0]["per_query_top"].values() for _, label in top
    }
    with Image.open(tmp_path / "p0.png") as img:
        assert img.text["schema"] == "sfmpairs/retrieval-picture"
    r = CliRunner().invoke(
        main,
        [
            "plot",
            str(tmp_path / "r0.json"),
            str(tmp_path / "r1.json"),
            "--label",
            "one",
            "--label",
            "two",
            "-o",
            str(tmp_path / "both.png"),
        ],
    )
    assert r.exit_code == 0, r.output
    with Image.open(tmp_path / "both.png") as img:
        assert "one, two" in img.text["Description"] and img.width > Image.open(tmp_path / "p0.png").width
