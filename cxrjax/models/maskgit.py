"""RayGen's text-conditioned masked-token transformer, "ModelV2" (spec raygen_and_raddiffusion.md
C.5, C.10, C.11).

Shapes: B images, N image tokens (<= seq_len; 1024 = 32x32 row-major in RayGen), T text tokens,
D = width, H = ffn_hidden, C = codebook_size (the mask id is C, so the embedding has C + 1 rows).

    x = embed(ids) + pos[:N]                              # no LayerNorm, no dropout (C.5)
    ctx = text_projector(text)                            # Linear(text_dim -> D), with bias
    per layer:  x = x + SelfMHA(x)
                x = x + CrossMHA(x, ctx)                  # no pre-norms (C.10 item 3)
                x = x + FFN(x)                            # LN -> D->2H -> GEGLU -> LN(H) -> H->D
                x = LayerNorm_3(x)                        # post-norm, the only norm of the stack
    logits = final_dense(x)                               # Linear(D -> C), with bias

``text`` is what RayGen feeds its projector: CXR-BERT's last hidden states already L2-normalised
over the sequence axis (C.4, C.10 item 1); that normalisation belongs to the text side, not here.

Cross-attention and padding (C.10 item 2): RayGen attends to PAD positions of the text.
``text_key_padding=False`` keeps that (``text_mask`` is then ignored); ``True`` masks keys where
``text_mask`` is False. A row whose mask is all False (the null condition of classifier-free
guidance, ``null_condition``) then attends to nothing: its cross-attention weights are zero and
the block adds only the output bias. (torch returns NaN for such a row; a defined null is what
guidance needs.)

Names mirror the seed's modules so the converter (models/maskgit_convert.py) is a renaming:
``image_embedding``, ``pos_emb`` (1, seq_len, D), ``text_projector``, ``dec_layers_{i}`` with
``mha`` / ``cross_mha`` (params ``query``, ``key``, ``value``, ``out``), ``ffn`` (``layer_norm_1``,
``linear_1``, ``layer_norm_2``, ``linear_2``) and ``layer_norm_3``, then ``final_dense``. The seed's
unused per-layer ``layer_norm_1`` / ``layer_norm_2`` have no counterpart.

Initialisation is torch's for the same modules: embeddings and positions N(0, 1); q/k/v
xavier-uniform over the packed (3D, D) in_proj, i.e. U(+-sqrt(6 / 4D)), their biases 0; every
Linear (out projection included) U(+-1/sqrt(fan_in)); out-projection bias 0, other Linear biases
U(+-1/sqrt(fan_in)); LayerNorms 1 / 0, eps 1e-5.

Dtype policy (as models/transformer_layers.py): parameters float32; ``dtype`` is the compute dtype
of the dense layers and attention (bfloat16 is the stand-in for the seed's fp16 autocast, a deviation, C.11);
the residual stream, LayerNorm statistics, softmax and the returned logits are float32.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from cxrjax.models.prior_layers import Dropout
from cxrjax.models.transformer_layers import TokenDense, gelu_exact, layer_norm

Array = jax.Array
Dtype = Any

LAYER_NORM_EPS = 1e-5  # torch nn.LayerNorm default, every norm of ModelV2
_NEG = -1e30  # masked attention logit: finite, so a fully masked row stays NaN-free


# ----------------------------------------------------------------------------- initialisers
def _torch_linear_kernel():
  """torch nn.Linear's weight init (kaiming_uniform, a=sqrt(5)): U(+-1/sqrt(fan_in))."""
  return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _torch_linear_bias(fan_in: int):
  """torch nn.Linear's bias init: U(+-1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


# xavier_uniform on torch's packed (3D, D) in_proj has bound sqrt(6 / (D + 3D)); on each (D, D)
# third, variance_scaling fan_avg gives sqrt(3 s / D), equal for s = 1/2.
_QKV_KERNEL = nn.initializers.variance_scaling(0.5, "fan_avg", "uniform")


def _projection(key, width: int, kernel_init) -> dict:
  """One {'kernel': (D, D), 'bias': (D,)} projection of nn.MultiheadAttention (bias 0)."""
  return {"kernel": kernel_init(key, (width, width), jnp.float32),
          "bias": jnp.zeros((width,), jnp.float32)}


def _project(x: Array, params: list[dict], dtype: Dtype) -> Array:
  """x (B, S, D) through the given projections side by side as ONE GEMM on (B*S, D):
  -> (B, S, len(params) * D) in dtype."""
  b, s, d = x.shape
  kernel = jnp.concatenate([p["kernel"] for p in params], axis=1).astype(dtype)
  bias = jnp.concatenate([p["bias"] for p in params]).astype(dtype)
  return (x.reshape(b * s, d).astype(dtype) @ kernel + bias).reshape(b, s, -1)


# ----------------------------------------------------------------------------- layers
class Attention(nn.Module):
  """torch ``nn.MultiheadAttention(width, heads, dropout, batch_first=True)``:
  x (B, N, D), context (B, T, D) or None, key_mask (B, T) bool or None -> (B, N, D) in dtype.

  Queries from x, keys / values from context (x when None). Self-attention projects q, k, v in one
  GEMM, cross-attention k, v in one; heads are split by reshapes, never a loop. Logits are scaled
  by 1/sqrt(D / heads) in float32; dropout (rate ``dropout_rate``) acts on the attention
  probabilities, as torch's. key_mask True = attend; a row with no True key gets zero weights.
  """
  width: int
  heads: int
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, context: Array | None = None, key_mask: Array | None = None,
               deterministic: bool = True) -> Array:
    if self.width % self.heads:
      raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
    b, n, _ = x.shape
    h, d = self.heads, self.width // self.heads
    q_p, k_p, v_p = (self.param(name, _projection, self.width, _QKV_KERNEL)
                     for name in ("query", "key", "value"))
    if context is None:
      q, k, v = jnp.split(_project(x, [q_p, k_p, v_p], self.dtype), 3, axis=-1)
    else:
      q = _project(x, [q_p], self.dtype)
      k, v = jnp.split(_project(context, [k_p, v_p], self.dtype), 2, axis=-1)
    q = q.reshape(b, n, h, d)
    k = k.reshape(b, k.shape[1], h, d)
    v = v.reshape(b, v.shape[1], h, d)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    logits = logits / math.sqrt(d)
    if key_mask is not None:
      keep = key_mask[:, None, None, :]
      weights = jax.nn.softmax(jnp.where(keep, logits, _NEG), axis=-1)
      # With every key masked the softmax is uniform over masked keys; zero it instead.
      weights = weights * jnp.any(key_mask, axis=-1)[:, None, None, None]
    else:
      weights = jax.nn.softmax(logits, axis=-1)
    if self.dropout_rate > 0.0:
      # Keep decisions from the keyed hash (prior_layers.keep_mask), not threefry per entry: at
      # the seed's sizes a step drops 250 M attention probabilities.
      weights = Dropout(self.dropout_rate)(weights, deterministic=deterministic)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(self.dtype), v).reshape(b, n, self.width)
    out_p = self.param("out", _projection, self.width, _torch_linear_kernel())
    return _project(out, [out_p], self.dtype)


class FeedForward(nn.Module):
  """The seed's FeedForwardNetwork2 (lucidrains' MUSE FFN): (B, N, D) float32 -> (B, N, D) dtype.

  LN -> Dense(D -> 2H, no bias) -> GEGLU: split (a, b) in that order, b * gelu_exact(a) ->
  LN(H) -> Dense(H -> D, no bias). The seed's FFN has no dropout (it ignores its argument).
  """
  width: int
  hidden: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    y = layer_norm(LAYER_NORM_EPS, "layer_norm_1")(x).astype(self.dtype)
    y = TokenDense(2 * self.hidden, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                   kernel_init=_torch_linear_kernel(), name="linear_1")(y)
    a, gate = jnp.split(y, 2, axis=-1)
    y = gate * gelu_exact(a)
    y = layer_norm(LAYER_NORM_EPS, "layer_norm_2")(y).astype(self.dtype)
    return TokenDense(self.width, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                      kernel_init=_torch_linear_kernel(), name="linear_2")(y)


class DecoderLayer(nn.Module):
  """The seed's TransformerDecoderLayer (C.5): x (B, N, D) float32, ctx (B, T, D),
  key_mask (B, T) bool or None -> (B, N, D) float32. Residuals without pre-norm, then LN_3."""
  width: int
  heads: int
  ffn_hidden: int
  attention_dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, ctx: Array, key_mask: Array | None,
               deterministic: bool = True) -> Array:
    attn = dict(width=self.width, heads=self.heads, dropout_rate=self.attention_dropout,
                dtype=self.dtype)
    x = x + Attention(**attn, name="mha")(x, deterministic=deterministic).astype(jnp.float32)
    x = x + Attention(**attn, name="cross_mha")(x, ctx, key_mask, deterministic).astype(
        jnp.float32)
    x = x + FeedForward(self.width, self.ffn_hidden, self.dtype, name="ffn")(x).astype(
        jnp.float32)
    return layer_norm(LAYER_NORM_EPS, "layer_norm_3")(x)


class TokenTransformer(nn.Module):
  """RayGen ModelV2 (C.5): image-token ids and text states -> logits over the codebook.

  __call__(ids, text, text_mask=None, deterministic=True) -> logits
    ids: (B, N) int32 in [0, codebook_size]; codebook_size is the mask id. N <= seq_len (the
      first N learned positions are used, as the seed slices its table).
    text: (B, T, text_dim) float, the sequence-normalised CXR-BERT states (see the module doc).
    text_mask: (B, T) bool, True for real tokens; used only when ``text_key_padding``.
    deterministic: False applies attention dropout (needs a 'dropout' rng).
    logits: (B, N, codebook_size) float32.
  The defaults are RayGen's (129.9M parameters); a CPU-sized variant is e.g. seq_len=256,
  width=256, depth=4, heads=4, ffn_hidden=1024, text_dim=256.
  """
  codebook_size: int = 1024
  seq_len: int = 1024
  width: int = 1024
  depth: int = 6
  heads: int = 8
  ffn_hidden: int = 4096
  text_dim: int = 768
  attention_dropout: float = 0.1
  text_key_padding: bool = False
  dtype: Dtype = jnp.float32

  @property
  def mask_id(self) -> int:
    return self.codebook_size

  @nn.compact
  def __call__(self, ids: Array, text: Array, text_mask: Array | None = None,
               deterministic: bool = True) -> Array:
    b, n = ids.shape
    if n > self.seq_len:
      raise ValueError(f"{n} image tokens exceed the model's seq_len {self.seq_len}")
    if text.ndim != 3 or text.shape[0] != b or text.shape[-1] != self.text_dim:
      raise ValueError(f"text must be (B={b}, T, text_dim={self.text_dim}), got {text.shape}")
    embed = nn.Embed(self.codebook_size + 1, self.width, embedding_init=nn.initializers.normal(1.0),
                     param_dtype=jnp.float32, name="image_embedding")
    pos = self.param("pos_emb", nn.initializers.normal(1.0), (1, self.seq_len, self.width),
                     jnp.float32)
    x = embed(ids) + pos[:, :n]
    ctx = TokenDense(self.width, dtype=self.dtype, param_dtype=jnp.float32,
                     kernel_init=_torch_linear_kernel(),
                     bias_init=_torch_linear_bias(self.text_dim), name="text_projector")(
                         text.astype(self.dtype))
    key_mask = None
    if self.text_key_padding and text_mask is not None:
      if text_mask.shape != text.shape[:2]:
        raise ValueError(f"text_mask must be (B, T) = {text.shape[:2]}, got {text_mask.shape}")
      key_mask = text_mask.astype(bool)
    for i in range(self.depth):
      x = DecoderLayer(self.width, self.heads, self.ffn_hidden, self.attention_dropout, self.dtype,
                       name=f"dec_layers_{i}")(x, ctx, key_mask, deterministic)
    logits = TokenDense(self.codebook_size, dtype=self.dtype, param_dtype=jnp.float32,
                        kernel_init=_torch_linear_kernel(),
                        bias_init=_torch_linear_bias(self.width), name="final_dense")(
                            x.astype(self.dtype))
    return logits.astype(jnp.float32)


# ----------------------------------------------------------------------------- conditioning
def null_condition(text: Array, text_mask: Array | None = None) -> tuple[Array, Array]:
  """The classifier-free-guidance null condition shaped as (text (B, T, E), text_mask (B, T)):
  zeros and an all-False mask.

  Parameter-free and the same at training (losses.masked_tokens.drop_text) and decoding time.
  With ``text_key_padding`` the cross-attention then reads nothing; without it (the seed's
  behaviour) it reads the projector's bias at every position, a constant context either way.
  """
  del text_mask  # the null's shape comes from text
  return jnp.zeros_like(text), jnp.zeros(text.shape[:2], bool)


def make_tokens_to_logits(model: TokenTransformer, variables: Any, text: Array,
                          text_mask: Array | None = None) -> Callable[[Array, bool], Array]:
  """The ``tokens_to_logits(ids, conditional)`` of models.mask_decoding.decode for this model.

  ids (B, N) int32 -> logits (B, N, codebook_size) float32, deterministic. ``conditional`` is a
  static Python bool: True reads ``text`` / ``text_mask`` (B, T, text_dim) / (B, T), False the
  ``null_condition``.
  """
  null_text, null_mask = null_condition(text, text_mask)

  def tokens_to_logits(ids: Array, conditional: bool = True) -> Array:
    if conditional:
      return model.apply(variables, ids, text, text_mask)
    return model.apply(variables, ids, null_text, null_mask)

  return tokens_to_logits
