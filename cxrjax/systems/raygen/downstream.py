"""The seed's downstream experiment (C.9.4): a DenseNet classifier of RayGen's 10 findings trained on
real images only, on real + 100 % synthetic and on real + 50 % synthetic, each tested on real.

Data as the seed's: NaN -> 0, studies positive for Enlarged Cardiomediastinum, No Finding, Pleural
Other or Support Devices dropped, the 10 classes of RAYGEN_CLASSES. Synthetic images are
class-prompted (the prompt is the class name), in inverse-frequency counts scaled to the real
training set's size (capped by downstream.max_synthetic on a CPU), each with the one-hot label of
its prompt (the seed's pneumothorax -> pneumonia index bug behind downstream.faithful_label_bug).
The three classifiers share one compiled program and select their best step on the real
validation split's macro AUROC, as the seed does. Beyond the seed: bootstrap CIs and macro F1 at 0.5.
"""
from __future__ import annotations

import numpy as np

from cxrjax.core.stage import Run
from cxrjax.core.writers import say
from cxrjax.data.iterators import ShuffledBatches
from cxrjax.evaluate.multilabel import f1_at_half, macro, macro_value, per_label
from cxrjax.evaluate.synthetic_mix import (RAYGEN_CLASSES, first_fraction,
                                           inverse_frequency_counts, prompt_labels)
from cxrjax.systems.raygen.generator import Sampling
from cxrjax.systems.raygen.perceptual import network
from cxrjax.tasks.image_classifier import ImageNetwork, bce_classifier_task

DROPPED = ("Enlarged Cardiomediastinum", "No Finding", "Pleural Other", "Support Devices")
ARMS = ("real", "real+100%", "real+50%")


def seed_subset(images: np.ndarray, labels: np.ndarray, names: list) -> tuple[np.ndarray, np.ndarray]:
  """The seed's cleaning of one split: (images, (N, 10) labels in RAYGEN_CLASSES order)."""
  y = np.nan_to_num(labels, nan=0.0)
  y = np.where(y < 0, 0.0, y)  # an uncertain label left by the policy counts as absent here
  drop = np.zeros(len(y), bool)
  for name in DROPPED:
    if name in names:
      drop |= y[:, names.index(name)] == 1
  missing = [c for c in RAYGEN_CLASSES if c not in names]
  if missing:
    raise ValueError(f"the dataset lacks RayGen's classes {missing}; the downstream experiment "
                     f"needs CheXpert's label names")
  cols = [names.index(c) for c in RAYGEN_CLASSES]
  return images[~drop], y[~drop][:, cols].astype(np.float32)


def synthetic_plan(real_labels: np.ndarray, total: int) -> list:
  """The class of every synthetic image of the 100 % set, in the seed's order (rarest class's
  share first); the 50 % set is first_fraction of the same counts."""
  counts = inverse_frequency_counts(real_labels.sum(axis=0).astype(int), RAYGEN_CLASSES, total)
  return [name for name, n in counts.items() for _ in range(n)], counts


def run_downstream(run: Run, splits: dict, names: list, generator, config, parent: dict) -> dict:
  """Trains the three classifiers and scores them on the real test split."""
  dc = config.downstream
  train_x, train_y = seed_subset(splits["train"].images, splits["train"].labels, names)
  val_x, val_y = seed_subset(splits["valid"].images, splits["valid"].labels, names)
  test_x, test_y = seed_subset(splits["test"].images, splits["test"].labels, names)
  total = min(len(train_x), dc.max_synthetic)
  classes, counts = synthetic_plan(train_y, total)
  say(f"[downstream] {len(train_x)} real training images; generating {len(classes)} "
      f"class-prompted synthetic ones ({counts})")
  fake = generator.generate(classes, run.mesh, seed=config.seed + 100,
                            batch_size=config.eval.batch_size, sampling=Sampling.from_config(config.sampling))
  fake = np.round(np.clip(fake, 0, 1) * 255).astype(np.uint8)
  fake_y = prompt_labels(classes, RAYGEN_CLASSES, dc.faithful_label_bug)
  half_counts = first_fraction(counts, 0.5)
  half = np.concatenate([np.flatnonzero(np.array(classes) == name)[:n]
                         for name, n in half_counts.items()]).astype(int)
  arms = {"real": (train_x, train_y),
          "real+100%": (np.concatenate([train_x, fake]), np.concatenate([train_y, fake_y])),
          "real+50%": (np.concatenate([train_x, fake[half]]), np.concatenate([train_y, fake_y[half]]))}

  module = network(config.perceptual, len(RAYGEN_CLASSES))
  task = bce_classifier_task(module, image_size=config.data.image_size, intensity="unit", channels=1)
  ec = config.eval
  out = {"counts": {"real_train": len(train_x), "synthetic": len(classes),
                    "synthetic_half": int(len(half)), "validation": len(val_x), "test": len(test_x),
                    "per_class": counts}}
  for i, arm in enumerate(ARMS):
    x, y = arms[arm]

    def evaluate(state) -> dict:
      logits, _ = ImageNetwork(module, state.variables(), "unit", 1).extract(
          val_x, run.mesh, ec.batch_size)
      return {"val_macro_auroc": macro_value(val_y, logits)}

    data = ShuffledBatches({"image": x, "labels": y}, config.downstream_train.batch_size,
                           seed=config.seed + 20 + i)
    result = run.stage(task, data, config.downstream_train, seed=config.seed + 20,
                       name=f"downstream_{i}", parent=parent,
                       defines={"arm": arm, "downstream": dc, "net": config.perceptual.block_config},
                       evaluate=evaluate, best=("val_macro_auroc", "max"))
    logits, _ = ImageNetwork(module, result.variables(), "unit", 1).extract(test_x, run.mesh,
                                                                            ec.batch_size)
    probs = 1.0 / (1.0 + np.exp(-logits))
    kw = dict(n_resamples=ec.n_bootstrap, alpha=ec.alpha, seed=ec.seed)
    out[arm] = {"per_label": per_label(test_y, probs, names=RAYGEN_CLASSES, **kw),
                "macro": macro(test_y, probs, **kw), "f1": f1_at_half(test_y, probs),
                "best_step": int(result.best_step)}
    auc = out[arm]["macro"]["auroc"]
    say(f"[downstream] {arm}: test macro AUROC " + ("n/a" if auc is None else f"{auc['value']:.3f}"))
  return out
