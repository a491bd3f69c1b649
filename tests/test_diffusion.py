"""Tests for cxrjax.core.diffusion: schedule reference values, closed forms, samplers, jit."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxrjax.core import diffusion as D


def _np(schedule):
  return jax.tree.map(lambda a: np.asarray(a, dtype=np.float64), schedule)


def _betas(kind, T):
  return D.cosine_beta_schedule(T) if kind == "cosine" else D.linear_beta_schedule(T)


# ----------------------------------------------------------------------------- schedule


def test_cosine_schedule_reference_values_T64():
  s = _np(D.make_schedule("cosine", 64))
  assert s.betas.shape == (64,) and D.make_schedule("cosine", 64).betas.dtype == jnp.float32
  assert D.make_schedule("cosine", 64).num_timesteps == 64
  rel = lambda got, want: np.testing.assert_allclose(got, want, rtol=2e-5)  # noqa: E731
  rel(s.betas[[0, 1, 63]], [1.19955e-3, 2.38489e-3, 0.999])
  rel(s.alphas_cumprod[[0, 31]], [0.998800, 0.493844])
  np.testing.assert_allclose(s.alphas_cumprod[63], 5.928e-7, rtol=1e-3)  # spec gives 4 digits
  rel(s.sqrt_alphas_cumprod[[16, 32, 48]], [0.91053, 0.68521, 0.35720])
  assert s.posterior_variance[0] == 0.0
  rel(s.posterior_variance[1], 7.9875e-4)
  assert s.posterior_mean_coef1[0] == 1.0 and s.posterior_mean_coef2[0] == 0.0
  rel([s.posterior_mean_coef1[63], s.posterior_mean_coef2[63]], [0.024324, 0.031604])
  np.testing.assert_allclose(s.posterior_log_variance_clipped[0], np.log(1e-20), rtol=1e-6)
  assert s.alphas_cumprod_prev[0] == 1.0
  np.testing.assert_allclose(s.alphas_cumprod_prev[1:], s.alphas_cumprod[:-1])


def test_linear_schedule_and_unknown_kind():
  b = D.linear_beta_schedule(64)
  assert b.dtype == np.float64
  np.testing.assert_allclose([b[0], b[-1]], [1000 / 64 * 1e-4, 1000 / 64 * 0.02])
  np.testing.assert_allclose(D.linear_beta_schedule(1000)[[0, -1]], [1e-4, 0.02])
  s = _np(D.make_schedule("linear", 64))
  np.testing.assert_allclose(s.alphas_cumprod, np.cumprod(1 - b), rtol=1e-6)
  with pytest.raises(ValueError, match="cosine"):
    D.make_schedule("quadratic", 64)


# ----------------------------------------------------------------------------- closed forms


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_posterior_matches_gaussian_product(kind):
  T = 64
  b = _betas(kind, T)
  a, ab = 1 - b, np.cumprod(1 - b)
  abp = np.r_[1.0, ab[:-1]]
  sched = D.make_schedule(kind, T)
  rng = np.random.default_rng(0)
  t = np.arange(T, dtype=np.int32)
  x0, xt = rng.normal(size=(T, 3)), rng.normal(size=(T, 3))
  mean, var, logvar = D.q_posterior(sched, jnp.asarray(x0, jnp.float32),
                                    jnp.asarray(xt, jnp.float32), jnp.asarray(t))
  assert mean.shape == (T, 3) and var.shape == (T, 1) and logvar.shape == (T, 1)
  # N(x_{t-1}; sqrt(abar_{t-1}) x0, 1 - abar_{t-1}) * N(x_t; sqrt(a_t) x_{t-1}, b_t), for t >= 1.
  prec = 1 / (1 - abp[1:]) + a[1:] / b[1:]
  want_var = 1 / prec
  want_mean = want_var[:, None] * (np.sqrt(abp[1:])[:, None] * x0[1:] / (1 - abp[1:])[:, None]
                                   + np.sqrt(a[1:])[:, None] * xt[1:] / b[1:, None])
  np.testing.assert_allclose(np.asarray(var)[1:, 0], want_var, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(logvar)[1:, 0], np.log(want_var), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(mean)[1:], want_mean, rtol=1e-4, atol=1e-5)
  # t = 0: abar_{-1} = 1, the posterior collapses onto x0.
  np.testing.assert_allclose(np.asarray(mean)[0], x0[0], atol=1e-6)
  assert float(var[0, 0]) == 0.0


def test_q_sample_moments_monte_carlo():
  sched = D.make_schedule("cosine", 64)
  n = 200_000
  x0 = jnp.full((n, 2), jnp.array([1.5, -0.5]))
  for ti in (0, 20, 40, 63):
    t = jnp.full((n,), ti, jnp.int32)
    x = D.q_sample(sched, x0, t, jax.random.normal(jax.random.key(ti), x0.shape))
    ab = float(sched.alphas_cumprod[ti])
    np.testing.assert_allclose(np.mean(x, 0), np.sqrt(ab) * np.array([1.5, -0.5]), atol=0.01)
    np.testing.assert_allclose(np.var(x, 0), [1 - ab] * 2, rtol=0.02, atol=1e-5)


def test_parametrisation_round_trips():
  sched = D.make_schedule("cosine", 64)
  k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
  x0 = jax.random.normal(k1, (64, 4, 3))  # any (B, ...)
  eps = jax.random.normal(k2, x0.shape)
  t = jnp.arange(64, dtype=jnp.int32)
  xt = D.q_sample(sched, x0, t, eps)
  v = D.v_target(sched, x0, t, eps)
  tol = dict(rtol=1e-4, atol=2e-4)
  np.testing.assert_allclose(D.predict_x0_from_eps(sched, xt, t, eps), x0, **tol)
  np.testing.assert_allclose(D.predict_x0_from_v(sched, xt, t, v), x0, **tol)
  # eps from x0 is ill-conditioned at t = 0 (sqrt(1/abar - 1) ~ 0.035): relative tolerance there.
  np.testing.assert_allclose(D.predict_eps_from_x0(sched, xt, t, x0)[1:], eps[1:], **tol)
  np.testing.assert_allclose(D.predict_eps_from_x0(sched, xt, t, x0)[0], eps[0], atol=5e-3)
  x0_hat = D.predict_x0_from_eps(sched, xt, t, D.predict_eps_from_x0(sched, xt, t, x0))
  np.testing.assert_allclose(x0_hat, x0, **tol)
  for p in D.PARAMETRISATIONS:
    target = D.training_target(sched, x0, eps, t, p)
    np.testing.assert_allclose(D.model_output_to_x0(sched, target, xt, t, p), x0, **tol)
  with pytest.raises(ValueError):
    D.model_output_to_x0(sched, x0, xt, t, "score")


def test_cfg_extract_and_timestep_sampling():
  out = D.classifier_free_guidance(jnp.array([3.0, 1.0]), jnp.array([1.0, 1.0]), 2.5)
  np.testing.assert_allclose(out, [6.0, 1.0])
  np.testing.assert_allclose(D.classifier_free_guidance(jnp.array([3.0]), jnp.array([1.0]), 1.0), [3.0])
  e = D.extract(jnp.arange(10.0), jnp.array([2, 7]), (2, 5, 4))
  assert e.shape == (2, 1, 1)
  np.testing.assert_allclose(e.ravel(), [2.0, 7.0])
  t = D.diffusion_timestep_sample(jax.random.key(0), 10_000, 64)
  assert t.dtype == jnp.int32 and int(t.min()) == 0 and int(t.max()) == 63


# ----------------------------------------------------------------------------- DDIM timesteps


@pytest.mark.parametrize("T,S", [(64, 16), (1000, 50), (64, 64), (64, 2)])
def test_ddim_timesteps_match_upstream_formula(T, S):
  times = np.linspace(-1.0, T, S + 1)[:-1].astype(np.int64)[::-1]  # astype truncates toward 0
  want = list(zip(times[:-1].tolist(), times[1:].tolist()))
  got = D.ddim_timesteps(T, S)
  assert got == want and len(got) == S - 1 and got[-1][1] == -1
  if (T, S) == (64, 16):
    assert [p[0] for p in got] == [59, 55, 51, 47, 43, 39, 35, 31, 27, 23, 19, 15, 11, 7, 3]


# ----------------------------------------------------------------------------- samplers


def test_samplers_recover_single_point():
  sched = D.make_schedule("cosine", 64)
  x_star = jnp.array([0.3, -1.2, 2.0, 0.0, 5.0])
  fn = lambda x, t: jnp.broadcast_to(x_star, x.shape)  # noqa: E731  optimal x0 for a point mass
  shape = (8, 5)
  x = D.ddpm_sample(fn, sched, shape, jax.random.key(0))
  np.testing.assert_array_equal(x, jnp.broadcast_to(x_star, shape))  # c1_0 = 1, c2_0 = 0
  for quirk in (True, False):
    # eta is traced, so each quirk setting compiles once for both eta values.
    ddim = jax.jit(lambda r, eta: D.ddim_sample(fn, sched, shape, r, num_steps=16, eta=eta,
                                                use_upstream_alpha_quirk=quirk))
    for eta in (0.0, 1.0):
      x = ddim(jax.random.key(1), eta)
      np.testing.assert_allclose(x, jnp.broadcast_to(x_star, shape), atol=1e-6)
# eps-parametrised oracle: eps = predict_eps_from_x0(x_t, x*); DDPM still lands on x*.
  fn_eps = lambda x, t: D.predict_eps_from_x0(sched, x, t, jnp.broadcast_to(x_star, x.shape))  # noqa: E731
  x = D.sample(fn_eps, sched, shape, jax.random.key(2), parametrisation="eps")
  np.testing.assert_allclose(x, jnp.broadcast_to(x_star, shape), atol=1e-4)


def _gauss_oracle(sched, m, s):
  def fn(x, t):  # E[x0 | x_t] for x0 ~ N(m, s^2)
    ab = D.extract(sched.alphas_cumprod, t, x.shape)
    return (jnp.sqrt(ab) * s ** 2 * x + (1 - ab) * m) / (ab * s ** 2 + 1 - ab)
  return fn


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_ddpm_gaussian_data_recovered(kind):
  # T = 256 keeps DDPM's discretisation bias (posterior variance ignores Var[x0|x_t]) under ~2%.
  sched = D.make_schedule(kind, 256)
  m, s = jnp.array([0.5, -1.0, 2.0, 0.0]), jnp.array([0.7, 1.5, 2.0, 1.0])
  x = jax.jit(lambda r: D.ddpm_sample(_gauss_oracle(sched, m, s), sched, (20_000, 4), r))(
      jax.random.key(3))
  np.testing.assert_allclose(x.mean(0), m, atol=0.05 * 2)
  np.testing.assert_allclose(x.std(0), s, rtol=0.05)


def _analytic_chain(kind, T, m, s, pairs=None, eta=1.0, quirk=True):
  """Exact mean/std of the sampler output for Gaussian data (every step is affine + noise)."""
  b = _betas(kind, T)
  a, ab = 1 - b, np.cumprod(1 - b)
  abp = np.r_[1.0, ab[:-1]]
  mu, var = 0.0, 1.0

  def x0_coeffs(i):  # E[x0|x_t] = A x_t + B
    den = ab[i] * s * s + 1 - ab[i]
    return np.sqrt(ab[i]) * s * s / den, (1 - ab[i]) * m / den

  if pairs is None:  # DDPM
    for i in range(T - 1, -1, -1):
      A, B = x0_coeffs(i)
      c1 = b[i] * np.sqrt(abp[i]) / (1 - ab[i])
      c2 = (1 - abp[i]) * np.sqrt(a[i]) / (1 - ab[i])
      pv = b[i] * (1 - abp[i]) / (1 - ab[i]) if i > 0 else 0.0
      mu, var = c1 * (A * mu + B) + c2 * mu, (c1 * A + c2) ** 2 * var + pv
    return mu, np.sqrt(var)
  al = abp if quirk else ab
  for t, tn in pairs:
    A, B = x0_coeffs(t)
    if tn < 0:
      return A * mu + B, abs(A) * np.sqrt(var)
    # eps = (x/sqrt(ab) - x0) / sqrt(1/ab - 1), x0 = A x + B
    ka, kb = (1 / np.sqrt(ab[t]) - A) / np.sqrt(1 / ab[t] - 1), -B / np.sqrt(1 / ab[t] - 1)
    c1 = eta * np.sqrt((1 - al[t] / al[tn]) * (1 - al[tn]) / (1 - al[t]))
    c2 = np.sqrt(1 - al[tn] - c1 ** 2)
    g, h = np.sqrt(al[tn]) * A + c2 * ka, np.sqrt(al[tn]) * B + c2 * kb
    mu, var = g * mu + h, g * g * var + c1 * c1


def test_samplers_match_analytic_chain_T64():
  # Checks the exact update rules (incl. the upstream alpha quirk) against a float64 recursion.
  sched, m, s, shape = D.make_schedule("cosine", 64), 0.5, 0.7, (40_000, 2)
  fn = _gauss_oracle(sched, m, s)
  check = lambda x, want: np.testing.assert_allclose(  # noqa: E731
      [float(x.mean()), float(x.std())], want, rtol=0.01, atol=0.005)
  check(D.sample(fn, sched, shape, jax.random.key(4)), _analytic_chain("cosine", 64, m, s))
  pairs = D.ddim_timesteps(64, 16)
  for quirk in (True, False):
    ddim = jax.jit(lambda r, eta: D.ddim_sample(fn, sched, shape, r, num_steps=16, eta=eta,
                                                use_upstream_alpha_quirk=quirk))
    for eta in (0.0, 1.0):
      want = _analytic_chain("cosine", 64, m, s, pairs, eta=eta, quirk=quirk)
      check(ddim(jax.random.key(5), eta), want)


def test_sample_dispatch_jit_and_determinism():
  sched = D.make_schedule("cosine", 64)
  w = jnp.array([0.9, 1.1, 1.0])  # closed-over "params"

  @jax.jit
  def run(rng):
    fn = lambda x, t: w * x * 0.5 + 0.01 * t[:, None]  # noqa: E731
    return (D.sample(fn, sched, (4, 3), rng), D.sample(fn, sched, (4, 3), rng, num_steps=8),
            D.ddim_sample(fn, sched, (4, 3), rng, num_steps=8, eta=0.0, parametrisation="v",
                          use_upstream_alpha_quirk=False),
            D.ddpm_sample(fn, sched, (4, 3), rng, parametrisation="eps", clip_denoised=1.0))

  outs = run(jax.random.key(0))
  for o in outs:
    assert o.shape == (4, 3) and o.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(o)))
  again = run(jax.random.key(0))
  for a, b in zip(outs, again):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError):
    D.sample(lambda x, t: x, sched, (2, 3), jax.random.key(0), num_steps=65)
  with pytest.raises(ValueError):
    D.ddim_sample(lambda x, t: x, sched, (2, 3), jax.random.key(0), num_steps=1)
