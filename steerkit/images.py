"""Opening images from data files safely: corrupt, huge and decompression-bomb files get clear errors.

Every image a record points at goes through `load_image` before a model sees it, so a bad file fails
with its path and the reason instead of crashing a run half-way or exhausting memory.
"""

from __future__ import annotations

from pathlib import Path

#: Largest image accepted, in pixels (a 8k x 8k photo); larger ones are refused, not resized, since a
#: file that large in a chat data set is almost always a mistake or an attack.
MAX_PIXELS = 64_000_000
#: Largest image file accepted, in bytes.
MAX_BYTES = 50_000_000


class ImageError(ValueError):
    """An image file that cannot be used; the message names the file and the reason."""


def load_image(path: str | Path, *, max_pixels: int = MAX_PIXELS, max_bytes: int = MAX_BYTES):  # -> PIL.Image
    """Open, check and fully decode an image as RGB.

    Raises:
        ImageError: missing file, too many bytes, too many pixels (decompression bomb), or a file
            PIL cannot decode.
    """
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: image file not found")
    size = path.stat().st_size
    if size > max_bytes:
        raise ImageError(f"{path}: {size} bytes is over the {max_bytes}-byte limit")
    try:
        with Image.open(path) as probe:
            w, h = probe.size
            if w * h > max_pixels:
                raise ImageError(f"{path}: {w}x{h} pixels is over the {max_pixels}-pixel limit (decompression bomb?)")
            probe.verify()
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{path}: refused as a decompression bomb ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{path}: cannot decode image ({type(exc).__name__}: {exc})") from None
