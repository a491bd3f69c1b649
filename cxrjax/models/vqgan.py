"""The VQ-GAN image tokenizer of RayGen: taming-transformers' ``VQModel`` as UniXGen configures it
(spec raygen_and_raddiffusion.md §C.3), in Flax linen.

Encoder: conv_in -> per level ``num_res_blocks`` ResBlocks (each followed by self-attention when the
level's nominal resolution is in ``attn_resolutions``) and a stride-2 downsample except at the last
level -> mid (ResBlock, attention, ResBlock) -> GroupNorm -> swish -> conv_out to ``z_channels``.
Then a 1x1 ``quant_conv`` to ``embed_dim``, nearest-neighbour vector quantisation against an
``n_embed`` x ``embed_dim`` codebook with the straight-through estimator, a 1x1 ``post_quant_conv``
and the decoder: conv_in -> mid -> levels from coarse to fine with ``num_res_blocks + 1`` ResBlocks
(and attention where listed), a nearest x2 upsample + 3x3 conv except at the finest level ->
GroupNorm -> swish -> conv_out. No tanh: the decoder's raw output is the reconstruction (clamping
to [-1, 1] is the caller's, as UniXGen's decode wrapper does).

The defaults are UniXGen's 512-px tokenizer (ch 128, ch_mult (1,1,2,2,4), 2 res blocks, attention
only in the mid blocks, z = embed = 256, 1024 codes): images (B, 512, 512, 3) in [-1, 1] become
(B, 32, 32) codes. Every size is a field, so a small variant for a CPU (ch 32-64, ch_mult
(1,2,2,4), 128 px, 512 codes) is the same code with other numbers.

Layout NHWC. Parameters float32; ``dtype`` is the compute dtype of the encoder and decoder; the
quantiser always runs in float32 (the argmin decides the codes).

Module and parameter names follow taming's state dict, so ``vqgan_convert`` is a renaming:
``encoder/down_{i}/block_{j}/{norm1,conv1,norm2,conv2,nin_shortcut}``,
``encoder/down_{i}/attn_{j}/{norm,q,k,v,proj_out}``,
``encoder/down_{i}/downsample/conv``, ``encoder/mid/{block_1,attn_1,block_2}``,
``decoder/up_{i}/...`` with taming's level index (``up_{n-1}`` is the coarsest and runs first),
``quant_conv``, ``quantize/embedding``, ``post_quant_conv``.

Initialisation is PyTorch's default (convs U(+-1/sqrt(fan_in)) for weight and bias, GroupNorm 1/0)
and the codebook U(-1/n_embed, 1/n_embed), as taming trains from.
"""
from __future__ import annotations

from typing import Any, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cxrjax.models.prior_layers import torch_bias_init

Array = jax.Array
Dtype = Any

# Where the decoder's final conv kernel sits in params: taming's adaptive GAN weight takes
# gradients of the reconstruction and adversarial losses with respect to it.
LAST_LAYER = ("decoder", "conv_out", "kernel")

# torch Conv2d's default kernel init, kaiming-uniform(a=sqrt 5) == U(+-1/sqrt(fan_in)).
torch_conv_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def _conv(in_features: int, features: int, kernel: int = 3, stride: int = 1, padding=1,
          dtype: Dtype = jnp.float32, name: str | None = None) -> nn.Conv:
  """torch Conv2d(in, out, kernel, stride, padding) with its default init, NHWC."""
  pad = [(padding, padding)] * 2 if isinstance(padding, int) else padding
  return nn.Conv(features, (kernel, kernel), strides=stride, padding=pad, dtype=dtype,
                 param_dtype=jnp.float32, kernel_init=torch_conv_init,
                 bias_init=torch_bias_init(in_features * kernel * kernel), name=name)


def _norm(groups: int, dtype: Dtype, name: str) -> nn.GroupNorm:
  # Two-pass variance: E[x^2] - E[x]^2 loses digits on large activations and breaks torch parity.
  return nn.GroupNorm(num_groups=groups, epsilon=1e-6, use_fast_variance=False, dtype=dtype,
                      name=name)


def swish(x: Array) -> Array:
  return x * jax.nn.sigmoid(x)


class ResBlock(nn.Module):
  """GN -> swish -> conv3 -> GN -> swish -> conv3, plus x (or a 1x1 'nin_shortcut' of x when the
  width changes): (B, H, W, C) -> (B, H, W, features). taming's dropout (0.0 here) is left out."""
  features: int
  groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    h = _conv(c, self.features, dtype=self.dtype, name="conv1")(
        swish(_norm(self.groups, self.dtype, "norm1")(x)))
    h = _conv(self.features, self.features, dtype=self.dtype, name="conv2")(
        swish(_norm(self.groups, self.dtype, "norm2")(h)))
    if c != self.features:
      x = _conv(c, self.features, 1, padding=0, dtype=self.dtype, name="nin_shortcut")(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head self-attention over the H*W positions, residual: (B, H, W, C) -> same.
  GN -> 1x1 q, k, v -> softmax(q k^T / sqrt(C)) v -> 1x1 proj_out."""
  groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    B, H, W, C = x.shape
    h = _norm(self.groups, self.dtype, "norm")(x)
    q, k, v = (_conv(C, C, 1, padding=0, dtype=self.dtype, name=n)(h).reshape(B, H * W, C)
               for n in ("q", "k", "v"))
    logits = jnp.einsum("bqc,bkc->bqk", q, k).astype(jnp.float32) * C ** -0.5
    w = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bqk,bkc->bqc", w, v).reshape(B, H, W, C)
    return x + _conv(C, C, 1, padding=0, dtype=self.dtype, name="proj_out")(out)


class Resample(nn.Module):
  """'down': zero-pad right/bottom by 1, 3x3 conv stride 2 (B, H, W, C) -> (B, H/2, W/2, C);
  'up': nearest x2 then 3x3 conv, (B, H, W, C) -> (B, 2H, 2W, C). The conv is named 'conv'."""
  kind: str
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    if self.kind == "down":
      return _conv(c, c, 3, 2, ((0, 1), (0, 1)), self.dtype, "conv")(x)
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return _conv(c, c, dtype=self.dtype, name="conv")(x)


class Level(nn.Module):
  """One resolution level: `num_blocks` ResBlocks 'block_{j}' to `features` channels, each followed
  by 'attn_{j}' when `attention`, then an optional Resample (`resample` 'down' / 'up' / None)."""
  features: int
  num_blocks: int
  attention: bool
  resample: str | None
  groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h: Array) -> Array:
    for j in range(self.num_blocks):
      h = ResBlock(self.features, self.groups, self.dtype, name=f"block_{j}")(h)
      if self.attention:
        h = AttnBlock(self.groups, self.dtype, name=f"attn_{j}")(h)
    if self.resample is not None:
      h = Resample(self.resample, self.dtype, name="downsample" if self.resample == "down"
                   else "upsample")(h)
    return h


class MidBlock(nn.Module):
  """ResBlock 'block_1' -> AttnBlock 'attn_1' -> ResBlock 'block_2', width kept."""
  groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h: Array) -> Array:
    c = h.shape[-1]
    h = ResBlock(c, self.groups, self.dtype, name="block_1")(h)
    h = AttnBlock(self.groups, self.dtype, name="attn_1")(h)
    return ResBlock(c, self.groups, self.dtype, name="block_2")(h)


def _has_attention(resolution: int, level: int, attn_resolutions: Sequence[int]) -> bool:
  # taming decides from the configured resolution, not the input's: UniXGen's [24] matches no level.
  return resolution // 2 ** level in tuple(attn_resolutions)


class _Pyramid(nn.Module):
  """The fields the encoder and the decoder share: level i has ch * ch_mult[i] channels;
  resolution is the nominal image side ``attn_resolutions`` refers to (taming's ``resolution``),
  and level i has attention when resolution // 2**i is listed."""
  ch: int = 128
  ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = ()
  resolution: int = 512
  norm_groups: int = 32
  dtype: Dtype = jnp.float32


class Encoder(_Pyramid):
  """Images (B, H, W, in_channels) -> features (B, H/f, W/f, z_channels), f = 2**(len(ch_mult)-1).
  Inputs of any multiple of f run."""
  z_channels: int = 256

  @nn.compact
  def __call__(self, x: Array) -> Array:
    n = len(self.ch_mult)
    h = _conv(x.shape[-1], self.ch, dtype=self.dtype, name="conv_in")(x.astype(self.dtype))
    for i, mult in enumerate(self.ch_mult):
      h = Level(self.ch * mult, self.num_res_blocks,
                _has_attention(self.resolution, i, self.attn_resolutions),
                "down" if i != n - 1 else None, self.norm_groups, self.dtype, name=f"down_{i}")(h)
    h = MidBlock(self.norm_groups, self.dtype, name="mid")(h)
    h = swish(_norm(self.norm_groups, self.dtype, "norm_out")(h))
    return _conv(h.shape[-1], self.z_channels, dtype=self.dtype, name="conv_out")(h)


class Decoder(_Pyramid):
  """Latents (B, h, w, z_channels) -> images (B, h*f, w*f, out_channels), no output activation.

  Levels run coarse to fine; level i (taming's ``up[i]``) has num_res_blocks + 1 ResBlocks of
  ch * ch_mult[i] channels and upsamples unless i == 0.
  """
  out_channels: int = 3

  @nn.compact
  def __call__(self, z: Array) -> Array:
    n = len(self.ch_mult)
    h = _conv(z.shape[-1], self.ch * self.ch_mult[-1], dtype=self.dtype, name="conv_in")(
        z.astype(self.dtype))
    h = MidBlock(self.norm_groups, self.dtype, name="mid")(h)
    for i in reversed(range(n)):
      h = Level(self.ch * self.ch_mult[i], self.num_res_blocks + 1,
                _has_attention(self.resolution, i, self.attn_resolutions),
                "up" if i != 0 else None, self.norm_groups, self.dtype, name=f"up_{i}")(h)
    h = swish(_norm(self.norm_groups, self.dtype, "norm_out")(h))
    return _conv(h.shape[-1], self.out_channels, dtype=self.dtype, name="conv_out")(h)


def quantizer_loss(z: Array, z_q: Array, beta: float = 0.25, legacy: bool = True) -> Array:
  """taming's VectorQuantizer2 loss, a scalar, for features z and their codes z_q (same shape).

  commitment = mean((sg[z_q] - z)^2) moves the encoder, codebook = mean((z_q - sg[z])^2) moves
  the codes. legacy=True (taming's default, UniXGen's setting): commitment + beta * codebook, so
  beta scales the codebook term; legacy=False: beta * commitment + codebook (the VQ-VAE paper).
  """
  sg = jax.lax.stop_gradient
  commitment = jnp.mean(jnp.square(sg(z_q) - z))
  codebook = jnp.mean(jnp.square(z_q - sg(z)))
  return commitment + beta * codebook if legacy else beta * commitment + codebook


class VectorQuantizer(nn.Module):
  """Nearest-neighbour quantisation against an (n_embed, embed_dim) codebook 'embedding'.

  __call__(z (..., embed_dim)) -> (z_q (..., embed_dim) with the straight-through gradient, aux):
    aux['codebook_loss']  scalar, ``quantizer_loss(z, codes, beta, legacy)``
    aux['indices']        (...) int32, argmin of the squared L2 distance (first index on ties)
    aux['distances']      (..., n_embed) float32 squared distances (the entropy loss reads them)
  """
  n_embed: int = 1024
  embed_dim: int = 256
  beta: float = 0.25
  legacy: bool = True

  def setup(self):
    bound = 1.0 / self.n_embed
    self.embedding = self.param(
        "embedding", lambda key, shape: jax.random.uniform(key, shape, jnp.float32, -bound, bound),
        (self.n_embed, self.embed_dim))

  def distances(self, z: Array) -> Array:
    """(..., embed_dim) -> (..., n_embed) squared L2 distances to every code, float32."""
    z = z.astype(jnp.float32)
    e = self.embedding
    # Full float32 matmul: TF32 on a GPU would flip near ties in the argmin that picks the codes.
    ze = jnp.einsum("...d,nd->...n", z, e, precision=jax.lax.Precision.HIGHEST)
    return jnp.sum(z * z, -1, keepdims=True) + jnp.sum(e * e, -1) - 2 * ze

  def lookup(self, indices: Array) -> Array:
    """(...) int codes -> (..., embed_dim) codebook vectors."""
    return jnp.take(self.embedding, indices, axis=0)

  def __call__(self, z: Array) -> tuple[Array, dict]:
    z = z.astype(jnp.float32)
    d = self.distances(z)
    indices = jnp.argmin(d, axis=-1).astype(jnp.int32)
    codes = self.lookup(indices)
    loss = quantizer_loss(z, codes, self.beta, self.legacy)
    z_q = z + jax.lax.stop_gradient(codes - z)
    return z_q, {"codebook_loss": loss, "indices": indices, "distances": d}


class VQGAN(nn.Module):
  """taming's VQModel: images (B, H, W, in_channels), H and W multiples of ``factor``.

  __call__(images) -> (reconstruction (B, H, W, out_channels) float32, aux) with aux from
    ``VectorQuantizer`` ('codebook_loss', 'indices' (B, H/f, W/f), 'distances' (B, H/f, W/f,
    n_embed)) plus 'z' (B, H/f, W/f, embed_dim), the pre-quantisation features.
  encode(images) -> indices (B, H/f, W/f) int32; decode_indices(indices) -> images;
  encode_features(images) -> z; decode(z_q) -> images.
  The final decoder kernel sits at ``params[VQGAN.LAST_LAYER]`` (see ``last_layer``).
  """
  LAST_LAYER: ClassVar[tuple[str, ...]] = LAST_LAYER

  ch: int = 128
  ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = ()
  resolution: int = 512
  z_channels: int = 256
  embed_dim: int = 256
  n_embed: int = 1024
  in_channels: int = 3
  out_channels: int = 3
  beta: float = 0.25
  legacy: bool = True
  norm_groups: int = 32
  dtype: Dtype = jnp.float32

  @property
  def factor(self) -> int:
    """The downsampling factor: image side / code-grid side."""
    return 2 ** (len(self.ch_mult) - 1)

  def setup(self):
    common = dict(ch=self.ch, ch_mult=tuple(self.ch_mult), num_res_blocks=self.num_res_blocks,
                  attn_resolutions=tuple(self.attn_resolutions), resolution=self.resolution,
                  norm_groups=self.norm_groups, dtype=self.dtype)
    self.encoder = Encoder(z_channels=self.z_channels, **common)
    self.quant_conv = _conv(self.z_channels, self.embed_dim, 1, padding=0, dtype=self.dtype)
    self.quantize = VectorQuantizer(self.n_embed, self.embed_dim, self.beta, self.legacy)
    self.post_quant_conv = _conv(self.embed_dim, self.z_channels, 1, padding=0, dtype=self.dtype)
    self.decoder = Decoder(out_channels=self.out_channels, **common)

  def _check(self, images: Array) -> None:
    if images.ndim != 4 or images.shape[-1] != self.in_channels:
      raise ValueError(f"VQGAN expects NHWC images (B, H, W, {self.in_channels}), got shape "
                       f"{tuple(images.shape)}")
    H, W = images.shape[1:3]
    if H % self.factor or W % self.factor:
      raise ValueError(f"image side {H}x{W} is not a multiple of the VQGAN's downsampling factor "
                       f"{self.factor} (2**(len(ch_mult)-1)); resize or crop the images")

  def encode_features(self, images: Array) -> Array:
    """(B, H, W, in_channels) -> z (B, H/f, W/f, embed_dim) float32, before quantisation."""
    self._check(images)
    return self.quant_conv(self.encoder(images)).astype(jnp.float32)

  def encode(self, images: Array) -> Array:
    """(B, H, W, in_channels) -> code indices (B, H/f, W/f) int32."""
    return self.quantize(self.encode_features(images))[1]["indices"]

  def decode(self, z_q: Array) -> Array:
    """Quantised features (B, h, w, embed_dim) -> raw decoder output (B, h*f, w*f, out) float32."""
    return self.decoder(self.post_quant_conv(z_q.astype(self.dtype))).astype(jnp.float32)

  def decode_indices(self, indices: Array) -> Array:
    """Code indices (B, h, w) -> raw decoder output (B, h*f, w*f, out_channels), not clamped."""
    return self.decode(self.quantize.lookup(indices))

  def __call__(self, images: Array) -> tuple[Array, dict]:
    z = self.encode_features(images)
    z_q, aux = self.quantize(z)
    return self.decode(z_q), {**aux, "z": z}


def last_layer(params) -> Array:
  """The decoder's final conv kernel (3, 3, C, out_channels) in a VQGAN's params."""
  node = params
  for k in LAST_LAYER:
    node = node[k]
  return node


def with_last_layer(params, kernel: Array):
  """A copy of a VQGAN's params with the decoder's final conv kernel replaced (the rest shared).

  For the adaptive GAN weight: ``recon, vjp = jax.vjp(lambda k: model.apply({'params':
  with_last_layer(params, k)}, x)[0], last_layer(params))`` gives vjp(d loss / d recon) = d loss /
  d kernel for each loss term, through the last conv only.
  """
  def replace(node, path):
    if not path:
      return kernel
    return {**node, path[0]: replace(node[path[0]], path[1:])}
  return replace(params, LAST_LAYER)
