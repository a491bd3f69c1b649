"""DALLE-2-style diffusion-prior network (CXR embedding -> CTPA embedding).

Re-implements, from the spec (``prior_and_fmkd.md`` §A.2), the ``DiffusionPriorNetwork`` +
``CausalTransformer`` of DALLE2-pytorch v1.15.6 as configured by the CXR->CTPA distillation
paper: pre-LN causal transformer with multi-query cosine-sim attention (scale 16), a learned
null key/value, shared interleaved rotary embeddings (first 32 channels), a shared causal T5
relative-position bias, SwiGLU feed-forward with a normformer LayerNorm, and a final "stable"
LayerNorm + projection. The network reads its x0 prediction from a learned query token.

Shapes: B batch, n tokens (max_text_len + 4 = 81 in the paper), D model width, H heads,
d head width. Params are float32; ``dtype`` is the matmul compute dtype; norms, l2-norms,
rotary and softmax always run in float32 and the residual stream stays float32.
Dropout's keep decisions are a keyed integer hash of each entry's index (``prior_layers.keep_mask``).
Three rewrites for XLA:CPU change no parameter and no maths beyond float rounding: linear layers act on
the flattened (B*n, D) tokens, a LayerNorm gain that feeds a linear layer is folded into its kernel,
and SwiGLU's value and gate are two GEMMs (``prior_layers.TokenDense``).
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from cxrjax.models.prior_layers import (Dropout, LayerNorm, apply_rotary, broadcast_batch,
                                        causal_bias_buckets, l2norm, normal_init, rotary_angles,
                                        torch_bias_init, torch_dense, torch_linear_init)
# Re-exported: callers and tests use them as cxrjax.models.prior.<name>.
from cxrjax.models.prior_layers import relative_position_bucket  # noqa: F401

Array = jax.Array
Dtype = Any


class Attention(nn.Module):
  """Pre-LN multi-query causal cosine-sim attention with a learned null key/value.

  x: (B, n, D); bias: (n, H, n+1) rel-pos bias with the causal mask folded in (-max where key
  j > query i + 1; see ``CausalTransformer``); angles: (n, rot_dim) rotary angles or None.
  Returns (B, n, D), or (B, 1, D) for the last query only when ``last_only``.

  Queries stay in the (B, m, H, d) layout the projection produces: with one shared K/V head
  the score and value einsums are batched GEMMs over B with m*H rows either way, so no
  (B, H, m, d) transpose is materialised (forward or backward).
  """
  dim: int
  heads: int
  dim_head: int = 64
  dropout: float = 0.0
  cosine_sim_scale: float = 16.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, bias, angles, deterministic: bool = True, last_only: bool = False):
    b = x.shape[0]
    h, g = LayerNorm(fold_gain=True, dtype=self.dtype, name="norm")(x)
    kv = torch_dense(2 * self.dim_head, self.dtype, "to_kv")(h, g)  # one shared K and V head
    k, v = jnp.split(kv, 2, axis=-1)                         # (B, n, d) each
    # The last query needs K/V of every token, but only its own query row.
    hq = h[:, -1:] if last_only else h
    m = hq.shape[1]
    q = torch_dense(self.heads * self.dim_head, self.dtype, "to_q")(hq, g)
    q = q.reshape(b, m, self.heads, self.dim_head)  # (B, m, H, d)
    if angles is not None:
      q = apply_rotary(q, (angles[-1:] if last_only else angles)[:, None, :])
      k = apply_rotary(k, angles)
    null_kv = self.param("null_kv", normal_init, (2, self.dim_head), jnp.float32)
    nkv = broadcast_batch(null_kv[:, None, :], b)  # (B, 2, 1, d)
    k = jnp.concatenate([nkv[:, 0].astype(k.dtype), k], axis=1)  # (B, n+1, d); key 0 = null
    v = jnp.concatenate([nkv[:, 1].astype(v.dtype), v], axis=1)  # (not rotated)
    # cosine-sim: the upstream sqrt(scale) on both sides == scale on the product
    qn = l2norm(q).astype(self.dtype)
    kn = l2norm(k).astype(self.dtype)
    sim = jnp.einsum("bihd,bjd->bihj", qn, kn, preferred_element_type=jnp.float32)
    # + bias. Masked entries: 16*cos + (-max) rounds to -max, bit-identical to the old
    # where(mask, -max, sim + bias); query n-1 sees every key, so last_only has no mask.
    sim = sim * self.cosine_sim_scale + broadcast_batch(bias[-1:] if last_only else bias, b)
    attn = jax.nn.softmax(sim, axis=-1)  # float32, (B, m, H, n+1)
    attn = Dropout(self.dropout)(attn, deterministic=deterministic)
    out = jnp.einsum("bihj,bjd->bihd", attn.astype(self.dtype), v.astype(self.dtype))
    out = out.reshape(b, m, self.heads * self.dim_head)
    out = torch_dense(self.dim, self.dtype, "to_out")(out)
    return LayerNorm(dtype=self.dtype, name="out_norm")(out)


class FeedForward(nn.Module):
  """LN -> Dense(2*ff_mult*D) -> SwiGLU (first half * SiLU(second half)) -> [LN] -> Dropout -> Dense(D).

  x: (B, m, D) -> (B, m, D).
  """
  dim: int
  mult: int = 4
  dropout: float = 0.0
  normformer: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    inner = int(self.mult * self.dim)
    h, g = LayerNorm(fold_gain=True, dtype=self.dtype, name="norm")(x)
    val, gate = torch_dense(2 * inner, self.dtype, "proj_in", split=2)(h, g)
    h = val * nn.silu(gate)
    g = None
    if self.normformer:  # its gain folds into proj_out (dropout commutes with it)
      h, g = LayerNorm(fold_gain=True, dtype=self.dtype, name="post_norm")(h)
    h = Dropout(self.dropout)(h, deterministic=deterministic)
    return torch_dense(self.dim, self.dtype, "proj_out")(h, g)


class Block(nn.Module):
  """x <- Attn(x) + x; x <- FF(x) + x. (B, n, D) -> (B, n, D), or (B, 1, D) when ``last_only``."""
  dim: int
  heads: int
  dim_head: int = 64
  ff_mult: int = 4
  attn_dropout: float = 0.0
  ff_dropout: float = 0.0
  normformer: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, bias, angles, deterministic: bool = True, last_only: bool = False):
    a = Attention(self.dim, self.heads, self.dim_head, self.attn_dropout, dtype=self.dtype,
                  name="attn")(x, bias, angles, deterministic, last_only)
    x = (x[:, -1:] if last_only else x) + a  # residual stays float32
    f = FeedForward(self.dim, self.ff_mult, self.ff_dropout, self.normformer, self.dtype,
                    name="ff")(x, deterministic)
    return x + f


class CausalTransformer(nn.Module):
  """Pre-LN causal transformer with shared rotary + rel-pos bias, stable final LN and projection.

  x: (B, n, D) -> (B, n, D); with ``last_only`` the last layer only computes token n-1 and the
  result is (B, 1, D) (exactly equivalent: nothing later reads the other tokens).
  """
  dim: int
  depth: int
  heads: int
  dim_head: int = 64
  ff_mult: int = 4
  attn_dropout: float = 0.0
  ff_dropout: float = 0.0
  normformer: bool = True
  rotary: bool = True
  num_buckets: int = 32
  max_distance: int = 128
  remat: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool = True, last_only: bool = False) -> Array:
    n = x.shape[1]
    x = x.astype(jnp.float32)
    table = self.param("rel_pos_bias", normal_init, (self.num_buckets, self.heads), jnp.float32)
    buckets = causal_bias_buckets(n, self.num_buckets, self.max_distance)
    bias = jnp.transpose(table[buckets], (0, 2, 1))  # (n, H, n+1), shared by every layer
    # Fold the causal mask (key j holds token j-1: keys j > i+1 are in the future) into the
    # shared bias once, instead of a select over (B, n, H, n+1) scores in every layer.
    i = jnp.arange(n)[:, None, None]
    j = jnp.arange(n + 1)[None, None, :]
    bias = jnp.where(j > i + 1, -jnp.finfo(jnp.float32).max, bias)
    angles = rotary_angles(jnp.arange(n), self.dim_head) if self.rotary else None
    block_cls = nn.remat(Block, static_argnums=(4, 5)) if self.remat else Block
    for layer in range(self.depth):
      lo = last_only and layer == self.depth - 1
      x = block_cls(self.dim, self.heads, self.dim_head, self.ff_mult, self.attn_dropout,
                    self.ff_dropout, self.normformer, self.dtype,
                    name=f"block_{layer}")(x, bias, angles, deterministic, lo)
    x, g = LayerNorm(stable=True, fold_gain=True, dtype=self.dtype, name="norm_out")(x)
    return torch_dense(self.dim, self.dtype, "final_proj")(x, g)


class DiffusionPriorNetwork(nn.Module):
  """x0-predicting prior network: (x_t (B, D), t (B,), cond (B, cond_dim)) -> x0_pred (B, D) float32.

  Token sequence (max_text_len + 4): max_text_len learned null text encodings (no text encodings
  are ever given), cond token (null_text_embeds where not text_keep), time embedding, x_t token
  (null_image_embed where not image_keep), learned query. The output is the final representation
  of the learned query.

  ``cond_dim`` is an extension: the paper's condition is already D=512-d (identity). If set and
  != dim, a Dense(cond_dim -> dim) with PyTorch-default init projects it.
  ``last_layer_shortcut`` computes only the learned-query row in the last layer (exact).
  """
  dim: int
  depth: int
  heads: int
  dim_head: int = 64
  ff_mult: int = 4
  attn_dropout: float = 0.05
  ff_dropout: float = 0.05
  num_timesteps: int = 1000
  max_text_len: int = 77
  normformer: bool = True
  rotary: bool = True
  cond_dim: int | None = None
  remat: bool = False
  last_layer_shortcut: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_t: Array, t: Array, cond: Array, *, text_keep: Array | None = None,
               image_keep: Array | None = None, deterministic: bool = True) -> Array:
    b, d = x_t.shape[0], self.dim
    learned_query = self.param("learned_query", normal_init, (d,), jnp.float32)
    null_text_enc = self.param("null_text_encodings", normal_init, (1, self.max_text_len, d),
                               jnp.float32)
    null_text_embeds = self.param("null_text_embeds", normal_init, (1, 1, d), jnp.float32)
    null_image_embed = self.param("null_image_embed", normal_init, (1, d), jnp.float32)
    time_table = self.param("time_embed", normal_init, (self.num_timesteps, d), jnp.float32)

    cond = cond.astype(jnp.float32)
    if self.cond_dim is not None and self.cond_dim != d:
      cond = nn.Dense(d, dtype=self.dtype, param_dtype=jnp.float32,
                      kernel_init=torch_linear_init,
                      bias_init=torch_bias_init(self.cond_dim), name="cond_proj")(cond)
      cond = cond.astype(jnp.float32)
    cond_tok = cond[:, None, :]
    if text_keep is not None:
      cond_tok = jnp.where(text_keep[:, None, None], cond_tok, null_text_embeds)
    img_tok = x_t.astype(jnp.float32)
    if image_keep is not None:
      img_tok = jnp.where(image_keep[:, None], img_tok, null_image_embed)
    tokens = jnp.concatenate([
        broadcast_batch(null_text_enc[0], b),
        cond_tok,
        time_table[t][:, None, :],
        img_tok[:, None, :],
        broadcast_batch(learned_query[None, :], b),
    ], axis=1)  # (B, max_text_len + 4, D)
    out = CausalTransformer(
        self.dim, self.depth, self.heads, self.dim_head, self.ff_mult, self.attn_dropout,
        self.ff_dropout, self.normformer, self.rotary, remat=self.remat, dtype=self.dtype,
        name="transformer")(tokens, deterministic=deterministic,
                            last_only=self.last_layer_shortcut)
    return out[:, -1].astype(jnp.float32)


# ----------------------------------------------------------------------------- accounting
def num_params(params) -> int:
  """Total number of scalars in a parameter pytree (arrays or ShapeDtypeStructs)."""
  return int(sum(math.prod(p.shape) for p in jax.tree.leaves(params)))


def flops_per_example(dim: int, depth: int, heads: int, dim_head: int = 64, ff_mult: int = 4,
                      seq_len: int = 81, *, cond_dim: int | None = None,
                      last_layer_shortcut: bool = True) -> int:
  """Forward-pass matmul FLOPs (2 x MACs) of one example; norms/softmax/rotary are not counted.

  With n = seq_len, q = heads*dim_head, f = ff_mult*dim, each layer costs per query token
      2*dim*q (W_q) + 2*q*dim (W_o) + 2*dim*2f (W_1) + 2*f*dim (W_2)
      + 2*q*(n+1) (scores) + 2*q*(n+1) (attn @ V)     [dense: masked entries are computed too]
  plus, for all n tokens, 2*dim*2*dim_head (W_kv). Every layer has n query tokens except the last
  one under ``last_layer_shortcut`` (1 query token); final_proj costs 2*dim^2 per output token
  (n, or 1 with the shortcut); cond_proj (if cond_dim != dim) adds 2*cond_dim*dim. A training
  step is ~3x this (backward ~2x forward).
  """
  n = seq_len
  q = heads * dim_head
  f = ff_mult * dim
  per_query = 2 * dim * q + 2 * q * dim + 2 * dim * 2 * f + 2 * f * dim + 4 * q * (n + 1)
  kv = 2 * dim * 2 * dim_head * n
  last_m = 1 if last_layer_shortcut else n
  total = depth * kv + (depth - 1) * n * per_query + last_m * per_query
  total += 2 * dim * dim * last_m
  if cond_dim is not None and cond_dim != dim:
    total += 2 * cond_dim * dim
  return int(total)
