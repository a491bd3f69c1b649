"""RadDiffusion's multi-view ViT encoder (spec raygen_and_raddiffusion.md D.1, D.3, D.4, D.9).

One set of ViT-MAE weights runs over every view of a study; after every layer each view's [CLS]
token is replaced by the mean [CLS] of the study's present views (the "bottleneck-cls", D.4), the
only channel through which views exchange information. With one view per study and the bottleneck
off, ``StudyEncoder`` is exactly Hugging Face's ``ViTMAEModel`` encoder (tests/test_vit.py checks
last_hidden_state against transformers with the same pixels and masking noise).

Shapes: B studies, V views (padded; ``view_mask`` says which exist), H = W = image_size, C channels,
p patch, g = image_size // p patches per side, L = g * g patches, K kept patches (all L without
masking), T = 1 + K tokens (the [CLS] first), D hidden.

Layout choices:
- Images are NHWC per view, (B, V, H, W, C); patches are numbered row-major (index r * g + c),
  as HF's conv + flatten numbers them.
- The layer stack is a Python loop over ``layer_{i}`` submodules (not nn.scan): depth is at most 12,
  each layer is a separately named subtree (so the converter is a renaming), and the per-layer
  states are easy to ``sow`` (collection 'intermediates', name 'layer_outputs', (B, V, T, D) each).
- The residual stream stays float32; ``dtype`` is the compute dtype of the dense layers and the
  patch convolution (bfloat16 on GPU); LayerNorm statistics and the softmax run in float32.
- Padded views are computed like real ones (fixed shapes) but enter the study mean through
  ``jnp.where``, so their values never reach present views. Pad with finite values (zeros): a NaN
  in a padded view would not change the forward pass, but would poison weight gradients.
- The layers are ``models/transformer_layers.py``'s, shared with the pretraining decoders
  (models/mae_decoders.py, which also use ``bottleneck_cls``), so encoder and decoders have one
  layer, one LayerNorm eps (``LAYER_NORM_EPS``) and one dtype policy.

Initialisation follows HF post_init (D.3): Dense kernels and the patch convolution N(0, 0.02),
biases 0, LayerNorm 1 / 0, ``cls_token`` N(0, 0.02). HF's constructor also draws the patch
convolution xavier-uniform (as a flattened Linear), which post_init likely overwrites in
transformers 4.30 (the spec marks this as ambiguous); we use N(0, 0.02).
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cxrjax.models.transformer_layers import INIT_STD, LAYER_NORM_EPS, Dtype, ViTLayer, layer_norm

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ViTSize:
  """One row of the D.3 table (HF ``ViTMAEConfig`` JSONs of RadDiffusion), encoder and decoder."""
  patch_size: int
  hidden: int
  depth: int
  heads: int
  mlp: int
  mask_ratio: float
  decoder_hidden: int
  decoder_depth: int
  decoder_heads: int
  decoder_mlp: int
  image_size: int = 256
  channels: int = 1
  layer_norm_eps: float = LAYER_NORM_EPS

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid * self.grid

  @property
  def head_dim(self) -> int:
    return self.hidden // self.heads


VIT_SIZES = {
    "xs": ViTSize(32, 256, 6, 8, 1024, 0.5, 128, 2, 4, 512),  # the default, README results
    "s": ViTSize(32, 768, 6, 12, 3072, 0.75, 512, 4, 16, 2048),
    "b": ViTSize(16, 768, 12, 12, 3072, 0.5, 512, 8, 16, 2048),
}


def vit_size(size: str) -> ViTSize:
  if size not in VIT_SIZES:
    raise ValueError(f"unknown ViT size {size!r}; expected one of {sorted(VIT_SIZES)}")
  return VIT_SIZES[size]


# ----------------------------------------------------------------------------- constants, masking
def sincos_2d(dim: int, grid: int) -> np.ndarray:
  """Fixed 2-D sin-cos position table: (grid * grid + 1, dim) float32 numpy, row 0 (the CLS) zeros.

  Row 1 + r * grid + c is patch (row r, column c). The first dim/2 entries encode the column c,
  the second dim/2 the row r; each half is [sin(pos * w_k)]_k ++ [cos(pos * w_k)]_k with
  w_k = 10000^(-k / (dim / 4)), k < dim / 4. This is the table HF ViT-MAE stores (its
  ``get_2d_sincos_pos_embed`` in 4.x; in 5.x ``build_2d_sinusoidal_position_embedding`` with the
  two halves swapped back). Computed in float64, rounded once, as HF does.
  """
  if dim % 4:
    raise ValueError(f"the sin-cos table needs a width divisible by 4, got {dim}")
  omega = 1.0 / 10000.0 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
  col = np.tile(np.arange(grid, dtype=np.float64), grid)  # row-major patch order
  row = np.repeat(np.arange(grid, dtype=np.float64), grid)

  def encode(pos):
    out = np.outer(pos, omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  table = np.concatenate([encode(col), encode(row)], axis=1)
  return np.concatenate([np.zeros((1, dim)), table], axis=0).astype(np.float32)


def num_kept(num_patches: int, mask_ratio: float) -> int:
  """K = int(L * (1 - mask_ratio)), HF's ``len_keep`` (Python float arithmetic, truncated)."""
  if not 0.0 <= mask_ratio < 1.0:
    raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
  return int(num_patches * (1 - mask_ratio))


def masking_from_noise(noise: Array, mask_ratio: float) -> tuple[Array, Array, Array]:
  """HF ViT-MAE ``random_masking`` given its noise (..., L) float.

  Patches are shuffled by ascending noise and the first K = ``num_kept(L, mask_ratio)`` kept.
  Returns ids_keep (..., K) int32 (kept patch indices, in shuffle order, the order the encoder
  sees them), mask (..., L) float32 (0 kept, 1 removed, original patch order) and ids_restore
  (..., L) int32 (the inverse permutation of the shuffle; the decoder unshuffles with it).
  """
  noise = jnp.asarray(noise)
  k = num_kept(noise.shape[-1], mask_ratio)
  ids_shuffle = jnp.argsort(noise, axis=-1).astype(jnp.int32)
  ids_restore = jnp.argsort(ids_shuffle, axis=-1).astype(jnp.int32)
  # HF: ones, zero the first K in shuffle order, unshuffle; a patch is removed iff its shuffle
  # position (= ids_restore) is >= K.
  mask = (ids_restore >= k).astype(jnp.float32)
  return ids_shuffle[..., :k], mask, ids_restore


def random_masking(key: Array, shape_prefix: tuple[int, ...], num_patches: int,
                   mask_ratio: float) -> tuple[Array, Array, Array]:
  """Independent per-image masks: noise U(0, 1) of shape (*shape_prefix, L), then
  ``masking_from_noise``. With shape_prefix (B, V), ids_keep (B, V, K) feeds ``StudyEncoder``."""
  noise = jax.random.uniform(key, (*shape_prefix, num_patches), jnp.float32)
  return masking_from_noise(noise, mask_ratio)


def study_mean(x: Array, view_mask: Array) -> Array:
  """Mean over the present views: x (B, V, D), view_mask (B, V) bool -> (B, D) float32.

  ``where`` rather than a multiply so that whatever an absent view holds adds exactly 0. A study
  with no present view gets zeros.
  """
  total = jnp.sum(jnp.where(view_mask[..., None], x.astype(jnp.float32), 0.0), axis=1)
  count = jnp.maximum(jnp.sum(view_mask, axis=1), 1).astype(jnp.float32)
  return total / count[:, None]


def bottleneck_cls(h: Array, view_mask: Array) -> Array:
  """The bottleneck-cls step (D.4): h (B, V, T, D) float32 -> (B, V, T, D), every view's token 0
  replaced by ``study_mean`` of the present views' token 0 (view_mask (B, V) bool).

  Absent views receive the mean too (harmless: nothing reads them back). Encoder and decoders
  call this after each of their layers.
  """
  b, v, _, d = h.shape
  shared = study_mean(h[:, :, 0], view_mask).astype(h.dtype)  # (B, D)
  # An in-place update of token 0, not a concatenate: no copy of the (B, V, T, D) stream per layer.
  return h.at[:, :, 0].set(jnp.broadcast_to(shared[:, None], (b, v, d)))


# ----------------------------------------------------------------------------- layers
class PatchEmbed(nn.Module):
  """The patch convolution (kernel = stride = patch) applied to patches already cut out:
  (N, K, p * p * C) float, each patch flattened as (p_row, p_col, C) -> (N, K, features) in dtype.

  Params as ``nn.Conv`` holds them, drawn in its order (kernel (p, p, C, features) N(0, 0.02), then
  bias zeros), so initialisation and checkpoints are the convolution's. On cut-out patches it is
  one GEMM, and only the patches given (the kept ones) cost anything.
  """
  features: int
  patch_size: int
  channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, patches: Array) -> Array:
    p, c = self.patch_size, self.channels
    kernel = self.param("kernel", nn.initializers.normal(INIT_STD), (p, p, c, self.features),
                        jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    x = patches.astype(self.dtype) @ kernel.reshape(p * p * c, self.features).astype(self.dtype)
    return x + bias.astype(self.dtype)


class StudyEncoder(nn.Module):
  """The bottleneck-cls ViT over a study's views (D.3, D.4).

  __call__(images, view_mask=None, ids_keep=None) -> (tokens, aux)
    images: (B, V, H, W, C) float, H = W = image_size, C = channels.
    view_mask: (B, V) bool, which views exist (None: all). Absent views are computed but never
      influence present views or any output of the study.
    ids_keep: (B, V, K) int32 kept patch indices per view (``random_masking``), or None for no
      masking (all L patches, in row-major order).
    tokens: (B, V, 1 + K, D) float32 after the final LayerNorm; token 0 is the [CLS].
    aux['cls_pre_ln']: (B, D) float32, the study's [CLS] before the final LayerNorm (the linear
      probe's features, D.7.2; one per study, so the seed's wrong-study index cannot happen).
    aux['cls']: (B, D) float32, the study's [CLS] after the final LayerNorm (the fine-tuning head's
      input, D.7.3).
    Both are means over the present views: with the bottleneck every present view carries the same
    [CLS], so this is that vector (up to rounding); without it, the mean of the per-view [CLS].

  Embedding: conv (kernel = stride = patch) -> + fixed sin-cos positions (``sincos_2d``, a
  constant, not a parameter) -> keep ``ids_keep`` -> prepend ``cls_token`` + pos[0]; computed as
  one GEMM on the kept patches only (the same sums). Then ``depth``
  ``ViTLayer``s; with ``bottleneck`` each view's [CLS] is replaced after EVERY layer by the mean
  [CLS] of the study's present views (also written into absent views, harmlessly); then the final
  LayerNorm ``layernorm``. Params: ``patch_embed`` {kernel (p, p, C, D), bias (D,)}, ``cls_token``
  (D,), ``layer_{i}``, ``layernorm``.
  """
  patch_size: int = 32
  hidden: int = 256
  depth: int = 6
  heads: int = 8
  mlp: int = 1024
  image_size: int = 256
  channels: int = 1
  bottleneck: bool = True
  dtype: Dtype = jnp.float32
  layer_norm_eps: float = LAYER_NORM_EPS

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @nn.compact
  def __call__(self, images: Array, view_mask: Array | None = None,
               ids_keep: Array | None = None) -> tuple[Array, dict]:
    if images.ndim != 5:
      raise ValueError(f"StudyEncoder expects (B, V, H, W, C) images, got shape {images.shape}")
    b, v, hgt, wid, c = images.shape
    if (hgt, wid, c) != (self.image_size, self.image_size, self.channels):
      raise ValueError(f"StudyEncoder built for {self.image_size}x{self.image_size}x"
                       f"{self.channels} views, got {hgt}x{wid}x{c}")
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size "
                       f"{self.patch_size}")
    view_mask = (jnp.ones((b, v), bool) if view_mask is None
                 else jnp.asarray(view_mask).astype(bool))
    if view_mask.shape != (b, v):
      raise ValueError(f"view_mask must be (B, V) = {(b, v)}, got {view_mask.shape}")
    n, d, p = b * v, self.hidden, self.patch_size
    pos = jnp.asarray(sincos_2d(d, self.image_size // p))  # (L + 1, D)

    # The patch convolution (kernel = stride = p) as one GEMM on the kept patches only: the same
    # sums as HF's conv over every patch followed by the gather, at 1 - mask_ratio of the cost,
    # and no convolution kernel gradient (XLA:CPU transposes the whole image batch for it).
    g = self.image_size // p
    patches = images.reshape(n, g, p, g, p, c).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(n, self.num_patches, p * p * c)  # row-major, each (p_row, p_col, C)
    positions = pos[1:]  # (L, D), the same for every view
    if ids_keep is not None:
      if ids_keep.ndim != 3 or ids_keep.shape[:2] != (b, v):
        raise ValueError(f"ids_keep must be (B, V, K) with (B, V) = {(b, v)}, got "
                         f"{ids_keep.shape}")
      idx = ids_keep.reshape(n, ids_keep.shape[-1]).astype(jnp.int32)
      patches = jnp.take_along_axis(patches, idx[..., None], axis=1)
      positions = jnp.take(positions, idx, axis=0)  # (N, K, D) rows of the constant table
    x = PatchEmbed(d, p, c, self.dtype, name="patch_embed")(patches)
    tokens = x.astype(jnp.float32) + positions
    cls = self.param("cls_token", nn.initializers.normal(INIT_STD), (d,), jnp.float32) + pos[0]
    h = jnp.concatenate([jnp.broadcast_to(cls, (n, 1, d)), tokens], axis=1)  # (N, T, D)
    t = h.shape[1]

    for i in range(self.depth):
      h = ViTLayer(d, self.heads, self.mlp, self.layer_norm_eps, self.dtype, name=f"layer_{i}")(h)
      h = h.reshape(b, v, t, d)
      if self.bottleneck:
        # After the whole layer (attention + MLP), as the seed's ViTMAEBottleneckLayer does.
        h = bottleneck_cls(h, view_mask)
      self.sow("intermediates", "layer_outputs", h)
      h = h.reshape(n, t, d)

    cls_pre_ln = study_mean(h.reshape(b, v, t, d)[:, :, 0], view_mask)
    out = layer_norm(self.layer_norm_eps, "layernorm")(h).reshape(b, v, t, d)
    return out, {"cls_pre_ln": cls_pre_ln, "cls": study_mean(out[:, :, 0], view_mask)}


def study_encoder(size: str, **overrides) -> StudyEncoder:
  """``StudyEncoder`` with the fields of ``VIT_SIZES[size]`` ('xs', 's', 'b'); overrides win
  (e.g. bottleneck=False, dtype=jnp.bfloat16)."""
  s = vit_size(size)
  fields = dict(patch_size=s.patch_size, hidden=s.hidden, depth=s.depth, heads=s.heads,
                mlp=s.mlp, image_size=s.image_size, channels=s.channels,
                layer_norm_eps=s.layer_norm_eps)
  return StudyEncoder(**{**fields, **overrides})


def flops_per_view(size: str | ViTSize, mask_ratio: float | None = None) -> int:
  """Forward FLOPs (2 x MACs) of the encoder on one view: the patch convolution over all L
  patches, then ``depth`` layers over T = 1 + K tokens (q/k/v/out projections, the two attention
  products, the MLP). mask_ratio: None = the size's own; 0 = no masking. Norms, softmax and the
  bottleneck mean are not counted. A training step costs about 3x.
  """
  s = vit_size(size) if isinstance(size, str) else size
  r = s.mask_ratio if mask_ratio is None else mask_ratio
  t = 1 + num_kept(s.num_patches, r)
  embed = s.num_patches * s.patch_size ** 2 * s.channels * s.hidden
  layer = t * 4 * s.hidden ** 2 + 2 * t * t * s.hidden + 2 * t * s.hidden * s.mlp
  return 2 * (embed + s.depth * layer)
