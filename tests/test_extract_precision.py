"""``precision="fp32"`` means float32 on CUDA too: cuDNN's default TF32 convolutions
moved descriptors by about 1e-4 on an H200 (batched vs one at a time, README: 1e-6)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sfmpairs.retrieval import extract as extract_module
from sfmpairs.retrieval.network import build_network


@pytest.mark.parametrize("precision, tf32_in_forward", [("fp32", False), ("bf16", True)])
def test_fp32_extraction_turns_tf32_off_and_back_on(tmp_path, monkeypatch, precision, tf32_in_forward):
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(tmp_path / "a.png")
    seen = []
    forward = extract_module.multiscale_forward

    def recording_forward(net, x, scales):
        seen.append(torch.backends.cudnn.allow_tf32)
        return forward(net, x, scales)

    monkeypatch.setattr(extract_module, "multiscale_forward", recording_forward)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)  # torch's default
    net = build_network({"arch": "resnet18", "image_size": 64})
    extract_module.extract_descriptors(net, tmp_path, ["a.png"], workers=0, precision=precision)
    assert seen == [tf32_in_forward] and torch.backends.cudnn.allow_tf32


def test_descriptors_that_are_not_finite_are_an_error_not_a_silent_nan(tmp_path):
    """A descriptor of a readable image that is NaN (weights gone bad, or activations
    that overflow float16 on CUDA) stops the extraction with the first image's name."""
    from sfmpairs import SfmpairsError

    for k in range(3):
        Image.fromarray(np.full((40, 50, 3), 60 * k, np.uint8)).save(tmp_path / f"{k}.png")
    torch.manual_seed(0)
    net = build_network({"arch": "resnet18", "image_size": 64})
    good, _ = extract_module.extract_descriptors(net, tmp_path, ["0.png", "1.png"], workers=0, precision="fp32")
    assert np.isfinite(good).all()
    with torch.no_grad():
        net.features[0].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(
        SfmpairsError,
        match=r"^2 of 2 descriptors are not finite \(first: 0.png\) in float32; "
        r"the network's weights may hold NaN",
    ):
        extract_module.extract_descriptors(net, tmp_path, ["0.png", "1.png"], workers=0, precision="fp32")
    # a skipped image's row is NaN by design, and no error
    desc, bad = extract_module.extract_descriptors(
        build_network({"arch": "resnet18", "image_size": 64}),
        tmp_path,
        ["2.png", "missing.png"],
        workers=0,
        precision="fp32",
        skip_bad=True,
    )
    assert list(bad) == [1] and np.isnan(desc[1]).all() and np.isfinite(desc[0]).all()
