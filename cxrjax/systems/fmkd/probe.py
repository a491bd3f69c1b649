"""Linear probes on frozen features (CXR-FM-LP, CXR-FMKD-LP, CXR-FMKD-Direct-LP), core-loop stages.

The backbone is frozen in eval mode: features are extracted once with the running BatchNorm
statistics and the probe trains a Linear(D -> 14) on them with BCE and Adam (spec B.4), keeping
the checkpoint with the lowest validation BCE. Inputs are standardised with training-row
statistics: an affine reparametrisation of the same linear model that only conditions Adam.

The seed instead left Lightning's module in train mode during LP, so BatchNorm used batch
statistics and kept updating its running averages (spec B.2 "LP subtlety"). That leak needs a
train-mode backbone forward per probe step; it is not reproduced here (see configs/fmkd.py).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from cxrjax.core import loop
from cxrjax.data.iterators import ShuffledBatches
from cxrjax.data.normalize import Normalizer, fit_normalizer
from cxrjax.losses.classification import masked_sigmoid_bce
from cxrjax.models.heads import EmbeddingClassifier


@dataclasses.dataclass(eq=False)
class LinearProbe:
  """probabilities(x (N, D)) -> (N, C) of a trained probe."""
  model: EmbeddingClassifier
  params: dict
  standardizer: Normalizer

  def probabilities(self, x: np.ndarray) -> np.ndarray:
    logits = self.model.apply({"params": self.params}, jnp.asarray(self.standardizer.apply(x)))
    return np.asarray(jax.nn.sigmoid(logits))


def train_probe(name: str, x_train: np.ndarray, y_train: np.ndarray, x_valid: np.ndarray,
                y_valid: np.ndarray, *, seed: int, config, mesh, workdir: str,
                fingerprint: dict) -> LinearProbe:
  """Trains Linear(D -> C) on (N, D) features and (N, C) {0, 1} labels; best by val BCE."""
  pc = config.probe
  num_classes = y_train.shape[1]
  model = EmbeddingClassifier(hidden=(), dropout=0.0, num_outputs=num_classes)
  standardizer = fit_normalizer("standardize", x_train)
  xs_train = np.asarray(standardizer.apply(x_train), np.float32)
  xs_valid = jnp.asarray(standardizer.apply(x_valid), jnp.float32)

  def init(rng):
    return {"params": model.init(rng, jnp.zeros((1, x_train.shape[1])))["params"]}

  def loss(params, batch, rng, _):
    del rng
    bce = masked_sigmoid_bce(model.apply({"params": params}, batch["x"]), batch["y"])
    return bce, {"terms": {"bce": bce}}

  def evaluate(state) -> dict:
    logits = model.apply({"params": state.params}, xs_valid)
    return {"val_bce": float(masked_sigmoid_bce(logits, jnp.asarray(y_valid)))}

  data = ShuffledBatches({"x": xs_train, "y": y_train.astype(np.float32)}, pc.batch_size, seed=seed)
  result = loop.train(
      loop.Task(name, init, loss), data, mesh=mesh, workdir=workdir,
      schedule=loop.Schedule(num_steps=pc.steps, log_every=pc.log_every,
                             checkpoint_every=pc.checkpoint_every, keep=1, eval_every=pc.eval_every,
                             best_metric="val_bce", best_mode="min"),
      optim=pc.optim.to_dict(), seed=seed, evaluate=evaluate, fingerprint=fingerprint,
      config=config.to_dict(), tensorboard=config.tensorboard)
  return LinearProbe(model, result.best_state.params, standardizer)
