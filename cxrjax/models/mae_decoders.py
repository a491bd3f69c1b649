"""RadDiffusion's pretraining decoders (spec raygen_and_raddiffusion.md D.5, D.6.5) over studies
of several views.

Shapes: B studies, V view slots (padded), L = num_patches patches in row-major order, K kept
(visible) patches per view, D_enc encoder width, ``hidden`` decoder width, P = p*p*C values per
patch. Every decoder reads the encoder's output

  tokens      (B, V, 1 + K, D_enc)  [cls, kept patches in shuffled order], after the final LayerNorm
  ids_restore (B, V, L) int         HF's argsort(ids_shuffle); position i is masked iff ids_restore[i] >= K
  view_mask   (B, V) bool           True for a present view

(the encoder's ids_keep is argsort(ids_restore)[:K], so it is not needed), the DiffMAE decoders
also the noisy composite (B, V, H, W, C) of ``core.diffusion.noise_masked_patches``. Each returns
predictions (B, V, L, P) float32 in the full patch order. Views are flattened to (B*V, ...) for
the layers; the only channel between the views of a study is the bottleneck CLS
(D.4): after every layer of the MAE and joint decoders, each view's CLS <- the mean of the present
views' CLS, so a padded view never reaches a present one.

The layers are the encoder's (``models/transformer_layers.py``): ``ViTLayer`` (HF ``ViTMAELayer``:
pre-norm, q/k/v/out Dense with bias, scale 1/sqrt(d_head), exact GELU, LayerNorm eps 1e-12) for the MAE and
joint decoders, and :class:`CrossSelfLayer`, built from ``ViTAttention`` and the same
LayerNorm / MLP pieces, for the cross-self decoder; the CLS step is ``vit.bottleneck_cls``. So the
parameter names are the encoder's (``layer_{i}/attention/{query,key,value,out}``,
``layer_{i}/fc1``, ...), and so is the dtype policy: the residual stream is float32, ``dtype`` is
the compute dtype of the dense layers and convolution, LayerNorm and the softmax run in float32.
Initialisation is HF's: Dense and conv kernels N(0, 0.02), biases 0, LayerNorm 1/0, mask token
N(0, 0.02); the sin-cos position table is a constant, not a parameter.
"""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from cxrjax.models.transformer_layers import (INIT_STD, LAYER_NORM_EPS, Dtype, ViTAttention,
                                              ViTLayer, dense, feed_forward, layer_norm)
from cxrjax.models.vit import bottleneck_cls
from cxrjax.models.vit import sincos_2d  # HF ViT-MAE's table; re-exported here

Array = jax.Array


class CrossSelfLayer(nn.Module):
  """The seed's ``ViTMAEBottleneckCrossLayer`` ('cross-self', D.6.5b). ``q (N, Q, hidden)``
  float32, ``context (N, S, hidden)`` (not layer-normed) -> ``(N, Q, hidden)`` float32:
  ``q += CrossAttn(LN_before(q), context); q += SelfAttn(LN_intermediate(q));
  q += fc2(GELU(fc1(LN_after(q))))``. Submodules: ``layernorm_before``, ``cross_attention``,
  ``layernorm_intermediate``, ``attention`` (both ``ViTAttention``), ``layernorm_after``,
  ``fc1``, ``fc2`` (``ViTLayer``'s pieces and dtype policy).
  """
  hidden: int
  heads: int
  mlp: int
  layer_norm_eps: float = LAYER_NORM_EPS
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, q: Array, context: Array) -> Array:
    eps, dt = self.layer_norm_eps, self.dtype
    attention = functools.partial(ViTAttention, self.hidden, self.heads, dt)
    y = layer_norm(eps, "layernorm_before")(q).astype(dt)
    q = q + attention(name="cross_attention")(y, context.astype(dt)).astype(jnp.float32)
    y = layer_norm(eps, "layernorm_intermediate")(q).astype(dt)
    q = q + attention(name="attention")(y).astype(jnp.float32)
    y = layer_norm(eps, "layernorm_after")(q).astype(dt)
    return q + feed_forward(y, self.hidden, self.mlp, dt).astype(jnp.float32)


def _unshuffle(shuffled: Array, ids_restore: Array) -> Array:
  """Full order from shuffled order: ``out[..., i, :] = shuffled[..., ids_restore[i], :]``.
  ``shuffled (B, V, L, D)``, ``ids_restore (B, V, L)``."""
  return jnp.take_along_axis(shuffled, ids_restore[..., None], axis=2)


class _Decoder(nn.Module):
  """Fields and pieces the three decoders share."""
  hidden: int
  depth: int
  heads: int
  mlp: int
  patch_size: int
  num_patches: int
  channels: int = 1
  dtype: Dtype = jnp.float32
  layer_norm_eps: float = LAYER_NORM_EPS

  def _pos(self) -> Array:
    grid = math.isqrt(self.num_patches)
    if grid * grid != self.num_patches:
      raise ValueError(f"num_patches={self.num_patches} is not a square grid")
    return jnp.asarray(sincos_2d(self.hidden, grid))  # (1 + L, hidden) float32

  def _check(self, tokens: Array, ids_restore: Array) -> int:
    if ids_restore.shape[-1] != self.num_patches:
      raise ValueError(f"ids_restore has {ids_restore.shape[-1]} positions, the decoder "
                       f"{self.num_patches}")
    return tokens.shape[2] - 1  # K, static

  def _self_stack(self, h: Array, view_mask: Array, bottleneck: bool) -> Array:
    """``depth`` ``ViTLayer`` s over ``h (B, V, 1 + L, hidden)`` float32, the study CLS mean
    (``vit.bottleneck_cls``) after each when ``bottleneck``."""
    B, V, S, _ = h.shape
    for i in range(self.depth):
      layer = ViTLayer(self.hidden, self.heads, self.mlp, self.layer_norm_eps, self.dtype,
                       name=f"layer_{i}")
      h = layer(h.reshape(B * V, S, self.hidden)).reshape(B, V, S, self.hidden)
      if bottleneck:
        h = bottleneck_cls(h, view_mask)
    return h

  def _embed(self, tokens: Array) -> Array:
    """``decoder_embed``: encoder tokens ``(B, V, 1 + K, D_enc)`` -> ``(B, V, 1 + K, hidden)``
    float32."""
    return dense(self.hidden, self.dtype, "decoder_embed")(tokens).astype(jnp.float32)

  def _predict(self, h: Array) -> Array:
    """``decoder_norm`` then ``decoder_pred``: ``(..., hidden)`` -> ``(..., p*p*C)`` float32."""
    h = layer_norm(self.layer_norm_eps, "decoder_norm")(h).astype(self.dtype)
    p = self.patch_size
    return dense(p * p * self.channels, self.dtype, "decoder_pred")(h).astype(jnp.float32)

  def _noisy_tokens(self, noisy_images: Array) -> Array:
    """``decoder_patch_embeddings``: ``(B, V, H, W, C) -> (B, V, L, hidden)``, row-major, no pos."""
    B, V, H, W, C = noisy_images.shape
    p = self.patch_size
    conv = nn.Conv(self.hidden, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                   param_dtype=jnp.float32, kernel_init=nn.initializers.normal(INIT_STD),
                   bias_init=nn.initializers.zeros, name="decoder_patch_embeddings")
    x = conv(noisy_images.reshape(B * V, H, W, C).astype(self.dtype)).astype(jnp.float32)
    if x.shape[1] * x.shape[2] != self.num_patches:
      raise ValueError(f"a {H}x{W} image has {x.shape[1] * x.shape[2]} patches, the decoder "
                       f"{self.num_patches}")
    return x.reshape(B, V, self.num_patches, self.hidden)


class MAEDecoder(_Decoder):
  """Vanilla MAE decoder with the bottleneck CLS (the seed's ``ViTMAEBottleneckDecoder``, D.5).

  ``__call__(tokens (B, V, 1+K, D_enc), ids_restore (B, V, L), view_mask (B, V))`` ->
  ``(B, V, L, p*p*C)``: decoder_embed, the learned mask token in the L - K masked slots, unshuffle
  (cls first), + sin-cos table, ``depth`` layers (study CLS mean after each when ``bottleneck``),
  LayerNorm, decoder_pred, cls row dropped. With V = 1 and ``bottleneck`` off it is HF's
  ``ViTMAEDecoder``.
  """
  bottleneck: bool = True

  @nn.compact
  def __call__(self, tokens: Array, ids_restore: Array, view_mask: Array) -> Array:
    K = self._check(tokens, ids_restore)
    B, V = tokens.shape[:2]
    x = self._embed(tokens)
    mask_token = self.param("mask_token", nn.initializers.normal(INIT_STD), (self.hidden,),
                            jnp.float32)
    fill = jnp.broadcast_to(mask_token, (B, V, self.num_patches - K, self.hidden))
    patches = _unshuffle(jnp.concatenate([x[:, :, 1:], fill], axis=2), ids_restore)
    h = jnp.concatenate([x[:, :, :1], patches], axis=2) + self._pos()
    h = self._self_stack(h, view_mask, self.bottleneck)
    return self._predict(h)[:, :, 1:]


class DiffMAEJointDecoder(_Decoder):
  """DiffMAE "joint" decoder (``strategy=None``, the README-results variant, D.6.5a).

  ``__call__(tokens, ids_restore, view_mask, noisy_images (B, V, H, W, C))`` -> ``(B, V, L, P)``,
  predictions at every position (only masked ones enter the loss). No mask token: a masked slot
  holds ``decoder_patch_embeddings`` of the noisy composite at that patch, a visible slot the
  decoder_embed of its encoder token; cls first, + sin-cos table, ``depth`` layers with the study
  CLS mean when ``bottleneck``, LayerNorm, decoder_pred, cls dropped. The noisy image's visible
  patches are never read.
  """
  bottleneck: bool = True

  @nn.compact
  def __call__(self, tokens: Array, ids_restore: Array, view_mask: Array,
               noisy_images: Array) -> Array:
    K = self._check(tokens, ids_restore)
    B, V = tokens.shape[:2]
    x = self._embed(tokens)
    noisy = self._noisy_tokens(noisy_images)
    # The seed gathers the noisy tokens at the masked ids and unshuffles [visible, noisy]; a
    # per-position select of the full-order tables is the same sequence without an argsort.
    pad = jnp.zeros((B, V, self.num_patches - K, self.hidden), jnp.float32)
    visible = _unshuffle(jnp.concatenate([x[:, :, 1:], pad], axis=2), ids_restore)
    patches = jnp.where((ids_restore >= K)[..., None], noisy, visible)
    h = jnp.concatenate([x[:, :, :1], patches], axis=2) + self._pos()
    h = self._self_stack(h, view_mask, self.bottleneck)
    return self._predict(h)[:, :, 1:]


class DiffMAECrossSelfDecoder(_Decoder):
  """DiffMAE "cross-self" decoder (the seed's HEAD default, D.6.5b).

  ``__call__(tokens, ids_restore, view_mask, noisy_images (B, V, H, W, C))`` -> ``(B, V, L, P)``
  with zeros at visible positions. Queries: the noisy composite's tokens at the L - K masked
  positions (+ their sin-cos rows); context: [cls, visible] after decoder_embed (+ their rows),
  not layer-normed; ``max(depth // 2, 1)`` :class:`CrossSelfLayer` s, no CLS mean (as the seed:
  views never meet here, so ``view_mask`` is accepted for a uniform signature and unused);
  LayerNorm, decoder_pred. The masked-only predictions are scattered back to the full order by
  prepending K zero rows and unshuffling: right for any mask ratio (the seed prepends L - K rows,
  which is right only at ratio 0.5, D.6.6).
  """

  @nn.compact
  def __call__(self, tokens: Array, ids_restore: Array, view_mask: Array,
               noisy_images: Array) -> Array:
    del view_mask
    K = self._check(tokens, ids_restore)
    B, V = tokens.shape[:2]
    M = self.num_patches - K
    pos = self._pos()
    x = self._embed(tokens)
    ids_shuffle = jnp.argsort(ids_restore, axis=-1)  # (B, V, L): kept ids, then masked ids
    ids_keep, ids_masked = ids_shuffle[..., :K], ids_shuffle[..., K:]
    context = jnp.concatenate([x[:, :, :1] + pos[0], x[:, :, 1:] + pos[1 + ids_keep]], axis=2)
    noisy = self._noisy_tokens(noisy_images)
    q = jnp.take_along_axis(noisy, ids_masked[..., None], axis=2) + pos[1 + ids_masked]
    q, context = q.reshape(B * V, M, self.hidden), context.reshape(B * V, K + 1, self.hidden)
    for i in range(max(self.depth // 2, 1)):
      q = CrossSelfLayer(self.hidden, self.heads, self.mlp, self.layer_norm_eps, self.dtype,
                         name=f"layer_{i}")(q, context)
    pred = self._predict(q).reshape(B, V, M, -1)  # (B, V, L - K, P) in shuffled-masked order
    zeros = jnp.zeros((B, V, K, pred.shape[-1]), pred.dtype)
    return _unshuffle(jnp.concatenate([zeros, pred], axis=2), ids_restore)
