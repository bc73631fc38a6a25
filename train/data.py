"""Images for the network: decoding and resizing in DataLoader workers, batches of
images of equal size.

Images are resized so that the longer side is ``image_size`` (never up-scaled, aspect
ratio kept) with PIL's ``thumbnail``, as the authors' code does. Batches hold images of
identical size after resizing (a batch sampler groups them): padding would change what
GeM, SPoC and R-MAC pool, so batching never changes a descriptor.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..common import SfmpairsError


def resized_size(width: int, height: int, image_size: int) -> tuple[int, int]:
    """(width, height) after PIL's thumbnail((image_size, image_size))."""
    if max(width, height) <= image_size:
        return width, height
    if width >= height:
        return image_size, max(1, round(height * image_size / width))
    return max(1, round(width * image_size / height)), image_size


def load_image(path: Path, image_size: int, box=None) -> torch.Tensor:
    """An RGB uint8 tensor (3, H, W), longer side at most ``image_size``, cropped first
    to ``box`` (x1, y1, x2, y2) if given; raises :class:`SfmpairsError` naming the file
    if it is missing or cannot be decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()  # decoded in full, as the authors' convert("RGB") does (no JPEG draft)
            if img.mode != "RGB":  # convert() of an RGB image would only copy it
                img = img.convert("RGB")
            if box is not None:
                img = img.crop(tuple(int(round(c)) for c in box))
            img.thumbnail((image_size, image_size), Image.LANCZOS)
            array = np.array(img)  # a writable copy
    except FileNotFoundError:
        raise SfmpairsError(f"{path}: image not found") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise SfmpairsError(f"{path}: cannot decode image ({e})") from None
    return torch.from_numpy(array).permute(2, 0, 1)


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
    """Batches of indices whose images have the same size after resizing (unreadable
    images go alone), in a fixed order, the smallest first."""

    def __init__(self, sizes: list, image_size: int, batch_size: int):
        groups = defaultdict(list)
        for i, s in enumerate(sizes):
            groups[resized_size(*s, image_size) if s else ("bad", i)].append(i)
        self.batches = [g[k:k + batch_size] for g in groups.values() for k in range(0, len(g), batch_size)]
        if self.batches:  # the smallest batch first: the network waits less for it
            smallest = min(range(len(self.batches)), key=lambda k: len(self.batches[k]))
            self.batches.insert(0, self.batches.pop(smallest))

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def collate(items):
    """Stack a batch of equal-size images; the bad ones come apart as (index, message)."""
    good = [(img, i) for img, i, _ in items if img is not None]
    bad = [(i, msg) for img, i, msg in items if img is None]
    images = torch.stack([img for img, _ in good]) if good else None
    return images, torch.tensor([i for _, i in good], dtype=torch.long), bad


def default_workers() -> int:
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def image_loader(root, names, image_size: int, batch_size: int = 16, workers: int | None = None,
                 pin_memory: bool = False, boxes=None) -> DataLoader:
    """A DataLoader over ``root/names`` (cropped to ``boxes`` if given) yielding (uint8
    images (B, 3, H, W), indices, [(index, message) of bad images]), images of a batch
    of equal size."""
    dataset = ImageList(root, names, image_size, boxes)
    if boxes is None:
        sizes = image_sizes([dataset.root / n for n in dataset.names])
    else:
        sizes = [(int(round(b[2])) - int(round(b[0])), int(round(b[3])) - int(round(b[1]))) for b in boxes]
    workers = default_workers() if workers is None else workers
    return DataLoader(dataset, batch_sampler=SameSizeBatches(sizes, image_size, batch_size),
                      num_workers=workers, collate_fn=collate, pin_memory=pin_memory,
                      prefetch_factor=4 if workers else None)
