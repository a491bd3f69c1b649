"""The classifier's data: a prepared TFDS study dataset and its batches.

Every split is read through data.pipeline.StudyPipeline (frontal views, one per study, the
uncertain policy applied), streamed rather than decoded into memory, so MIMIC-CXR-sized datasets
work as the phantoms do.
"""
from __future__ import annotations

import os

import numpy as np

from cxrjax.data import registry
from cxrjax.data.errors import DataError
from cxrjax.data.labels import NUM_LABELS, apply_uncertain_policy
from cxrjax.data.pipeline import PipelineConfig


def open_dataset(dc, workdir: str) -> dict:
  """{split: TFDS data source} of config.data; renders cxr_phantoms on first use, and for a
  real-data builder names the `python -m cxrjax.data prepare` command when it is not prepared."""
  if dc.builder not in registry.builder_classes():  # the message names the config field
    raise DataError(f"data.builder={dc.builder!r}; choose one of {sorted(registry.builder_classes())}")
  data_dir = dc.data_dir or os.path.join(workdir, "data")
  return registry.open_study_dataset(dc.builder, data_dir, list(dc.builder_config), tuple(dc.splits),
                                     hint="set data.splits")


def pipeline_config(dc, batch_size: int, seed: int, augment=None, *, train: bool) -> PipelineConfig:
  kw = dict(image_size=dc.image_size, max_views=1, views=tuple(dc.views), uncertain=dc.uncertain,
            read_threads=dc.read_threads)
  if train:
    return PipelineConfig(global_batch_size=batch_size, seed=seed, augment=augment, **kw)
  return PipelineConfig.for_eval(batch_size, seed=seed, **kw)


def positive_weights(source, uncertain: str, max_studies: int = 20_000, seed: int = 0) -> np.ndarray:
  """(14,) float32 n_neg / n_pos per label over (a random sample of up to `max_studies`) studies
  of `source`, after the uncertain policy; 1 where a label has no positive or no negative."""
  n = len(source)
  rows = np.arange(n) if n <= max_studies else np.sort(
      np.random.default_rng(seed).choice(n, max_studies, replace=False))
  labels = apply_uncertain_policy(np.stack([np.asarray(source[int(i)]["labels"], np.float32)
                                            for i in rows]), uncertain)
  pos, neg = (labels == 1).sum(0), (labels == 0).sum(0)
  w = np.where((pos > 0) & (neg > 0), neg / np.maximum(pos, 1), 1.0)
  assert w.shape == (NUM_LABELS,)
  return w.astype(np.float32)
