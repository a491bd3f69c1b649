"""cxrjax.data.augment: determinism, the identity, geometry direction, intensity table."""
import dataclasses

import numpy as np
import pytest
from PIL import Image

from cxrjax.data import augment as A


def _image(h=64, w=64, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)


def test_deterministic_from_seed():
  cfg = A.AugmentConfig(size=48, hflip_prob=0.5)
  img = _image(80, 72)
  a = A.augment(img, np.random.default_rng([3, 1, 7]), cfg)
  b = A.augment(img, np.random.default_rng([3, 1, 7]), cfg)
  c = A.augment(img, np.random.default_rng([3, 1, 8]), cfg)
  assert a.shape == (48, 48) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_identity_when_all_ranges_are_zero():
  img = _image(64, 64)
  cfg = A.AugmentConfig.identity(size=64)
  out = A.augment(img[..., None], np.random.default_rng(0), cfg)  # (H, W, 1) accepted
  np.testing.assert_array_equal(out, img)
  # Downsizing: 2x is a box-filter reduction, exactly PIL's reduce(2).
  out = A.augment(img, np.random.default_rng(0), dataclasses.replace(cfg, size=32))
  np.testing.assert_array_equal(out, np.asarray(Image.fromarray(img).reduce(2)))
  np.testing.assert_array_equal(A.resize(img, 32), out)


def _dot(h=64, w=64, row=31, col=47):
  img = np.zeros((h, w), np.uint8)
  img[row, col] = 255
  return img


def _peak(img):
  return tuple(int(v) for v in np.unravel_index(np.argmax(img), img.shape))


def test_rotation_turns_content_counter_clockwise():
  # Dot centre (47.5, 31.5) is (+15.5, -0.5) from the image centre (32, 32); a 90 degree
  # counter-clockwise turn (y down) takes (dx, dy) to (dy, -dx) = (-0.5, -15.5): pixel row 16, col 31.
  params = dataclasses.replace(A.identity_params(64, 64), angle_deg=90.0)
  out = A.apply(_dot(), params, 64)
  assert _peak(out) == (16, 31)
  assert out.max() > 200  # a right angle keeps the dot on the pixel grid
  small = A.apply(_dot(), dataclasses.replace(params, angle_deg=10.0), 64)
  row, col = _peak(small)
  assert row < 31 and col <= 47  # a small positive turn lifts a dot right of centre


def test_translation_and_flip_move_content():
  base = A.identity_params(64, 64)
  # Moving the crop centre 8 px right moves the content 8 px left.
  out = A.apply(_dot(), dataclasses.replace(base, center=(40.0, 32.0)), 64)
  assert _peak(out) == (31, 39)
  out = A.apply(_dot(), dataclasses.replace(base, flip=True), 64)
  assert _peak(out) == (31, 16)


def test_sampled_ranges_and_flip_off_by_default():
  cfg = A.AugmentConfig(size=32)
  rng = np.random.default_rng(0)
  draws = [A.sample_params(cfg, rng, 100, 80) for _ in range(300)]
  assert not any(p.flip for p in draws)
  angles = np.array([p.angle_deg for p in draws])
  assert np.abs(angles).max() <= 10 and angles.min() < -5 and angles.max() > 5
  areas = np.array([p.crop_size[0] * p.crop_size[1] / (100 * 80) for p in draws])
  assert areas.min() >= 0.7 * 0.95 - 1e-6 and areas.max() <= 1.0 + 1e-6
  assert all(0.9 <= p.contrast <= 1.1 and abs(p.brightness) <= 0.1 for p in draws)
  flips = [A.sample_params(dataclasses.replace(cfg, hflip_prob=0.5), rng, 10, 10).flip
           for _ in range(100)]
  assert 20 < sum(flips) < 80


def test_brightness_contrast_lut():
  np.testing.assert_array_equal(A.intensity_lut(0.0, 1.0), np.arange(256))
  up = A.intensity_lut(0.1, 1.0).astype(int)
  assert up[0] == 26 and up[100] == 126 and up[255] == 255
  assert np.all(np.diff(up) >= 0)
  steep = A.intensity_lut(0.0, 1.5).astype(int)  # 1.5 v - 63.75
  assert steep[0] == 0 and steep[40] == 0 and steep[100] == 86 and steep[255] == 255
  assert abs(steep[128] - 128) <= 1
  img = _image(32, 32)
  params = dataclasses.replace(A.identity_params(32, 32), brightness=-0.2, contrast=1.3)
  np.testing.assert_array_equal(A.apply(img, params, 32), A.intensity_lut(-0.2, 1.3)[img])


def test_bad_config_and_image_rejected():
  with pytest.raises(ValueError):
    A.AugmentConfig(scale=(0.0, 1.0))
  with pytest.raises(ValueError):
    A.AugmentConfig(rotate_deg=-1.0)
  with pytest.raises(ValueError):
    A.resize(np.zeros((4, 4), np.float32), 4)
