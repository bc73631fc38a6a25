"""Opening photos: PIL only (no torch), so that pictures (``sfmpairs show``) load
quickly too."""

from __future__ import annotations

from pathlib import Path

from sfmpairs.common import SfmpairsError


def open_rgb(path: str | Path):
    """The photo at ``path`` as a decoded RGB ``PIL.Image``: the one place sfmpairs
    opens photos (extraction, training, the Dataset of tuples, pictures). Raises
    :class:`SfmpairsError` naming the file if it is missing or cannot be decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()  # decoded in full, as the authors' convert("RGB") does (no JPEG draft)
            return img if img.mode == "RGB" else img.convert("RGB")  # convert() of RGB only copies
    except FileNotFoundError:
        raise SfmpairsError(f"{path}: image not found") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise SfmpairsError(f"{path}: cannot decode image ({e})") from None
