"""Building blocks of the diffusion-prior network (spec A.2): PyTorch-default initialisers,
interleaved partial rotary embeddings, causal T5 relative-position buckets, a batch broadcast with
a cheap gradient, dropout with hashed keep decisions, and the bias-free (optionally "stable") LayerNorm.

Shapes: B batch, n tokens, D width, H heads, d head width.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

Array = jax.Array
Dtype = Any


# ----------------------------------------------------------------------------- initialisers
def torch_linear_init(key, shape, dtype=jnp.float32):
  """PyTorch ``nn.Linear`` default kernel init: kaiming-uniform(a=sqrt 5) == U(+-1/sqrt(fan_in)).

  Flax kernels are (fan_in, fan_out), so fan_in = shape[0].
  """
  bound = 1.0 / math.sqrt(shape[0])
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def torch_bias_init(fan_in: int):
  """PyTorch ``nn.Linear`` default bias init U(+-1/sqrt(fan_in)) (needs fan_in, hence a closure)."""
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


normal_init = nn.initializers.normal(stddev=1.0)  # torch.randn / nn.Embedding default


class TokenDense(nn.Module):
  """Bias-free linear layer applied to the tokens as one (B*n, D) matrix. (..., D) -> (..., features).

  Parameter "kernel" (D, features), float32, as ``nn.Dense``'s. Why flattened: on a (B, n, D)
  input the kernel gradient contracts two axes (B and n), and XLA:CPU then materialises a
  transposed copy of the (B, n, features) cotangent for it; flattened, the contraction is one
  axis and the GEMMs run unchanged. Paper-config prior block, forward + backward, 2 cores:
  250 -> 336 GFLOP/s for its dense layers (benchmarks/RESULTS.md).

  ``in_scale`` (D,) multiplies the kernel's rows: ``dense(x, s) == dense(x * s)`` up to
  rounding. It receives a preceding LayerNorm's gain (``LayerNorm(fold_gain=True)``), so the
  gain's multiply and its gradient (a reduction over all B*n tokens) act on the (D, features)
  kernel instead of the (B*n, D) activations.

  ``split=k`` returns the k equal column blocks of the output (SwiGLU's value and gate) as k
  GEMMs. Why: the gradient of splitting one product is a concatenate of the (B*n, features)
  cotangent, a ~10 ms copy per paper-config layer; k GEMMs need none.
  """
  features: int
  dtype: Dtype = jnp.float32
  kernel_init: Any = torch_linear_init
  split: int = 1

  @nn.compact
  def __call__(self, inputs: Array, in_scale: Array | None = None):
    kernel = self.param("kernel", self.kernel_init, (inputs.shape[-1], self.features),
                        jnp.float32)
    if in_scale is not None:
      kernel = kernel * in_scale[:, None]
    x = inputs.reshape(-1, inputs.shape[-1]).astype(self.dtype)
    outs = [jnp.dot(x, k.astype(self.dtype)).reshape(*inputs.shape[:-1], k.shape[-1])
            for k in jnp.split(kernel, self.split, axis=-1)]
    return outs[0] if self.split == 1 else tuple(outs)


def torch_dense(features: int, dtype: Dtype, name: str, split: int = 1) -> TokenDense:
  """Bias-free token linear layer with PyTorch's default kernel init."""
  return TokenDense(features, dtype=dtype, split=split, name=name)


# ----------------------------------------------------------------------------- pure helpers
def rotary_angles(positions: Array, dim_head: int, theta: float = 10000.0) -> Array:
  """Rotary angles phi = p * theta_i, theta_i = theta^(-2i/rot_dim), rot_dim = min(32, dim_head).

  Each frequency is repeated for the interleaved channel pair (2i, 2i+1).
  positions: (n,) -> (n, rot_dim) float32.
  """
  rot_dim = min(32, dim_head)
  inv_freq = theta ** (-jnp.arange(0, rot_dim, 2, dtype=jnp.float32) / rot_dim)  # (rot_dim/2,)
  ang = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
  return jnp.repeat(ang, 2, axis=-1)


def apply_rotary(x: Array, angles: Array) -> Array:
  """Rotate interleaved pairs (a, b) -> (a cos - b sin, b cos + a sin) on the first rot_dim channels.

  x: (..., n, d); angles: (n, rot_dim). Channels >= rot_dim pass through. Computed in float32,
  returned in x.dtype.
  """
  rot_dim, d = angles.shape[-1], x.shape[-1]
  xf = x.astype(jnp.float32)
  # Full width: cos 1 and sin 0 on the pass-through channels, the sign of the pair swap
  # folded into sin, so no slice/concatenate (whose gradients are pads) is needed.
  widen = [(0, 0)] * (angles.ndim - 1) + [(0, d - rot_dim)]
  cos = jnp.pad(jnp.cos(angles), widen, constant_values=1.0)
  sign = jnp.tile(jnp.array([-1.0, 1.0], jnp.float32), rot_dim // 2)
  sin = jnp.pad(jnp.sin(angles) * sign, widen)
  swapped = xf.reshape(*xf.shape[:-1], d // 2, 2)[..., ::-1].reshape(xf.shape)  # (a, b) -> (b, a)
  return (xf * cos + swapped * sin).astype(x.dtype)


def relative_position_bucket(rel: Array, num_buckets: int = 32, max_distance: int = 128) -> Array:
  """Causal T5 bucket of rel = i - j (query minus key index), clipped at 0 (int32, same shape).

  r < num_buckets/2 -> r; else min(nb-1, nb/2 + floor(ln(r/(nb/2)) / ln(max_distance/(nb/2)) * nb/2)).
  """
  max_exact = num_buckets // 2
  r = jnp.maximum(jnp.asarray(rel, jnp.int32), 0)
  safe = jnp.maximum(r, max_exact).astype(jnp.float32)  # avoid log(0); small branch chosen below
  large = max_exact + (jnp.log(safe / max_exact) / math.log(max_distance / max_exact)
                       * (num_buckets - max_exact)).astype(jnp.int32)  # trunc == floor (>= 0)
  large = jnp.minimum(large, num_buckets - 1)
  return jnp.where(r < max_exact, r, large)


def causal_bias_buckets(n: int, num_buckets: int = 32, max_distance: int = 128) -> Array:
  """Buckets for queries i in [0, n) vs keys j in [0, n] (key 0 = null key): (n, n+1) int32.

  Faithful to the upstream off-by-one: the raw key index j is used although key j holds token
  j-1, so a query's own token and the one before it both land in bucket 0.
  """
  i = jnp.arange(n)[:, None]
  j = jnp.arange(n + 1)[None, :]
  return relative_position_bucket(i - j, num_buckets, max_distance)


def broadcast_batch(y: Array, b: int) -> Array:
  """``jnp.broadcast_to(y, (b, *y.shape))`` whose transpose (the sum over the new axis) is a GEMV.

  Same forward and same gradient up to float summation order. Why: XLA:CPU lowers the
  reduction over a leading axis that autodiff emits for a batch broadcast poorly (summing a
  (64, 12, 81, 82) gradient over axis 0 takes ~40 ms, ``ones(64) @ g.reshape(64, -1)`` ~1 ms),
  and the rel-pos bias, null-text tokens, learned query and null K/V are all batch broadcasts.
  """
  return _broadcast_batch(y, b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _broadcast_batch(y, b):
  return jnp.broadcast_to(y, (b, *y.shape))


def _broadcast_batch_fwd(y, b):
  return _broadcast_batch(y, b), None


def _broadcast_batch_bwd(b, _, g):
  return (jnp.tensordot(jnp.ones((b,), g.dtype), g, axes=1),)


_broadcast_batch.defvjp(_broadcast_batch_fwd, _broadcast_batch_bwd)


def _mix32(x: Array) -> Array:
  """Chris Wellons' "lowbias32" integer finaliser: a bijection of uint32 with near-ideal avalanche."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x21F0AAAD)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x735A2D97)
  return x ^ (x >> 15)


def _keep_threshold(rate: float) -> int:
  """t = round((1 - rate) * 2^32): a 32-bit uniform u keeps its entry iff u < t."""
  return min(int(round((1.0 - rate) * 2.0**32)), 2**32 - 1)


def keep_mask(rng: Array, shape: tuple[int, ...], thresh: int) -> Array:
  """Bool mask of ``shape``, True with probability thresh / 2^32, independently per entry.

  Each entry's 32-bit uniform is a keyed hash of its flat index,
  ``mix(mix(i ^ k0) + k1)``, with (k0, k1) one threefry draw from ``rng``. Why: on CPU,
  threefry per entry (``jax.random.bernoulli``) costs ~50 ms per paper-config attention
  mask and dominated dropout; the hash fuses into the consuming op (~1 ms). Keys stay
  threefry-quality (flax splits them per layer and step); within a mask the entries pass
  the rate, neighbour-independence and cross-key tests in tests/test_prior_network.py.
  """
  size = math.prod(shape)
  if size >= 2**32:
    raise ValueError(f"dropout mask of {size} entries exceeds the 32-bit counter")
  k0, k1 = jax.random.bits(rng, (2,), jnp.uint32)
  index = jax.lax.iota(jnp.uint32, size).reshape(shape)
  return _mix32(_mix32(index ^ k0) + k1) < jnp.uint32(thresh)


def dropout(x: Array, rate: float, rng: Array) -> Array:
  """Inverted dropout: x is zeroed with probability ``rate`` (to 2^-32) and kept entries are
  scaled by 1 / (1 - rate), so E[out] = x. Keep decisions come from ``keep_mask``."""
  if rate <= 0.0:
    return x
  if rate >= 1.0:
    return jnp.zeros_like(x)
  thresh = _keep_threshold(rate)
  keep = keep_mask(rng, x.shape, thresh)
  return jnp.where(keep, x * jnp.asarray(2.0**32 / thresh, x.dtype), jnp.zeros((), x.dtype))


class Dropout(nn.Module):
  """``nn.Dropout`` with hashed keep decisions (see ``keep_mask``); rng collection 'dropout'."""
  rate: float

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    if deterministic or self.rate <= 0.0:
      return x
    return dropout(x, self.rate, self.make_rng("dropout"))


def l2norm(x: Array) -> Array:
  # F.normalize semantics: x / max(||x||, 1e-12), in float32
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


# ----------------------------------------------------------------------------- layers
class LayerNorm(nn.Module):
  """Bias-free LayerNorm, biased variance, eps 1e-5, gain "g" (ones). (..., D) -> (..., D).

  ``stable`` first divides by stop_gradient(max(x, -1)) (plain max, as upstream). Runs in
  float32 and returns ``dtype``. With ``fold_gain`` it returns ``(x_hat, g)``, the normalised
  input without the gain and the gain itself, for a following linear layer to fold g into its
  kernel (``TokenDense(in_scale=g)``); used only where a linear layer (or an elementwise
  dropout, which commutes with it) is all that follows.
  """
  eps: float = 1e-5
  stable: bool = False
  fold_gain: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array):
    g = self.param("g", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    x = x.astype(jnp.float32)
    if self.stable:
      x = x / jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True))
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    x_hat = (x - mean) * jax.lax.rsqrt(var + self.eps)
    if self.fold_gain:
      return x_hat.astype(self.dtype), g
    return (x_hat * g).astype(self.dtype)
