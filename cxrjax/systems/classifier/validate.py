"""Checks of a classifier config's values, before anything is rendered, loaded or trained."""
from __future__ import annotations

import os

from cxrjax.core.checks import all_finite, choice, densenet_block, positive, probability, train_block
from cxrjax.core.errors import ConfigError
from cxrjax.data.labels import UNCERTAIN_POLICIES, VIEWS
from cxrjax.tasks.image_classifier import INTENSITIES

CLASS_WEIGHTS = ("none", "balanced")


def validate_config(c) -> None:
  """Raises ConfigError naming the first field whose value cannot work."""
  all_finite(c)
  d = c.data
  positive(d.image_size, "data.image_size")
  if not set(d.views) <= set(VIEWS) or not d.views:
    raise ConfigError(f"data.views={tuple(d.views)} must be a non-empty subset of {VIEWS}")
  choice(d.uncertain, UNCERTAIN_POLICIES, "data.uncertain")
  choice(d.intensity, INTENSITIES, "data.intensity")
  choice(d.channels, (1, 3), "data.channels")
  if len(d.splits) != 3 or len(set(d.splits)) != 3:
    raise ConfigError(f"data.splits={tuple(d.splits)} must name 3 distinct splits: train, "
                      "validation, test")
  if not c.model.init_from:
    densenet_block(c.model, "model")
  elif not os.path.isfile(os.path.expanduser(c.model.init_from)):
    raise ConfigError(f"model.init_from={c.model.init_from!r} is not a file")
  choice(c.loss.class_weights, CLASS_WEIGHTS, "loss.class_weights")
  train_block(c.train, "train")
  for key in ("hflip_prob", "brightness", "contrast", "translate"):
    probability(c.augment[key], f"augment.{key}", closed_high=True)
  positive(c.eval.batch_size, "eval.batch_size")
  positive(c.eval.n_bootstrap, "eval.n_bootstrap")
  if not 0 < c.eval.alpha < 1:
    raise ConfigError(f"eval.alpha={c.eval.alpha} must be in (0, 1)")
