"""Transformer pieces in Hugging Face's ViT / BERT layout, shared by RadDiffusion's study encoder
(models/vit.py) and its MAE decoders (models/mae_decoders.py), RayGen's BERT (models/bert.py) and
MaskGIT transformer (models/maskgit.py): one dense layer, one LayerNorm, one exact GELU, one
attention, one pre-norm layer, one dtype policy.

Dtype policy: parameters are float32; ``dtype`` is the compute dtype of the dense layers (bfloat16
on GPU); LayerNorm statistics and the softmax run in float32.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any

INIT_STD = 0.02  # HF initializer_range (ViTMAEConfig in every RadDiffusion config, BERT's)
LAYER_NORM_EPS = 1e-12  # HF ViTMAEConfig.layer_norm_eps, encoder and decoder alike


class TokenDense(nn.Dense):
  """``nn.Dense`` (same parameters) on the tokens as one (N*T, D) matrix: (..., D) -> (..., F).
  On (N, T, D) the kernel gradient contracts two axes and XLA:CPU copies a transposed cotangent
  for it (the prior's finding, models/prior_layers.TokenDense); flattened, it does not."""

  def __call__(self, x: Array) -> Array:
    lead = x.shape[:-1]
    return super().__call__(x.reshape(-1, x.shape[-1])).reshape(*lead, self.features)


def dense(features: int, dtype: Dtype, name: str) -> nn.Dense:
  """HF-initialised Dense (kernel N(0, 0.02), bias 0): float32 params, computes in ``dtype``."""
  return TokenDense(features, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=nn.initializers.normal(INIT_STD), bias_init=nn.initializers.zeros,
                    name=name)


def linear_params(features: int):
  """Initialiser of one ``{'kernel': (fan_in, features), 'bias': (features,)}`` parameter, the
  tree ``dense`` would hold (kernel N(0, 0.02), bias 0), given ``fan_in``."""

  def init(key, fan_in: int) -> dict:
    return {"kernel": nn.initializers.normal(INIT_STD)(key, (fan_in, features), jnp.float32),
            "bias": jnp.zeros((features,), jnp.float32)}

  return init


def project_side_by_side(x: Array, layers: list[dict], dtype: Dtype) -> Array:
  """x (N, T, D_in) through several linear layers side by side as ONE GEMM on (N*T, D_in):
  -> (N, T, len(layers), features)."""
  n, t, d_in = x.shape
  kernel = jnp.concatenate([p["kernel"] for p in layers], axis=1).astype(dtype)
  bias = jnp.concatenate([p["bias"] for p in layers]).astype(dtype)
  y = x.reshape(n * t, d_in).astype(dtype) @ kernel + bias
  return y.reshape(n, t, len(layers), -1)


def layer_norm(eps: float, name: str) -> nn.LayerNorm:
  """LayerNorm (scale 1, bias 0) computed and returned in float32 whatever the compute dtype."""
  # Two-pass variance, as torch: the one-pass E[x^2] - E[x]^2 loses digits on a residual stream
  # whose mean is large against its spread.
  return nn.LayerNorm(epsilon=eps, dtype=jnp.float32, param_dtype=jnp.float32,
                      use_fast_variance=False, name=name)


def feed_forward(y: Array, hidden: int, mlp: int, dtype: Dtype) -> Array:
  """HF ViT-MAE MLP: (N, T, hidden) -> fc1 (-> mlp) -> exact GELU -> fc2 (-> hidden), in dtype.

  Call it inside a compact method: ``fc1`` and ``fc2`` become submodules of the calling layer,
  so ``ViTLayer`` and the decoders' ``CrossSelfLayer`` hold the same names.
  """
  return dense(hidden, dtype, "fc2")(gelu_exact(dense(mlp, dtype, "fc1")(y)))


def gelu_exact(x: Array) -> Array:
  """x * Phi(x), torch's exact GELU, written with erf: jax.nn.gelu's erfc form lowers on XLA:CPU
  to exponentials and selects that cost twice as much (within 1.1e-6 of float64 either way)."""
  return 0.5 * x * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))


class ViTAttention(nn.Module):
  """Multi-head attention, HF ViT-MAE: x (N, T, D), context (N, S, D) or None -> (N, T, D) in
  `dtype`.

  Queries from ``x``; keys and values from ``context`` when given (cross-attention), else from
  ``x``. q / k / v / out linear layers with bias (params ``query``, ``key``, ``value``, ``out``,
  each ``{'kernel', 'bias'}`` as ``nn.Dense`` holds them), logits scaled by 1 / sqrt(D / heads),
  softmax in float32, no attention mask. Projections reading the same tokens run as one GEMM on
  the concatenated kernels, heads split by one transpose (benchmarks/RESULTS.md).
  """
  hidden: int
  heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, context: Array | None = None) -> Array:
    if self.hidden % self.heads:
      raise ValueError(f"hidden {self.hidden} is not divisible by heads {self.heads}")
    n, t, d_in = x.shape
    h, d = self.heads, self.hidden // self.heads
    q_p, k_p, v_p = (self.param(name, linear_params(self.hidden), d_in if context is None or
                                name == "query" else context.shape[-1])
                     for name in ("query", "key", "value"))
    if context is None:
      qkv = project_side_by_side(x, [q_p, k_p, v_p], self.dtype).reshape(n, t, 3, h, d)
      q, k, v = jnp.moveaxis(qkv, (2, 3), (0, 2))  # each (N, H, T, d)
    else:
      s = context.shape[1]
      q = jnp.moveaxis(project_side_by_side(x, [q_p], self.dtype).reshape(n, t, h, d), 2, 1)
      kv = project_side_by_side(context, [k_p, v_p], self.dtype).reshape(n, s, 2, h, d)
      k, v = jnp.moveaxis(kv, (2, 3), (0, 2))
    # Heads folded into the batch: on XLA:CPU these rank-3 batched dots run the attention core
    # 1.6x faster (forward + backward) than rank-4 (N, H, ...) einsums (benchmarks/RESULTS.md).
    s = k.shape[2]
    q, k, v = q.reshape(n * h, t, d), k.reshape(n * h, s, d), v.reshape(n * h, s, d)
    logits = jnp.einsum("bqd,bkd->bqk", q, k, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits / math.sqrt(d), axis=-1).astype(self.dtype)
    out = jnp.einsum("bqk,bkd->bqd", weights, v).reshape(n, h, t, d)
    out = jnp.moveaxis(out, 1, 2).reshape(n, t, self.hidden)
    out_p = self.param("out", linear_params(self.hidden), self.hidden)
    return project_side_by_side(out, [out_p], self.dtype)[:, :, 0]


class ViTLayer(nn.Module):
  """Pre-norm transformer layer, HF ``ViTMAELayer``: (N, T, D) float32 -> (N, T, D) float32.

  h = h + Attn(LN_before(h)); h = h + fc2(GELU_exact(fc1(LN_after(h)))). Dropout is 0 in every
  RadDiffusion config, so there is none. Submodules: ``layernorm_before``, ``attention``
  (ViTAttention), ``layernorm_after``, ``fc1`` (D -> mlp), ``fc2`` (mlp -> D).
  """
  hidden: int
  heads: int
  mlp: int
  layer_norm_eps: float = LAYER_NORM_EPS
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h: Array) -> Array:
    y = layer_norm(self.layer_norm_eps, "layernorm_before")(h).astype(self.dtype)
    h = h + ViTAttention(self.hidden, self.heads, self.dtype, name="attention")(y).astype(
        jnp.float32)
    y = layer_norm(self.layer_norm_eps, "layernorm_after")(h).astype(self.dtype)
    return h + feed_forward(y, self.hidden, self.mlp, self.dtype).astype(jnp.float32)
