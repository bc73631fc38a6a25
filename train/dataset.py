"""A ``torch.utils.data.Dataset`` of mined tuples, usable from any training loop.

    from sfmpairs.train.dataset import PairTuples
    ds = PairTuples("pairs.h5", "photos/", split="train", transform=my_transform)
    query, positive, negatives = ds[0]

Item i is the i-th query of the split, its positive and its hard negatives (as mined,
``-1`` padding left out), each image loaded with PIL (RGB) and passed through
``transform`` (default: a float tensor in [0, 1], resized to ``image_size`` if given).
``negatives`` is a list (its length may vary with the number of other clusters).

Images keep their aspect ratio, so tuples of different images do not stack into one
tensor: batch them with ``collate_fn=collate_tuples``, which gives what the authors'
training loop (cnnimageretrieval-pytorch) takes, a list of tuples of images and a list
of targets:

    loader = DataLoader(ds, batch_size=5, shuffle=True, collate_fn=collate_tuples, num_workers=4)
    for inputs, targets in loader:          # inputs[k]: [query, positive, *negatives]
        for images, target in zip(inputs, targets):
            out = torch.cat([net(x) for x in images])   # each x is (1, 3, H, W)
            loss = criterion(out, target)                # target: [-1, 1, 0, ..., 0]

An image that is missing or cannot be decoded raises :class:`~sfmpairs.common.SfmpairsError`
naming it (in DataLoader workers torch wraps it with the worker's traceback); with
``skip_bad=True`` its tuple is skipped instead: the item is None, logged once, counted
in ``skipped`` (of this process: each worker counts its own), and ``collate_tuples``
leaves it out, so a batch may hold fewer tuples.

Everything here is picklable (classes and module-level functions), so DataLoader
workers run under every start method, ``spawn`` and ``forkserver`` included.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from sfmpairs.common import SfmpairsError
from sfmpairs.retrieval.images import open_rgb

logger = logging.getLogger("sfmpairs.dataset")


class ToTensor:
    """The default transform: a float tensor (3, H, W) in [0, 1], the longer side at
    most ``image_size`` if given (PIL's thumbnail, Lanczos). A class, not a closure, so
    that DataLoader workers can pickle it under the spawn start method."""

    def __init__(self, image_size: int | None = None):
        self.image_size = image_size

    def __call__(self, img):
        from PIL import Image

        if self.image_size:
            img = img.copy()
            img.thumbnail((self.image_size, self.image_size), Image.LANCZOS)
        return torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div(255)


def collate_tuples(batch: list) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
    """Batch items of :class:`PairTuples` as cnnimageretrieval-pytorch's training does
    (its ``collate_tuples`` over its ``TuplesDataset``): ``inputs[k]`` lists tuple k's
    images, query, positive, then negatives, each ``(1, C, H, W)`` at its own size;
    ``targets[k]`` is ``[-1, 1, 0, ..., 0]`` (query, positive, one 0 per negative),
    what its contrastive and triplet losses take."""
    inputs, targets = [], []
    for query, positive, negatives in (item for item in batch if item is not None):
        inputs.append([x.unsqueeze(0) for x in (query, positive, *negatives)])
        targets.append(torch.tensor([-1.0, 1.0] + [0.0] * len(negatives)))
    return inputs, targets


class PairTuples(Dataset):
    """(query, positive, [negatives]) images of a pair file's split."""

    def __init__(
        self,
        pairs: str | Path,
        images_root: str | Path | None = None,
        split: str = "train",
        transform=None,
        image_size: int | None = None,
        skip_bad: bool = False,
    ):
        from sfmpairs.mining.pairfile import read_pair_file

        p = read_pair_file(pairs)
        if split not in p["splits"]:
            raise SfmpairsError(f"{pairs}: no {split} split")
        s = p["splits"][split]
        self.root = Path(images_root or p["images_root"] or ".")
        self.names = p["names"]
        self.query, self.positive = s["query"], s["positive"]
        self.negatives = s.get("negatives", np.zeros((len(self.query), 0), np.int64))
        self.transform = transform or ToTensor(image_size)
        self.skip_bad = skip_bad
        self.skipped: dict[int, str] = {}  # tuple -> the problem, with skip_bad

    def __len__(self) -> int:
        return len(self.query)

    def tuple_names(self, i: int) -> tuple[str, str, list[str]]:
        """The image names of tuple i: (query, positive, negatives)."""
        return (
            str(self.names[self.query[i]]),
            str(self.names[self.positive[i]]),
            [str(self.names[n]) for n in self.negatives[i] if n >= 0],
        )

    def _load(self, name: str):
        return self.transform(open_rgb(self.root / name))

    def __getitem__(self, i: int):
        q, p, negs = self.tuple_names(i)
        try:
            return self._load(q), self._load(p), [self._load(n) for n in negs]
        except SfmpairsError as e:
            if not self.skip_bad:
                raise
            if i not in self.skipped:
                logger.warning("skipped tuple %d: %s", i, e)
            self.skipped[i] = str(e)
            return None
