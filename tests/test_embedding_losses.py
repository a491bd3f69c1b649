"""The FMKD embedding losses against closed forms and the seed's PyTorch semantics (spec B.3)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxrjax.losses import embedding as E


def _pair(seed=0, b=5, d=7):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(b, d)).astype(np.float32), rng.normal(size=(b, d)).astype(np.float32)


def test_mse_mae_closed_form():
  p, t = _pair()
  np.testing.assert_allclose(E.mse(p, t), np.mean((p - t) ** 2), rtol=1e-6)
  np.testing.assert_allclose(E.mae(p, t), np.mean(np.abs(p - t)), rtol=1e-6)
  assert float(E.mse(t, t)) == 0.0


def test_huber_matches_piecewise_definition():
  p = np.array([[0.0, 0.0, 0.0, 0.0]], np.float32)
  t = np.array([[0.5, -0.5, 2.0, -3.0]], np.float32)
  # 0.5 r^2 for |r| <= 1, |r| - 0.5 beyond
  want = np.mean([0.125, 0.125, 1.5, 2.5])
  np.testing.assert_allclose(E.huber(p, t), want, rtol=1e-6)
  np.testing.assert_allclose(E.huber(p, t, delta=2.0), np.mean([0.125, 0.125, 2.0, 4.0]), rtol=1e-6)


def test_cosine_closed_form_and_extremes():
  p, t = _pair(1)
  cos = np.sum(p * t, 1) / (np.linalg.norm(p, axis=1) * np.linalg.norm(t, axis=1))
  np.testing.assert_allclose(E.cosine(p, t), 1 - cos.mean(), rtol=1e-5)
  np.testing.assert_allclose(E.cosine(t, 3 * t), 0.0, atol=1e-6)  # scale-invariant
  np.testing.assert_allclose(E.cosine(t, -t), 2.0, atol=1e-6)
  # a zero row: torch clamps each norm at eps, so the similarity is 0 (not NaN)
  z = np.zeros((1, 3), np.float32)
  np.testing.assert_allclose(E.cosine(z, np.ones((1, 3), np.float32)), 1.0, atol=1e-6)
  assert np.isfinite(jax.grad(lambda a: E.cosine(a, t[:1] * 0 + 1))(jnp.zeros((1, 7)))).all()


def test_mixes():
  p, t = _pair(2)
  m, c = np.mean((p - t) ** 2), float(E.cosine(p, t))
  np.testing.assert_allclose(E.mse_cosine(p, t), 0.5 * m + 0.5 * c, rtol=1e-6)
  np.testing.assert_allclose(
      E.mse_cosine(p, t, 0.6, E.SEED_MSE_SCALE, E.SEED_COS_SCALE),
      0.6 * m / 0.07545425 + 0.4 * c / 0.008772321, rtol=1e-5)
  s = jnp.array([0.3, -0.2])
  np.testing.assert_allclose(E.mse_cosine_learned(p, t, s),
                             np.exp(-0.3) * m + 0.3 + np.exp(0.2) * c - 0.2, rtol=1e-5)
  # at s = 0 the learned mix is plain mse + cosine; d/ds1 = 1 - mse there
  np.testing.assert_allclose(E.mse_cosine_learned(p, t, jnp.zeros(2)), m + c, rtol=1e-6)
  g = jax.grad(lambda s: E.mse_cosine_learned(p, t, s))(jnp.zeros(2))
  np.testing.assert_allclose(g, [1 - m, 1 - c], rtol=1e-5)


@pytest.mark.parametrize("kind", E.KINDS)
def test_dispatch_returns_logged_terms(kind):
  p, t = _pair(3)
  log_vars = jnp.zeros(2) if kind == "mse_cosine_learned" else None
  loss, terms = E.embedding_loss(kind, p, t, alpha=0.6, log_vars=log_vars)
  assert np.isfinite(float(loss)) and {"mse", "cosine"} <= set(terms)
  loss0, _ = E.embedding_loss(kind, t, t, log_vars=log_vars)
  assert abs(float(loss0)) < 1e-5  # every loss is zero at the target


def test_unknown_kind():
  p, t = _pair()
  with pytest.raises(ValueError, match="unknown embedding loss"):
    E.embedding_loss("kl", p, t)
