"""ResNet with BasicBlocks (ResNet-18 by default) in Flax linen, as torchvision builds it.

Stem: 7x7/2 conv (no bias) -> BN -> ReLU -> 3x3/2 max pool. Then four stages ('layer1'..'layer4')
of BasicBlocks (3x3 conv -> BN -> ReLU -> 3x3 conv -> BN, plus the identity or a 1x1/stride conv
+ BN 'downsample' shortcut, then ReLU) with 64/128/256/512 channels, the first block of stages
2-4 striding by 2. Then global average pooling to the 512-d feature and an optional linear 'fc'.
GMCD's pathology/image branch is ResNet-18 without 'fc' (spec gmcd.md §2.1).

Module and parameter names are torchvision's state-dict names, nested: ``conv1``, ``bn1``,
``layer2/0/{conv1,bn1,conv2,bn2}``, ``layer2/0/downsample/{0,1}``, ``fc``; so
``resnet_convert`` is a renaming of the leaves ('kernel' -> 'weight', 'scale' -> 'weight',
'mean' -> 'running_mean', ...) plus transposes.

Batch norm has PyTorch's semantics (momentum 0.1 == 0.9 here, eps 1e-5, running variance updated
with the unbiased batch variance, normalisation with the biased one), so converted weights and
train-mode updates match torch. Shapes: NHWC inputs (B, H, W, C). Params are float32; ``dtype``
is the compute dtype of convolutions and activations (bfloat16 on GPU); batch statistics,
features and logits are float32.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cxrjax.models.densenet import BatchNorm  # PyTorch semantics, shared with DenseNet
from cxrjax.models.densenet_ops import max_pool_3x3_s2
from cxrjax.models.prior_layers import torch_bias_init, torch_linear_init

Array = jax.Array
Dtype = Any

STAGE_SIZES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}

# torchvision ResNet: nn.init.kaiming_normal_(conv.weight, mode='fan_out', nonlinearity='relu'),
# i.e. N(0, 2 / (out_channels * kh * kw)), untruncated.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv(features: int, kernel: int, stride: int, padding: int, dtype: Dtype,
          name: str) -> nn.Conv:
  return nn.Conv(features, (kernel, kernel), strides=stride, padding=[(padding, padding)] * 2,
                 use_bias=False, dtype=dtype, param_dtype=jnp.float32, kernel_init=conv_init,
                 name=name)


class Downsample(nn.Module):
  """The projection shortcut: 1x1 conv with `stride` ('0') -> BN ('1'):
  (B, H, W, C) -> (B, ceil(H / stride), ceil(W / stride), features)."""
  features: int
  stride: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    h = _conv(self.features, 1, self.stride, 0, self.dtype, "0")(x)
    return BatchNorm(dtype=self.dtype, name="1")(h, train)


class BasicBlock(nn.Module):
  """conv3x3(stride)-BN-ReLU-conv3x3-BN + shortcut, ReLU:
  (B, H, W, C) -> (B, ceil(H / stride), ceil(W / stride), features).

  The shortcut is the identity unless the stride or the width changes, then ``Downsample``
  (torchvision's rule, so the same blocks have a 'downsample' entry in the state dict).
  """
  features: int
  stride: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    h = _conv(self.features, 3, self.stride, 1, self.dtype, "conv1")(x)
    h = BatchNorm(relu=True, dtype=self.dtype, name="bn1")(h, train)
    h = _conv(self.features, 3, 1, 1, self.dtype, "conv2")(h)
    h = BatchNorm(dtype=self.dtype, name="bn2")(h, train)
    if self.stride != 1 or x.shape[-1] != self.features:
      x = Downsample(self.features, self.stride, self.dtype, name="downsample")(x, train)
    return jax.nn.relu(h + x.astype(h.dtype))


class Stage(nn.Module):
  """`num_blocks` BasicBlocks named '0', '1', ...; the first strides by `stride`:
  (B, H, W, C) -> (B, ceil(H / stride), ceil(W / stride), features)."""
  num_blocks: int
  features: int
  stride: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    for j in range(self.num_blocks):
      x = BasicBlock(self.features, self.stride if j == 0 else 1, self.dtype, name=str(j))(x, train)
    return x


class ResNet(nn.Module):
  """torchvision-compatible BasicBlock ResNet: (B, H, W, C) float32 -> (out, aux).

  out: the logits (B, num_classes) of the linear head 'fc' on the pooled features, or, when
  num_classes is None (no head; GMCD's image branch), the pooled features (B, 512) themselves.
  aux['features']: (B, 512) float32 globally average-pooled output of layer4.
  stage_sizes: blocks per stage ((2, 2, 2, 2) = ResNet-18, (3, 4, 6, 3) = ResNet-34).
  Input channels are whatever the input has at init (3 for ImageNet weights). train: batch
  statistics (and running-stat updates in the mutable 'batch_stats' collection) rather than the
  running averages. Spatial sizes: the stem divides H and W by 4, stages 2-4 by 2 each (32 in
  all, rounding up), so a 64 x 64 input reaches layer4 at 2 x 2.
  """
  stage_sizes: Sequence[int] = STAGE_SIZES[18]
  num_classes: int | None = 1000
  num_init_features: int = 64
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> tuple[Array, dict]:
    if x.ndim != 4:
      raise ValueError(f"ResNet expects (B, H, W, C) images, got shape {x.shape}")
    h = _conv(self.num_init_features, 7, 2, 3, self.dtype, "conv1")(x.astype(self.dtype))
    h = BatchNorm(relu=True, dtype=self.dtype, name="bn1")(h, train)
    h = max_pool_3x3_s2(h)
    for i, n in enumerate(self.stage_sizes):
      width = self.num_init_features * 2 ** i
      h = Stage(n, width, 1 if i == 0 else 2, self.dtype, name=f"layer{i + 1}")(h, train)
    features = jnp.mean(h.astype(jnp.float32), axis=(1, 2))  # (B, 512)
    if self.num_classes is None:
      return features, {"features": features}
    # torchvision leaves fc at nn.Linear's default init (weights and bias U(+-1/sqrt(fan_in))).
    fan_in = features.shape[-1]
    logits = nn.Dense(self.num_classes, dtype=jnp.float32, param_dtype=jnp.float32,
                      kernel_init=torch_linear_init, bias_init=torch_bias_init(fan_in),
                      name="fc")(features)
    return logits, {"features": features}


def resnet18(**kwargs) -> ResNet:
  return ResNet(stage_sizes=STAGE_SIZES[18], **kwargs)


def num_features(stage_sizes: Sequence[int] = STAGE_SIZES[18], num_init_features: int = 64) -> int:
  """Width of the pooled features (aux['features']): 512 for ResNet-18/34."""
  return num_init_features * 2 ** (len(stage_sizes) - 1)
