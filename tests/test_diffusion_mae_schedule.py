"""Tests for RadDiffusion's additions to cxrjax.core.diffusion (spec D.6.1-D.6.3)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxrjax.core import diffusion as D


def test_power_linspace_betas_closed_form_and_spec_numbers():
  b = D.power_linspace_betas()
  assert b.shape == (100,) and b.dtype == np.float64
  np.testing.assert_allclose(b, np.linspace(1e-4, 0.2, 100) ** 2, rtol=1e-15)
  np.testing.assert_allclose([b[0], b[-1]], [1e-8, 0.04], rtol=1e-12)
  s = D.power_linspace_schedule()
  assert s.num_timesteps == 100 and s.betas.dtype == jnp.float32
  abar = np.asarray(s.alphas_cumprod, np.float64)
  np.testing.assert_allclose(abar, np.cumprod(1 - b), rtol=1e-6)
  np.testing.assert_allclose([abar[49], abar[99]], [0.847, 0.257], atol=1e-3)  # spec D.6.1
  assert abar[0] == pytest.approx(1.0, abs=1e-7)
  abar1 = np.asarray(D.power_linspace_schedule(rho=1.0).alphas_cumprod)
  np.testing.assert_allclose(abar1[99], 2.14e-5, rtol=1e-2)  # "~2e-5" with rho = 1
  np.testing.assert_allclose(np.asarray(D.power_linspace_schedule(50, 0.1, 0.3, 3.0).betas),
                             np.linspace(0.1, 0.3, 50) ** 3, rtol=1e-6)


def _reference_schedule(betas):
  """The DDPM coefficients written out in float64, each rounded once to float32."""
  ab = np.cumprod(1.0 - betas)
  abp = np.concatenate([[1.0], ab[:-1]])
  pv = betas * (1.0 - abp) / (1.0 - ab)
  ref = dict(betas=betas, alphas_cumprod=ab, alphas_cumprod_prev=abp,
             sqrt_alphas_cumprod=np.sqrt(ab), sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ab),
             sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ab),
             sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ab - 1.0), posterior_variance=pv,
             posterior_log_variance_clipped=np.log(np.maximum(pv, 1e-20)),
             posterior_mean_coef1=betas * np.sqrt(abp) / (1.0 - ab),
             posterior_mean_coef2=(1.0 - abp) * np.sqrt(1.0 - betas) / (1.0 - ab))
  return {k: v.astype(np.float32) for k, v in ref.items()}


def test_schedule_from_betas_equals_make_schedule():
  # make_schedule builds through schedule_from_betas, so their equality alone is circular; both
  # are also pinned bit for bit to the maths written out above.
  for kind, betas in [("linear", D.linear_beta_schedule(64)), ("cosine", D.cosine_beta_schedule(64))]:
    a, b = D.make_schedule(kind, 64), D.schedule_from_betas(betas)
    ref = _reference_schedule(betas)
    assert sorted(ref) == sorted(f.name for f in dataclasses.fields(a))
    for f in dataclasses.fields(a):
      np.testing.assert_array_equal(np.asarray(getattr(a, f.name)), np.asarray(getattr(b, f.name)))
      np.testing.assert_array_equal(np.asarray(getattr(a, f.name)), ref[f.name])


def test_power_schedule_posterior_is_finite():
  s = D.power_linspace_schedule()
  for f in dataclasses.fields(s):
    assert np.isfinite(np.asarray(getattr(s, f.name))).all(), f.name
  assert float(s.posterior_variance[0]) == 0.0


def _inputs(N=3, H=8, W=12, p=4, seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  # Drawn flat: the numbers of a (N, H, W, 1) draw, without its slow compile (see diffusion.py).
  x = jax.random.uniform(k1, (N * H * W,)).reshape(N, H, W, 1)
  mask = (jax.random.uniform(k2, (N, (H // p) * (W // p))) < 0.5).astype(jnp.float32)
  return x, mask


def test_noise_masked_patches_composite_formula():
  s = D.power_linspace_schedule()
  x, mask = _inputs()
  t = jnp.array([0, 50, 99], jnp.int32)
  key = jax.random.key(7)
  out = np.asarray(D.noise_masked_patches(key, x, mask, t, s, 4))
  eps = np.asarray(jax.random.normal(key, x.shape, x.dtype))
  a = np.asarray(s.sqrt_alphas_cumprod)[np.asarray(t)][:, None, None, None]
  c = np.asarray(s.sqrt_one_minus_alphas_cumprod)[np.asarray(t)][:, None, None, None]
  noisy = np.clip(a * np.asarray(x) + c * eps, -1, 1)
  xn = np.asarray(x)
  for n in range(3):
    for j in range(6):
      r, col = divmod(j, 3)
      sl = (n, slice(4 * r, 4 * r + 4), slice(4 * col, 4 * col + 4))
      if mask[n, j]:
        np.testing.assert_allclose(out[sl], noisy[sl], rtol=1e-6, atol=1e-6)
      else:  # visible patches are the clean image, bit for bit
        np.testing.assert_array_equal(out[sl], xn[sl])
  assert out.min() >= -1.0 and out.max() <= 1.0
  # At t = 99 (rho = 2) the noise is strong enough that some masked pixel clips at -1.
  assert (out[2] == -1.0).any()


def test_noise_masked_patches_leading_dims_and_no_gradient():
  s = D.power_linspace_schedule()
  x, mask = _inputs(N=4)
  t = jnp.array([10, 20, 30, 40], jnp.int32)
  key = jax.random.key(3)
  flat = D.noise_masked_patches(key, x, mask, t, s, 4)
  studies = D.noise_masked_patches(key, x.reshape(2, 2, 8, 12, 1), mask.reshape(2, 2, 6),
                                   t.reshape(2, 2), s, 4)
  np.testing.assert_array_equal(np.asarray(studies).reshape(flat.shape), np.asarray(flat))
  g = jax.grad(lambda im: D.noise_masked_patches(key, im, mask, t, s, 4).sum())(x)
  assert float(jnp.abs(g).max()) == 0.0
  with pytest.raises(ValueError, match="patches"):
    D.noise_masked_patches(key, x, mask[:, :5], t, s, 4)


def test_sample_timesteps_uniform_per_image():
  t = D.sample_timesteps(jax.random.key(0), 20000, 100)
  assert t.shape == (20000,) and t.dtype == jnp.int32
  counts = np.bincount(np.asarray(t), minlength=100)
  assert counts.min() > 120 and counts.max() < 290 and t.min() == 0 and t.max() == 99
  assert len(np.unique(np.asarray(t[:50]))) > 30  # not one step for the batch


def test_sample_sparse_timesteps_distinct_descending():
  t = np.asarray(D.sample_sparse_timesteps(jax.random.key(1), 500, 100, 5))
  assert t.shape == (500, 5)
  assert (np.diff(t, axis=1) < 0).all() and t.min() >= 0 and t.max() < 100
  assert np.bincount(t.ravel(), minlength=100).min() > 0
  with pytest.raises(ValueError):
    D.sample_sparse_timesteps(jax.random.key(1), 2, 10, 11)
