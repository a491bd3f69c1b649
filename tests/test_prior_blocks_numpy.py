"""Float64 numpy references of the prior network's blocks (spec prior_and_fmkd.md §A.2).

An independent re-derivation of DALLE-2's DiffusionPriorNetwork pieces, written from the spec's
maths rather than from cxrjax.models.prior: the attention block (pre-LN, multi-query cosine-sim
attention with scale 16, learned null key/value, interleaved partial rotary on q and k, rel-pos
bias + causal mask, output projection + LayerNorm), the SwiGLU feed-forward with its normformer
LayerNorm, the residual block and a whole CausalTransformer (shared T5 buckets with the upstream
off-by-one, stable final LayerNorm, projection). Parameters are read out of the Flax tree after
``init`` and perturbed to random non-default values. The reference applies every LayerNorm gain
in the LayerNorm and then the plain kernel, so the code's gain folding
(``LayerNorm(fold_gain=True)`` + ``TokenDense(in_scale=g)``) is checked to be exact.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxrjax.models import prior as P

TOL = 1e-4  # max abs difference, float32 Flax vs float64 numpy
EPS = 1e-5  # LayerNorm eps (fp32)
SIM_SCALE = 16.0


# ----------------------------------------------------------------------------- numpy reference
def ln(x, g, stable=False):
  """Bias-free LayerNorm with biased variance; `stable` first divides by the plain max."""
  if stable:
    x = x / np.max(x, axis=-1, keepdims=True)
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + EPS) * g


def l2n(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def rotate(x, positions):
  """Interleaved rotary on the first min(32, d) channels: pair (2i, 2i+1) turns by p * theta_i.

  x: (..., n, d) with the token axis second to last; positions: (n,).
  """
  d = x.shape[-1]
  rot = min(32, d)
  out = x.copy()
  for i in range(rot // 2):
    theta = 10000.0 ** (-2.0 * i / rot)
    phi = positions.astype(np.float64) * theta  # (n,)
    c, s = np.cos(phi)[:, None], np.sin(phi)[:, None]
    a, b = x[..., 2 * i:2 * i + 1], x[..., 2 * i + 1:2 * i + 2]
    out[..., 2 * i:2 * i + 1] = a * c - b * s
    out[..., 2 * i + 1:2 * i + 2] = b * c + a * s
  return out


def t5_bucket(r, num_buckets=32, max_distance=128):
  """Causal T5 bucket of r = max(i - j, 0), straight from the spec's formula, in float64."""
  r = max(r, 0)
  exact = num_buckets // 2
  if r < exact:
    return r
  return min(num_buckets - 1,
             exact + int(math.floor(math.log(r / exact) / math.log(max_distance / exact) * exact)))


def ref_bias(table, n):
  """(n, H, n+1) bias as the transformer builds it: raw key index j (upstream off-by-one)."""
  buckets = np.array([[t5_bucket(i - j) for j in range(n + 1)] for i in range(n)])
  return np.transpose(table[buckets], (0, 2, 1))


def causal_mask(n):
  """(n, n+1) True where key j is hidden from query i: key j holds token j-1, so j > i + 1."""
  return np.arange(n + 1)[None, :] > np.arange(n)[:, None] + 1


def ref_attention(p, x, bias, mask, heads, positions=None):
  """x: (B, n, D); bias: (n, H, n+1) finite; mask: (n, n+1) bool; positions: (n,) or None."""
  b, n, _ = x.shape
  h = ln(x, p["norm"]["g"])
  q = h @ p["to_q"]["kernel"]  # (B, n, H*d)
  kv = h @ p["to_kv"]["kernel"]  # (B, n, 2d): one shared K/V head
  d = kv.shape[-1] // 2
  k, v = kv[..., :d], kv[..., d:]
  q = q.reshape(b, n, heads, d).transpose(0, 2, 1, 3)  # (B, H, n, d)
  if positions is not None:
    q = rotate(q, positions)
    k = rotate(k, positions)
  null_k = np.broadcast_to(p["null_kv"][0], (b, 1, d))
  null_v = np.broadcast_to(p["null_kv"][1], (b, 1, d))
  k = np.concatenate([null_k, k], axis=1)  # (B, n+1, d); the null key is not rotated
  v = np.concatenate([null_v, v], axis=1)
  sim = SIM_SCALE * np.einsum("bhid,bjd->bhij", l2n(q), l2n(k))
  sim = sim + np.transpose(bias, (1, 0, 2))[None]  # bias[i, h, j] -> [h, i, j]
  sim = np.where(mask[None, None], -np.inf, sim)
  sim = sim - sim.max(-1, keepdims=True)
  attn = np.exp(sim)
  attn = attn / attn.sum(-1, keepdims=True)
  out = np.einsum("bhij,bjd->bhid", attn, v)
  out = out.transpose(0, 2, 1, 3).reshape(b, n, heads * d)  # 'b h n d -> b n (h d)'
  return ln(out @ p["to_out"]["kernel"], p["out_norm"]["g"])


def ref_ff(p, x, normformer=True):
  h = ln(x, p["norm"]["g"])
  u = h @ p["proj_in"]["kernel"]
  inner = u.shape[-1] // 2
  val, gate = u[..., :inner], u[..., inner:]
  h = val * (gate / (1.0 + np.exp(-gate)))  # SwiGLU: first half * SiLU(second half)
  if normformer:
    h = ln(h, p["post_norm"]["g"])
  return h @ p["proj_out"]["kernel"]


def ref_block(p, x, bias, mask, heads, positions, normformer=True):
  x = x + ref_attention(p["attn"], x, bias, mask, heads, positions)
  return x + ref_ff(p["ff"], x, normformer)


def ref_transformer(p, x, heads, depth, rotary, normformer=True):
  n = x.shape[1]
  bias = ref_bias(p["rel_pos_bias"], n)
  mask = causal_mask(n)
  positions = np.arange(n) if rotary else None
  for layer in range(depth):
    x = ref_block(p[f"block_{layer}"], x, bias, mask, heads, positions, normformer)
  return ln(x, p["norm_out"]["g"], stable=True) @ p["final_proj"]["kernel"]


def _final_stream_max(p, x, heads, depth, rotary):
  """Per-token max of the residual stream entering the stable LN (checks the test's premise)."""
  n = x.shape[1]
  bias, mask = ref_bias(p["rel_pos_bias"], n), causal_mask(n)
  for layer in range(depth):
    x = ref_block(p[f"block_{layer}"], x, bias, mask, heads, np.arange(n) if rotary else None)
  return x.max(-1)


# ----------------------------------------------------------------------------- helpers
def param_shapes(mod, *args):
  """The module's params tree as shapes only: eval_shape runs no init (eager init is slow)."""
  return jax.eval_shape(lambda *a: mod.init(jax.random.PRNGKey(0), *a), *args)["params"]


def apply_fn(mod, **kw):
  """Jitted deterministic apply (None angles is an empty pytree, so rotary-off traces too)."""
  return jax.jit(lambda p, *a: mod.apply({"params": p}, *a, deterministic=True, **kw))


def perturb(params, seed):
  """Every leaf of a params (shape) tree replaced by random non-default values.

  Gains 1 + N(0, 0.5) (some negative), kernels N(0, 1.5^2 / fan_in), null_kv and tables
  N(0, 1). Returns the same values as a float32 jnp tree and a float64 numpy tree.
  """
  leaves, tree = jax.tree_util.tree_flatten_with_path(params)
  rng = np.random.default_rng(seed)
  new = []
  for path, leaf in leaves:
    name = str(path[-1].key)
    shape = leaf.shape
    if name == "g":
      val = 1.0 + 0.5 * rng.normal(size=shape)
    elif name == "kernel":
      val = rng.normal(size=shape) * 1.5 / math.sqrt(shape[0])
    else:
      val = rng.normal(size=shape)
    new.append(val.astype(np.float32))
  p32 = jax.tree_util.tree_unflatten(tree, [jnp.asarray(v) for v in new])
  p64 = jax.tree_util.tree_unflatten(tree, [v.astype(np.float64) for v in new])
  return p32, p64


def rand_x(b, n, dim, seed):
  """(b, n, dim) float32 tokens."""
  rng = np.random.default_rng(seed)
  # Per-token offsets and scales make the LayerNorm's mean subtraction and rescaling matter.
  x = rng.normal(size=(b, n, dim)) * rng.uniform(0.5, 3.0, size=(b, n, 1))
  return (x + rng.normal(size=(b, n, 1))).astype(np.float32)


def rand_bias(n, heads, seed):
  """A random finite (n, H, n+1) bias and the Flax-side bias with the causal mask folded in
  (-float32 max where masked), exactly as CausalTransformer passes it to the attention."""
  rng = np.random.default_rng(seed)
  bias = rng.normal(size=(n, heads, n + 1)).astype(np.float32)
  mask = causal_mask(n)
  folded = np.where(mask[:, None, :], -np.finfo(np.float32).max, bias).astype(np.float32)
  return bias.astype(np.float64), mask, jnp.asarray(folded)


def angles_for(n, dim_head):
  """Rotary angles input (n, rot_dim) computed here, independent of prior_layers.rotary_angles."""
  rot = min(32, dim_head)
  theta = 10000.0 ** (-2.0 * np.arange(rot // 2) / rot)
  return jnp.asarray(np.repeat(np.arange(n)[:, None] * theta[None, :], 2, axis=-1), jnp.float32)


def max_diff(a, b):
  """Max abs difference between a Flax output and a float64 reference."""
  return float(np.max(np.abs(np.asarray(a, np.float64) - b)))


# ----------------------------------------------------------------------------- tests
# dim_head 40 > 32: the first 32 channels rotate, the last 8 pass through.
DIM, HEADS, DIM_HEAD, B, N = 24, 3, 40, 3, 9


@pytest.mark.parametrize("rotary", [True, False])
def test_attention_block_matches_numpy(rotary):
  mod = P.Attention(DIM, HEADS, DIM_HEAD)
  x = rand_x(B, N, DIM, seed=1)
  bias64, mask, bias32 = rand_bias(N, HEADS, seed=2)
  angles = angles_for(N, DIM_HEAD) if rotary else None
  params = param_shapes(mod, jnp.asarray(x), bias32, angles)
  assert set(params) == {"norm", "to_q", "to_kv", "null_kv", "to_out", "out_norm"}
  p32, p64 = perturb(params, seed=3)
  out = apply_fn(mod)(p32, jnp.asarray(x), bias32, angles)
  ref = ref_attention(p64, x.astype(np.float64), bias64, mask, HEADS,
                      np.arange(N) if rotary else None)
  assert out.shape == (B, N, DIM) and out.dtype == jnp.float32
  assert max_diff(out, ref) <= TOL
  # last_only computes exactly the last query's row.
  last = apply_fn(mod, last_only=True)(p32, jnp.asarray(x), bias32, angles)
  assert last.shape == (B, 1, DIM)
  assert max_diff(last, ref[:, -1:]) <= TOL


def test_attention_reference_is_sensitive():
  """The reference tells apart the features it models (rotary, null kv, bias): sanity of the probe."""
  x = rand_x(B, N, DIM, seed=4).astype(np.float64)
  mod = P.Attention(DIM, HEADS, DIM_HEAD)
  bias64, mask, bias32 = rand_bias(N, HEADS, seed=5)
  params = param_shapes(mod, jnp.asarray(x, jnp.float32), bias32, None)
  _, p64 = perturb(params, seed=6)
  base = ref_attention(p64, x, bias64, mask, HEADS, np.arange(N))
  assert np.abs(base - ref_attention(p64, x, bias64, mask, HEADS, None)).max() > 1e-2
  assert np.abs(base - ref_attention(p64, x, 0 * bias64, mask, HEADS, np.arange(N))).max() > 1e-2
  p_alt = jax.tree.map(lambda a: a, p64)
  p_alt["null_kv"] = p64["null_kv"][::-1]
  assert np.abs(base - ref_attention(p_alt, x, bias64, mask, HEADS, np.arange(N))).max() > 1e-2


@pytest.mark.parametrize("normformer", [True, False])
def test_feedforward_block_matches_numpy(normformer):
  mod = P.FeedForward(DIM, mult=3, normformer=normformer)
  x = rand_x(B, N, DIM, seed=7)
  params = param_shapes(mod, jnp.asarray(x))
  expected = {"norm", "proj_in", "proj_out"} | ({"post_norm"} if normformer else set())
  assert set(params) == expected
  assert params["proj_in"]["kernel"].shape == (DIM, 2 * 3 * DIM)
  p32, p64 = perturb(params, seed=8)
  out = apply_fn(mod)(p32, jnp.asarray(x))
  ref = ref_ff(p64, x.astype(np.float64), normformer)
  assert out.shape == (B, N, DIM) and out.dtype == jnp.float32
  assert max_diff(out, ref) <= TOL


@pytest.mark.parametrize("rotary", [True, False])
def test_residual_block_matches_numpy(rotary):
  mod = P.Block(DIM, HEADS, DIM_HEAD, ff_mult=2)
  x = rand_x(B, N, DIM, seed=9)
  bias64, mask, bias32 = rand_bias(N, HEADS, seed=10)
  angles = angles_for(N, DIM_HEAD) if rotary else None
  params = param_shapes(mod, jnp.asarray(x), bias32, angles)
  p32, p64 = perturb(params, seed=11)
  positions = np.arange(N) if rotary else None
  ref = ref_block(p64, x.astype(np.float64), bias64, mask, HEADS, positions)
  out = apply_fn(mod)(p32, jnp.asarray(x), bias32, angles)
  assert max_diff(out, ref) <= TOL
  last = apply_fn(mod, last_only=True)(p32, jnp.asarray(x), bias32, angles)
  assert max_diff(last, ref[:, -1:]) <= TOL


# n = 150 > 128 reaches every bucket regime: exact (< 16), logarithmic and the clip at 31.
@pytest.mark.parametrize("rotary,n,last_only", [(True, 150, False), (False, 21, False),
                                                (True, 21, True)])
def test_causal_transformer_matches_numpy(rotary, n, last_only):
  dim, heads, dim_head, depth, b = 16, 2, 40, 2, 2
  mod = P.CausalTransformer(dim, depth, heads, dim_head, ff_mult=2, rotary=rotary)
  x = rand_x(b, n, dim, seed=12)
  # The stable final LN divides by the plain max (not abs-max): a few tokens, the last (read by
  # last_only) among them, are pushed far negative so their max stays < 0 through the residual
  # stream and the division flips their sign; the others get a clearly positive max.
  x[..., 0] = np.abs(x[..., 0]) + 4.0
  neg = [1, n // 2, n - 1]
  x[:, neg] = -25.0 - np.abs(x[:, neg])
  params = param_shapes(mod, jnp.asarray(x))
  p32, p64 = perturb(params, seed=13)
  out = apply_fn(mod, last_only=last_only)(p32, jnp.asarray(x))
  ref = ref_transformer(p64, x.astype(np.float64), heads, depth, rotary)
  final_max = _final_stream_max(p64, x.astype(np.float64), heads, depth, rotary)
  assert (final_max[:, neg] < -1.0).all() and (np.delete(final_max, neg, axis=1) != 0).all()
  if last_only:
    ref = ref[:, -1:]
  assert out.shape == ref.shape
  assert max_diff(out, ref) <= TOL


def test_stable_layernorm_plain_max_and_eps():
  """LayerNorm(stable=True): divide by the plain max (an all-negative row flips sign, unlike with
  abs-max), biased variance, eps 1e-5 (a row of spread ~1e-2 / max makes eps visible)."""
  from cxrjax.models.prior_layers import LayerNorm
  rng = np.random.default_rng(14)
  d = 12
  rows = [rng.normal(size=d) * 2 + 1,             # mixed signs, positive max
          -5.0 - np.abs(rng.normal(size=d)),      # all negative: max < 0
          rng.normal(size=d) - 6.0 + np.eye(d)[3] * 7.5,  # |min| > max > 0
          1.0 + 1e-2 * rng.normal(size=d)]        # var(x / max) ~ 1e-4: eps matters
  x = np.stack(rows)
  g = (1.0 + 0.5 * rng.normal(size=d))
  for stable in (True, False):
    mod = LayerNorm(stable=stable)
    out = jax.jit(mod.apply)({"params": {"g": jnp.asarray(g, jnp.float32)}},
                             jnp.asarray(x, jnp.float32))
    assert max_diff(out, ln(x, g, stable=stable)) <= TOL
    h, g_out = jax.jit(LayerNorm(stable=stable, fold_gain=True).apply)(
        {"params": {"g": jnp.asarray(g, jnp.float32)}}, jnp.asarray(x, jnp.float32))
    assert max_diff(h, ln(x, 1.0, stable=stable)) <= TOL
    np.testing.assert_array_equal(np.asarray(g_out), g.astype(np.float32))
