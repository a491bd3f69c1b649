"""The Pix2Pix PatchGAN discriminator (``NLayerDiscriminator``) as taming-transformers uses it to
train the VQ-GAN (spec raygen_and_raddiffusion.md §C.3), in Flax linen.

conv4x4/2 (bias) -> LeakyReLU(0.2) -> (n_layers - 1) x [conv4x4/2 (no bias) -> BatchNorm ->
LeakyReLU] -> conv4x4/1 (no bias) -> BatchNorm -> LeakyReLU -> conv4x4/1 (bias) to one logit per
patch.
Widths ndf * min(2**n, 8). All convs pad 1. Images (B, H, W, in_channels) -> logits
(B, H', W', 1) float32; for 256 px and 3 layers, H' = 30 (each logit sees a 70x70 patch).

Module names are the indices of taming's ``nn.Sequential`` ('0', '2', '3', ...), so its state
dict (``main.{i}.*``, under ``loss.discriminator.`` in a VQ-GAN checkpoint) converts by renaming
(``vqgan_convert.convert_discriminator``).

Batch norm has PyTorch's semantics (``densenet.BatchNorm``): train=True normalises with the batch
statistics and moves the running ones (collection 'batch_stats', torch momentum 0.1, unbiased
running variance); train=False uses the running ones. Init as taming's ``weights_init``: conv
kernels N(0, 0.02), BatchNorm scale N(1, 0.02) and bias 0; the two conv biases keep torch's
default U(+-1/sqrt(fan_in)).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cxrjax.models.densenet import BatchNorm
from cxrjax.models.prior_layers import torch_bias_init

Array = jax.Array
Dtype = Any

conv_init = nn.initializers.normal(stddev=0.02)


def _scale_init(key, shape, dtype=jnp.float32):
  return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


class DiscriminatorBatchNorm(BatchNorm):
  """``densenet.BatchNorm`` with taming's N(1, 0.02) scale init (BatchNorm hard-codes ones)."""

  def param(self, name, init_fn, *args, **kwargs):
    return super().param(name, _scale_init if name == "scale" else init_fn, *args, **kwargs)


class NLayerDiscriminator(nn.Module):
  """PatchGAN: (B, H, W, in_channels) -> per-patch logits (B, H', W', 1) float32.

  ndf: width of the first conv; n_layers: number of stride-2 convs (3 in taming); dtype: compute
  dtype of convolutions and activations (batch statistics stay float32).
  """
  in_channels: int = 3
  ndf: int = 64
  n_layers: int = 3
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(f"NLayerDiscriminator expects NHWC images (B, H, W, {self.in_channels}), "
                       f"got shape {tuple(x.shape)}")
    index = 0  # position in taming's nn.Sequential, which names the modules

    def conv(h, features, stride, bias):
      nonlocal index
      c = h.shape[-1]
      out = nn.Conv(features, (4, 4), strides=stride, padding=[(1, 1), (1, 1)], use_bias=bias,
                    dtype=self.dtype, param_dtype=jnp.float32, kernel_init=conv_init,
                    bias_init=torch_bias_init(16 * c), name=str(index))(h)
      index += 1
      return out

    def norm_act(h):
      nonlocal index
      h = DiscriminatorBatchNorm(dtype=self.dtype, name=str(index))(h, train)
      index += 2  # the LeakyReLU takes an index too
      return nn.leaky_relu(h, 0.2)

    h = nn.leaky_relu(conv(x.astype(self.dtype), self.ndf, 2, True), 0.2)
    index += 1
    mult = 1
    for n in range(1, self.n_layers + 1):
      mult = min(2 ** n, 8)
      # The last of these keeps the size (stride 1), as pix2pix does.
      h = norm_act(conv(h, self.ndf * mult, 2 if n < self.n_layers else 1, False))
    return conv(h, 1, 1, True).astype(jnp.float32)
