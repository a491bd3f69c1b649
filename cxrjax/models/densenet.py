"""DenseNet-121 / DenseNet-169 (Huang et al. 2017) in Flax linen, as torchvision builds them.

Stem: 7x7/2 conv (no bias) -> BN -> ReLU -> 3x3/2 max pool. Then dense blocks of ``DenseLayer``s
(BN -> ReLU -> 1x1 conv to bn_size*growth -> BN -> ReLU -> 3x3 conv to growth; each layer sees
every earlier feature map of its block), separated by transitions (BN -> ReLU -> 1x1 conv to half
the channels -> 2x2/2 average pool; run here with the pool first, see below). Head: BN -> ReLU ->
global average pool -> linear.
DenseNet-121 pools 1024 features, DenseNet-169 1664 (spec prior_and_fmkd.md B.2).

Module and parameter names follow torchvision's state dict (``conv0``, ``norm0``,
``denseblock1/denselayer1/{norm1,conv1,norm2,conv2}``, ``transition1/{norm,conv}``, ``norm5``,
``classifier``) so that ``densenet_convert`` is a renaming plus transposes.

Batch norm has PyTorch's semantics (momentum 0.1 == Flax 0.9, eps 1e-5, running variance updated
with the unbiased batch variance, normalisation with the biased one), so converted weights and
train-mode updates match torch. Shapes: NHWC inputs (B, H, W, C), C = 1 (torchxrayvision) or 3
(ImageNet). Params are float32; ``dtype`` is the compute dtype of convolutions and activations
(bfloat16 on GPU); batch statistics and the logits are float32.

Dense-block memory traffic: the textbook layer concatenates all earlier maps again in every layer
(``concat='concat'``, the default), rewriting O(L^2) channels per block. ``concat='buffer'``
allocates the block's final (B, H, W, C_out) buffer once and writes each layer's ``growth`` new
channels into it with ``lax.dynamic_update_slice`` (in place), each layer reading the channel
prefix it needs. Both give the same numbers (tests check it), but the buffer brought no gain on
XLA CPU (benchmarks/densenet_step.py, DenseNet-121 train step, batch 16, shared 2-core machine,
with nn.Conv for the 1x1 convolutions: 224x224 6.9 vs 7.0 s/step and 6.8 vs 6.7 CPU-s/step;
112x112 2.0 vs 1.4 s/step): the forward saves the copies, but autodiff turns each prefix read into
a pad to the full block width plus an add.

1x1 convolutions (most of DenseNet's FLOPs) run as matmuls (``PointwiseConv``): XLA CPU
differentiates a dot much faster than a 1x1 convolution. Train step, same machine, the two
variants alternating in one process: 5.7 vs 6.7 CPU-s/step, 3.3-3.5 vs 4.2 s/step wall.

Fusion barriers (``fusion_barriers``, on by default on CPU): left alone, XLA CPU fuses cheap
elementwise producers into every consumer, so each dense layer's batch-norm backward -- and, for
a concatenation slice, the chain of all later layers' batch-norm backwards -- is recomputed inside
the transposes and copies that feed the weight-gradient convolutions and dots. ``fusion_barrier``
stops that at four places per layer (see ``DenseLayer`` and ``DenseBlock``), so each of those
values is computed once and read. Train step, DenseNet-121, batch 16, 224 px, 2-core AVX-512
machine: 2.9 -> 2.1 s/step with the pooled transitions below (benchmarks/RESULTS.md); all three
changes here together: 1.9 s/step, 3-5 % faster than torch's 2.0 there.

Shared batch moments: the first norm of every layer in a block normalises the concatenation of
all earlier maps with its own scale and bias but the same per-channel batch statistics, so the
block computes each map's mean and variance once instead of once per later layer (O(L) instead
of O(L^2) reductions). Same machine and step: 2.09 -> 1.81-1.91 s/step.

Transitions average-pool before their 1x1 convolution (torchvision convolves first). Both are
linear per pixel, so the result is the same up to float rounding, and the convolution runs on a
quarter of the pixels: 8% of DenseNet-121's FLOPs saved.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cxrjax.models.densenet_ops import (avg_pool_2x2, barrier_predicate, fusion_barrier,
                                        max_pool_3x3_s2, use_fusion_barriers)

Array = jax.Array
Dtype = Any

BLOCK_CONFIGS = {121: (6, 12, 24, 16), 169: (6, 12, 32, 32)}
CONCAT_MODES = ("concat", "buffer")

# torchvision: nn.init.kaiming_normal_(conv.weight) == N(0, 2 / fan_in), untruncated.
conv_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def torch_linear_init(key, shape, dtype=jnp.float32):
  """PyTorch nn.Linear default kernel init U(+-1/sqrt(fan_in)); flax kernels are (fan_in, out)."""
  bound = 1.0 / math.sqrt(shape[0])
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def moments(x: Array) -> tuple[Array, Array]:
  """Per-channel batch mean and biased variance of (..., C) over all other axes: two (C,) float32.

  Two-pass (the mean first), which stays accurate for raw 0..255 inputs where E[x^2] - E[x]^2
  would cancel.
  """
  xf = x.astype(jnp.float32)
  axes = tuple(range(x.ndim - 1))
  mean = jnp.mean(xf, axis=axes)
  return mean, jnp.mean(jnp.square(xf - mean), axis=axes)


class BatchNorm(nn.Module):
  """PyTorch-semantics BatchNorm1d/2d over the last axis, optionally followed by ReLU:
  (..., C) -> same shape, `dtype`. Shared by DenseNet (``BatchNormReLU``) and models.resnet.

  Params 'scale' and 'bias' (C,), batch_stats 'mean' and 'var' (C,), all float32. In train mode
  the batch mean and biased variance over all axes but the last normalise, and the running stats
  move to momentum * old + (1 - momentum) * new with the unbiased variance (as torch does; torch
  momentum 0.1 == 0.9 here). Statistics are computed in float32 whatever `dtype` is
  (``moments``). batch_moments: the (mean, biased variance) of x when the caller already has them
  (a dense block shares them between layers); gradients flow through them as through statistics
  computed here.
  """
  relu: bool = False
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool, batch_moments: tuple[Array, Array] | None = None
               ) -> Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    xf = x.astype(jnp.float32)
    if train:
      mean, var = moments(x) if batch_moments is None else batch_moments
      if not self.is_initializing():
        n = math.prod(x.shape[:-1])
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1 - m) * jax.lax.stop_gradient(mean)
        ra_var.value = m * ra_var.value + (1 - m) * jax.lax.stop_gradient(var) * (n / max(n - 1, 1))
    else:
      mean, var = ra_mean.value, ra_var.value
    mul = scale * jax.lax.rsqrt(var + self.epsilon)  # (C,): one multiply-add per element
    # With relu (every DenseNet norm), XLA fuses both into one pass over x.
    y = xf * mul + (bias - mean * mul)
    return (jax.nn.relu(y) if self.relu else y).astype(self.dtype)


class BatchNormReLU(BatchNorm):
  """DenseNet's norm: ``BatchNorm`` followed by ReLU, NHWC."""
  relu: bool = True


class PointwiseConv(nn.Module):
  """1x1 stride-1 convolution as a matmul over channels: (B, H, W, C) -> (B, H, W, features).

  Same parameter as nn.Conv ('kernel', (1, 1, C, features), same init), so the tree and the
  converter do not change. Why: XLA CPU runs a 1x1 convolution's backward ~2.3x slower than the
  equivalent dot (measured at (16, 56, 56, 256) -> 128: 0.37 vs 0.16 CPU-s), and 1x1 convolutions
  are most of DenseNet's FLOPs.
  """
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param("kernel", conv_init, (1, 1, x.shape[-1], self.features), jnp.float32)
    return jnp.dot(x.astype(self.dtype), kernel[0, 0].astype(self.dtype))


def _conv(features: int, kernel: int, stride: int, padding: int, dtype: Dtype, name: str) -> nn.Module:
  if kernel == 1 and stride == 1 and padding == 0:
    return PointwiseConv(features, dtype, name=name)
  return nn.Conv(features, (kernel, kernel), strides=stride, padding=[(padding, padding)] * 2,
                 use_bias=False, dtype=dtype, param_dtype=jnp.float32, kernel_init=conv_init,
                 name=name)


class DenseLayer(nn.Module):
  """BN-ReLU-conv1x1(bn_size*growth)-BN-ReLU-conv3x3(growth): (B, H, W, C_in) -> (B, H, W, growth).

  x_moments: x's batch (mean, variance) when the block has them. barrier_pred: when given
  (``barrier_predicate``), fusion barriers materialise the 1x1 output's gradient (read by both
  of that dot's gradients), the second BN-ReLU output (read again, transposed, by the 3x3 weight
  gradient) and the layer output's gradient (the sum over later layers that the 3x3
  convolution's two gradients read). A barrier on the first BN-ReLU output was measured too and
  made the step slower: that tensor is as wide as the whole concatenated input.
  """
  growth_rate: int = 32
  bn_size: int = 4
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool, x_moments: tuple[Array, Array] | None = None,
               barrier_pred: Array | None = None) -> Array:
    def barrier(v):
      return v if barrier_pred is None else fusion_barrier(v, barrier_pred)
    h = BatchNormReLU(dtype=self.dtype, name="norm1")(x, train, x_moments)
    h = barrier(_conv(self.bn_size * self.growth_rate, 1, 1, 0, self.dtype, "conv1")(h))
    h = barrier(BatchNormReLU(dtype=self.dtype, name="norm2")(h, train))
    return barrier(_conv(self.growth_rate, 3, 1, 1, self.dtype, "conv2")(h))


class DenseBlock(nn.Module):
  """`num_layers` DenseLayers: (B, H, W, C) -> (B, H, W, C + num_layers * growth_rate).

  Output channel order is torchvision's: the block input, then layer 1's maps, layer 2's, ...
  concat: 'concat' (re-concatenate per layer) or 'buffer' (preallocated output, in-place writes).
  remat: recompute each layer's activations in the backward pass instead of storing them.
  barrier_pred: see DenseLayer; with it the block also materialises its input's gradient (the
  sum over all its layers), which the pooling or transition before it would otherwise recompute.
  In train mode each map's batch moments are computed once and shared by the first norms of all
  later layers (torch recomputes them per layer over the whole concatenation; same numbers up to
  rounding).
  """
  num_layers: int
  growth_rate: int = 32
  bn_size: int = 4
  concat: str = "concat"
  remat: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool, barrier_pred: Array | None = None) -> Array:
    layer_cls = nn.remat(DenseLayer, static_argnums=(2,)) if self.remat else DenseLayer
    layers = [layer_cls(self.growth_rate, self.bn_size, self.dtype, name=f"denselayer{i + 1}")
              for i in range(self.num_layers)]
    c0, g = x.shape[-1], self.growth_rate
    x = x.astype(self.dtype)
    if barrier_pred is not None:
      x = fusion_barrier(x, barrier_pred)
    # In train mode every layer's first norm needs the batch moments of all earlier maps; they
    # do not change within the block, so each map's are computed once, when it appears.
    piece_moments = [moments(x)] if train else []

    def input_moments():
      if not train:
        return None
      means, variances = zip(*piece_moments)
      return jnp.concatenate(means), jnp.concatenate(variances)

    def grow(new):
      if train:
        piece_moments.append(moments(new))

    if self.concat == "concat":
      for layer in layers:
        new = layer(x, train, input_moments(), barrier_pred)
        grow(new)
        x = jnp.concatenate([x, new], axis=-1)
      return x
    buf = jnp.zeros(x.shape[:-1] + (c0 + self.num_layers * g,), self.dtype)
    buf = jax.lax.dynamic_update_slice(buf, x, (0, 0, 0, 0))
    for i, layer in enumerate(layers):
      c = c0 + i * g
      new = layer(buf[..., :c], train, input_moments(), barrier_pred).astype(self.dtype)
      grow(new)
      buf = jax.lax.dynamic_update_slice(buf, new, (0, 0, 0, c))
    return buf


class Transition(nn.Module):
  """BN-ReLU-avgpool 2x2/2-conv1x1(features): (B, H, W, C) -> (B, H/2, W/2, features) (floor).

  torchvision convolves, then pools; the two commute (both linear per pixel), and pooling first
  runs the convolution on a quarter of the pixels.
  """
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    h = BatchNormReLU(dtype=self.dtype, name="norm")(x, train)
    return _conv(self.features, 1, 1, 0, self.dtype, "conv")(avg_pool_2x2(h))


class DenseNet(nn.Module):
  """torchvision-compatible DenseNet: (B, H, W, C) float32 -> (logits (B, num_classes), aux).

  aux['features']: (B, F) float32 globally pooled features after norm5 + ReLU (F = 1024 for
  DenseNet-121, 1664 for DenseNet-169), the embedding the FMKD bias analysis exports.
  block_config: layers per dense block ((6, 12, 24, 16) = 121, (6, 12, 32, 32) = 169).
  Each transition halves the channels (compression 0.5). Input channels (1 or 3) are whatever
  the input has at init. train: batch statistics (and running-stat updates in the mutable
  'batch_stats' collection) rather than the running averages. fusion_barriers: None (default)
  uses them on CPU only (see the module docstring); they never change the numbers.
  """
  block_config: Sequence[int] = BLOCK_CONFIGS[121]
  num_classes: int = 1000
  growth_rate: int = 32
  bn_size: int = 4
  num_init_features: int = 64
  concat: str = "concat"
  remat: bool = False
  fusion_barriers: bool | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> tuple[Array, dict]:
    if x.ndim != 4:
      raise ValueError(f"DenseNet expects (B, H, W, C) images, got shape {x.shape}")
    if self.concat not in CONCAT_MODES:
      raise ValueError(f"concat must be one of {CONCAT_MODES}, got {self.concat!r}")
    barrier_pred = barrier_predicate(x) if use_fusion_barriers(self.fusion_barriers) else None
    h = _conv(self.num_init_features, 7, 2, 3, self.dtype, "conv0")(x.astype(self.dtype))
    h = BatchNormReLU(dtype=self.dtype, name="norm0")(h, train)
    h = max_pool_3x3_s2(h)
    c = self.num_init_features
    for i, n in enumerate(self.block_config):
      h = DenseBlock(n, self.growth_rate, self.bn_size, self.concat, self.remat, self.dtype,
                     name=f"denseblock{i + 1}")(h, train, barrier_pred)
      c += n * self.growth_rate
      if i != len(self.block_config) - 1:
        c //= 2
        h = Transition(c, self.dtype, name=f"transition{i + 1}")(h, train)
    h = BatchNormReLU(dtype=self.dtype, name="norm5")(h, train)
    features = jnp.mean(h.astype(jnp.float32), axis=(1, 2))  # (B, c)
    logits = nn.Dense(self.num_classes, dtype=jnp.float32, param_dtype=jnp.float32,
                      kernel_init=torch_linear_init, bias_init=nn.initializers.zeros,
                      name="classifier")(features)
    return logits, {"features": features}


def densenet121(**kwargs) -> DenseNet:
  return DenseNet(block_config=BLOCK_CONFIGS[121], **kwargs)


def densenet169(**kwargs) -> DenseNet:
  return DenseNet(block_config=BLOCK_CONFIGS[169], **kwargs)


def num_features(block_config: Sequence[int] = BLOCK_CONFIGS[121], growth_rate: int = 32,
                 num_init_features: int = 64) -> int:
  """F, the width of the pooled features (aux['features']): 1024 for DenseNet-121, 1664 for 169."""
  c = num_init_features
  for i, n in enumerate(block_config):
    c += n * growth_rate
    if i != len(block_config) - 1:
      c //= 2
  return c


def num_params(params) -> int:
  """Total number of scalars in a parameter pytree (arrays or ShapeDtypeStructs)."""
  return int(sum(math.prod(p.shape) for p in jax.tree.leaves(params)))


def flops_per_example(block_config: Sequence[int] = BLOCK_CONFIGS[121], size: int = 224,
                      in_chans: int = 3, num_classes: int = 1000, growth_rate: int = 32,
                      bn_size: int = 4, num_init_features: int = 64,
                      pool_first_transitions: bool = False) -> int:
  """Forward conv + linear FLOPs (2 x MACs) of one square `size` image; norms/pools not counted.

  Counted analytically from the layer shapes (torchvision's 2.83 "GFLOPS" for DenseNet-121 at
  224 are these MACs). A training step costs ~3x (backward ~2x forward; the stem's input
  gradient, which is not needed, is included in that estimate). pool_first_transitions: count
  the transition convolutions on the pooled pixels, as cxrjax's Transition runs them (2.60
  GMACs for DenseNet-121 at 224) rather than before pooling, as torchvision does.
  """
  def out(s, k, st, p):
    return (s + 2 * p - k) // st + 1

  s = out(size, 7, 2, 3)
  macs = s * s * 49 * in_chans * num_init_features
  s = out(s, 3, 2, 1)
  c = num_init_features
  inner = bn_size * growth_rate
  for i, n in enumerate(block_config):
    for j in range(n):
      macs += s * s * ((c + j * growth_rate) * inner + 9 * inner * growth_rate)
    c += n * growth_rate
    if i != len(block_config) - 1:
      conv_side = s // 2 if pool_first_transitions else s
      macs += conv_side * conv_side * c * (c // 2)
      c //= 2
      s //= 2
  macs += c * num_classes
  return 2 * macs
