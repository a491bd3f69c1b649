"""Tests for cxrjax.data.normalize: exact inverses, the seed's unNormalize, JSON, jax."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxrjax.data.errors import DataError
from cxrjax.data.normalize import KINDS, Normalizer, fit_normalizer


@pytest.fixture(scope="module")
def x():
  rng = np.random.default_rng(0)
  # positive-ish, anisotropic like DenseNet features: per-dim scale and offset differ
  return (rng.gamma(2.0, 1.0, size=(200, 16)) * rng.uniform(0.1, 3.0, 16) - 0.5).astype(np.float32)


def seed_unnormalize(z, lo, hi):
  """The seed's loss/classification_loss.py::unNormalize, verbatim in formula."""
  return (z * (hi - lo) + hi + lo) / 2


def test_minmax_maps_train_to_exactly_minus_one_one(x):
  norm = fit_normalizer("minmax", x)
  assert norm.params == {"min": float(x.min()), "max": float(x.max())}
  z = norm.apply(x.astype(np.float64))
  assert z.min() == -1.0 and abs(z.max() - 1.0) < 1e-15
  z32 = norm.apply(x)
  assert z32.dtype == np.float32
  np.testing.assert_allclose([z32.min(), z32.max()], [-1.0, 1.0], atol=1e-6)


def test_seed_unnormalize_is_the_inverse(x):
  norm = fit_normalizer("minmax", x)
  lo, hi = norm.params["min"], norm.params["max"]
  x64 = x.astype(np.float64)
  z = 2 * (x64 - lo) / (hi - lo) - 1  # the map the seed's unNormalize undoes
  np.testing.assert_allclose(norm.apply(x64), z, atol=1e-12)
  np.testing.assert_allclose(seed_unnormalize(z, lo, hi), x64, atol=1e-12)
  np.testing.assert_allclose(norm.invert(z), seed_unnormalize(z, lo, hi), atol=1e-12)


@pytest.mark.parametrize("kind", ["minmax", "standardize", "none"])
@pytest.mark.parametrize("backend", ["numpy", "jax", "jax_jit"])
def test_round_trip(x, kind, backend):
  norm = fit_normalizer(kind, x)
  assert norm.exact_inverse
  apply, invert = norm.apply, norm.invert
  if backend == "jax_jit":
    apply, invert = jax.jit(apply), jax.jit(invert)
  arr = jnp.asarray(x) if backend.startswith("jax") else x
  z = apply(arr)
  back = invert(z)
  assert isinstance(z, jax.Array) == backend.startswith("jax")
  assert back.dtype == np.float32 and back.shape == x.shape
  scale = np.abs(x).max()  # float32 holds ~7 digits of the largest value
  np.testing.assert_allclose(np.asarray(back) / scale, x / scale, atol=1e-6)


def test_standardize_fits_per_dimension(x):
  norm = fit_normalizer("standardize", x)
  z = norm.apply(x.astype(np.float64))
  np.testing.assert_allclose(z.mean(0), 0, atol=1e-9)
  np.testing.assert_allclose(z.std(0), 1, atol=1e-9)
  const = np.concatenate([x, np.ones((200, 1), np.float32)], axis=1)  # a dead feature
  std = fit_normalizer("standardize", const).params["std"]
  assert std[-1] == 1e-6


def test_l2_sqrt_d_direction_and_mean_norm(x):
  norm = fit_normalizer("l2_sqrt_d", x)
  assert not norm.exact_inverse
  for arr in (x, jnp.asarray(x)):
    z = np.asarray(norm.apply(arr))
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), np.sqrt(16), rtol=1e-6)
  back = norm.invert(norm.apply(x))
  mean_norm = np.linalg.norm(x.astype(np.float64), axis=1).mean()
  np.testing.assert_allclose(np.linalg.norm(back, axis=1), mean_norm, rtol=1e-5)
  cos = (back * x).sum(1) / np.linalg.norm(back, axis=1) / np.linalg.norm(x, axis=1)
  np.testing.assert_allclose(cos, 1, atol=1e-5)
  assert np.isfinite(norm.apply(np.zeros((1, 16), np.float32))).all()  # zero row: no NaN


@pytest.mark.parametrize("kind", KINDS)
def test_json_round_trip(x, kind):
  norm = fit_normalizer(kind, x)
  text = json.dumps(norm.to_json())
  for restored in (Normalizer.from_json(json.loads(text)), Normalizer.from_json(text)):
    assert restored == norm
    np.testing.assert_array_equal(restored.apply(x), norm.apply(x))


def test_errors(x):
  with pytest.raises(ValueError, match=r"unknown normaliser kind 'zscore'.*'minmax'.*'standardize'"):
    fit_normalizer("zscore", x)
  with pytest.raises(DataError, match="constant"):
    fit_normalizer("minmax", np.zeros((5, 3)))
  with pytest.raises(DataError, match="NaN"):
    fit_normalizer("standardize", np.array([[1.0, np.nan]]))
  with pytest.raises(DataError, match="non-empty"):
    fit_normalizer("minmax", np.zeros((0, 3)))
  with pytest.raises(ValueError, match="fitted on dim 16"):
    fit_normalizer("standardize", x).apply(x[:, :8])
  with pytest.raises(ValueError, match=r"missing param\(s\) \['max'\]"):
    Normalizer.from_json({"kind": "minmax", "params": {"min": 0.0}})
