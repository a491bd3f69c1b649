"""Tests for cxrjax.models.prior (DALLE-2 diffusion-prior network, spec §A.2)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxrjax.models import prior as P

TINY = dict(dim=32, depth=2, heads=2, dim_head=16, ff_mult=2, num_timesteps=16, max_text_len=5)


def _inputs(b=3, dim=32, cond_dim=None, seed=0):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  x_t = jax.random.normal(k1, (b, dim))
  t = jax.random.randint(k2, (b,), 0, 16)
  cond = jax.random.normal(k3, (b, cond_dim or dim))
  return x_t, t, cond


def _init(model, x_t, t, cond):
  return jax.jit(model.init)(jax.random.PRNGKey(1), x_t, t, cond)


def _apply(model):
  """Jitted apply: eager op-by-op dispatch of the transformer is what makes tests slow."""
  return jax.jit(model.apply, static_argnames=("deterministic",))


@pytest.fixture(scope="module")
def tiny():
  """(model, params, jitted apply, inputs) shared by tests: compiles dominate the run time."""
  model = P.DiffusionPriorNetwork(**TINY)
  x_t, t, cond = _inputs()
  return model, _init(model, x_t, t, cond), _apply(model), (x_t, t, cond)


def test_output_shape_and_cond_dim(tiny):
  model, params, apply, (x_t, t, cond) = tiny
  out = apply(params, x_t, t, cond)
  assert out.shape == (3, 32) and out.dtype == jnp.float32
  assert np.all(np.isfinite(out))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))

  model2 = P.DiffusionPriorNetwork(**TINY, cond_dim=20)
  x_t, t, cond = _inputs(cond_dim=20)
  params2 = _init(model2, x_t, t, cond)
  assert params2["params"]["cond_proj"]["kernel"].shape == (20, 32)
  assert _apply(model2)(params2, x_t, t, cond).shape == (3, 32)


def test_bf16_compute_keeps_float32_params(tiny):
  _, params, apply, (x_t, t, cond) = tiny
  model = P.DiffusionPriorNetwork(**TINY, dtype=jnp.bfloat16)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(1), x_t, t, cond)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(shapes))
  out = _apply(model)(params, x_t, t, cond)
  ref = apply(params, x_t, t, cond)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref, atol=0.15, rtol=0.1)


def test_paper_param_count():
  dim, depth, heads, dh, ff, T, L = 512, 12, 12, 64, 4, 1000, 77
  inner_q, inner_ff = heads * dh, ff * dim
  per_layer = {
      "attn_norm": dim, "null_kv": 2 * dh, "W_q": dim * inner_q, "W_kv": dim * 2 * dh,
      "W_o": inner_q * dim, "attn_out_norm": dim,
      "ff_norm": dim, "W_1": dim * 2 * inner_ff, "ff_post_norm": inner_ff, "W_2": inner_ff * dim,
  }
  assert sum(per_layer.values()) == 4_001_408
  top = {
      "learned_query": dim, "null_text_encodings": L * dim, "null_text_embeds": dim,
      "null_image_embed": dim, "time_table": T * dim, "rel_pos": 32 * heads,
      "norm_out": dim, "final_proj": dim * dim,
  }
  assert top["time_table"] == 512_000 and top["null_text_encodings"] == 39_424
  expected = depth * sum(per_layer.values()) + sum(top.values())
  assert expected == 48_832_896  # the spec's "~48.83 M"

  model = P.DiffusionPriorNetwork(dim=dim, depth=depth, heads=heads, dim_head=dh, ff_mult=ff,
                                  num_timesteps=T, max_text_len=L)
  x = jax.ShapeDtypeStruct((2, dim), jnp.float32)
  t = jax.ShapeDtypeStruct((2,), jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t, x)
  assert P.num_params(shapes) == expected
  tr = shapes["params"]["transformer"]
  assert tr["block_0"]["attn"]["to_kv"]["kernel"].shape == (dim, 2 * dh)
  assert tr["block_0"]["ff"]["proj_in"]["kernel"].shape == (dim, 2 * inner_ff)
  assert tr["rel_pos_bias"].shape == (32, heads)


def test_torch_linear_init_bounds():
  w = P.torch_linear_init(jax.random.PRNGKey(0), (256, 64))
  bound = 1 / math.sqrt(256)
  assert float(jnp.max(jnp.abs(w))) <= bound
  assert float(jnp.max(jnp.abs(w))) > 0.95 * bound  # uniform, fills the range
  np.testing.assert_allclose(float(jnp.std(w)), bound / math.sqrt(3), rtol=0.05)


def test_causality():
  tr = P.CausalTransformer(dim=32, depth=2, heads=2, dim_head=16, ff_mult=2)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 32))
  params = jax.jit(tr.init)(jax.random.PRNGKey(1), x)
  apply = _apply(tr)
  y = apply(params, x)
  assert y.shape == x.shape
  for i in [0, 3, 7]:
    noise = jax.random.normal(jax.random.PRNGKey(10 + i), x.shape) * 5.0
    x2 = x.at[:, i + 1:].add(noise[:, i + 1:])
    y2 = apply(params, x2)
    np.testing.assert_allclose(y2[:, : i + 1], y[:, : i + 1], atol=1e-6, rtol=1e-6)
    assert not np.allclose(y2[:, i + 1:], y[:, i + 1:])


def test_relative_position_buckets():
  r = jnp.arange(16)
  np.testing.assert_array_equal(P.relative_position_bucket(r), np.arange(16))
  # by hand: 16 + floor(ln(r/16)/ln 8 * 16)
  known = {16: 16, 20: 17, 32: 21, 45: 23, 46: 24, 64: 26, 80: 28, 127: 31, 128: 31, 1000: 31}
  got = P.relative_position_bucket(jnp.array(list(known)))
  np.testing.assert_array_equal(got, np.array(list(known.values())))
  np.testing.assert_array_equal(P.relative_position_bucket(jnp.array([-1, -50])), [0, 0])

  n = 81
  bk = np.asarray(jax.jit(P.causal_bias_buckets, static_argnums=0)(n))
  assert bk.shape == (n, n + 1)
  i = np.arange(n)
  assert np.all(bk[i, i + 1] == 0)  # key i+1 = the query's own token
  assert np.all(bk[i, i] == 0)      # key i = the previous token (off-by-one kept)
  np.testing.assert_array_equal(bk[:, 0], P.relative_position_bucket(jnp.arange(n)))  # null key
  assert bk[80, 2] == P.relative_position_bucket(78) == 28


def test_rotary():
  dh = 64
  q = jax.random.normal(jax.random.PRNGKey(0), (4, dh))
  k = jax.random.normal(jax.random.PRNGKey(1), (4, dh))
  ang = lambda p: P.rotary_angles(jnp.asarray(p), dh)
  assert ang([0, 1]).shape == (2, 32)
  # interleaved pairs share a frequency; theta_1 = 10000^(-2/32)
  a = ang([1.0])[0]
  np.testing.assert_allclose(a[2:4], [10000 ** (-2 / 32)] * 2, rtol=1e-6)
  # single pair by hand: (a, b) -> (a cos - b sin, b cos + a sin)
  x = jnp.zeros((1, dh)).at[0, 0].set(1.0).at[0, 1].set(2.0)
  y = P.apply_rotary(x, ang([3.0]))
  c, s = math.cos(3.0), math.sin(3.0)
  np.testing.assert_allclose(y[0, :2], [c - 2 * s, 2 * c + s], rtol=1e-5)
  # norm preserved; channels >= 32 pass through
  pos = jnp.array([0, 5, 17, 80])
  qr = P.apply_rotary(q, ang(pos))
  np.testing.assert_allclose(jnp.linalg.norm(qr, axis=-1), jnp.linalg.norm(q, axis=-1), rtol=1e-5)
  np.testing.assert_array_equal(qr[:, 32:], q[:, 32:])
  # relative: <rot(q, p1), rot(k, p2)> depends only on p1 - p2
  def dot(p1, p2):
    return jnp.sum(P.apply_rotary(q, ang([p1] * 4)) * P.apply_rotary(k, ang([p2] * 4)), -1)
  np.testing.assert_allclose(dot(7, 3), dot(20, 16), atol=1e-4)
  np.testing.assert_allclose(dot(0, 5), dot(40, 45), atol=1e-4)
  assert not np.allclose(dot(7, 3), dot(3, 7), atol=1e-3)


def test_stable_layernorm():
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 16)) * 3 + 1
  ln = P.LayerNorm(stable=True)
  params = ln.init(jax.random.PRNGKey(0), x)
  assert params["params"]["g"].shape == (16,)
  y = ln.apply(params, x)
  z = x / jnp.max(x, axis=-1, keepdims=True)  # plain max, not abs-max
  ref = (z - z.mean(-1, keepdims=True)) / jnp.sqrt(z.var(-1, keepdims=True) + 1e-5)
  np.testing.assert_allclose(y, ref, atol=1e-5, rtol=1e-5)
  # plain (non-stable) LN is the same formula on x itself
  y0 = P.LayerNorm().apply(params, x)
  ref0 = (x - x.mean(-1, keepdims=True)) / jnp.sqrt(x.var(-1, keepdims=True) + 1e-5)
  np.testing.assert_allclose(y0, ref0, atol=1e-5, rtol=1e-5)


def test_conditioning_dropout(tiny):
  _, params, apply, (x_t, t, cond) = tiny
  x_t2, _, cond2 = _inputs(seed=5)
  off, on = jnp.zeros((3,), bool), jnp.ones((3,), bool)
  # always pass both masks so that one compiled function serves every case
  f = lambda x, c, tk=on, ik=on: apply(params, x, t, c, text_keep=tk, image_keep=ik)
  np.testing.assert_array_equal(f(x_t, cond, tk=off), f(x_t, cond2, tk=off))
  np.testing.assert_array_equal(f(x_t, cond, ik=off), f(x_t2, cond, ik=off))
  assert not np.allclose(f(x_t, cond), f(x_t, cond2))
  assert not np.allclose(f(x_t, cond), f(x_t2, cond))
  # all-True masks == no masks; a mixed mask only changes the dropped rows
  np.testing.assert_array_equal(f(x_t, cond), apply(params, x_t, t, cond))
  mixed = jnp.array([True, False, True])
  a, b = f(x_t, cond, tk=mixed), f(x_t, cond)
  np.testing.assert_allclose(a[mixed], b[mixed], atol=1e-6)
  assert not np.allclose(a[1], b[1])


def test_dropout_determinism(tiny):
  _, params, apply, (x_t, t, cond) = tiny
  a = apply(params, x_t, t, cond, deterministic=True)
  b = apply(params, x_t, t, cond, deterministic=True)
  np.testing.assert_array_equal(a, b)
  d = lambda s: apply(params, x_t, t, cond, deterministic=False,
                      rngs={"dropout": jax.random.PRNGKey(s)})
  np.testing.assert_array_equal(d(0), d(0))
  assert not np.allclose(d(0), d(1))
  assert not np.allclose(d(0), a)


def test_last_layer_shortcut_and_remat(tiny):
  fast, params, apply, (x_t, t, cond) = tiny
  assert fast.last_layer_shortcut
  full = P.DiffusionPriorNetwork(**TINY, last_layer_shortcut=False)
  rem = P.DiffusionPriorNetwork(**TINY, remat=True)
  shapes = jax.eval_shape(full.init, jax.random.PRNGKey(1), x_t, t, cond)
  assert jax.tree.structure(params) == jax.tree.structure(shapes)
  ref = _apply(full)(params, x_t, t, cond)
  np.testing.assert_allclose(apply(params, x_t, t, cond), ref, atol=1e-5, rtol=1e-5)

  def loss(p, m):
    return jnp.sum(m.apply(p, x_t, t, cond) ** 2)
  g_fast = jax.jit(jax.grad(loss), static_argnums=1)(params, fast)
  g_rem = jax.jit(jax.grad(loss), static_argnums=1)(params, rem)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4),
               g_fast, g_rem)


def test_token_dense_scale_and_split():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 8))
  s = 1.0 + jax.random.normal(jax.random.PRNGKey(1), (8,))
  dense = P.torch_dense(6, jnp.float32, "d")
  params = dense.init(jax.random.PRNGKey(2), x)
  kernel = params["params"]["kernel"]
  np.testing.assert_allclose(dense.apply(params, x), x @ kernel, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(dense.apply(params, x, s), dense.apply(params, x * s),
                             atol=1e-5, rtol=1e-5)
  halves = P.torch_dense(6, jnp.float32, "d", split=2).apply(params, x, s)
  whole = (x * s) @ kernel
  np.testing.assert_allclose(halves[0], whole[..., :3], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(halves[1], whole[..., 3:], atol=1e-5, rtol=1e-5)


class _GainAppliedLayerNorm(P.LayerNorm):
  """LayerNorm that applies its gain itself even when asked to fold it (the unfolded reference)."""

  def __call__(self, x):
    if not self.fold_gain:
      return super().__call__(x)
    x_hat, g = super().__call__(x)
    return (x_hat.astype(jnp.float32) * g).astype(self.dtype), None


def test_layernorm_gain_folding_matches_applied_gain(tiny, monkeypatch):
  """Folding each LayerNorm gain into the next linear layer's kernel changes nothing but
  rounding: outputs and every parameter gradient match the network with gains applied,
  on gains far from their initial ones."""
  model, params, _, (x_t, t, cond) = tiny
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(jax.random.PRNGKey(7), len(leaves))
  leaves = [v * (1.0 + 0.5 * jax.random.normal(k, v.shape)) if path[-1].key == "g" else v
            for (path, v), k in zip(leaves, keys)]
  params = jax.tree_util.tree_unflatten(treedef, leaves)

  def loss(p):
    return jnp.sum(jnp.tanh(model.apply(p, x_t, t, cond)))
  folded = jax.jit(jax.value_and_grad(loss))(params)
  monkeypatch.setattr(P, "LayerNorm", _GainAppliedLayerNorm)
  applied = jax.jit(jax.value_and_grad(loss))(params)
  np.testing.assert_allclose(folded[0], applied[0], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(  # float32 rounding of O(1) sums
      a, b, atol=1e-5 * (1.0 + np.abs(b).max()), rtol=1e-4), folded[1], applied[1])
  g_post = folded[1]["params"]["transformer"]["block_0"]["ff"]["post_norm"]["g"]
  assert float(jnp.abs(g_post).max()) > 1e-3  # the folded gains still learn


def test_flops_per_example():
  dim, depth, heads, dh, ff, n = 512, 12, 12, 64, 4, 81
  # independent count: 2 FLOPs per weight per token that uses it, plus QK^T and AV
  w_kv = dim * 2 * dh
  w_other = dim * heads * dh * 2 + dim * 2 * ff * dim + ff * dim * dim
  attn = 2 * 2 * heads * n * (n + 1) * dh
  full = depth * (2 * n * (w_kv + w_other) + attn) + 2 * n * dim * dim
  assert P.flops_per_example(dim, depth, heads, dh, ff, n, last_layer_shortcut=False) == full
  short = (depth * 2 * n * w_kv + (depth - 1) * (2 * n * w_other + attn)
           + 2 * w_other + attn // n + 2 * dim * dim)
  assert P.flops_per_example(dim, depth, heads, dh, ff, n) == short
  assert short < full


def test_hashed_dropout_statistics():
  """The hashed keep decisions behave like i.i.d. Bernoulli(1 - rate) draws."""
  from scipy import stats

  from cxrjax.models.prior_layers import _keep_threshold, dropout, keep_mask

  rate, shape = 0.05, (64, 4, 81, 81)
  n = math.prod(shape)
  masks = [np.asarray(keep_mask(jax.random.PRNGKey(s), shape, _keep_threshold(rate))).ravel()
           for s in range(3)]
  for m in masks:
    # keep rate within 4 binomial standard deviations
    assert abs(m.mean() - (1 - rate)) < 4 * math.sqrt(rate * (1 - rate) / n)
    # neighbours (flat index i, i+1 and i, i+81) are independent: 2x2 chi-square test
    for lag in (1, 81):
      a, b = m[:-lag], m[lag:]
      table = [[np.sum(a & b), np.sum(a & ~b)], [np.sum(~a & b), np.sum(~a & ~b)]]
      assert stats.chi2_contingency(table)[1] > 1e-4, lag
# masks under different keys are independent of each other
  a, b = masks[0], masks[1]
  table = [[np.sum(a & b), np.sum(a & ~b)], [np.sum(~a & b), np.sum(~a & ~b)]]
  assert stats.chi2_contingency(table)[1] > 1e-4
  # runs of drops have the geometric length distribution of i.i.d. draws: mean 1 / (1 - rate)
  drops = np.flatnonzero(~masks[2])
  runs = np.diff(np.flatnonzero(np.diff(drops) != 1))
  assert abs(runs.mean() - 1 / (1 - rate)) < 0.01
  # inverted dropout is unbiased
  x = jnp.ones(shape)
  assert abs(float(dropout(x, rate, jax.random.PRNGKey(7)).mean()) - 1.0) < 1e-3
  np.testing.assert_array_equal(dropout(x, 0.0, jax.random.PRNGKey(0)), x)
  assert not np.any(dropout(x, 1.0, jax.random.PRNGKey(0)))
