"""Image files of any PIL mode -> float32 RGB [3, H, W] in [0, 1].

``Image.convert("RGB")`` alone is wrong for high-bit-depth images: PIL clips a 16-bit
greyscale image (mode ``I;16``, common in medical imaging) to 0..255, so nearly every pixel
reads as white. Here each kind is scaled by its own range:

- 8-bit modes (``1``, ``L``, ``P``, ``RGB``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, with or
  without alpha): PIL's conversion to RGB, divided by 255; alpha is dropped, not composited
  (a transparent pixel keeps its colour);
- 16-bit integer modes (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``): divided by 65535;
- 32-bit integer (``I``): divided by 65535 when every value lies in 0..65535 (how PIL opens
  many 16-bit PNG and TIFF files); otherwise scaled linearly from its minimum to its maximum;
- 32-bit float (``F``): kept when every value lies in [0, 1], else scaled min-to-max like ``I``;
  a NaN or infinite pixel is an error.

Greyscale results are repeated over the three channels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
SIXTEEN_BIT_MAX = 65535.0


def _scaled_by_range(values: np.ndarray, path) -> np.ndarray:
    """Float64 [H, W] values -> [0, 1]: min to max (a constant image becomes 0)."""
    if not np.isfinite(values).all():
        raise ValueError(f"{path}: the image holds NaN or infinite pixels")
    low, high = float(values.min(initial=0.0)), float(values.max(initial=0.0))
    if high == low:
        return np.zeros_like(values)
    return (values - low) / (high - low)


def image_to_rgb_array(picture: Image.Image, path="image") -> np.ndarray:
    """A PIL image of any mode -> float32 [H, W, 3] RGB in [0, 1] (see the module docstring)."""
    mode = picture.mode
    if mode in SIXTEEN_BIT_MODES:
        grey = np.asarray(picture).astype(np.float64) / SIXTEEN_BIT_MAX
    elif mode == "I":
        values = np.asarray(picture).astype(np.float64)
        fits_16_bits = values.size == 0 or (values.min() >= 0 and values.max() <= SIXTEEN_BIT_MAX)
        grey = values / SIXTEEN_BIT_MAX if fits_16_bits else _scaled_by_range(values, path)
    elif mode == "F":
        values = np.asarray(picture).astype(np.float64)
        in_unit_range = values.size == 0 or (np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1)
        grey = values if in_unit_range else _scaled_by_range(values, path)
    else:  # 8-bit modes; convert() drops an alpha band and maps palettes and CMYK to RGB
        return np.asarray(picture.convert("RGB"), dtype=np.float32) / np.float32(255)
    return np.repeat(grey.astype(np.float32)[:, :, None], 3, axis=2)


def read_rgb_image(path) -> torch.Tensor:
    """float32 [3, H, W] RGB in [0, 1] of an image file of any PIL mode."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    try:
        with Image.open(path) as picture:
            pixels = image_to_rgb_array(picture, path)  # [H, W, 3]
    except OSError as exc:
        raise ValueError(f"{path}: not an image PIL can read ({exc})") from exc
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


__all__ = ["image_to_rgb_array", "read_rgb_image"]
