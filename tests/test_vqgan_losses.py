"""Known answers for the VQ-GAN losses and codebook statistics (cxrjax.losses.vqgan, spec
raygen_and_raddiffusion.md §C.3; the entropy loss is MaskGIT's libml/losses.py entropy_loss)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxrjax.losses import vqgan as L

# One compiled program per call signature instead of one per primitive: faster on a busy CPU.
usage = jax.jit(L.codebook_usage, static_argnums=1)
perplexity = jax.jit(L.perplexity)
distance = jax.jit(L.perceptual_distance, static_argnames=("reduce",))
entropy = jax.jit(L.codebook_entropy_loss, static_argnames=("temperature", "kind"))


def test_hinge_and_generator_losses():
  real = jnp.array([[2.0, 0.5], [-1.0, 1.0]])  # relu(1 - real): 0, 0.5, 2, 0 -> mean 0.625
  fake = jnp.array([-3.0, 0.0, 1.0])  # relu(1 + fake): 0, 1, 2 -> mean 1
  np.testing.assert_allclose(L.hinge_d_loss(real, fake), 0.5 * (0.625 + 1.0))
  assert float(L.hinge_d_loss(jnp.full((4,), 1.0), jnp.full((4,), -1.0))) == 0.0
  np.testing.assert_allclose(L.generator_adversarial_loss(fake), 2.0 / 3.0)


def test_adaptive_weight_against_explicit_norms():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(3, 3, 8, 3)).astype(np.float32)
  b = rng.normal(size=(3, 3, 8, 3)).astype(np.float32) * 7
  want = np.sqrt((a.astype(np.float64) ** 2).sum()) / (np.sqrt((b.astype(np.float64) ** 2).sum())
                                                       + 1e-4)
  np.testing.assert_allclose(L.adaptive_weight(a, b), want, rtol=1e-5)
  # Pytrees use the global norm; the weight is clamped to [0, 1e4].
  np.testing.assert_allclose(L.adaptive_weight({"k": a, "b": a[0]}, b),
                             np.sqrt((a ** 2).sum() + (a[0] ** 2).sum()) / (np.sqrt((b ** 2).sum())
                                                                            + 1e-4), rtol=1e-5)
  assert float(L.adaptive_weight(a, np.zeros_like(b))) == 1e4
  np.testing.assert_allclose(L.adaptive_weight(a, 0 * b, max_weight=3.0), 3.0)
  # Gradient stopped, as taming's .detach().
  assert float(jax.grad(lambda s: L.adaptive_weight(s * a, b))(1.0)) == 0.0


def test_adopt_weight_gates_by_step():
  assert float(L.adopt_weight(30000, 30001)) == 0.0
  assert float(L.adopt_weight(30001, 30001)) == 1.0
  steps = jnp.arange(5)
  np.testing.assert_array_equal(jax.jit(lambda s: L.adopt_weight(s, 3, 0.8))(steps),
                                np.array([0, 0, 0, 0.8, 0.8], np.float32))


def _one_hot_distances(codes, n, gap=10.0):
  """Distances whose softmax(-d / 0.01) is one-hot at `codes`."""
  d = np.full((len(codes), n), gap, np.float32)
  d[np.arange(len(codes)), codes] = 0.0
  return d


def test_entropy_loss_known_answers():
  n = 8
  # Confident and uniform over the codes: sample entropy 0, batch entropy log n (MaskGIT's 1e-5
  # inside the log shifts it by ~n * 1e-5 / n).
  spread = entropy(_one_hot_distances(np.arange(32) % n, n))
  np.testing.assert_allclose(spread, -np.log(n), atol=1e-4)
  # Collapse onto one code: both entropies 0.
  collapse = entropy(_one_hot_distances(np.zeros(32, int), n))
  np.testing.assert_allclose(collapse, 0.0, atol=1e-4)
  # No confidence (all codes equally far): sample entropy = batch entropy = log n.
  np.testing.assert_allclose(entropy(np.ones((5, n), np.float32)), 0.0, atol=1e-4)
  # The argmax form agrees on one-hot assignments; shape (B, h, w, n) is flattened.
  d = _one_hot_distances(np.arange(32) % n, n).reshape(2, 4, 4, n)
  np.testing.assert_allclose(entropy(d, kind="argmax"), -np.log(n), atol=1e-4)
  # A numpy re-computation of MaskGIT's formula on soft assignments.
  d = np.random.default_rng(0).uniform(0, 0.05, size=(10, n)).astype(np.float32)
  logits = -d / 0.01
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  avg = p.mean(0)
  want = -np.mean((p * np.log(p)).sum(1)) + np.sum(avg * np.log(avg + 1e-5))
  np.testing.assert_allclose(entropy(d), want, rtol=1e-4)
  with pytest.raises(ValueError, match="'softmax' or 'argmax'"):
    L.codebook_entropy_loss(d, kind="gumbel")


def test_usage_perplexity_dead_codes():
  idx = jnp.array([[0, 1, 1], [3, 3, 3]], jnp.int32)
  counts = usage(idx, 5)
  np.testing.assert_array_equal(counts, [1, 2, 0, 3, 0])
  assert counts.dtype == jnp.int32
  p = np.array([1, 2, 3]) / 6
  np.testing.assert_allclose(perplexity(counts), np.exp(-(p * np.log(p)).sum()), rtol=1e-6)
  assert int(L.dead_codes(counts)) == 2
  np.testing.assert_allclose(perplexity(jnp.full((16,), 4)), 16.0, rtol=1e-6)
  np.testing.assert_allclose(perplexity(jnp.array([0, 9, 0])), 1.0)
  assert float(perplexity(jnp.zeros(4, jnp.int32))) == 1.0  # nothing counted yet: no NaN


def test_codebook_loss_is_the_models():
  from cxrjax.models.vqgan import quantizer_loss
  assert L.codebook_loss is quantizer_loss
  z, q = jnp.ones((2, 3)), jnp.zeros((2, 3))
  np.testing.assert_allclose(L.codebook_loss(z, q, 0.25, True), 1.25)


def test_perceptual_distance():
  rng = np.random.default_rng(0)
  a = [rng.normal(size=(2, 4, 4, 6)).astype(np.float32),
       rng.normal(size=(2, 2, 2, 10)).astype(np.float32)]
  b = [rng.normal(size=x.shape).astype(np.float32) for x in a]
  assert float(distance(a, a)) < 1e-12  # zero up to how XLA fuses the two normalisations
  # Invariant to a positive scale per pixel (LPIPS unit-normalises over channels).
  scaled = [x * rng.uniform(0.1, 10, size=x.shape[:3] + (1,)).astype(np.float32) for x in a]
  np.testing.assert_allclose(distance(scaled, b), distance(a, b),
                             rtol=1e-5)
  # Hand example: pixel 0 compares (3, 4) -> (0.6, 0.8) with (1, 0): 0.16 + 0.64 = 0.8; pixel 1
  # is equal. Mean over the 2 pixels 0.4; a second identical layer adds 0.4.
  fa = np.array([[[[3.0, 4.0], [1.0, 0.0]]]], np.float32)  # (1, 1, 2, 2)
  fb = np.array([[[[1.0, 0.0], [2.0, 0.0]]]], np.float32)
  np.testing.assert_allclose(distance([fa], [fb]), 0.4, rtol=1e-6)
  np.testing.assert_allclose(distance([fa, fa], [fb, fb]), 0.8, rtol=1e-6)
  # Channel weights (LPIPS's lin layer) and the per-sample form.
  np.testing.assert_allclose(distance([fa], [fb], weights=[np.array([1.0, 0.0])]),
                             0.16 / 2, rtol=1e-6)
  per = distance(a, b, reduce=False)
  assert per.shape == (2,)
  np.testing.assert_allclose(per.mean(), distance(a, b), rtol=1e-6)
  # Zero feature vectors stay finite (eps 1e-10 outside the root).
  zero = [np.zeros((1, 2, 2, 3), np.float32)]
  assert float(distance(zero, zero)) == 0.0
  g = jax.jit(jax.grad(lambda x: L.perceptual_distance([x], [b[0]])))(a[0])
  assert np.all(np.isfinite(g))
  with pytest.raises(ValueError, match="must be equal"):
    distance([a[0]], [a[1]])
  with pytest.raises(ValueError, match="equally long"):
    distance(a, a[:1])
