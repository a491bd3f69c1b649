"""A DenseNet multi-label classifier on a TFDS study dataset (configs/classifier.py).

`run(config, workdir)`: open (or render) the dataset -> optional per-class positive weights ->
one core-loop stage training DenseNet with one output per label of the dataset (masked BCE;
batch statistics threaded through the loop; the checkpoint with the best validation macro AUROC
kept) -> test predictions (of the training dataset, or of eval.builder's dataset with the labels
matched by name) -> per-label and macro AUROC / AUPRC with bootstrap CIs
(systems.classifier.evaluation). A rerun in the same workdir resumes, or only re-evaluates when
training is done.
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
from cxrjax.data.labels import match_label_names
from cxrjax.data.errors import DataError
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

def build_model(mc, channels: int, num_classes: int) -> tuple[DenseNet, dict | None, int]:
  """(model with a num_classes-way head, starting variables or None, input channels). With
  model.init_from the architecture and channels come from the file; a head of another size is
  dropped (a fresh one is initialised)."""
  if not mc.init_from:
    return DenseNet(block_config=tuple(mc.block_config), num_classes=num_classes,
                    growth_rate=mc.growth_rate, num_init_features=mc.num_init_features,
                    bn_size=mc.bn_size), None, channels
  path = os.path.expanduser(mc.init_from)
  loaded, variables, extras = load_densenet(path)
  model = loaded.clone(num_classes=num_classes)
  if loaded.num_classes != num_classes:
    variables = {"params": {k: v for k, v in variables["params"].items() if k != "classifier"},
                 "batch_stats": variables["batch_stats"]}
  if extras["in_chans"] != channels:
    say(f"[model] {path} takes {extras['in_chans']}-channel inputs; data.channels follows it")
  say(f"[model] starting from {path} (DenseNet {tuple(loaded.block_config)}, "
      f"{loaded.num_classes} -> {num_classes} outputs)")
  return model, variables, extras["in_chans"]


def predict(network: ImageNetwork, source, config, mesh, *, features: bool = False
            ) -> tuple[np.ndarray, np.ndarray]:
  """(labels (N, C) with NaN, logits (N, C')) of every study of `source` with a kept view (C the
  source's labels, C' the model's), in the source's order; with `features`, the pooled features
  (N, F) follow the logits: (N, C' + F)."""
  dc = config.data
  batches = ImageBatches(StudyPipeline(source, cdata.pipeline_config(
      dc, config.eval.batch_size, config.seed, train=False)), with_mask=True)
  out = predict_batches(network.forward_fn(features), batches, mesh, params=network.variables,
                        keep=("labels", "_mask"))
  keep = out["_mask"].astype(bool)
  return out["labels"][keep], out["out"][keep]


def run(config, workdir: str) -> dict:
  validate_config(config)
  tc, dc = config.train, config.data
  job = Run.start(config, workdir, {"train.batch_size": tc.batch_size,
                                     "eval.batch_size": config.eval.batch_size})
  mesh = job.mesh
  sources, names = cdata.open_dataset(dc, workdir)
  train_src, valid_src, test_src = (sources[s] for s in dc.splits)
  counts = {s: len(sources[s]) for s in dc.splits}
  dataset = cdata.dataset_name(dc.builder, train_src)
  say(f"data: {dataset} {counts}; {len(names)} labels ({', '.join(names[:4])}"
      f"{', ...' if len(names) > 4 else ''}); {dc.image_size} px; uncertain={dc.uncertain}; "
      f"{mesh.devices.size} device(s)")
  model, start, channels = build_model(config.model, dc.channels, len(names))
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
  unmatched = None
  if config.eval.builder:  # another dataset: score the labels both have, by name
    test_src, test_names, dataset = cdata.open_eval_split(config, workdir)
    model_cols, data_cols, model_only, data_only = match_label_names(names, test_names)
    unmatched = {"model_only": model_only, "data_only": data_only}
    say(f"[eval] {dataset} {config.eval.split}: {len(model_cols)} label(s) matched by name; only the "
        f"model has {model_only or 'none'}; only the data has {data_only or 'none'}")
    if not model_cols:
      raise DataError(f"eval.builder={config.eval.builder!r}: no label of {dataset} ({list(test_names)}) "
                      f"matches one of the model's ({list(names)}) by name")
    counts = {config.eval.split: len(test_src)}
  labels, logits = predict(network(result.best_state), test_src, config, mesh)
  if unmatched is not None:
    labels, logits, names = labels[:, data_cols], logits[:, model_cols], [names[i] for i in model_cols]
  return evaluation.report(labels, expit(logits), config=config, workdir=workdir,
                           counts={**counts, "test_scored": int(len(labels))},
                           best_step=int(result.best_step), names=names, dataset=dataset,
                           unmatched=unmatched)
