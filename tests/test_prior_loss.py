"""Known-answer tests for cxrjax.losses.diffusion.prior_loss (spec prior_and_fmkd.md §A.4).

The frozen CTPA head is a tiny linear map (logits = x @ w + b) and U is the min-max inverse
U(z) = (z (max - min) + max + min) / 2, so every expected value and gradient is computed
independently here in float64 numpy: by hand (closed-form gradient of BCE-of-sigmoid) and by
central finite differences of the numpy reference. Scale != 1 everywhere, so a missing or
misplaced `/ scale` changes the numbers.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxrjax.losses.diffusion import prior_loss

B, D = 6, 5
SCALE = 3.7  # != 1 and != sqrt(D): U(z / scale) and U(z) differ
W_DIFF, W_CLS = 0.8, 0.2


def _setup(seed=0):
  """Random head (w, b), min-max bounds and (output, target, pred_x0, x0) in the scaled space."""
  rng = np.random.default_rng(seed)
  w = rng.normal(size=D) * 0.7
  b = 0.3
  lo = rng.uniform(-2.0, -0.5, size=D)
  hi = rng.uniform(0.5, 2.5, size=D)
  x0 = rng.uniform(-1, 1, size=(B, D)) * SCALE  # normalised embedding in [-1, 1], times scale
  pred = x0 + rng.normal(size=(B, D)) * 0.8 * SCALE
  # output/target differ from pred/x0 so the MSE and cls terms are told apart (eps/v targets).
  output = rng.normal(size=(B, D))
  target = rng.normal(size=(B, D))
  return dict(w=w, b=b, lo=lo, hi=hi, x0=x0, pred=pred, output=output, target=target)


def _jax_fns(s):
  w, b = jnp.asarray(s["w"], jnp.float32), jnp.float32(s["b"])
  lo, hi = jnp.asarray(s["lo"], jnp.float32), jnp.asarray(s["hi"], jnp.float32)
  head = lambda x: x @ w + b
  unnorm = lambda z: (z * (hi - lo) + hi + lo) / 2
  return head, unnorm


def _f32(*xs):
  return [jnp.asarray(x, jnp.float32) for x in xs]


# ----------------------------------------------------------------------------- numpy reference
def _np_sigmoid(z):
  return 1.0 / (1.0 + np.exp(-z))


def _np_unnorm(s, z):
  return (z * (s["hi"] - s["lo"]) + s["hi"] + s["lo"]) / 2


def _np_logits(s, x):
  return x @ s["w"] + s["b"]


def _np_bce(logits, tgt):
  """PyTorch BCELoss(sigmoid(logits), tgt): logs clamped at -100, mean over entries."""
  p = _np_sigmoid(logits)
  with np.errstate(divide="ignore"):
    log_p = np.maximum(np.log(p), -100.0)
    log_1mp = np.maximum(np.log(1 - p), -100.0)
  return float(np.mean(-(tgt * log_p + (1 - tgt) * log_1mp)))


def _np_intended(s, pred, x0, output, target, scale=SCALE):
  """Default path: U on pred/scale and x0/scale, soft teacher target."""
  mse = float(np.mean((output - target) ** 2))
  logits = _np_logits(s, _np_unnorm(s, pred / scale))
  tgt = _np_sigmoid(_np_logits(s, _np_unnorm(s, x0 / scale)))
  cls = _np_bce(logits, tgt)
  return W_DIFF * mse + W_CLS * cls, mse, cls


def _np_faithful(s, pred, x0, output, target):
  """The seed's code: U applied to the *scaled* tensors (no division by scale)."""
  mse = float(np.mean((output - target) ** 2))
  logits = _np_logits(s, _np_unnorm(s, pred))
  tgt = _np_sigmoid(_np_logits(s, _np_unnorm(s, x0)))
  cls = _np_bce(logits, tgt)
  return W_DIFF * mse + W_CLS * cls, mse, cls


def _fd_grad(f, x, h=1e-6):
  """Central finite-difference gradient of a float64 scalar function of an array."""
  g = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    xp, xm = x.copy(), x.copy()
    xp[idx] += h
    xm[idx] -= h
    g[idx] = (f(xp) - f(xm)) / (2 * h)
  return g


def _loss(s, output, target, pred, x0, **kw):
  head, unnorm = _jax_fns(s)
  kw.setdefault("scale", SCALE)
  return prior_loss(output, target, pred, x0, head_logits=head, unnormalize=unnorm,
                    w_diff=W_DIFF, w_cls=W_CLS, **kw)


# ----------------------------------------------------------------------------- default path
def test_default_total_matches_numpy_reference():
  s = _setup()
  total, terms = _loss(s, *_f32(s["output"], s["target"], s["pred"], s["x0"]))
  ref_total, ref_mse, ref_cls = _np_intended(s, s["pred"], s["x0"], s["output"], s["target"])
  np.testing.assert_allclose(float(terms["diffusion"]), ref_mse, rtol=1e-5)
  np.testing.assert_allclose(float(terms["cls"]), ref_cls, rtol=1e-5)
  np.testing.assert_allclose(float(total), ref_total, rtol=1e-5)
  # The cls term is a real soft BCE, not ~0 (which would make the checks above toothless).
  assert ref_cls > 0.05
  # Total is exactly the weighted sum of the logged terms.
  np.testing.assert_allclose(float(total), W_DIFF * float(terms["diffusion"])
                             + W_CLS * float(terms["cls"]), rtol=1e-6)


def test_default_weights_are_0p8_and_0p2():
  """Defaults follow the seed (0.8 MSE + 0.2 BCE)."""
  s = _setup(1)
  head, unnorm = _jax_fns(s)
  args = _f32(s["output"], s["target"], s["pred"], s["x0"])
  total, terms = prior_loss(*args, head_logits=head, unnormalize=unnorm, scale=SCALE)
  np.testing.assert_allclose(float(total), 0.8 * float(terms["diffusion"])
                             + 0.2 * float(terms["cls"]), rtol=1e-6)
  np.testing.assert_allclose(float(total), _np_intended(s, s["pred"], s["x0"], s["output"],
                                                        s["target"])[0], rtol=1e-5)


def test_scale_division_is_applied():
  """With scale != 1 the head must see U(pred / scale): tells `/ scale` from its absence."""
  s = _setup(2)
  _, terms = _loss(s, *_f32(s["output"], s["target"], s["pred"], s["x0"]))
  with_div = _np_intended(s, s["pred"], s["x0"], s["output"], s["target"])[2]
  without_div = _np_faithful(s, s["pred"], s["x0"], s["output"], s["target"])[2]
  assert abs(with_div - without_div) > 0.05  # the two readings are far apart here
  np.testing.assert_allclose(float(terms["cls"]), with_div, rtol=1e-5)
  # Invariant: the cls term depends on pred/scale and x0/scale only.
  _, terms1 = _loss(s, *_f32(s["output"], s["target"], s["pred"] / SCALE, s["x0"] / SCALE),
                    scale=1.0)
  np.testing.assert_allclose(float(terms1["cls"]), float(terms["cls"]), rtol=1e-5)
  # The label path divides by scale too.
  labels = np.array([1.0, 0.0, 1.0, 0.0, 1.0, 1.0])
  _, tl = _loss(s, *_f32(s["output"], s["target"], s["pred"], s["x0"]), cls_target="label",
                labels=jnp.asarray(labels, jnp.float32))
  np.testing.assert_allclose(float(tl["cls"]),
                             _np_bce(_np_logits(s, _np_unnorm(s, s["pred"] / SCALE)), labels),
                             rtol=1e-5)


def test_default_gradient_flows_through_cls_term():
  """d loss / d pred_x0 (output held fixed) is the cls term's gradient; matches closed form and FD."""
  s = _setup(3)
  output, target, pred, x0 = _f32(s["output"], s["target"], s["pred"], s["x0"])
  g = np.asarray(jax.grad(lambda p: _loss(s, output, target, p, x0)[0])(pred), np.float64)

  # Closed form: dBCE/dlogit_i = (sigmoid(l_i) - t_i) / B; dl_i/dpred_i = w * (hi - lo) / (2 scale).
  logits = _np_logits(s, _np_unnorm(s, s["pred"] / SCALE))
  tgt = _np_sigmoid(_np_logits(s, _np_unnorm(s, s["x0"] / SCALE)))
  dl = (_np_sigmoid(logits) - tgt) / B
  ref = W_CLS * dl[:, None] * (s["w"] * (s["hi"] - s["lo"]) / (2 * SCALE))[None, :]
  fd = _fd_grad(lambda p: _np_intended(s, p, s["x0"], s["output"], s["target"])[0], s["pred"])
  np.testing.assert_allclose(fd, ref, rtol=1e-5, atol=1e-9)  # the two references agree
  assert np.abs(ref).max() > 1e-3
  np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-7)


def test_teacher_target_gets_no_gradient():
  s = _setup(4)
  output, target, pred, x0 = _f32(s["output"], s["target"], s["pred"], s["x0"])
  # x0 only enters through the teacher target here (target is a separate array): no gradient.
  g_x0 = jax.grad(lambda x: _loss(s, output, target, pred, x)[0])(x0)
  np.testing.assert_array_equal(np.asarray(g_x0), 0.0)
  # Seed's x0-prediction wiring (output = pred_x0, target = x0): d/dx0 is the MSE's alone.
  f = lambda p, x: _loss(s, p, x, p, x)[0]
  g_p, g_x = jax.grad(f, argnums=(0, 1))(pred, x0)
  mse_grad = W_DIFF * 2 * (s["pred"] - s["x0"]) / (B * D)
  np.testing.assert_allclose(np.asarray(g_x), -mse_grad, rtol=1e-4, atol=1e-7)
  # ... while d/dpred has the MSE part plus the (non-zero) cls part.
  cls_part = np.asarray(g_p) - mse_grad
  assert np.abs(cls_part).max() > 1e-3


# ----------------------------------------------------------------------------- faithful path
def test_faithful_value_matches_seed_formula():
  s = _setup(5)
  total, terms = _loss(s, *_f32(s["output"], s["target"], s["pred"], s["x0"]),
                       faithful_no_grad_cls=True)
  ref_total, ref_mse, ref_cls = _np_faithful(s, s["pred"], s["x0"], s["output"], s["target"])
  np.testing.assert_allclose(float(terms["diffusion"]), ref_mse, rtol=1e-5)
  np.testing.assert_allclose(float(terms["cls"]), ref_cls, rtol=1e-5)
  np.testing.assert_allclose(float(total), ref_total, rtol=1e-5)
  # Discriminates from the intended formula (which divides by scale).
  assert abs(ref_cls - _np_intended(s, s["pred"], s["x0"], s["output"], s["target"])[2]) > 0.05


def test_faithful_cls_term_has_zero_gradient():
  s = _setup(6)
  output, target, pred, x0 = _f32(s["output"], s["target"], s["pred"], s["x0"])
  # Through pred_x0 / x0 alone (output, target fixed): nothing at all.
  g_p, g_x = jax.grad(lambda p, x: _loss(s, output, target, p, x, faithful_no_grad_cls=True)[0],
                      argnums=(0, 1))(pred, x0)
  np.testing.assert_array_equal(np.asarray(g_p), 0.0)
  np.testing.assert_array_equal(np.asarray(g_x), 0.0)
  # Seed wiring: the gradient is the 0.8 * MSE gradient exactly, though the logged cls != 0.
  f = lambda p, x: _loss(s, p, x, p, x, faithful_no_grad_cls=True)
  g_p, g_x = jax.grad(lambda p, x: f(p, x)[0], argnums=(0, 1))(pred, x0)
  mse_grad = W_DIFF * 2 * (s["pred"] - s["x0"]) / (B * D)
  np.testing.assert_allclose(np.asarray(g_p), mse_grad, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(np.asarray(g_x), -mse_grad, rtol=1e-4, atol=1e-7)
  assert float(f(pred, x0)[1]["cls"]) > 0.05


# ----------------------------------------------------------------------------- label path
LABELS = np.array([1.0, np.nan, 0.0, 1.0, np.nan, 0.0])


def test_label_target_matches_numpy_over_labelled_rows():
  s = _setup(7)
  total, terms = _loss(s, *_f32(s["output"], s["target"], s["pred"], s["x0"]),
                       cls_target="label", labels=jnp.asarray(LABELS, jnp.float32))
  keep = np.isfinite(LABELS)
  logits = _np_logits(s, _np_unnorm(s, s["pred"] / SCALE))
  ref_cls = _np_bce(logits[keep], LABELS[keep])
  ref_mse = float(np.mean((s["output"] - s["target"]) ** 2))
  assert np.isfinite(float(total))
  np.testing.assert_allclose(float(terms["cls"]), ref_cls, rtol=1e-5)
  np.testing.assert_allclose(float(total), W_DIFF * ref_mse + W_CLS * ref_cls, rtol=1e-5)
  # Not the mean over all B rows with NaN rows counted as 0 targets, nor over B with 0 loss.
  assert abs(ref_cls - _np_bce(logits, np.nan_to_num(LABELS))) > 1e-3


def test_label_target_ignores_unlabelled_rows():
  s = _setup(8)
  labels = jnp.asarray(LABELS, jnp.float32)
  output, target, pred, x0 = _f32(s["output"], s["target"], s["pred"], s["x0"])
  base = float(_loss(s, output, target, pred, x0, cls_target="label", labels=labels)[0])
  # Moving the NaN rows' predictions (hence their logits) far away changes nothing.
  nan_rows = ~np.isfinite(LABELS)
  pred2 = np.array(s["pred"])
  pred2[nan_rows] += 50.0 * np.sign(s["w"])[None, :]
  moved = float(_loss(s, output, target, jnp.asarray(pred2, jnp.float32), x0, cls_target="label",
                      labels=labels)[0])
  assert moved == pytest.approx(base, rel=1e-6)
  # ... whereas moving a labelled row does change it (the probe has teeth).
  pred3 = np.array(s["pred"])
  pred3[0] += 5.0 * np.sign(s["w"])
  assert abs(float(_loss(s, output, target, jnp.asarray(pred3, jnp.float32), x0,
                         cls_target="label", labels=labels)[0]) - base) > 1e-3
  # The gradient is finite everywhere and zero on the unlabelled rows.
  g = np.asarray(jax.grad(lambda p: _loss(s, output, target, p, x0, cls_target="label",
                                          labels=labels)[0])(pred))
  assert np.all(np.isfinite(g))
  np.testing.assert_array_equal(g[nan_rows], 0.0)
  assert np.abs(g[~nan_rows]).max() > 1e-4


def test_label_target_all_nan_batch_is_finite():
  s = _setup(9)
  output, target, pred, x0 = _f32(s["output"], s["target"], s["pred"], s["x0"])
  labels = jnp.full((B,), jnp.nan, jnp.float32)
  total, terms = _loss(s, output, target, pred, x0, cls_target="label", labels=labels)
  ref_mse = float(np.mean((s["output"] - s["target"]) ** 2))
  assert np.isfinite(float(total))
  assert float(terms["cls"]) == 0.0
  np.testing.assert_allclose(float(total), W_DIFF * ref_mse, rtol=1e-5)
  g = jax.grad(lambda p: _loss(s, output, target, p, x0, cls_target="label", labels=labels)[0])(pred)
  assert np.all(np.isfinite(np.asarray(g)))


def test_unknown_cls_target_raises():
  s = _setup(10)
  with pytest.raises(ValueError):
    _loss(s, *_f32(s["output"], s["target"], s["pred"], s["x0"]), cls_target="bogus")
