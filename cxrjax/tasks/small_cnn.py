"""A SmallCNN (models.small_cnn) trained on uint8 radiographs with masked BCE, as one core-loop
stage: the phantom-learnability benchmark's probe of what the images show, and the bias
analysis' known-answer test."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from cxrjax.core import loop
from cxrjax.core.mesh import create_mesh
from cxrjax.core.predict import sharded_map
from cxrjax.core.task import Task
from cxrjax.data.iterators import ShuffledBatches
from cxrjax.losses.classification import masked_sigmoid_bce
from cxrjax.models.small_cnn import SmallCNN

DEFAULT_OPTIM = dict(name="adamw", lr=2e-3, schedule="cosine", warmup_steps=100, weight_decay=1e-4,
                     grad_clip=1.0)


def standardize(images):
  """uint8 (B, H, W) -> float32 (B, H, W, 1) in [-1, 1] (phantom grey levels span most of 0..255)."""
  return (images.astype(jnp.float32) / 127.5 - 1.0)[..., None]


@functools.lru_cache(maxsize=8)
def cnn_task(model: SmallCNN, size: int, name: str) -> Task:
  """{'x': (B, S, S) uint8, 'y': (B, C) {0, 1, NaN}} -> masked BCE of model's logits."""

  def init(rng):
    return {"params": model.init(rng, jnp.zeros((1, size, size, 1)))["params"]}

  def loss(params, batch, ctx):
    bce = masked_sigmoid_bce(model.apply({"params": params}, standardize(batch["x"])), batch["y"])
    return bce, {"terms": {"bce": bce}}

  return Task(name=name, init=init, loss=loss)


def train_cnn(images: np.ndarray, targets: np.ndarray, *, model: SmallCNN, steps: int,
              batch_size: int, seed: int, workdir: str, optim: dict | None = None,
              log_every: int = 100, name: str = "phantom_cnn",
              fingerprint: dict | None = None) -> dict:
  """Trains `model` on images (N, S, S) uint8 against targets (N, C) {0, 1, NaN} in
  <workdir>/<name> (resumable); returns the final params. fingerprint: what else defines the run
  (a workdir reused with other settings is refused, not resumed)."""
  size = images.shape[1]
  optim = optim or DEFAULT_OPTIM
  data = ShuffledBatches({"x": images, "y": np.asarray(targets, np.float32)}, batch_size, seed=seed)
  result = loop.train(
      cnn_task(model, size, name), data, mesh=create_mesh(), workdir=workdir,
      schedule=loop.Schedule(num_steps=steps, log_every=log_every, checkpoint_every=steps, keep=1),
      optim=optim, seed=seed, tensorboard=False,
      fingerprint={"model": repr(model), "n": len(images), "size": size, "batch": batch_size,
                   "optim": dict(optim), **(fingerprint or {})})
  return jax.device_get(result.state.params)


@functools.lru_cache(maxsize=8)
def _proba_fn(model: SmallCNN):
  """One long-lived function per model, so sharded_map reuses its compiled program."""
  return lambda batch, params: jax.nn.sigmoid(model.apply({"params": params}, standardize(batch["x"])))


def predict(model: SmallCNN, params, images: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
  """P(label) for images (N, S, S) uint8 -> (N, C) float32."""
  return sharded_map(_proba_fn(model), {"x": images}, create_mesh(), batch_size=batch_size,
                     params=params)
