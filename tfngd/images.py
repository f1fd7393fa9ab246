"""Turning samples into pictures: image grids, 2-D scatter rasters and PNG files.

Only numpy and ``tf.io.encode_png``: no plotting library. Every function
returns (or takes) a ``uint8`` array of shape ``[H, W, C]`` with ``C`` 1
(grayscale) or 3 (RGB), ready for ``tf.summary.image`` or :func:`save_png`.

* Image samples ``[N, H, W, C]`` in [-1, 1] become one near-square grid
  (:func:`image_grid`), optionally upscaled by nearest neighbour so that
  tiny 8x8 digits stay visible.
* 2-D samples ``[N, 2]`` become a scatter raster on a fixed extent
  (:func:`scatter_image`), so frames from different epochs are comparable.
"""

from __future__ import annotations

import math
import os

import numpy as np
import tensorflow as tf

# The square [-4, 4]^2 holds the usual 2-D toys (moons, 8 Gaussians, checkerboard, ...).
DEFAULT_EXTENT = (-4.0, 4.0, -4.0, 4.0)
# Tiles smaller than this many pixels are upscaled by samples_to_image (8x8 digits: x4).
MIN_TILE_PIXELS = 32

_BACKGROUND = 255
_AXIS_GRAY = 224


def to_uint8(x) -> np.ndarray:
    """Map floats in [-1, 1] to ``uint8`` via ``round((x + 1) * 127.5)``, clipped to [0, 255].

    Rounds half up; NaN maps to 0 and infinities to the ends of the range.
    """
    values = np.nan_to_num(np.asarray(x, dtype=np.float64), nan=-1.0, posinf=1.0, neginf=-1.0)
    return np.clip(np.floor((values + 1.0) * 127.5 + 0.5), 0, 255).astype(np.uint8)


def _as_uint8_images(images) -> np.ndarray:
    """``uint8`` passes through; floating point is read as [-1, 1]; anything else is an error."""
    array = np.asarray(images)
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        return to_uint8(array)
    raise TypeError(f"images must be uint8 or floating point in [-1, 1], got dtype {array.dtype}")


def upscale(images: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour upscaling of ``[..., H, W, C]`` by an integer factor."""
    if int(scale) != scale or scale < 1:
        raise ValueError(f"scale must be an integer >= 1, got {scale!r}")
    scale = int(scale)
    if scale == 1:
        return images
    return np.repeat(np.repeat(images, scale, axis=-3), scale, axis=-2)


def image_grid(
    images,
    ncols: int | None = None,
    padding: int = 1,
    pad_value: int = 255,
    scale: int = 1,
) -> np.ndarray:
    """Tile ``N`` images into one ``uint8`` grid, row by row.

    Args:
      images: ``[N, H, W, C]`` (or ``[N, H, W]``) with ``C`` 1 or 3, either
        ``uint8`` or floating point in [-1, 1].
      ncols: tiles per row; default ``ceil(sqrt(N))`` (near-square).
      padding: pixels of ``pad_value`` between tiles and around the border.
      pad_value: gray level of the padding and of empty cells.
      scale: nearest-neighbour upscaling factor of each tile (padding is not scaled).

    Returns:
      ``uint8 [rows * (H * scale + padding) + padding,
      ncols * (W * scale + padding) + padding, C]``; image ``k`` sits in row
      ``k // ncols``, column ``k % ncols``.
    """
    tiles = _as_uint8_images(images)
    if tiles.ndim == 3:
        tiles = tiles[..., None]
    if tiles.ndim != 4 or tiles.shape[-1] not in (1, 3):
        raise ValueError(f"images must be [N, H, W, C] with C in (1, 3), got shape {tiles.shape}")
    count = tiles.shape[0]
    if count == 0:
        raise ValueError("image_grid needs at least one image")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if not 0 <= pad_value <= 255:
        raise ValueError(f"pad_value must be in [0, 255], got {pad_value}")
    if ncols is not None and ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    tiles = upscale(tiles, scale)
    ncols = min(ncols or math.ceil(math.sqrt(count)), count)
    nrows = math.ceil(count / ncols)
    _, height, width, channels = tiles.shape
    grid = np.full(
        (nrows * (height + padding) + padding, ncols * (width + padding) + padding, channels),
        pad_value, dtype=np.uint8,
    )
    for k in range(count):
        row, col = divmod(k, ncols)
        top = padding + row * (height + padding)
        left = padding + col * (width + padding)
        grid[top:top + height, left:left + width] = tiles[k]
    return grid


def _extent4(extent) -> tuple[float, float, float, float]:
    """``(xmin, xmax, ymin, ymax)`` from None, ``(lo, hi)`` (both axes) or a 4-tuple."""
    if extent is None:
        extent = DEFAULT_EXTENT
    extent = tuple(float(v) for v in extent)
    if len(extent) == 2:
        extent = extent + extent
    if len(extent) != 4:
        raise ValueError(f"extent must be (lo, hi) or (xmin, xmax, ymin, ymax), got {extent}")
    xmin, xmax, ymin, ymax = extent
    if not (np.isfinite(extent).all() and xmin < xmax and ymin < ymax):
        raise ValueError(f"extent must be finite with xmin < xmax and ymin < ymax, got {extent}")
    return xmin, xmax, ymin, ymax


def scatter_image(
    points,
    size: int = 256,
    extent=None,
    point_radius: int = 1,
    axes: bool = True,
) -> np.ndarray:
    """Rasterise 2-D points as dark dots on a white ``uint8 [size, size, 1]`` image.

    Each point inks a ``(2 r + 1)``-pixel square; overlapping dots darken
    (each one removes 60% of the remaining brightness), so dense regions show
    as density. The raster covers a fixed ``extent`` (default
    :data:`DEFAULT_EXTENT`), so images of different epochs are comparable;
    ``x`` grows to the right and ``y`` upwards. Points outside the extent, and
    non-finite points, are not drawn. With ``axes``, the lines ``x = 0`` and
    ``y = 0`` are drawn in light gray when they fall inside the extent.

    Args:
      points: ``[N, 2]`` array (float or tensor).
      size: side of the square image in pixels.
      extent: ``(lo, hi)`` for both axes or ``(xmin, xmax, ymin, ymax)``.
      point_radius: dot radius ``r`` in pixels (0: single pixels).
      axes: draw the coordinate axes.
    """
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"points must have shape [N, 2], got {points.shape}")
    if size < 1 or point_radius < 0:
        raise ValueError(f"size must be >= 1 and point_radius >= 0, got {size}, {point_radius}")
    xmin, xmax, ymin, ymax = _extent4(extent)

    background = np.full((size, size), float(_BACKGROUND))
    if axes:
        if xmin <= 0.0 <= xmax:
            background[:, min(int((0.0 - xmin) / (xmax - xmin) * size), size - 1)] = _AXIS_GRAY
        if ymin <= 0.0 <= ymax:
            background[min(int((ymax - 0.0) / (ymax - ymin) * size), size - 1), :] = _AXIS_GRAY

    x, y = points[:, 0], points[:, 1]
    inside = np.isfinite(points).all(axis=1) & (x >= xmin) & (x <= xmax) & (y >= ymin) & (y <= ymax)
    cols = np.minimum(((x[inside] - xmin) / (xmax - xmin) * size).astype(np.int64), size - 1)
    rows = np.minimum(((ymax - y[inside]) / (ymax - ymin) * size).astype(np.int64), size - 1)
    counts = np.zeros((size, size))
    np.add.at(counts, (rows, cols), 1.0)
    if point_radius > 0:
        r = point_radius
        padded = np.pad(counts, r)
        counts = sum(padded[r + dy:r + dy + size, r + dx:r + dx + size]
                     for dy in range(-r, r + 1) for dx in range(-r, r + 1))
    brightness = background * np.power(0.4, counts)
    return np.clip(np.floor(brightness + 0.5), 0, 255).astype(np.uint8)[..., None]


def samples_to_image(
    samples,
    ncols: int | None = None,
    scale: int | None = None,
    padding: int = 1,
    extent=None,
    size: int = 256,
) -> np.ndarray:
    """One ``uint8 [H, W, C]`` picture of a batch of samples.

    * ``[N, H, W, C]`` (or ``[N, H, W]``) images in [-1, 1]: an
      :func:`image_grid`; ``scale`` defaults to ``max(1, 32 // max(H, W))``
      (8x8 digits are upscaled 4x, 28x28 images are not).
    * ``[N, 2]`` points: a :func:`scatter_image` of side ``size`` on ``extent``.
    """
    samples = np.asarray(samples)
    if samples.ndim in (3, 4):
        if scale is None:
            scale = max(1, MIN_TILE_PIXELS // max(samples.shape[1], samples.shape[2]))
        return image_grid(samples, ncols=ncols, padding=padding, scale=scale)
    if samples.ndim == 2 and samples.shape[1] == 2:
        return scatter_image(samples, size=size, extent=extent)
    raise ValueError(
        "samples must be images [N, H, W, C] / [N, H, W] or 2-D points [N, 2], "
        f"got shape {samples.shape}"
    )


def save_png(path: str, image) -> str:
    """Write a ``uint8 [H, W, C]`` (or ``[H, W]``) image as PNG (parent dirs are created).

    Returns ``path``.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise TypeError(f"save_png needs a uint8 image, got dtype {image.dtype} (see to_uint8)")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 2, 3, 4):
        raise ValueError(f"image must be [H, W, C] with C in 1..4, got shape {image.shape}")
    parent = os.path.dirname(path)
    if parent:
        tf.io.gfile.makedirs(parent)
    tf.io.write_file(path, tf.io.encode_png(image))
    return path
