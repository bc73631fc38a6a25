"""Images for the network: decoding and resizing in DataLoader workers, batches of
images of equal size.

Images are resized so that the longer side is ``image_size`` (never up-scaled, aspect
ratio kept) with PIL's ``thumbnail``, as the authors' code does. A batch sampler groups
images by their predicted size after resizing (from the file headers, for speed), and
``collate`` stacks the decoded images by their actual shape: a wrong prediction costs a
smaller batch, never a crash. Nothing is padded (padding would change what GeM, SPoC and
R-MAC pool), so batching never changes a descriptor.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from sfmpairs.common import SfmpairsError

from .images import decode_problem, open_rgb
from .options import ExtractConf


def resized_size(width: int, height: int, image_size: int) -> tuple[int, int]:
    """(width, height) after PIL's thumbnail((image_size, image_size)): the longer side
    becomes ``image_size``, the shorter the floor or ceiling of its scaled length whose
    aspect ratio is nearer the original's (at least 1), as Pillow computes it.

    Only a prediction, used to group images into batches: ``collate`` stacks the
    decoded images by their actual shapes, so a Pillow that rounds otherwise costs
    speed, never a wrong batch.
    """
    if max(width, height) <= image_size:
        return width, height
    aspect = width / height
    if aspect <= 1:
        n = image_size * aspect
        new_width = min(math.floor(n), math.ceil(n), key=lambda k: abs(aspect - k / image_size))
        return max(new_width, 1), image_size
    n = image_size / aspect
    new_height = min(math.floor(n), math.ceil(n), key=lambda k: abs(aspect - image_size / k) if k else 0)
    return image_size, max(new_height, 1)


def load_image(path: Path, image_size: int, box=None) -> torch.Tensor:
    """An RGB uint8 tensor (3, H, W), longer side at most ``image_size`` (PIL's
    thumbnail, Lanczos, as the authors' code), cropped first to ``box`` (x1, y1, x2, y2)
    if given; raises :class:`SfmpairsError` naming the file if it is missing or cannot
    be decoded."""
    from PIL import Image

    img = open_rgb(path)
    try:
        if box is not None:
            img = img.crop(tuple(int(round(c)) for c in box))
        img.thumbnail((image_size, image_size), Image.LANCZOS)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - a truncated file can fail only now
        raise SfmpairsError(f"{path}: cannot decode image ({decode_problem(e, path)})") from None
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)  # np.array: a writable copy


def image_sizes(paths: list[Path]) -> list[tuple[int, int] | None]:
    """(width, height) of each image from its header (no decoding); None if unreadable."""
    from PIL import Image

    sizes = []
    for p in paths:
        try:
            with Image.open(p) as img:
                sizes.append(img.size)
        except Exception:  # reported when the image is loaded
            sizes.append(None)
    return sizes


class ImageList(Dataset):
    """Images ``root/name`` for ``names``; item i is (uint8 tensor, i, None), or
    (None, i, message) for an image that cannot be read: the main process decides
    what to do (a worker's exception would reach it as a multi-line traceback)."""

    def __init__(self, root: str | Path, names: list[str], image_size: int, boxes=None):
        self.root, self.names, self.image_size = Path(root), list(names), image_size
        self.boxes = boxes

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int):
        box = None if self.boxes is None else self.boxes[i]
        try:
            return load_image(self.root / self.names[i], self.image_size, box), i, None
        except SfmpairsError as e:
            return None, i, str(e)


class SameSizeBatches(Sampler):
    """Batches of indices whose images have the same predicted size after resizing
    (:func:`resized_size`; unreadable images go alone), in a fixed order, the smallest
    first."""

    def __init__(self, sizes: list, image_size: int, batch_size: int):
        groups = defaultdict(list)
        for i, s in enumerate(sizes):
            groups[resized_size(*s, image_size) if s else ("bad", i)].append(i)
        self.batches = [g[k : k + batch_size] for g in groups.values() for k in range(0, len(g), batch_size)]
        if self.batches:  # the smallest batch first: the network waits less for it
            smallest = min(range(len(self.batches)), key=lambda k: len(self.batches[k]))
            self.batches.insert(0, self.batches.pop(smallest))

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def collate(items):
    """([(images (B, 3, H, W), indices (B,)) for each image shape], [(index, message) of
    bad images]): the decoded images of a batch, stacked by their actual shapes."""
    groups = defaultdict(list)
    for img, i, _ in items:
        if img is not None:
            groups[tuple(img.shape)].append((img, i))
    stacks = [
        (torch.stack([img for img, _ in g]), torch.tensor([i for _, i in g], dtype=torch.long)) for g in groups.values()
    ]
    return stacks, [(i, msg) for img, i, msg in items if img is None]


def default_workers() -> int:
    from sfmpairs.distributed import default_workers as per_rank

    return per_rank()


def image_loader(
    root,
    names,
    image_size: int,
    batch_size: int = ExtractConf.batch_size,
    workers: int | None = None,
    pin_memory: bool = False,
    boxes=None,
) -> DataLoader:
    """A DataLoader over ``root/names`` (each cropped to its box (x1, y1, x2, y2) in
    ``boxes``, where given and not None) yielding batches as :func:`collate` makes them:
    ([(uint8 images (B, 3, H, W), indices)], [(index, message) of bad images]), each
    stack of images of one size."""
    dataset = ImageList(root, names, image_size, boxes)
    boxes = boxes if boxes is not None else [None] * len(names)
    sizes = image_sizes([dataset.root / n for n, b in zip(dataset.names, boxes) if b is None])[::-1]
    sizes = [
        sizes.pop() if b is None else (int(round(b[2])) - int(round(b[0])), int(round(b[3])) - int(round(b[1])))
        for b in boxes
    ]
    workers = default_workers() if workers is None else workers
    return DataLoader(
        dataset,
        batch_sampler=SameSizeBatches(sizes, image_size, batch_size),
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        prefetch_factor=4 if workers else None,
    )
