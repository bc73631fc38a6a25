"""Batched extraction never depends on predicting PIL's rounding (issue 11, item 1).

Photos of some sizes (1125x303 at 362 px: PIL gives 362x98, a round() prediction
97) once landed in one "same-size" batch with photos that really are 362x97, and
``torch.stack`` crashed extract, evaluate and training.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from sfmpairs.retrieval import data
from sfmpairs.retrieval.data import collate, load_image, resized_size
from sfmpairs.retrieval.extract import extract, extract_descriptors
from sfmpairs.retrieval.network import build_network, save_checkpoint

SIZE = 362
# (width, height) pairs whose 362 px sizes PIL rounds against round() (found by the sweep
# below with the old prediction), each next to a size that really gives the old guess
PROBLEM_SIZES = [
    (1125, 303),
    (1126, 303),
    (539, 303),
    (540, 303),
    (375, 500),
    (376, 500),
    (1358, 362),
    (571, 362),
    (200, 150),
    (150, 200),
]


def pil_thumbnail_size(width: int, height: int, image_size: int) -> tuple[int, int]:
    """The size PIL's own thumbnail gives (the size is computed before and independently
    of the resampling filter, so the fast NEAREST filter gives the same size)."""
    img = Image.new("1", (width, height))
    img.thumbnail((image_size, image_size), Image.NEAREST, reducing_gap=None)
    return img.size


@pytest.mark.parametrize("image_size", [362, 1024])
def test_predicted_size_is_pils_for_every_width(image_size):
    sizes = [(w, h) for h in (1, 303, 362, 500, 1024, 2000) for w in range(1, 2001)]
    sizes += [(h, w) for w, h in sizes]  # portrait too
    wrong = [
        (w, h, resized_size(w, h, image_size), pil_thumbnail_size(w, h, image_size))
        for w, h in sizes
        if resized_size(w, h, image_size) != pil_thumbnail_size(w, h, image_size)
    ]
    assert not wrong, f"{len(wrong)} sizes differ from PIL, e.g. (w, h, predicted, PIL) {wrong[:5]}"


def test_collate_stacks_images_by_their_actual_shape():
    a, b, c = (
        torch.zeros(3, 98, 362, dtype=torch.uint8),
        torch.ones(3, 97, 362, dtype=torch.uint8),
        torch.full((3, 98, 362), 2, dtype=torch.uint8),
    )
    stacks, bad = collate([(a, 5, None), (b, 7, None), (None, 8, "x.jpg: image not found"), (c, 9, None)])
    assert bad == [(8, "x.jpg: image not found")]
    assert [(tuple(x.shape), idx.tolist()) for x, idx in stacks] == [((2, 3, 98, 362), [5, 9]), ((1, 3, 97, 362), [7])]
    assert torch.equal(stacks[0][0][1], c) and torch.equal(stacks[1][0][0], b)
    assert collate([(None, 0, "bad")]) == ([], [(0, "bad")])


@pytest.fixture(scope="module")
def problem_photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("sizes")
    rng = np.random.default_rng(3)
    names = []
    for k, (w, h) in enumerate(PROBLEM_SIZES):
        name = f"p{k:02d}_{w}x{h}." + ("png" if k % 2 else "jpg")
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(root / name)
        names.append(name)
    (root / "list.txt").write_text("\n".join(names) + "\n")
    return root, names


def one_at_a_time(net, root, names, size):
    """The float32 reference: each image decoded and forwarded alone, no batching."""
    with torch.no_grad():
        return np.stack([net(net.normalise_input(load_image(root / n, size)[None]))[0].numpy() for n in names])


@pytest.fixture(params=["predicted", "mispredicted"])
def sampler_prediction(request, monkeypatch):
    """The sampler's size prediction as it is, or wrong for every image (all of them then
    share one batch): batching must be exact either way."""
    if request.param == "mispredicted":
        monkeypatch.setattr(data, "resized_size", lambda w, h, s: (1, 1))
    return request.param


def test_problem_sizes_in_one_batch_equal_one_at_a_time(problem_photos, sampler_prediction):
    root, names = problem_photos
    actual = {tuple(load_image(root / n, SIZE).shape) for n in names}
    assert (3, 98, 362) in actual and (3, 97, 362) in actual  # the sizes that crashed
    torch.manual_seed(0)
    net = build_network({"arch": "resnet18", "pool": "gem", "image_size": SIZE}).eval()
    desc, bad = extract_descriptors(net, root, names, batch_size=len(names), workers=0, precision="fp32")
    assert not bad
    np.testing.assert_allclose(desc, one_at_a_time(net, root, names, SIZE), rtol=0, atol=1e-6)


def test_extract_api_over_problem_sizes(problem_photos, sampler_prediction, tmp_path):
    root, names = problem_photos
    torch.manual_seed(1)
    net = build_network({"arch": "resnet18", "pool": "mac", "image_size": SIZE}).eval()
    save_checkpoint(tmp_path / "m.pt", net)
    r = extract(
        tmp_path / "m.pt",
        tmp_path / "d.h5",
        images_root=root,
        image_list=root / "list.txt",
        device="cpu",
        precision="fp32",
        batch_size=32,
        workers=1,
    )
    assert r["images"] == len(names) and r["skipped"] == 0
    with h5py.File(tmp_path / "d.h5") as f:
        assert list(f["names"].asstr()[()]) == names
        desc = f["descriptors"][()]
    np.testing.assert_allclose(desc, one_at_a_time(net, root, names, SIZE), rtol=0, atol=1e-6)
