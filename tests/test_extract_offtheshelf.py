"""The off-the-shelf network without a checkpoint, and local weights files (issue 11,
item 12: an offline machine cannot download torchvision's weights)."""

from __future__ import annotations

import hashlib
import json

import h5py
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from sfmpairs import SfmpairsError
from sfmpairs.retrieval import network
from sfmpairs.retrieval.network import build_network, open_network, save_checkpoint


def torchvision_resnet18(seed: int = 0):
    torch.manual_seed(seed)
    return torchvision.models.resnet18(weights=None).eval()


def resnet_trunk(tv, x):
    """torchvision's own modules up to the last convolutional block."""
    for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
        x = getattr(tv, name)(x)
    return x


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """resnet18 weights as torchvision saves them, and the torchvision model."""
    tv = torchvision_resnet18(seed=7)
    path = tmp_path_factory.mktemp("weights") / "resnet18-local.pth"
    torch.save(tv.state_dict(), path)
    return path, tv


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "module.", "headless", "other head"])
def test_a_local_weights_file_gives_the_backbone_its_weights(weights_file, tmp_path, wrap):
    path, tv = weights_file
    state = tv.state_dict()
    if wrap != "plain":
        path = tmp_path / f"{wrap}.pth"
        if wrap == "module.":
            state = {"module." + k: v for k, v in state.items()}
        elif wrap == "headless":
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        elif wrap == "other head":  # a classifier fine-tuned on 10 classes: the head is cut off anyway
            state = {**state, "fc.weight": torch.zeros(10, 512), "fc.bias": torch.zeros(10)}
        else:
            state = {wrap: state, "epoch": 3}
        torch.save(state, path)
    torch.manual_seed(123)  # a random initialisation the file must overwrite
    net = build_network({"arch": "resnet18", "pool": "gem"}, pretrained=path).eval()
    x = torch.rand(2, 3, 64, 80)
    with torch.no_grad():
        torch.testing.assert_close(net.features(x), resnet_trunk(tv, x), rtol=0, atol=0)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert net.config["pretrained"] == f"{path.name} (sha256 {sha[:12]})"


def test_weights_that_do_not_fit_are_refused_in_one_line(weights_file, tmp_path):
    path, tv = weights_file
    torch.manual_seed(0)
    r34 = torchvision.models.resnet34(weights=None).state_dict()
    torch.save(r34, tmp_path / "r34.pth")
    extra = len(set(r34) - set(tv.state_dict()))  # resnet34's blocks that resnet18 lacks
    with pytest.raises(SfmpairsError) as e:
        build_network({"arch": "resnet18"}, pretrained=tmp_path / "r34.pth")
    assert str(e.value) == (
        f"{tmp_path / 'r34.pth'}: not resnet18 weights: {extra} unexpected keys "
        "(layer1.2.conv1.weight, layer1.2.bn1.weight, ...)"
    )
    assert "\n" not in str(e.value)

    state = tv.state_dict()
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    del state["layer4.1.bn2.weight"], state["layer4.1.bn2.bias"]
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(SfmpairsError) as e:
        build_network({"arch": "resnet18"}, pretrained=str(tmp_path / "bad.pth"))
    assert str(e.value) == (
        f"{tmp_path / 'bad.pth'}: not resnet18 weights: 2 missing keys (layer4.1.bn2.weight, "
        "layer4.1.bn2.bias), 1 shape mismatch (conv1.weight: file (64, 3, 3, 3), network "
        "(64, 3, 7, 7))"
    )

    with pytest.raises(SfmpairsError, match=r"not efficientnet_b0 weights: \d+ missing keys .*unexpected keys"):
        build_network({"arch": "efficientnet_b0"}, pretrained=path)
    with pytest.raises(SfmpairsError, match="missing.pth: no such file"):
        build_network({"arch": "resnet18"}, pretrained=tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a weights file")
    with pytest.raises(SfmpairsError, match="junk.pth: not a weights file"):
        build_network({"arch": "resnet18"}, pretrained=tmp_path / "junk.pth")
    torch.save({"a": 1}, tmp_path / "dict.pth")
    with pytest.raises(SfmpairsError, match="dict.pth: not a weights file"):
        build_network({"arch": "resnet18"}, pretrained=tmp_path / "dict.pth")
    save_checkpoint(tmp_path / "ckpt.pt", build_network({"arch": "resnet18"}))  # needs --model, not --pretrained
    with pytest.raises(
        SfmpairsError, match="ckpt.pt: an sfmpairs checkpoint, not backbone weights; give it as --model"
    ):
        build_network({"arch": "resnet18"}, pretrained=tmp_path / "ckpt.pt")


def test_imagenet_weights_are_recorded(weights_file, monkeypatch):
    path, tv = weights_file
    monkeypatch.setattr(network, "pretrained_state_dict", lambda arch: tv.state_dict())
    for pretrained in (True, "imagenet"):
        net = open_network(arch="resnet18", pretrained=pretrained)
        x = torch.rand(1, 3, 64, 64)
        with torch.no_grad():
            torch.testing.assert_close(net.features(x), resnet_trunk(tv, x), rtol=0, atol=0)
        assert net.config["pretrained"] == "imagenet (resnet18-f37072fd.pth)"


def test_open_network(tmp_path, caplog):
    torch.manual_seed(0)
    saved = build_network({"arch": "resnet18", "pool": "mac", "image_size": 200})
    save_checkpoint(tmp_path / "m.pt", saved)
    net = open_network(tmp_path / "m.pt")
    assert not net.training and net.config == saved.config
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(net(x), saved.eval()(x))
    with caplog.at_level("WARNING", logger="sfmpairs.network"):
        net = open_network(arch="resnet18")
    assert "resnet18 with random weights" in caplog.text
    assert not net.training and net.whiten is None
    assert (net.config["arch"], net.config["pool"], net.config["image_size"]) == ("resnet18", "gem", 1024)
    assert "pretrained" not in net.config  # random weights
    assert open_network(arch="resnet18", pool="spoc").config["pool"] == "spoc"
    with pytest.raises(SfmpairsError, match="^give --model or --arch, not both$"):
        open_network(tmp_path / "m.pt", arch="resnet18")
    with pytest.raises(SfmpairsError, match="--pool and --pretrained go with --arch"):
        open_network(tmp_path / "m.pt", pool="gem")
    with pytest.raises(SfmpairsError, match="^give --model CHECKPOINT, or --arch for an off-the-shelf network$"):
        open_network()
    with pytest.raises(SfmpairsError, match=r"or --arch for an off-the-shelf network \(--pool and --pretrained go"):
        open_network(pretrained=tmp_path / "w.pth")  # not a resnet50 by default: say what is missing
    with pytest.raises(SfmpairsError, match="unknown architecture 'resnet9'"):
        open_network(arch="resnet9")


def test_extract_with_an_off_the_shelf_network(weights_file, tmp_path):
    from sfmpairs.retrieval.data import load_image
    from sfmpairs.retrieval.extract import extract

    path, tv = weights_file
    rng = np.random.default_rng(0)
    names = []
    for k, (w, h) in enumerate([(120, 90), (90, 120), (120, 90), (64, 64)]):
        names.append(f"i{k}.png")
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(tmp_path / names[-1])
    (tmp_path / "list.txt").write_text("\n".join(names) + "\n")
    out = tmp_path / "d.h5"
    r = extract(
        None,
        out,
        arch="resnet18",
        pool="gem",
        pretrained=path,
        images_root=tmp_path,
        image_list=tmp_path / "list.txt",
        device="cpu",
        precision="fp32",
        workers=0,
    )
    assert r["images"] == 4
    with h5py.File(out) as f:
        desc = f["descriptors"][()]
        parameters, inputs = json.loads(f.attrs["parameters"]), json.loads(f.attrs["inputs"])
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert inputs["model"] is None and inputs["pretrained"] == str(path.resolve())
    assert inputs["pretrained_sha256"] == sha
    config = parameters["config"]
    assert (config["arch"], config["pool"]) == ("resnet18", "gem")
    assert config["pretrained"] == f"{path.name} (sha256 {sha[:12]})"
    assert parameters["image_size"] == 1024  # the off-the-shelf test size
    # reference: torchvision's trunk with the file's weights, GeM p = 3 by hand, one image at a time
    with torch.no_grad():
        for k, n in enumerate(names):
            img = load_image(tmp_path / n, 1024)[None].float() / 255
            mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
            x = (img - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
            v = resnet_trunk(tv, x).clamp(min=1e-6).pow(3).mean(dim=(-2, -1)).pow(1 / 3)[0]
            np.testing.assert_allclose(desc[k], (v / v.norm()).numpy(), rtol=0, atol=1e-6)
    with pytest.raises(SfmpairsError, match="give --model CHECKPOINT, or --arch"):
        extract(None, tmp_path / "e.h5", images_root=tmp_path, image_list=tmp_path / "list.txt")
    assert not (tmp_path / "e.h5").exists()
