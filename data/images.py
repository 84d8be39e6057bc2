"""Opening one image file as RGB, with a reason a person understands when that is impossible."""
from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cnnbench.common.errors import UserError


MAX_PIXELS = 64_000_000  # decompression-bomb guard: larger images are refused, never decoded

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class ImageError(UserError):
    """An image that cannot be used; str() is "<path>: <reason>"."""

    def __init__(self, path, reason: str):
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):
        # DataLoader workers pickle exceptions; keep both fields across the process boundary.
        return (type(self), (self.path, self.reason))


class _UnsupportedMode(Exception):
    pass


def load_rgb(path) -> Image.Image:
    """Decode `path` into an RGB image (EXIF orientation applied); ImageError when unusable."""
    return load_rgb_with_mode(path)[0]


def load_rgb_with_mode(path) -> tuple[Image.Image, str]:
    """`load_rgb`, also returning the file's own pixel mode (e.g. "L" for a grayscale JPEG)."""
    path = os.fspath(path)
    try:
        _check_file(path)
        with warnings.catch_warnings():
            # PIL only warns between its own limit and twice that; a warning is a refusal here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                _check_pixels(path, img)
                img.load()  # decode now, so a truncated file fails here and not inside a transform
                source_mode = img.mode
                return _to_rgb(ImageOps.exif_transpose(img)), source_mode
    except ImageError:
        raise
    except _UnsupportedMode as e:
        raise ImageError(path, str(e)) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(path, f"image too large, refused as a possible decompression bomb ({e})") from None
    except UnidentifiedImageError:
        raise ImageError(path, "not an image file (format not recognised, or the header is damaged)") from None
    except FileNotFoundError:
        raise ImageError(path, "file not found") from None
    except PermissionError:
        raise ImageError(path, "permission denied") from None
    except OSError as e:
        if "truncated" in str(e):
            raise ImageError(path, "truncated image (file ends before the image data does)") from None
        raise ImageError(path, f"cannot decode image ({e})") from None
    except Exception as e:  # PIL's decoders raise many types (SyntaxError, ValueError, struct.error...)
        raise ImageError(path, f"corrupt image data ({type(e).__name__}: {e})") from None


def _check_file(path: str) -> None:
    if os.path.isdir(path):
        raise ImageError(path, "is a directory, not an image file")
    if not os.path.exists(path):
        raise ImageError(path, "file not found")
    if os.path.getsize(path) == 0:
        raise ImageError(path, "empty file (0 bytes)")


def _check_pixels(path: str, img: Image.Image) -> None:
    width, height = img.size
    if width * height > MAX_PIXELS:
        raise ImageError(
            path,
            f"image too large ({width}x{height} = {width * height} pixels, limit {MAX_PIXELS}), "
            "refused as a possible decompression bomb",
        )


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode in _ALPHA_MODES or "transparency" in img.info:
        return _composite_on_white(img)
    if mode in _SIXTEEN_BIT_MODES:
        return _gray_array_to_rgb(_sixteen_bit_to_uint8(np.asarray(img)))
    if mode == "F":
        return _gray_array_to_rgb(_float_to_uint8(np.asarray(img, dtype=np.float64)))
    if mode == "RGB":
        return img.copy()
    try:
        return img.convert("RGB")  # L, P, 1, CMYK, YCbCr, ...
    except (ValueError, OSError) as e:
        raise _UnsupportedMode(f"unsupported pixel mode {mode!r} ({e})") from None


def _composite_on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _sixteen_bit_to_uint8(values: np.ndarray) -> np.ndarray:
    """Scale 0..65535 to 0..255 (65535 -> 255); integers outside that range are stretched min..max."""
    values = values.astype(np.float64)
    low, high = float(values.min()), float(values.max())
    if low < 0 or high > 65535:
        return _stretch(values, low, high)
    return np.rint(values / 257.0).astype(np.uint8)


def _float_to_uint8(values: np.ndarray) -> np.ndarray:
    """Float images: [0, 1] and [0, 255] are taken as intensities; any other range is stretched."""
    values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(values.min()), float(values.max())
    if low >= 0 and high <= 1:
        return np.rint(values * 255.0).astype(np.uint8)
    if low >= 0 and high <= 255:
        return np.rint(values).astype(np.uint8)
    return _stretch(values, low, high)


def _stretch(values: np.ndarray, low: float, high: float) -> np.ndarray:
    if high == low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.rint((values - low) * (255.0 / (high - low))).astype(np.uint8)


def _gray_array_to_rgb(gray: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2)))
