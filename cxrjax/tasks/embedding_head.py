"""A classifier head on fixed embeddings, trained as one core-loop stage.

The prior's CTPA teacher and X-ray baseline heads and FMKD's linear probes are this task. Inputs
are standardised with the training rows' statistics (an affine reparametrisation of the same
model that only conditions the optimiser); the statistics travel with the trained head, so it
applies to raw embeddings, also as a frozen input inside another stage's loss.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from cxrjax.core.loop import Task
from cxrjax.core.predict import sharded_map
from cxrjax.core.stage import Run
from cxrjax.data.iterators import ShuffledBatches
from cxrjax.data.normalize import fit_normalizer
from cxrjax.evaluate.classification import roc_auc
from cxrjax.losses.classification import masked_sigmoid_bce
from cxrjax.models.heads import EmbeddingClassifier

SELECTIONS = {"auc": ("val_auc", "max"), "bce": ("val_bce", "min")}


@dataclasses.dataclass(eq=False)
class TrainedHead:
  """A trained head: logits of raw embeddings (N, D) -> (N,) for one output, else (N, C).

  variables: {'params': head params, 'mean': (D,), 'inv_std': (D,)} float32 host arrays; pass
  them as a frozen input and call `apply` inside a loss.
  """
  model: EmbeddingClassifier
  variables: dict

  def apply(self, variables, x_raw):
    """Logits of raw embeddings with the given variables (traced or concrete)."""
    x = (x_raw - variables["mean"]) * variables["inv_std"]
    return self.model.apply({"params": variables["params"]}, x)

  def predict_proba(self, x_raw: np.ndarray, mesh, *, batch_size: int = 1024) -> np.ndarray:
    """Probabilities of raw embeddings (N, D) -> (N,) or (N, C), sharded over the mesh."""
    return sharded_map(_proba(self.model), {"x": np.asarray(x_raw, np.float32)}, mesh,
                       batch_size=batch_size, params=self.variables)


@functools.lru_cache(maxsize=32)
def _proba(model: EmbeddingClassifier):
  """One long-lived function per head architecture (sharded_map keys its program on it)."""
  head = TrainedHead(model, {})
  return lambda batch, variables: jax.nn.sigmoid(head.apply(variables, batch["x"]))


@functools.lru_cache(maxsize=32)
def head_task(model: EmbeddingClassifier, dim: int) -> Task:
  """The head's init and masked-BCE loss on standardised inputs {'x': (B, D), 'y': (B,) or (B, C)
  with NaN = unlabelled}. One Task object per (architecture, dim), so every head of that shape in
  a run shares one compiled step."""

  def init(rng):
    return {"params": model.init(rng, jnp.zeros((1, dim)))["params"]}

  def loss(params, batch, ctx):
    logits = model.apply({"params": params}, batch["x"], deterministic=False,
                         rngs={"dropout": ctx.rng})
    bce = masked_sigmoid_bce(logits, batch["y"])
    return bce, {"terms": {"bce": bce}}

  return Task(name="embedding_head", init=init, loss=loss)


def train_head(run: Run, name: str, x_train: np.ndarray, y_train: np.ndarray, x_valid: np.ndarray,
               y_valid: np.ndarray, *, model: EmbeddingClassifier, block, seed: int,
               parent: dict, select: str = "auc") -> tuple[TrainedHead, dict]:
  """Trains `model` on (N, D) embeddings and (N,) / (N, C) labels {0, 1, NaN}; keeps the
  checkpoint with the best validation AUC (select='auc', one output) or the lowest masked BCE
  ('bce'). Returns (the head, its stage fingerprint)."""
  metric, mode = SELECTIONS[select]
  block = block.to_dict() if hasattr(block, "to_dict") else dict(block)
  standardizer = fit_normalizer("standardize", x_train)
  mean = np.asarray(standardizer.params["mean"], np.float32)
  inv_std = np.asarray(1.0 / np.asarray(standardizer.params["std"]), np.float32)
  xs_train = (np.asarray(x_train, np.float32) - mean) * inv_std
  xs_valid = jnp.asarray((np.asarray(x_valid, np.float32) - mean) * inv_std)
  y_valid = np.asarray(y_valid, np.float32)

  def evaluate(state) -> dict:
    logits = model.apply({"params": state.params}, xs_valid)
    if select == "auc":
      return {metric: roc_auc(y_valid, np.asarray(jax.nn.sigmoid(logits)))}
    return {metric: float(masked_sigmoid_bce(logits, jnp.asarray(y_valid)))}

  data = ShuffledBatches({"x": xs_train, "y": np.asarray(y_train, np.float32)},
                         block["batch_size"], seed=seed)
  result = run.stage(head_task(model, x_train.shape[1]), data, block, seed=seed, name=name,
                     parent=parent, defines={"head": repr(model)}, evaluate=evaluate,
                     best=(metric, mode))
  variables = {"params": jax.device_get(result.best_state.params), "mean": mean, "inv_std": inv_std}
  return TrainedHead(model, variables), result.fingerprint
