"""``precision="fp32"`` means float32 on CUDA too: cuDNN's default TF32 convolutions
moved descriptors by about 1e-4 on an H200 (batched vs one at a time, README: 1e-6)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sfmpairs.train import extract as extract_module
from sfmpairs.train.network import build_network


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
