"""The retrieval network, checkpoints, extraction and whitening."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from sfmpairs import SfmpairsError
from sfmpairs.retrieval.backbones import BACKBONES, TIMM_BACKBONES
from sfmpairs.retrieval.network import (
    build_network,
    gem,
    load_checkpoint,
    mac,
    open_network,
    rmac,
    rmac_regions,
    save_checkpoint,
    spoc,
)


def _needs_extra(arch):
    """efficientnet_lite0 is built by timm (the lite0 extra): skipped without it."""
    if arch not in TIMM_BACKBONES:
        return arch
    missing = importlib.util.find_spec("timm") is None
    return pytest.param(
        arch, marks=pytest.mark.skipif(missing, reason=f"{arch} needs timm: pip install 'sfmpairs[lite0]'")
    )


@pytest.mark.parametrize("arch", [_needs_extra(a) for a in BACKBONES])
def test_every_backbone_gives_unit_descriptors(arch):
    torch.manual_seed(0)
    net = build_network({"arch": arch, "pool": "gem"}).eval()
    with torch.no_grad():
        v = net(torch.randn(2, 3, 64, 80))
    assert v.shape == (2, BACKBONES[arch]) == (2, net.dim)
    torch.testing.assert_close(v.norm(dim=1), torch.ones(2))


def test_poolings_match_their_formulas():
    x = torch.rand(2, 4, 5, 7) + 0.1
    torch.testing.assert_close(mac(x), x.flatten(2).max(-1).values)
    torch.testing.assert_close(spoc(x), x.flatten(2).mean(-1))
    torch.testing.assert_close(gem(x, 1.0), spoc(x))
    torch.testing.assert_close(gem(x, 3.0), (x.flatten(2) ** 3).mean(-1) ** (1 / 3))
    assert torch.allclose(gem(x, 200.0), mac(x), rtol=0.02)
    # R-MAC: the whole map plus every region, each MAC L2-normalised, summed
    expect = torch.nn.functional.normalize(mac(x), dim=-1)
    for t, left, s in rmac_regions(5, 7):
        expect = expect + torch.nn.functional.normalize(mac(x[..., t : t + s, left : left + s]), dim=-1)
    torch.testing.assert_close(rmac(x), expect)
    regions = rmac_regions(30, 40)
    assert regions[0][2] == 30 and all(t + s <= 30 and left + s <= 40 for t, left, s in regions)


def test_gem_p_is_learnable_and_starts_at_3():
    net = build_network({"arch": "resnet18", "pool": "gem"})
    assert float(net.p.detach()) == 3.0 and net.p.requires_grad
    v = net(torch.rand(1, 3, 64, 64)).sum()
    v.backward()
    assert net.p.grad is not None


def test_whitening_layer_sets_the_dimension():
    net = build_network({"arch": "resnet18", "whitening": 32}).eval()
    with torch.no_grad():
        assert net(torch.rand(2, 3, 64, 64)).shape == (2, 32)


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(1)
    net = build_network({"arch": "resnet18", "pool": "mac", "image_size": 200, "whitening": 16}).eval()
    save_checkpoint(tmp_path / "a.pt", net, epoch=3)
    loaded, state = load_checkpoint(tmp_path / "a.pt")
    assert loaded.config == net.config and state["epoch"] == 3 and state["tool_version"]
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x))


def test_bad_checkpoints(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SfmpairsError, match="not a checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"a": 1}, tmp_path / "other.pt")
    with pytest.raises(SfmpairsError, match="not an sfmpairs checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(SfmpairsError, match="no such file"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(SfmpairsError, match="unknown architecture"):
        build_network({"arch": "resnet9000"})


def test_pretrained_offline_names_the_missing_file(tmp_path, monkeypatch):
    import urllib.error

    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(SfmpairsError) as e:
        build_network({"arch": "resnet18"}, pretrained=True)
    filename = torchvision.models.get_model_weights("resnet18").DEFAULT.url.rsplit("/", 1)[1]
    assert filename in str(e.value) and str(tmp_path) in str(e.value)


def test_the_word_imagenet_is_imagenet_weights_and_a_file_of_that_name_is_a_path(tmp_path, monkeypatch):
    """``--pretrained`` alone gives the word "imagenet": it means ImageNet weights even
    beside a file of that name (the flag alone never depends on the current folder);
    that file is given as a path: ./imagenet (or a Path)."""
    import torchvision

    from sfmpairs.retrieval import network
    from sfmpairs.retrieval.backbones import wants_imagenet
    from sfmpairs.retrieval.extract import network_inputs
    from sfmpairs.train.options import parse_pretrained

    torch.manual_seed(0)
    mine, theirs = torchvision.models.resnet18(), torchvision.models.resnet18()
    monkeypatch.chdir(tmp_path)
    torch.save(mine.state_dict(), "imagenet")
    monkeypatch.setattr(network, "pretrained_state_dict", lambda arch: theirs.state_dict())
    for given in ("./imagenet", tmp_path / "imagenet", Path("imagenet")):
        pretrained = parse_pretrained(given) if isinstance(given, str) else given
        assert not wants_imagenet(pretrained)
        net = build_network({"arch": "resnet18"}, pretrained=pretrained)
        assert torch.equal(net.features[0].weight, mine.conv1.weight)
        assert net.config["pretrained"].startswith("imagenet (sha256 ")
        assert network_inputs(None, pretrained)["pretrained"] == str(tmp_path / "imagenet")
    for pretrained in (parse_pretrained("imagenet"), "imagenet", True):
        assert wants_imagenet(pretrained)
        net = build_network({"arch": "resnet18"}, pretrained=pretrained)
        assert torch.equal(net.features[0].weight, theirs.conv1.weight)
        assert net.config["pretrained"] == "imagenet (resnet18-f37072fd.pth)"
        assert network_inputs(None, pretrained)["pretrained"] == "imagenet"


def test_an_off_the_shelf_network_needs_an_arch_and_has_no_default_one():
    """open_network builds what it is given: no backbone stands in for an empty --arch."""
    with pytest.raises(SfmpairsError, match="^unknown architecture ''"):
        open_network(arch="")
    with pytest.raises(SfmpairsError, match="^unknown pooling ''"):
        open_network(arch="resnet18", pool="")
    assert open_network(arch="resnet18").config["pool"] == "gem"


# ----------------------------------------------------------------------------- extraction
@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A small folder of JPEG and PNG photos of several sizes, and one broken file."""
    from PIL import Image

    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    names = []
    for i, (w, h) in enumerate([(120, 90)] * 4 + [(90, 120)] * 3 + [(60, 40), (200, 150), (97, 131)]):
        arr = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        name = f"sub/img_{i:02d}." + ("png" if i % 3 == 0 else "jpg")
        (root / "sub").mkdir(exist_ok=True)
        Image.fromarray(arr).save(root / name)
        names.append(name)
    (root / "sub" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    return root, names


def _reference(net, root, names, size):
    from sfmpairs.retrieval.data import load_image

    with torch.no_grad():
        return np.stack([net(net.normalise_input(load_image(root / n, size)[None]))[0].numpy() for n in names])


def _with_trained_batchnorm(net):
    """Batch normalisation with statistics and affine weights far from a fresh network's
    identity, as after training: folding it into the convolutions then moves numbers."""
    g = torch.Generator().manual_seed(1)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.05)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.2)
    return net


def test_batched_extraction_equals_one_image_at_a_time(photos):
    from sfmpairs.retrieval.extract import extract_descriptors

    root, names = photos
    torch.manual_seed(0)
    net = _with_trained_batchnorm(build_network({"arch": "resnet18", "pool": "gem", "image_size": 100}).eval())
    desc, bad = extract_descriptors(net, root, names, batch_size=3, workers=0, precision="fp32")
    assert not bad and desc.shape == (len(names), 512)
    # the README's promise: fp32 batches equal a float32 one image at a time loop within 1e-6
    np.testing.assert_allclose(desc, _reference(net, root, names, 100), rtol=0, atol=1e-6)
    desc2, _ = extract_descriptors(net, root, names, batch_size=8, workers=1, precision="fp32")
    np.testing.assert_allclose(desc2, desc, rtol=0, atol=1e-6)


def test_reduced_precision_is_close_and_ranks_alike(photos):
    """bfloat16 moves descriptors by about 1e-3 and similarities by less."""
    from sfmpairs.retrieval.extract import autocast_dtype, extract_descriptors

    root, names = photos
    torch.manual_seed(0)
    net = build_network({"arch": "resnet18", "pool": "gem", "image_size": 100}).eval()
    exact = extract_descriptors(net, root, names, workers=0, precision="fp32")[0]
    bf16 = extract_descriptors(net, root, names, workers=0, precision="bf16")[0]
    assert bf16.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(bf16, axis=1), 1, atol=1e-5)
    assert 0 < np.abs(bf16 - exact).max() < 2e-2  # it did run in bfloat16
    assert np.abs(exact @ exact.T - bf16 @ bf16.T).max() < 2e-3
    cpu = torch.device("cpu")
    assert autocast_dtype(cpu, "fp32") is None and autocast_dtype(cpu, "bf16") == torch.bfloat16
    assert autocast_dtype(torch.device("cuda"), "auto") == torch.float16
    with pytest.raises(SfmpairsError, match="fp16 needs CUDA"):
        autocast_dtype(cpu, "fp16")
    with pytest.raises(SfmpairsError, match="unknown precision"):
        autocast_dtype(cpu, "fp8")


def test_images_are_resized_never_upscaled(photos):
    from sfmpairs.retrieval.data import load_image, resized_size

    root, names = photos
    assert tuple(load_image(root / names[9], 100).shape) == (3, 100, 74) == (3, *resized_size(97, 131, 100)[::-1])
    assert tuple(load_image(root / names[7], 100).shape) == (3, 40, 60)  # smaller: kept


def test_multiscale_is_the_generalised_mean(photos):
    import torch.nn.functional as F

    from sfmpairs.retrieval.data import load_image
    from sfmpairs.retrieval.extract import extract_descriptors

    root, names = photos
    torch.manual_seed(0)
    net = build_network({"arch": "resnet18", "pool": "gem", "image_size": 100}).eval()
    scales = (1.0, 0.7071, 0.5)
    desc, _ = extract_descriptors(net, root, names[:2], scales=scales, workers=0, precision="fp32")
    with torch.no_grad():
        for k, n in enumerate(names[:2]):
            x = net.normalise_input(load_image(root / n, 100)[None])
            vs = [
                net(F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False) if s != 1 else x)
                for s in scales
            ]
            v = (sum(u**3 for u in vs) / 3) ** (1 / 3)
            np.testing.assert_allclose(desc[k], F.normalize(v, dim=-1)[0].numpy(), atol=1e-4)


def test_multiscale_with_a_whitening_layer_is_the_mean_of_the_scales(photos):
    """Whitened components can be negative: the scales are averaged (p = 1, as in the
    authors' code), not combined with GeM's p (a cube root of a negative mean: NaN)."""
    import torch.nn.functional as F

    from sfmpairs.retrieval.data import load_image
    from sfmpairs.retrieval.extract import extract_descriptors

    root, names = photos
    torch.manual_seed(0)
    net = build_network({"arch": "resnet18", "pool": "gem", "whitening": 64, "image_size": 100}).eval()
    desc, _ = extract_descriptors(net, root, names[:3], scales=(1, 0.7071), workers=0, precision="fp32")
    assert desc.shape == (3, 64) and np.isfinite(desc).all()
    np.testing.assert_allclose(np.linalg.norm(desc, axis=1), 1, rtol=0, atol=1e-6)
    with torch.no_grad():
        for k, n in enumerate(names[:3]):
            x = net.normalise_input(load_image(root / n, 100)[None])
            v1 = net(x)[0].numpy()
            v2 = net(F.interpolate(x, scale_factor=0.7071, mode="bilinear", align_corners=False))[0].numpy()
            assert (v1 < 0).any() and (v2 < 0).any()
            mean = (v1 + v2) / 2
            np.testing.assert_allclose(desc[k], mean / np.linalg.norm(mean), rtol=0, atol=1e-6)


def test_bad_images(photos, tmp_path):
    from sfmpairs.retrieval.extract import extract_descriptors

    root, names = photos
    net = build_network({"arch": "resnet18", "image_size": 64})
    with pytest.raises(SfmpairsError, match=r"broken.jpg: (cannot decode|not an image)"):
        extract_descriptors(net, root, names + ["sub/broken.jpg"], workers=0)
    with pytest.raises(SfmpairsError, match="missing.jpg: image not found"):
        extract_descriptors(net, root, ["sub/missing.jpg"] + names, workers=1)
    desc, bad = extract_descriptors(net, root, names + ["sub/broken.jpg"], workers=0, skip_bad=True)
    assert list(bad) == [len(names)] and np.isnan(desc[-1]).all() and np.isfinite(desc[:-1]).all()


def test_extract_cli_writes_a_descriptor_file(photos, tmp_path):
    from click.testing import CliRunner

    from sfmpairs.cli import main
    from sfmpairs.retrieval.descriptors import read_descriptors

    root, names = photos
    save_checkpoint(tmp_path / "m.pt", build_network({"arch": "resnet18", "image_size": 64}))
    (tmp_path / "list.txt").write_text("\n".join(names + ["sub/broken.jpg"]) + "\n")
    args = [
        "extract",
        "--model",
        tmp_path / "m.pt",
        "--images-root",
        root,
        "--list",
        tmp_path / "list.txt",
        "-o",
        tmp_path / "d.h5",
        "--device",
        "cpu",
    ]
    r = CliRunner().invoke(main, [str(a) for a in args])
    errors = [line for line in r.stderr.splitlines() if line.startswith("sfmpairs: error:")]
    assert r.exit_code == 2 and len(errors) == 1 and "broken.jpg" in errors[0]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "d.h5").exists()
    r = CliRunner().invoke(
        main, [str(a) for a in args + ["--skip-bad", "--multiscale", "1,0.5", "--precision", "bf16"]]
    )
    assert r.exit_code == 0, r.stderr
    with h5py.File(tmp_path / "d.h5") as f:
        assert list(f["skipped"].asstr()[()]) == ["sub/broken.jpg"]
        assert f.attrs["schema"] == "sfmpairs/descriptors"
        parameters = json.loads(f.attrs["parameters"])
        assert parameters["precision"] == "bf16" and parameters["compute_dtype"] == "torch.bfloat16"
    d = read_descriptors(tmp_path / "d.h5", np.array(names, dtype=object))
    assert d.shape == (len(names), 512)
    r = CliRunner().invoke(main, [str(a) for a in args + ["--precision", "fp16", "--overwrite"]])
    assert r.exit_code == 2 and "fp16 needs CUDA" in r.stderr
    r = CliRunner().invoke(main, ["info", str(tmp_path / "d.h5")])
    assert r.exit_code == 0, r.stderr
    assert f"descriptors {len(names)} images, dimension 512, 1 skipped, network resnet18 + gem" in r.stdout
    assert "precision=bf16" in r.stdout
    r = CliRunner().invoke(main, ["info", str(tmp_path / "m.pt")])
    assert r.exit_code == 0, r.stderr
    assert "checkpoint  resnet18 + gem, whitening none, image size 64, 11.2 M weights" in r.stdout
    assert "schema      sfmpairs/checkpoint v1" in r.stdout


# ----------------------------------------------------------------------------- whitening
def test_learned_whitening_whitens_matching_pair_differences():
    from sfmpairs.retrieval.whiten import learn_lw, learn_pca

    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 12)) @ rng.normal(size=(12, 12))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    q, p = rng.integers(0, 400, 300), rng.integers(0, 400, 300)
    for dim in (12, 5):
        mean, P = learn_lw(X, q, p, dim)
        d = (X[q] - X[p]) @ P.T
        np.testing.assert_allclose(d.T @ d / len(d), np.eye(dim), atol=1e-9)
        Y = (X - mean) @ P.T  # the whitened set's covariance is diagonal, decreasing
        C = Y.T @ Y / len(Y)
        np.testing.assert_allclose(C, np.diag(np.diag(C)), atol=1e-9)
        assert np.all(np.diff(np.diag(C)) <= 1e-12)
    mean, P = learn_pca(X, 6)
    np.testing.assert_allclose(np.cov(((X - mean) @ P.T).T, bias=True), np.eye(6), atol=1e-9)


def _span_basis(diff: np.ndarray) -> np.ndarray:
    """Orthonormal rows spanning the rows of ``diff`` (numpy's SVD and rank)."""
    return np.linalg.svd(diff, full_matrices=False)[2][: np.linalg.matrix_rank(diff)]


def test_learned_whitening_with_fewer_pairs_than_dimensions(caplog):
    """5 pairs of 64-d descriptors span 5 dimensions: the whitening keeps those 5 and
    says so (it once divided by zero eigenvalues: projection norms near 1e5)."""
    from sfmpairs.retrieval.whiten import learn_lw

    rng = np.random.default_rng(1)
    X = rng.normal(size=(200, 64))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    q, p = np.arange(5), np.arange(5, 10)
    q, p = np.r_[q, q[:3]], np.r_[p, p[:3]]  # 8 pairs, 3 of them repeated: rank 5
    diff = X[q] - X[p]
    basis = _span_basis(diff)
    assert len(basis) == 5
    with caplog.at_level("WARNING", logger="sfmpairs.whiten"):
        mean, P = learn_lw(X, q, p)
    assert P.shape == (5, 64) and np.isfinite(P).all() and np.linalg.norm(P, axis=1).max() < 100
    assert "8 matching pairs span 5 of 64 dimensions: the whitening has 5 dimensions" in caplog.text
    d = diff @ P.T  # matching-pair differences: identity covariance in the kept subspace
    np.testing.assert_allclose(d.T @ d / len(d), np.eye(5), atol=1e-9)
    np.testing.assert_allclose(P @ basis.T @ basis, P, atol=1e-9)  # rows inside the span
    caplog.clear()
    mean, P3 = learn_lw(X, q, p, 3)  # asked for, within the rank: no warning
    d = diff @ P3.T
    assert P3.shape == (3, 64) and not caplog.text
    np.testing.assert_allclose(d.T @ d / len(d), np.eye(3), atol=1e-9)
    with pytest.raises(SfmpairsError, match="8 matching pairs span only 5 of 64 dimensions; ask for --dim 5"):
        learn_lw(X, q, p, 6)
    with pytest.raises(SfmpairsError, match="span no dimension"):
        learn_lw(X, q, q)


def test_pca_whitening_with_fewer_images_than_dimensions():
    from sfmpairs.retrieval.whiten import learn_pca

    X = np.random.default_rng(2).normal(size=(10, 32))
    mean, P = learn_pca(X)  # 10 centred points span 9 dimensions
    assert P.shape == (9, 32) and np.linalg.norm(P, axis=1).max() < 100
    np.testing.assert_allclose(np.cov(((X - mean) @ P.T).T, bias=True), np.eye(9), atol=1e-9)
    with pytest.raises(SfmpairsError, match="span only 9 of 32 dimensions"):
        learn_pca(X, 10)


def test_whiten_records_the_dimension_it_writes(tmp_path):
    from conftest import synth_and_mine
    from sfmpairs.mining.pairfile import read_pair_file
    from sfmpairs.retrieval.descriptors import write_descriptors
    from sfmpairs.retrieval.whiten import read_whitening, whiten

    root = synth_and_mine(
        tmp_path,
        clusters=3,
        image_size=(64, 48),
        seed=1,
        points=400,
        descriptor_seed=0,
        queries_per_cluster=0,
        val_clusters=[],
    )
    pf = read_pair_file(root / "pairs.h5")
    names, q, p = pf["names"], pf["splits"]["train"]["query"], pf["splits"]["train"]["positive"]
    X = np.random.default_rng(0).normal(size=(len(names), 256)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    write_descriptors(tmp_path / "d256.h5", names, X, {})
    rank = np.linalg.matrix_rank(X[q].astype(np.float64) - X[p])
    assert 1 < rank < 256
    r = whiten(tmp_path / "d256.h5", root / "pairs.h5", tmp_path / "w.h5")
    assert r["dim"] == rank and read_whitening(tmp_path / "w.h5")["projection"].shape == (rank, 256)
    with h5py.File(tmp_path / "w.h5") as f:
        assert json.loads(f.attrs["parameters"])["dim"] == rank
    with pytest.raises(SfmpairsError, match=f"pairs.h5: learned whitening: .* span only {rank} of 256"):
        whiten(tmp_path / "d256.h5", root / "pairs.h5", tmp_path / "w2.h5", dim=rank + 1)
    assert not (tmp_path / "w2.h5").exists()
