"""Training and extraction under torchrun (gloo, 2 processes on the CPU): the same
weights as one process on the same global batch, files written by rank 0 alone, a run
killed during an epoch resumed under torchrun, descriptors equal to one process's."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import SMALL
from sfmpairs.distributed import Ranks
from sfmpairs.retrieval.network import load_checkpoint
from sfmpairs.train.train import train

pytestmark = pytest.mark.skipif(
    shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
    reason="torchrun is not installed beside this Python",
)

# 13 queries in batches of 3: the last batch holds one tuple, fewer than the ranks. One
# epoch of plain SGD: a step is linear in the gradient, so the ranks' float rounding (the
# images of a batch forwarded in other groups) stays at its size, about 1e-7. (Adam
# divides by the root of the squared gradients and lifts that noise to the size of lr
# where gradients are near zero; and a new epoch mines with the slightly different
# network: 1 or 2 threads in one process differ by 1e-6 after two epochs.)
RUN = {**SMALL, "epochs": 1, "query_size": 13, "batch_size": 3, "optimizer": "sgd", "lr": 1e-3, "momentum": 0.0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, procs: int = 2, wait: bool = True):
    """``torchrun --nproc_per_node=procs -m sfmpairs ARGS`` on the CPU (gloo)."""
    command = [
        str(Path(sys.executable).parent / "torchrun"),
        f"--nproc_per_node={procs}",
        f"--master_port={free_port()}",
        "-m",
        "sfmpairs",
        *[str(a) for a in args],
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    if not wait:
        return subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def train_args(small_world, run_dir, options=RUN):
    args = ["train", "--pairs", small_world / "pairs.h5", "--images-root", small_world / "photos", "-o", run_dir]
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}", value]
    return args


def assert_same_weights(a: Path, b: Path, atol: float) -> None:
    net_a, _ = load_checkpoint(a)
    net_b, _ = load_checkpoint(b)
    for (name, x), (_, y) in zip(net_a.state_dict().items(), net_b.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=0, atol=atol, msg=name)


@pytest.fixture(scope="module")
def one_process(small_world, tmp_path_factory):
    """The reference: the same run in one process."""
    run = tmp_path_factory.mktemp("one") / "run"
    torch.set_num_threads(1)
    try:
        train(small_world / "pairs.h5", small_world / "photos", run, **RUN)
    finally:
        torch.set_num_threads(os.cpu_count() or 1)
    return run


def test_shares_cover_every_item_once_in_order():
    for n in range(0, 12):
        for world in (1, 2, 3, 5):
            spans = [Ranks(r, world).share(n) for r in range(world)]
            assert spans[0][0] == 0 and spans[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # contiguous, in rank order
            sizes = [b - a for a, b in spans]
            assert max(sizes) - min(sizes) <= 1


def test_two_ranks_train_the_weights_of_one_process_and_only_rank_0_writes(small_world, tmp_path, one_process):
    run = tmp_path / "run"
    proc = torchrun(*train_args(small_world, run))
    # the global batch means the same: the weights equal one process's, to float precision
    assert_same_weights(one_process / "last.pt", run / "last.pt", atol=1e-6)
    one = [json.loads(x) for x in (one_process / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in two] == [-1, 0]  # one line per epoch: rank 0's alone
    for a, b in zip(one, two):
        assert b["val_map"] == pytest.approx(a["val_map"], abs=1e-6)
        if a["loss"] is not None:
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)  # the mean over every rank's tuples
            assert (b["queries"], b["pool"]) == (a["queries"], a["pool"])
    config = json.loads((run / "config.json").read_text())
    assert config["world_size"] == 2
    assert sorted(p.name for p in run.iterdir()) == [
        "best.pt",
        "config.json",
        "last.pt",
        "metrics.jsonl",
        "metrics.png",
    ] + (["tensorboard"] if (run / "tensorboard").exists() else [])
    log = proc.stdout + proc.stderr
    assert log.count("epoch 0 (1 of 1): loss") == 1 and "2 ranks (gloo)" in log  # one log: rank 0's


def test_a_run_killed_during_an_epoch_resumes_under_torchrun(small_world, tmp_path):
    run = tmp_path / "run"
    options = {**SMALL, "epochs": 3, "query_size": 13, "batch_size": 3}  # Adam, as by default
    proc = torchrun(*train_args(small_world, run, options), wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # kill it once epoch 0 is recorded
        if (run / "last.pt").exists():
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read().decode()  # still running: killed during an epoch
    ranks = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in ranks:  # torchrun starts each rank in a session of its own: kill -9 them too
        os.killpg(int(pid), signal.SIGKILL)
    proc.wait()
    assert (run / "last.pt").exists() and json.loads((run / "config.json").read_text())["epochs"] == 3
    torchrun("train", "--resume", run)
    epochs = [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [-1, 0, 1, 2]  # each epoch once, neither a gap nor a repeat
    uninterrupted = tmp_path / "uninterrupted"
    torchrun(*train_args(small_world, uninterrupted, options))
    assert_same_weights(uninterrupted / "last.pt", run / "last.pt", atol=1e-6)  # the same ranks, the same sums


def test_extract_under_torchrun_writes_one_file_equal_to_one_process(small_world, tmp_path, one_process):
    from sfmpairs.retrieval.extract import extract

    model = one_process / "last.pt"
    extract(
        model,
        tmp_path / "one.h5",
        store=small_world / "sfm.h5",
        images_root=small_world / "photos",
        device="cpu",
        workers=0,
        precision="fp32",
    )
    torchrun(
        "extract",
        "--model",
        model,
        "--store",
        small_world / "sfm.h5",
        "--images-root",
        small_world / "photos",
        "-o",
        tmp_path / "two.h5",
        "--device",
        "cpu",
        "--workers",
        0,
        "--precision",
        "fp32",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.h5", "two.h5"]  # no leftovers of rank 1
    with h5py.File(tmp_path / "one.h5") as a, h5py.File(tmp_path / "two.h5") as b:
        assert list(a["names"].asstr()[()]) == list(b["names"].asstr()[()])
        np.testing.assert_allclose(a["descriptors"][()], b["descriptors"][()], rtol=0, atol=1e-6)
        assert json.loads(b.attrs["parameters"])["world_size"] == 2


class SharedRanks(Ranks):
    """Rank ``rank`` of ``world_size``, in one process: every other rank is taken to
    send what this one sends (enough to see what this rank does with its share)."""

    def gather(self, value):
        return [value] * self.world_size


def test_each_rank_forwards_only_its_share_of_a_batch(small_world):
    """Rank 1 of 2, a batch of 3 tuples: its share is the third tuple alone, and with a
    batch of 1 tuple it forwards a tuple that counts for nothing (its loss weighs 0)."""
    from sfmpairs.config import make_conf
    from sfmpairs.retrieval.network import build_network
    from sfmpairs.train.options import TrainConf
    from sfmpairs.train.train import ImageCache, TupleForward, _optimizer, _read_pairs, train_epoch

    class Recording(TupleForward):
        def forward(self, stacks):
            self.seen.append(sum(len(x) for x in stacks))
            return super().forward(stacks)

    torch.manual_seed(0)
    net = build_network({"arch": "resnet18", "image_size": 48})
    pairs = _read_pairs(small_world / "pairs.h5")
    q, p, images = pairs["train/query"], pairs["train/positive"], pairs["train/images"]
    others = [[int(i) for i in images if pairs["cluster"][i] != pairs["cluster"][q[k]]][k : k + 2] for k in range(3)]
    tuples = [[int(q[k]), int(p[k]), *others[k]] for k in range(3)]
    conf = make_conf(
        TrainConf, arch="resnet18", image_size=48, batch_size=3, optimizer="sgd", lr=1e-3, margin=0.85, amp=False
    )
    model = Recording(net)
    model.seen = []
    cache = ImageCache(small_world / "photos", 48, 1 << 26)
    before = [x.detach().clone() for x in net.parameters()]
    train_epoch(
        net,
        tuples,
        pairs["names"],
        conf,
        _optimizer(net, conf),
        torch.amp.GradScaler("cpu", enabled=False),
        torch.device("cpu"),
        cache,
        0,
        model,
        SharedRanks(1, 2, launched=True),
    )
    assert model.seen == [len(set(tuples[2]))]  # the third tuple's images, not the batch's
    model.seen = []
    before = [x.detach().clone() for x in net.parameters()]
    train_epoch(
        net,
        tuples[:1],
        pairs["names"],
        conf,
        _optimizer(net, conf),
        torch.amp.GradScaler("cpu", enabled=False),
        torch.device("cpu"),
        cache,
        0,
        model,
        SharedRanks(1, 2, launched=True),
    )
    assert model.seen == [len(set(tuples[0]))]  # a forward for DDP's sake...
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))  # ...that moves nothing


def test_each_rank_extracts_only_its_share_and_every_rank_gets_every_descriptor(monkeypatch):
    import sfmpairs.retrieval.extract as E

    calls = []

    def fake(net, root, names, **kwargs):
        calls.append(list(names))
        return np.arange(len(names), dtype=np.float32)[:, None] + 100 * len(calls), {0: f"{names[0]}: bad"}

    monkeypatch.setattr(E, "extract_descriptors", fake)
    names = [f"im{i}" for i in range(7)]
    desc, bad = E.extract_across_ranks(None, "root", names, SharedRanks(1, 3, launched=True))
    assert calls == [["im3", "im4"]]  # rank 1 of 3: items 3 and 4 of 7
    assert desc.shape == (6, 1) and bad == {3: "im3: bad"}  # 3 ranks' shares (here all alike), in order
