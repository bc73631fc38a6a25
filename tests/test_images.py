"""One way to open a photo (sfmpairs.retrieval.images.open_rgb), used by extraction,
training, the Dataset of tuples and the pictures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sfmpairs import SfmpairsError
from sfmpairs.retrieval.images import open_rgb


def test_open_rgb_converts_and_names_the_file_on_errors(tmp_path):
    grey = np.arange(12 * 10, dtype=np.uint8).reshape(10, 12)
    Image.fromarray(grey, "L").save(tmp_path / "grey.png")
    img = open_rgb(tmp_path / "grey.png")
    assert img.mode == "RGB" and img.size == (12, 10)
    np.testing.assert_array_equal(np.asarray(img), np.repeat(grey[..., None], 3, axis=2))  # PIL's L -> RGB
    (tmp_path / "junk.jpg").write_bytes(b"not a photo")
    with pytest.raises(SfmpairsError, match="junk.jpg: cannot decode image .not an image"):
        open_rgb(tmp_path / "junk.jpg")
    with pytest.raises(SfmpairsError, match="missing.jpg: image not found"):
        open_rgb(tmp_path / "missing.jpg")


def test_tuples_load_in_spawned_dataloader_workers(small_world):
    """The default transform pickles: DataLoader workers started by spawn (macOS's
    default, and Python 3.14's on Linux) get the Dataset."""
    from sfmpairs.train.dataset import PairTuples

    ds = PairTuples(small_world / "pairs.h5", small_world / "photos", image_size=32)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1, multiprocessing_context="spawn")
    query, positive, negatives = next(iter(loader))
    q_name = ds.tuple_names(0)[0]
    expect = Image.open(small_world / "photos" / q_name).convert("RGB")
    expect.thumbnail((32, 32), Image.LANCZOS)
    torch.testing.assert_close(query, torch.from_numpy(np.array(expect)).permute(2, 0, 1).float() / 255)
    assert positive.shape[0] == 3 and negatives == []
