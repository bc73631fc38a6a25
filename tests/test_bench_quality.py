"""The quality benchmark's code runs end to end (a tiny rendered world, one epoch, mac
positives and random negatives): a smoke test, with no threshold on scores or time."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_quality.py"
TINY = [
    "--worlds",
    "synthetic",
    "--seeds",
    "1",
    "--epochs",
    "1",
    "--configs",
    "mac/random",
    "--synth-clusters",
    "6",
    "--synth-images",
    "5",
    "--synth-size",
    "64x48",
    "--synth-points",
    "400",
    "--synth-val",
    "2",
    "--synth-test",
    "2",
    "--neg-num",
    "1",
    "--query-size",
    "4",
    "--pool-size",
    "8",
    "--image-size",
    "64",
    "--test-image-size",
    "64",
    "--threads",
    "1",
]


def test_bench_quality_runs_on_a_tiny_world(tmp_path):
    """From a random and a pretrained start (here a local weights file, as on an offline
    machine): a table per start and their comparison run by run."""
    import torch
    import torchvision

    spec = importlib.util.spec_from_file_location("bench_quality", BENCH)
    bench = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_quality", bench)  # its dataclass looks its module up
    spec.loader.exec_module(bench)
    torch.manual_seed(7)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "resnet18.pth")
    out, threads = tmp_path / "quality.json", torch.get_num_threads()
    starts = ["--init", "random,pretrained", "--pretrained", str(tmp_path / "resnet18.pth")]
    try:
        bench.main(TINY + starts + ["--workdir", str(tmp_path / "work"), "--json", str(out)])
    finally:
        torch.set_num_threads(threads)  # main sets the process's torch threads
    found = json.loads(out.read_text())
    assert set(found["worlds"]) == {"synthetic/random", "synthetic/pretrained"}
    for start, world in found["worlds"].items():
        fold = world["folds"][0]
        assert not set(fold["test"]) & (set(fold["train"]) | set(fold["val"]))  # test scenes never seen
        assert [r["config"] for r in world["summary"]] == ["untrained", "mac + random"]
        runs = [r for r in world["runs"] if r["strategy"] != "untrained"]
        assert len(runs) == 1 and all(0 <= r["test_best"] <= 1 and 0 <= r["test_last"] <= 1 for r in runs)
    untrained = {s: w["runs"][0]["test"] for s, w in found["worlds"].items()}
    lines = found["starts"]["synthetic"]
    assert len(lines) == 3 and lines[0].startswith("untrained (untrained): ")
    assert f"{100 * (untrained['synthetic/pretrained'] - untrained['synthetic/random']):+.1f}" in lines[0]
