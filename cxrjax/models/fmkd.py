"""CXR-FMKD's downstream classifier: an embedding network with a linear head stacked on it.

The distilled student is a DenseNet whose ``classifier`` slot is the Linear(F -> D) "KD projector"
(spec prior_and_fmkd.md B.2), i.e. ``DenseNet(num_classes=D)``; its output is compared with the
teacher embedding. The seed's CXR-FMKD-LP/-FFT models keep that projector and stack
Linear(D -> 14) on it with no nonlinearity in between: that is ``StackedClassifier``.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from cxrjax.models.densenet import torch_linear_init

HEAD_INPUTS = ("embedding", "features")


class StackedClassifier(nn.Module):
  """(B, H, W, C) -> (logits (B, num_classes), aux) with aux = {'embedding': (B, D) output of the
  backbone's own head (the projector), 'features': (B, F) the backbone's pooled features}.

  backbone: a module returning (out (B, D), aux with 'features'), e.g. models.densenet.DenseNet;
  its parameters live under 'backbone', the head's under 'head', so a distilled backbone's
  variables drop in unchanged.
  head_input: 'embedding' (the head sits on the projector: CXR-FMKD-LP/-FFT) or 'features'
  (on the pooled backbone features, bypassing the projector: CXR-FMKD-Direct-LP).
  """
  backbone: nn.Module
  num_classes: int = 14
  head_input: str = "embedding"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, dict]:
    if self.head_input not in HEAD_INPUTS:
      raise ValueError(f"head_input must be one of {HEAD_INPUTS}, got {self.head_input!r}")
    embedding, aux = self.backbone(x, train)
    logits = nn.Dense(self.num_classes, dtype=jnp.float32, kernel_init=torch_linear_init,
                      bias_init=nn.initializers.zeros,
                      name="head")(embedding if self.head_input == "embedding" else aux["features"])
    return logits, {"embedding": embedding, "features": aux["features"]}


def init_head(rng: jax.Array, in_dim: int, num_classes: int) -> dict:
  """Fresh parameters of StackedClassifier's head alone (as its own init draws them)."""
  dense = nn.Dense(num_classes, kernel_init=torch_linear_init, bias_init=nn.initializers.zeros)
  return dense.init(rng, jnp.zeros((1, in_dim), jnp.float32))["params"]
