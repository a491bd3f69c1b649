"""An image network trained with masked BCE on uint8 radiographs, batch statistics threaded through
the core loop: the classifier system's DenseNet and FMKD's teacher, fine-tunes and leaky probes.

Any module whose `apply(variables, x, train)` returns (logits or outputs (B, C), aux with
'features') fits: models.densenet.DenseNet, models.fmkd.StackedClassifier.
"""
from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np

from cxrjax.core.errors import ConfigError
from cxrjax.core.loop import Task
from cxrjax.core.predict import sharded_map
from cxrjax.losses.classification import masked_sigmoid_bce

# raw: grey levels 0..255 as float (the FMKD seed); unit: [-1, 1]; xrv: torchxrayvision's
# [-1024, 1024].
INTENSITIES = ("raw", "unit", "xrv")


def image_input(images, intensity: str, channels: int):
  """(B, S, S) uint8 -> (B, S, S, channels) float32 in the `intensity` range, the grey image
  replicated when channels == 3 (pseudo-RGB)."""
  if intensity not in INTENSITIES:
    raise ConfigError(f"intensity={intensity!r}; choose one of {INTENSITIES}")
  x = jnp.asarray(images).astype(jnp.float32)
  if intensity != "raw":
    x = x * (2.0 / 255.0) - 1.0
  if intensity == "xrv":
    x = x * 1024.0
  x = x[..., None]
  return jnp.repeat(x, channels, axis=-1) if channels != 1 else x


@functools.lru_cache(maxsize=32)
def bce_classifier_task(model, *, image_size: int, intensity: str, channels: int,
                        pos_weight: bool = False) -> Task:
  """init and loss of `model` on {'image': (B, S, S) uint8, 'labels': (B, C) {0, 1, NaN}}.

  pos_weight: the loss reads (C,) positive weights from the frozen input 'pos_weight'
  (BCEWithLogitsLoss(pos_weight)). One Task object per setting, so stages of the same
  architecture (fine-tunes of several seeds, the from-scratch baseline) share one program.
  """

  def init(rng):
    zeros = np.zeros((1, image_size, image_size), np.uint8)
    return dict(model.init(rng, image_input(zeros, intensity, channels), train=False))

  def loss(params, batch, ctx):
    (logits, _), updated = model.apply({"params": params, **ctx.state},
                                       image_input(batch["image"], intensity, channels),
                                       train=True, mutable=["batch_stats"])
    weight = ctx.frozen["pos_weight"] if pos_weight else None
    bce = masked_sigmoid_bce(logits, batch["labels"], weight)
    return bce, {"terms": {"bce": bce}, "state": {"batch_stats": updated["batch_stats"]}}

  return Task(name="image_classifier", init=init, loss=loss)


@functools.lru_cache(maxsize=32)
def _forward(module, intensity: str, channels: int, features: bool):
  """One long-lived eval forward per architecture (sharded_map keys its program on it)."""

  def fn(batch, variables):
    out, aux = module.apply(variables, image_input(batch["image"], intensity, channels), train=False)
    return jnp.concatenate([out, aux["features"]], axis=-1) if features else out

  return fn


@dataclasses.dataclass(eq=False)
class ImageNetwork:
  """A trained image network in eval mode (running batch statistics) and its input convention.

  variables: {'params', 'batch_stats'} of `module` alone.
  """
  module: object
  variables: dict
  intensity: str
  channels: int

  def forward_fn(self, features: bool = False):
    """fn(batch {'image': (B, S, S) uint8}, variables) -> outputs (B, C) [+ features (B, F)]."""
    return _forward(self.module, self.intensity, self.channels, features)

  def extract(self, images: np.ndarray, mesh, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, S, S) uint8 -> (outputs (N, C), pooled features (N, F)), sharded over the mesh."""
    out = sharded_map(self.forward_fn(True), {"image": images}, mesh, batch_size=batch_size,
                      params=self.variables)
    c = self.module.num_classes
    return out[:, :c], out[:, c:]
