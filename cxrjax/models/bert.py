"""RayGen's text encoder: the BERT architecture of CXR-BERT (spec raygen_and_raddiffusion.md C.4).

``Bert`` is Hugging Face's ``BertModel`` without the pooler: word + position + token-type
embeddings, LayerNorm, dropout, then ``layers`` post-LN blocks (self-attention -> dropout ->
LN(x + .), GELU feed-forward -> dropout -> LN(x + .)); it returns the last hidden states, the tensor
RayGen reads. ``MlmHead`` is ``BertForMaskedLM``'s ``cls.predictions`` (dense -> GELU -> LN, then a
decoder tied to the word embeddings plus a bias) and ``BertMaskedLM`` wraps both for pretraining.
With the same weights (``bert_convert.load_bert``) the hidden states and logits equal transformers'
(tests/test_bert.py).

Shapes: B texts, L tokens (L <= max_positions), D = hidden, V = vocab_size, H heads of D / H.

Layout choices:
- The residual stream, LayerNorm and the softmax are float32; ``dtype`` is the compute dtype of
  the dense layers (bfloat16 on GPU), as in models/transformer_layers.py, whose ``dense`` /
  ``layer_norm`` (HF's N(0, 0.02) / ones-zeros initialisation) are reused.
- Padding keys are removed from attention with ``where`` instead of HF's additive finfo.min; the
  two agree wherever a row has one real key, and padded query rows are still computed (fixed
  shapes), so padding positions equal HF's too.
- q, k and v are one GEMM on the concatenated kernels (params keep HF's three names).
- CXR-BERT's dropout is 0.25 and RayGen keeps it inactive (eval mode); here ``deterministic=True``
  is the default and dropout needs a 'dropout' rng otherwise. Its keep decisions are
  prior_layers' keyed hash, not threefry per entry (the MLM pretraining's dropout costs less).
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cxrjax.models.prior_layers import Dropout
from cxrjax.models.transformer_layers import (INIT_STD, dense, gelu_exact, layer_norm,
                                              linear_params, project_side_by_side)

Array = jax.Array
Dtype = Any

# A BERT that pretrains on a CPU in minutes (the phantom reports' vocabulary is small).
BERT_SMALL = dict(hidden=256, layers=4, heads=4, intermediate=1024)
NORMALIZE_EPS = 1e-12  # torch.nn.functional.normalize's default eps


def _embed(num: int, features: int, name: str) -> nn.Embed:
  return nn.Embed(num, features, embedding_init=nn.initializers.normal(INIT_STD),
                  param_dtype=jnp.float32, name=name)


class BertLayer(nn.Module):
  """One post-LN BERT block: (B, L, D) float32, key mask (B, L) bool -> (B, L, D) float32."""
  hidden: int
  heads: int
  intermediate: int
  layer_norm_eps: float
  dropout: float
  attention_dropout: float
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, mask: Array, deterministic: bool) -> Array:
    b, l, d = x.shape[0], x.shape[1], self.hidden
    hd = d // self.heads
    # q, k, v as one GEMM on the concatenated kernels (params still query / key / value, each
    # {'kernel', 'bias'} as nn.Dense holds them), heads split by one transpose.
    qkv_params = [self.param(name, linear_params(d), d) for name in ("query", "key", "value")]
    qkv = project_side_by_side(x, qkv_params, self.dtype).reshape(b, l, 3, self.heads, hd)
    # Heads folded into the batch for the two products: on XLA:CPU rank-3 batched dots run the
    # attention core alone 2.4x faster than (B, H, ...) einsums at BERT-base sizes, the whole
    # forward 6 % (benchmarks/RESULTS.md).
    q, k, v = (t.reshape(b * self.heads, l, hd) for t in jnp.moveaxis(qkv, (2, 3), (0, 2)))
    scores = jnp.einsum("nqd,nkd->nqk", q, k,
                        preferred_element_type=jnp.float32).reshape(b, self.heads, l, l)
    scores = jnp.where(mask[:, None, None, :], scores / math.sqrt(hd), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = Dropout(self.attention_dropout)(probs, deterministic=deterministic)
    ctx = jnp.einsum("nqk,nkd->nqd", probs.astype(v.dtype).reshape(b * self.heads, l, l), v)
    ctx = jnp.moveaxis(ctx.reshape(b, self.heads, l, hd), 1, 2).reshape(b, l, d)
    a = dense(d, self.dtype, "attention_out")(ctx).astype(jnp.float32)
    a = Dropout(self.dropout)(a, deterministic=deterministic)
    x = layer_norm(self.layer_norm_eps, "attention_norm")(x + a)
    f = gelu_exact(dense(self.intermediate, self.dtype, "intermediate")(x))
    f = dense(d, self.dtype, "output")(f).astype(jnp.float32)
    f = Dropout(self.dropout)(f, deterministic=deterministic)
    return layer_norm(self.layer_norm_eps, "output_norm")(x + f)


class Bert(nn.Module):
  """BertModel's last hidden states (the pooler is not built: RayGen does not use it).

  Defaults are CXR-BERT's config (C.4) except dropout (0.1, BERT's; CXR-BERT's 0.25 is only
  relevant when training). attention_dropout: None means the same as dropout.
  """
  vocab_size: int = 30522
  hidden: int = 768
  layers: int = 12
  heads: int = 12
  intermediate: int = 3072
  max_positions: int = 512
  type_vocab: int = 2
  layer_norm_eps: float = 1e-12
  dropout: float = 0.1
  attention_dropout: float | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: Array, attention_mask: Array | None = None,
               token_type_ids: Array | None = None, deterministic: bool = True) -> Array:
    """input_ids (B, L) int, attention_mask (B, L) bool/int (1 = real token; None: all real),
    token_type_ids (B, L) int (None: zeros) -> last hidden states (B, L, hidden) float32."""
    b, l = input_ids.shape
    if l > self.max_positions:
      raise ValueError(f"text of {l} tokens is longer than the encoder's max_positions="
                       f"{self.max_positions}; truncate it (wordpiece.TextTokenizer max_length)")
    if self.hidden % self.heads:
      raise ValueError(f"hidden={self.hidden} is not divisible by heads={self.heads}")
    mask = (jnp.ones((b, l), bool) if attention_mask is None
            else jnp.asarray(attention_mask).astype(bool))
    types = jnp.zeros((b, l), jnp.int32) if token_type_ids is None else token_type_ids
    x = (_embed(self.vocab_size, self.hidden, "word_embeddings")(input_ids)
         + _embed(self.max_positions, self.hidden, "position_embeddings")(jnp.arange(l))[None]
         + _embed(self.type_vocab, self.hidden, "token_type_embeddings")(types))
    x = layer_norm(self.layer_norm_eps, "embeddings_norm")(x)
    x = Dropout(self.dropout)(x, deterministic=deterministic)
    attention_dropout = self.dropout if self.attention_dropout is None else self.attention_dropout
    for i in range(self.layers):
      x = BertLayer(self.hidden, self.heads, self.intermediate, self.layer_norm_eps, self.dropout,
                    attention_dropout, self.dtype, name=f"layer_{i}")(x, mask, deterministic)
    return x


class MlmHead(nn.Module):
  """cls.predictions: (B, L, D) hidden states, word embeddings (V, D) -> logits (B, L, V) float32.

  The decoder is the embedding matrix (tied, as in BERT), so only the transform and the output
  bias are this module's parameters.
  """
  vocab_size: int
  hidden: int
  layer_norm_eps: float = 1e-12
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h: Array, embedding: Array) -> Array:
    t = gelu_exact(dense(self.hidden, self.dtype, "transform")(h))
    t = layer_norm(self.layer_norm_eps, "transform_norm")(t)
    bias = self.param("bias", nn.initializers.zeros, (self.vocab_size,), jnp.float32)
    logits = jnp.einsum("bld,vd->blv", t.astype(self.dtype), embedding.astype(self.dtype))
    return logits.astype(jnp.float32) + bias


class BertMaskedLM(nn.Module):
  """BertForMaskedLM: ``bert`` (a ``Bert``, params under 'bert') plus an ``MlmHead`` ('head').

  ``__call__`` returns MLM logits (B, L, V); ``encode`` the encoder's hidden states (B, L, D), so
  a pretrained model serves RayGen with ``apply(variables, ids, mask, method='encode')``.
  """
  bert: Bert

  def setup(self):
    self.head = MlmHead(self.bert.vocab_size, self.bert.hidden, self.bert.layer_norm_eps,
                        self.bert.dtype)

  def encode(self, input_ids: Array, attention_mask: Array | None = None,
             token_type_ids: Array | None = None, deterministic: bool = True) -> Array:
    return self.bert(input_ids, attention_mask, token_type_ids, deterministic)

  def __call__(self, input_ids: Array, attention_mask: Array | None = None,
               token_type_ids: Array | None = None, deterministic: bool = True) -> Array:
    h = self.bert(input_ids, attention_mask, token_type_ids, deterministic)
    # Read after the call: during init the table exists only once bert has run.
    embedding = self.bert.variables["params"]["word_embeddings"]["embedding"]
    return self.head(h, embedding)


def normalize_text_states(h: Array, axis: str = "sequence") -> Array:
  """L2-normalise BERT states h (B, L, D) as RayGen does before its text projection (C.4).

  axis='sequence' (faithful, the default): the seed's ``F.normalize(h, dim=1)``, each of the D
  channels divided by its norm over the L positions, padding included. axis='token': each token's
  D-vector to unit norm (what the seed very likely meant). Norms below 1e-12 are clamped, as torch.
  """
  if axis not in ("sequence", "token"):
    raise ValueError(f"axis must be 'sequence' or 'token', got {axis!r}")
  h = jnp.asarray(h, jnp.float32)
  norm = jnp.linalg.norm(h, axis=1 if axis == "sequence" else -1, keepdims=True)
  return h / jnp.maximum(norm, NORMALIZE_EPS)
