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
    except IsADirectoryError:
        raise SfmpairsError(f"{path}: is a folder, not an image") from None
    except UnidentifiedImageError:
        raise SfmpairsError(f"{path}: cannot decode image (not an image: unknown format or corrupt header)") from None
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds on corrupt data: one line
        raise SfmpairsError(f"{path}: cannot decode image ({decode_problem(e, path)})") from None


def decode_problem(e: BaseException, path) -> str:
    """PIL's message of ``e`` on one line, short, without the file's name again."""
    text = " ".join(str(e).replace(str(path), "").split()) or type(e).__name__
    return text if len(text) <= 120 else text[:117] + "..."
