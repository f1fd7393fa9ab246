"""Sample pictures: uint8 conversion, grid layout, scatter rasters and PNG files."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from tfngd import images

# --------------------------------------------------------------------------- to_uint8


def test_to_uint8_exact_values_and_clipping():
    x = np.array([-1.0, 0.0, 1.0, -3.0, 2.5, 1.0 / 127.5 - 1.0, np.nan], np.float32)
    np.testing.assert_array_equal(images.to_uint8(x), [0, 128, 255, 0, 255, 1, 0])
    assert images.to_uint8(x).dtype == np.uint8


def test_to_uint8_accepts_tensors():
    out = images.to_uint8(tf.constant([[-1.0, 1.0]]))
    assert out.shape == (1, 2) and out.dtype == np.uint8


# --------------------------------------------------------------------------- image_grid


def constant_images(n, h=2, w=3, c=1):
    """Image k is filled with the value 10 * (k + 1) (uint8)."""
    values = (10 * np.arange(1, n + 1)).astype(np.uint8)
    return np.broadcast_to(values[:, None, None, None], (n, h, w, c)).copy()


def test_grid_places_image_k_in_row_major_tile():
    n, h, w, pad = 5, 2, 3, 1
    grid = images.image_grid(constant_images(n, h, w), padding=pad, pad_value=255)
    # Near-square default: ceil(sqrt(5)) = 3 columns, 2 rows.
    assert grid.shape == (2 * (h + pad) + pad, 3 * (w + pad) + pad, 1)
    assert grid.dtype == np.uint8
    for k in range(n):
        row, col = divmod(k, 3)
        top, left = pad + row * (h + pad), pad + col * (w + pad)
        tile = grid[top:top + h, left:left + w]
        assert (tile == 10 * (k + 1)).all(), k
    # The sixth cell is empty: padding colour.
    assert (grid[pad + h + pad:, pad + 2 * (w + pad):] == 255).all()


def test_grid_padding_lines_and_explicit_columns():
    grid = images.image_grid(constant_images(4), ncols=4, padding=2, pad_value=7)
    assert grid.shape == (2 + 2 + 2, 4 * (3 + 2) + 2, 1)
    assert (grid[:2] == 7).all() and (grid[-2:] == 7).all()
    for col in range(5):
        left = col * (3 + 2)
        assert (grid[:, left:left + 2] == 7).all()
    nopad = images.image_grid(constant_images(4), ncols=2, padding=0)
    assert nopad.shape == (4, 6, 1)
    np.testing.assert_array_equal(nopad[:2, :3, 0], 10)
    np.testing.assert_array_equal(nopad[2:, 3:, 0], 40)


def test_grid_converts_floats_and_keeps_rgb():
    x = np.zeros((2, 4, 4, 3), np.float32)
    x[0] = -1.0
    x[1, ..., 2] = 1.0
    grid = images.image_grid(x, padding=0)
    assert grid.shape == (4, 8, 3)
    np.testing.assert_array_equal(grid[0, 0], [0, 0, 0])
    np.testing.assert_array_equal(grid[0, 4], [128, 128, 255])


def test_grid_scale_is_nearest_neighbour():
    x = np.arange(4, dtype=np.uint8).reshape(1, 2, 2, 1)
    grid = images.image_grid(x, padding=1, scale=3)
    assert grid.shape == (8, 8, 1)
    tile = grid[1:7, 1:7, 0]
    np.testing.assert_array_equal(tile, np.kron([[0, 1], [2, 3]], np.ones((3, 3), np.uint8)))


@pytest.mark.parametrize("bad", [np.zeros((2, 4, 4, 2), np.float32), np.zeros((0, 4, 4, 1)),
                                 np.zeros((4, 4), np.float32), np.zeros((1, 2, 2, 1), np.int32)])
def test_grid_rejects_bad_input(bad):
    with pytest.raises((ValueError, TypeError)):
        images.image_grid(bad)


# --------------------------------------------------------------------------- scatter_image


def test_scatter_marks_points_on_white_background():
    img = images.scatter_image(np.array([[1.0, 2.0]]), size=64, extent=(-4, 4), point_radius=0,
                               axes=False)
    assert img.shape == (64, 64, 1) and img.dtype == np.uint8
    # x = 1 -> column (1 + 4) / 8 * 64 = 40; y = 2 -> row (4 - 2) / 8 * 64 = 16.
    assert img[16, 40, 0] < 128
    mask = np.ones((64, 64), bool)
    mask[16, 40] = False
    assert (img[..., 0][mask] == 255).all()


def test_scatter_extent_is_respected():
    pts = np.array([[0.5, 0.5], [0.0, 1.0], [1.0, 0.0], [5.0, 5.0], [np.nan, 0.2]])
    img = images.scatter_image(pts, size=10, extent=(0, 1, 0, 1), point_radius=0)[..., 0]
    assert img[5, 5] < 128          # the centre
    assert img[0, 0] < 128          # (xmin, ymax): top left
    assert img[9, 9] < 128          # (xmax, ymin): bottom right, the closed edge
    assert (img < 128).sum() == 3   # (5, 5) is outside; NaN is not drawn
    # The same points on a wider extent land elsewhere: the extent drives the raster.
    wide = images.scatter_image(pts, size=10, extent=(-1, 1), point_radius=0, axes=False)[..., 0]
    assert wide[2, 7] < 128 and wide[5, 5] == 255


def test_scatter_default_extent_axes_and_density():
    img = images.scatter_image(np.zeros((0, 2)), size=32)[..., 0]
    # Default extent [-4, 4]^2: the axes cross in the middle, in light gray.
    assert img[16, 3] == img[3, 16] == 224 and img[3, 3] == 255
    one = images.scatter_image(np.array([[2.0, 2.0]]), size=32, point_radius=1, axes=False)[..., 0]
    many = images.scatter_image(np.full((5, 2), 2.0), size=32, point_radius=1, axes=False)[..., 0]
    assert (one < 255).sum() == 9 and (many < 255).sum() == 9   # 3x3 dots
    assert many[8, 24] < one[8, 24] < 128                        # denser is darker


def test_scatter_rejects_bad_input():
    with pytest.raises(ValueError):
        images.scatter_image(np.zeros((4, 3)))
    with pytest.raises(ValueError):
        images.scatter_image(np.zeros((4, 2)), extent=(1, 0))


# --------------------------------------------------------------------------- dispatch and files


def test_samples_to_image_dispatches_on_shape():
    digits = np.zeros((16, 8, 8, 1), np.float32)
    grid = images.samples_to_image(digits)
    assert grid.shape == (4 * 33 + 1, 4 * 33 + 1, 1)   # 8x8 tiles upscaled 4x, 1 px padding
    assert images.samples_to_image(np.zeros((4, 28, 28, 3))).shape == (2 * 29 + 1, 2 * 29 + 1, 3)
    assert images.samples_to_image(np.zeros((50, 2)), size=100).shape == (100, 100, 1)
    with pytest.raises(ValueError):
        images.samples_to_image(np.zeros((50, 3)))


def test_save_png_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    for channels in (1, 3):
        image = rng.integers(0, 256, size=(7, 5, channels), dtype=np.uint8)
        path = str(tmp_path / "nested" / "dir" / f"img{channels}.png")
        assert images.save_png(path, image) == path
        decoded = tf.io.decode_png(tf.io.read_file(path)).numpy()
        np.testing.assert_array_equal(decoded, image)
    gray = images.save_png(str(tmp_path / "gray.png"), np.zeros((3, 4), np.uint8))
    assert tf.io.decode_png(tf.io.read_file(gray)).shape == (3, 4, 1)
    with pytest.raises(TypeError):
        images.save_png(str(tmp_path / "float.png"), np.zeros((3, 4, 1), np.float32))
