"""A small convolutional classifier: a quick image baseline (phantom learnability, smoke runs).

Stages of 3x3 convolutions, each opened by a stride-2 convolution, then global average pooling
and one dense layer. GroupNorm rather than BatchNorm: no batch_stats to thread through the
training loop, and predictions do not depend on the batch they arrive in.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp


class SmallCNN(nn.Module):
  """(B, H, W, C) float images -> (B, num_labels) logits; with return_features also the pooled
  (B, widths[-1]) features under the dense layer, e.g. for evaluate.bias.

  widths: channels of each stage; stage k works at H / 2^(k+1) (every stage halves the
    resolution, the first one included, so nothing runs at full resolution but one strided
    convolution).
  convs_per_stage: 3x3 convolutions of each stage (>= 1, the first one strided); one in the
    first stage because that is where convolutions are widest in pixels and so costliest
    (on CPU (1, 2, 2, 2) trains ~1.3x faster than (2, 2, 2, 2) at 128 x 128).
  groups: GroupNorm groups (capped at a stage's width).
  Inputs should be roughly standardised (e.g. uint8 / 255 mapped to mean 0, sd ~1).
  """
  widths: Sequence[int] = (16, 32, 64, 128)
  convs_per_stage: Sequence[int] = (1, 2, 2, 2)
  num_labels: int = 14
  groups: int = 8

  @nn.compact
  def __call__(self, x, return_features: bool = False):
    if x.ndim != 4:
      raise ValueError(f"SmallCNN expects (B, H, W, C) images, got shape {x.shape}")
    if len(self.convs_per_stage) != len(self.widths) or min(self.convs_per_stage) < 1:
      raise ValueError(f"convs_per_stage {tuple(self.convs_per_stage)} needs one count >= 1 per "
                       f"stage of widths {tuple(self.widths)}")
    for width, convs in zip(self.widths, self.convs_per_stage):
      for i in range(convs):
        x = nn.Conv(width, (3, 3), strides=2 if i == 0 else 1, padding="SAME", use_bias=False)(x)
        x = nn.GroupNorm(num_groups=min(self.groups, width))(x)
        x = nn.gelu(x)
    features = jnp.mean(x, axis=(1, 2))  # (B, widths[-1])
    logits = nn.Dense(self.num_labels)(features)
    return (logits, features) if return_features else logits
