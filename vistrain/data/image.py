"""Robust image loading: any file PIL can decode becomes an 8-bit RGB image.

``load_image`` is the single entry point used by the datasets.  It

* opens the file read-only (the file is never modified),
* fully decodes it (``img.load()``), so truncated or corrupt files are found
  here instead of deep inside a DataLoader worker,
* applies the EXIF orientation tag (``ImageOps.exif_transpose``),
* converts every PIL mode to RGB, scaling high bit-depth data properly,
* and turns every failure into :class:`BadImageError` with a short reason.

``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is deliberately *not* set: with it a
truncated file silently decodes as a partly grey image.

Alpha channels (RGBA, LA, PA, La, RGBa, palette or colour-key transparency)
are composited on a white background rather than dropped.  The colour of a
fully transparent pixel is undefined: depending on the tool that wrote the
file it is black, white or left-over garbage, so simply dropping alpha gives
the same object different backgrounds from file to file.  Compositing on
white is deterministic and matches how the image looks in a viewer or a web
page, which is what the person who labelled it saw.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

__all__ = ["IMAGE_SUFFIXES", "BadImageError", "is_image_file", "load_image", "load_rgb_array"]

# Lower-case suffixes of the still-image formats Pillow decodes without
# external tools.  Deliberately absent: .dng (Pillow has no raw decoder, it
# would at best read the embedded thumbnail), .pdf/.eps (need ghostscript),
# .ico/.icns (several images of different sizes), .psd (layers).
IMAGE_SUFFIXES = frozenset(
    {
        ".bmp",
        ".gif",
        ".jfif",
        ".jpe",
        ".jpeg",
        ".jpg",
        ".mpo",
        ".pbm",
        ".pfm",
        ".pgm",
        ".png",
        ".pnm",
        ".ppm",
        ".tif",
        ".tiff",
        ".webp",
    }
)

_ALPHA_MODES = {"LA", "La", "PA", "RGBA", "RGBa"}
_ORIENTATION = int(ExifTags.Base.Orientation)
_WHITE = (255, 255, 255, 255)


class BadImageError(Exception):
    """An image file that cannot be decoded: ``str(e) == f"{path}: {reason}"``."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(path, reason)  # args == (path, reason): picklable across DataLoader workers
        self.path = Path(path)
        self.reason = str(reason)

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def is_image_file(path: str | os.PathLike) -> bool:
    """True if ``path`` has an image suffix (case-insensitive); the file is not opened."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def _reason(exc: BaseException) -> str:
    """Short human reason for a failure to open/decode an image."""
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    if isinstance(exc, IsADirectoryError):
        return "is a directory"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, UnidentifiedImageError):
        return "cannot identify image file"
    if isinstance(exc, Image.DecompressionBombError):
        return "image too large (decompression bomb check)"
    if isinstance(exc, MemoryError):
        return "out of memory while decoding"
    msg = " ".join(str(exc).split())
    if "truncated" in msg.lower():
        return "truncated file"
    detail = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
    if len(detail) > 100:
        detail = detail[:97] + "..."
    return f"corrupt image ({detail})"


def _has_alpha(im: Image.Image) -> bool:
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        return True
    if im.mode == "P" and im.palette is not None:
        return im.palette.mode.endswith("A")
    return False


def _on_white(im: Image.Image) -> Image.Image:
    """Composite an image with (any kind of) transparency onto white; returns RGB."""
    if im.mode == "La":  # premultiplied grey+alpha: PIL only converts it to LA
        im = im.convert("LA")
    rgba = im.convert("RGBA")
    lo, _ = rgba.getchannel("A").getextrema()
    if lo == 255:  # alpha channel present but fully opaque
        return rgba.convert("RGB")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")


def _to_uint8(a: np.ndarray, kind: str) -> np.ndarray:
    """Scale a single-channel high bit-depth array to uint8 (linear, no clipping of the range)."""
    if kind == "16bit":  # the container says 16 bit: 0..65535 -> 0..255 (== round(x / 257))
        a = np.clip(a.astype(np.int64), 0, 65535)
        return ((a * 255 + 32767) // 65535).astype(np.uint8)
    a = a.astype(np.float64)
    finite = np.isfinite(a)
    if not finite.all():
        a = np.where(finite, a, 0.0)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if kind == "float" and lo >= 0.0 and hi <= 1.0:
        scaled = a * 255.0  # normalised float image
    elif lo >= 0.0 and hi <= 255.0:
        scaled = a  # 8-bit data in a wide container (e.g. an 'I' image made from 'L')
    elif kind == "int" and lo >= 0.0 and hi <= 65535.0:
        scaled = a / 257.0  # 16-bit data stored as 32-bit int (PNG/PGM/TIFF 16-bit)
    elif hi > lo:
        scaled = (a - lo) * (255.0 / (hi - lo))  # arbitrary range (HDR, signed): stretch min..max
    else:
        scaled = np.zeros_like(a)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode.startswith("I;16"):
        return Image.fromarray(_to_uint8(np.asarray(im), "16bit")).convert("RGB")
    if mode in ("I", "I;32", "I;32B", "I;32L") or mode.startswith("I;32"):
        return Image.fromarray(_to_uint8(np.asarray(im), "int")).convert("RGB")
    if mode == "F" or mode.startswith("F;"):
        return Image.fromarray(_to_uint8(np.asarray(im), "float")).convert("RGB")
    if _has_alpha(im):
        return _on_white(im)
    # 1, L, P (opaque), CMYK (PIL undoes Adobe's inverted CMYK when decoding), YCbCr, RGBX, LAB, HSV ...
    return im.convert("RGB")


def _exif_orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(_ORIENTATION, 1) or 1)
    except Exception:  # malformed EXIF must not reject an otherwise valid image
        return 1


def load_image(path: str | os.PathLike, draft: tuple[int, int] | None = None) -> Image.Image:
    """Open, fully decode and return ``path`` as an RGB ``PIL.Image`` with EXIF orientation applied.

    ``draft=(w, h)`` lets the JPEG decoder downscale by 1/2, 1/4 or 1/8 while
    decoding, keeping both sides >= (w, h) (before EXIF rotation, so pass a
    square).  It is much faster for large photos and still decodes the whole
    stream, so truncated files are detected.  Other formats ignore it.

    Raises :class:`BadImageError` (never anything else for a bad file) with a
    short reason such as ``"truncated file"``, ``"cannot identify image file"``,
    ``"empty file"`` or ``"file not found"``.
    """
    path = Path(path)
    try:
        if os.stat(path).st_size == 0:
            raise BadImageError(path, "empty file")
        with Image.open(path) as im:  # read-only; the with-block closes the file
            if draft is not None:
                im.draft("RGB", (int(draft[0]), int(draft[1])))
            im.load()
            if _exif_orientation(im) != 1:
                try:
                    im = ImageOps.exif_transpose(im)
                except Exception:  # broken orientation data: keep the pixels as stored
                    pass
            out = _to_rgb(im)  # may be `im` itself: its loaded pixels survive closing the file
    except BadImageError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, EOFError, struct.error, ...
        raise BadImageError(path, _reason(e)) from e
    return out


_JPEG_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".jfif"})


def load_rgb_array(path: str | os.PathLike) -> np.ndarray:
    """``load_image(path)`` as an ``ndarray[H, W, 3]`` uint8, with a faster decoder for JPEG files.

    JPEGs (no alpha, 8 bits) are decoded by OpenCV, which applies the EXIF orientation too and gives
    the same pixels as Pillow (tested); a JPEG OpenCV cannot read, and every other format, goes through
    :func:`load_image` and raises :class:`BadImageError` like it.  For files already verified (the
    detection label scan decodes every image with Pillow), where decoding is per training sample.
    """
    if Path(path).suffix.lower() in _JPEG_SUFFIXES:
        img = cv2.imread(os.fspath(path), cv2.IMREAD_COLOR)  # BGR, EXIF orientation applied
        if img is not None:
            return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return np.asarray(load_image(path))
