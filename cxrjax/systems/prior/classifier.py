"""Stages 1-2: PE classifiers on raw embeddings (CTPA teacher head, X-ray-only baseline)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from cxrjax.core import loop
from cxrjax.core.predict import sharded_map
from cxrjax.data.iterators import ShuffledBatches
from cxrjax.data.normalize import Normalizer, fit_normalizer
from cxrjax.evaluate.classification import roc_auc
from cxrjax.losses.classification import masked_sigmoid_bce
from cxrjax.models.heads import EmbeddingClassifier


@dataclasses.dataclass(eq=False)
class TrainedHead:
  """A frozen classifier on raw embeddings: logits(x_raw (B, D)) -> (B,)."""
  model: EmbeddingClassifier
  params: dict
  standardizer: Normalizer  # fitted on the labelled training rows

  def logits(self, x_raw, params=None):
    params = self.params if params is None else params
    return self.model.apply({"params": params}, self.standardizer.apply(x_raw))

  def _proba(self, batch, params):
    return jax.nn.sigmoid(self.logits(batch["x"], params))

  def predict_proba(self, x_raw: np.ndarray, mesh, *, params=None, batch_size: int = 1024) -> np.ndarray:
    """P(PE) for raw embeddings (N, D) -> (N,); `params` overrides the head's own."""
    return sharded_map(self._proba, {"x": x_raw}, mesh, batch_size=batch_size,
                       params=self.params if params is None else params)


def train_head(name: str, x_train: np.ndarray, y_train: np.ndarray, x_valid: np.ndarray,
               y_valid: np.ndarray, *, config, mesh, workdir: str, fingerprint: dict) -> TrainedHead:
  """Trains one head with the core loop; keeps the checkpoint with the best validation AUC."""
  cfg = config.classifier_train
  model = EmbeddingClassifier(hidden=tuple(config.classifier.hidden), dropout=config.classifier.dropout)
  standardizer = fit_normalizer("standardize", x_train)
  dim = x_train.shape[1]

  def init(rng):
    return {"params": model.init(rng, jnp.zeros((1, dim)))["params"]}

  def loss(params, batch, rng, _):
    logits = model.apply({"params": params}, standardizer.apply(batch["x"]), deterministic=False,
                         rngs={"dropout": rng})
    bce = masked_sigmoid_bce(logits, batch["y"])
    return bce, {"terms": {"bce": bce}}

  head = TrainedHead(model, None, standardizer)

  def evaluate(state) -> dict:
    return {"val_auc": roc_auc(y_valid, head.predict_proba(x_valid, mesh, params=state.params))}

  data = ShuffledBatches({"x": x_train, "y": y_train.astype(np.float32)}, cfg.batch_size,
                         seed=config.seed + _stable_hash(name))
  result = loop.train(
      loop.Task(name=name, init=init, loss=loss), data, mesh=mesh, workdir=workdir,
      schedule=loop.Schedule(num_steps=cfg.steps, log_every=cfg.log_every,
                             checkpoint_every=cfg.checkpoint_every, keep=cfg.keep,
                             eval_every=cfg.eval_every, best_metric="val_auc"),
      optim=cfg.optim.to_dict(), seed=config.seed + _stable_hash(name), evaluate=evaluate,
      fingerprint=fingerprint, config=config.to_dict(),
      tensorboard=config.tensorboard)
  head.params = result.best_state.params
  return head


def _stable_hash(name: str) -> int:
  """A small per-stage seed offset that does not change between Python runs."""
  return sum(ord(c) * (i + 1) for i, c in enumerate(name)) % 10_000


