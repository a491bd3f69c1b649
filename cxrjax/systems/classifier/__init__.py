"""A DenseNet multi-label classifier on a TFDS study dataset (configs/classifier.py).

`run(config, workdir)`: open (or render) the dataset -> optional per-class positive weights ->
one core-loop stage training DenseNet (masked BCE; batch statistics threaded through the loop;
the checkpoint with the best validation macro AUROC kept) -> test predictions -> per-label and
macro AUROC / AUPRC with bootstrap CIs (systems.classifier.evaluation). A rerun in the same
workdir resumes, or only re-evaluates when training is done.
"""
from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
from scipy.special import expit

from cxrjax.core.predict import predict_batches
from cxrjax.core.stage import Run
from cxrjax.core.writers import say
from cxrjax.data.augment import augment_config
from cxrjax.data.image_batches import ImageBatches
from cxrjax.data.labels import NUM_LABELS
from cxrjax.data.pipeline import StudyPipeline
from cxrjax.evaluate.classification import roc_auc
from cxrjax.losses.classification import masked_sigmoid_bce
from cxrjax.models.densenet import DenseNet
from cxrjax.models.densenet_convert import load_densenet
from cxrjax.systems.classifier import data as cdata
from cxrjax.systems.classifier import evaluation
from cxrjax.systems.classifier.validate import validate_config

__all__ = ["run", "validate_config"]
from cxrjax.tasks.image_classifier import ImageNetwork, bce_classifier_task

def build_model(mc, channels: int) -> tuple[DenseNet, dict | None, int]:
  """(model with a 14-way head, starting variables or None, input channels). With
  model.init_from the architecture and channels come from the file; a head of another size is
  dropped (a fresh one is initialised)."""
  if not mc.init_from:
    return DenseNet(block_config=tuple(mc.block_config), num_classes=NUM_LABELS,
                    growth_rate=mc.growth_rate, num_init_features=mc.num_init_features,
                    bn_size=mc.bn_size), None, channels
  path = os.path.expanduser(mc.init_from)
  loaded, variables, extras = load_densenet(path)
  model = loaded.clone(num_classes=NUM_LABELS)
  if loaded.num_classes != NUM_LABELS:
    variables = {"params": {k: v for k, v in variables["params"].items() if k != "classifier"},
                 "batch_stats": variables["batch_stats"]}
  if extras["in_chans"] != channels:
    say(f"[model] {path} takes {extras['in_chans']}-channel inputs; data.channels follows it")
  say(f"[model] starting from {path} (DenseNet {tuple(loaded.block_config)}, "
      f"{loaded.num_classes} -> {NUM_LABELS} outputs)")
  return model, variables, extras["in_chans"]


def predict(network: ImageNetwork, source, config, mesh) -> tuple[np.ndarray, np.ndarray]:
  """(labels (N, 14) with NaN, logits (N, 14)) of every study of `source` with a kept view."""
  dc = config.data
  batches = ImageBatches(StudyPipeline(source, cdata.pipeline_config(
      dc, config.eval.batch_size, config.seed, train=False)), with_mask=True)
  out = predict_batches(network.forward_fn(), batches, mesh, params=network.variables,
                        keep=("labels", "_mask"))
  keep = out["_mask"].astype(bool)
  return out["labels"][keep], out["out"][keep]


def run(config, workdir: str) -> dict:
  validate_config(config)
  tc, dc = config.train, config.data
  job = Run.start(config, workdir, {"train.batch_size": tc.batch_size,
                                     "eval.batch_size": config.eval.batch_size})
  mesh = job.mesh
  sources = cdata.open_dataset(dc, workdir)
  train_src, valid_src, test_src = (sources[s] for s in dc.splits)
  counts = {s: len(sources[s]) for s in dc.splits}
  say(f"data: {dc.builder} {counts}; {dc.image_size} px; uncertain={dc.uncertain}; "
      f"{mesh.devices.size} device(s)")
  model, start, channels = build_model(config.model, dc.channels)
  pos_weight = None
  if config.loss.class_weights == "balanced":
    pos_weight = cdata.positive_weights(train_src, dc.uncertain, seed=config.seed)
    say("[loss] positive weights n_neg/n_pos: " + ", ".join(f"{w:.1f}" for w in pos_weight))
  batches = ImageBatches(StudyPipeline(train_src, cdata.pipeline_config(
      dc, tc.batch_size, config.seed, augment_config(config.augment, dc.image_size), train=True)))

  def network(state) -> ImageNetwork:
    return ImageNetwork(model, state.variables(), dc.intensity, channels)

  def evaluate(state) -> dict:
    labels, logits = predict(network(state), valid_src, config, mesh)
    score = evaluation.macro_value(labels, logits, roc_auc)
    # No label with both classes in validation: nothing to rank by (0, never NaN).
    return {"val_macro_auroc": 0.0 if np.isnan(score) else score,
            "val_bce": float(masked_sigmoid_bce(jnp.asarray(logits), jnp.asarray(labels)))}

  task = bce_classifier_task(model, image_size=dc.image_size, intensity=dc.intensity,
                             channels=channels, pos_weight=pos_weight is not None)
  # Converted weights, a fresh head where the file had another.
  graft = None if start is None else {
      **{f"params/{k}": v for k, v in start["params"].items()}, "batch_stats": start["batch_stats"]}
  result = job.stage(
      task, batches, tc, seed=config.seed, name="classifier",
      defines={k: config[k] for k in ("data", "model", "loss", "augment")}, evaluate=evaluate,
      best=("val_macro_auroc", "max") if tc.eval_every else None, graft=graft,
      frozen=None if pos_weight is None else {"pos_weight": pos_weight})
  labels, logits = predict(network(result.best_state), test_src, config, mesh)
  return evaluation.report(labels, expit(logits), config=config, workdir=workdir,
                           counts={**counts, "test_scored": int(len(labels))},
                           best_step=int(result.best_step))
