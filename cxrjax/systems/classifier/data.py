"""The classifier's data: a prepared TFDS study dataset and its batches.

Every split is read through data.pipeline.StudyPipeline (frontal views, one per study, the
uncertain policy applied), streamed rather than decoded into memory, so MIMIC-CXR-sized datasets
work as the phantoms do.
"""
from __future__ import annotations

import os

import numpy as np

from cxrjax.core.errors import ConfigError
from cxrjax.data import registry
from cxrjax.data.errors import DataError
from cxrjax.data.features import label_names
from cxrjax.data.labels import apply_uncertain_policy
from cxrjax.data.pipeline import PipelineConfig


def builder_items(builder: str, items, phantom_items) -> list[str]:
  """The builder's config items: ``items`` when given; else the system's phantom world for
  cxr_phantoms, and nothing (the default config, or the only one prepared) for the others, so
  switching data.builder never carries another builder's keys along."""
  if items:
    return list(items)
  return list(phantom_items) if builder == "cxr_phantoms" else []


def open_split_sources(builder: str, data_dir: str, items: list[str], splits, *, field: str,
                       hint: str) -> dict:
  """{split: TFDS data source}; a builder or a key=value item it does not take names ``field``."""
  if builder not in registry.builder_classes():  # the message names the config field
    raise DataError(f"{field.rsplit('.', 1)[0]}.builder={builder!r}; choose one of "
                    f"{sorted(registry.builder_classes())}")
  try:
    return registry.open_study_dataset(builder, data_dir, items, tuple(splits), hint=hint)
  except ConfigError as e:
    raise ConfigError(f"{field}={tuple(items)}: {e}") from None


def open_dataset(dc, workdir: str) -> tuple[dict, tuple[str, ...]]:
  """({split: TFDS data source} of config.data, the dataset's label names); renders cxr_phantoms
  on first use, and for a real-data builder names the `python -m cxrjax.data prepare` command
  when it is not prepared."""
  data_dir = dc.data_dir or os.path.join(workdir, "data")
  items = builder_items(dc.builder, dc.builder_config, dc.phantom_config)
  sources = open_split_sources(dc.builder, data_dir, items, dc.splits, field="data.builder_config",
                               hint="set data.splits")
  return sources, label_names(sources[dc.splits[0]])


def open_eval_split(config, workdir: str):
  """(source, label names, its name for reports) of eval.builder's eval.split."""
  ec, dc = config.eval, config.data
  data_dir = ec.data_dir or dc.data_dir or os.path.join(workdir, "data")
  items = builder_items(ec.builder, ec.builder_config, dc.phantom_config)
  source = open_split_sources(ec.builder, data_dir, items, (ec.split,), field="eval.builder_config",
                              hint="set eval.split")[ec.split]
  return source, label_names(source), dataset_name(ec.builder, source)


def dataset_name(builder: str, source) -> str:
  """'cxr_folder/covid': the builder and the prepared config a source was read from."""
  info = getattr(source, "dataset_info", None)
  name = getattr(info, "config_name", None)
  return f"{builder}/{name}" if name else builder


def pipeline_config(dc, batch_size: int, seed: int, augment=None, *, train: bool) -> PipelineConfig:
  kw = dict(image_size=dc.image_size, max_views=1, views=tuple(dc.views), uncertain=dc.uncertain,
            read_threads=dc.read_threads)
  if train:
    return PipelineConfig(global_batch_size=batch_size, seed=seed, augment=augment, **kw)
  return PipelineConfig.for_eval(batch_size, seed=seed, **kw)


def positive_weights(source, uncertain: str, max_studies: int = 20_000, seed: int = 0) -> np.ndarray:
  """(C,) float32 n_neg / n_pos per label over (a random sample of up to `max_studies`) studies
  of `source`, after the uncertain policy; 1 where a label has no positive or no negative."""
  n = len(source)
  rows = np.arange(n) if n <= max_studies else np.sort(
      np.random.default_rng(seed).choice(n, max_studies, replace=False))
  labels = apply_uncertain_policy(np.stack([np.asarray(source[int(i)]["labels"], np.float32)
                                            for i in rows]), uncertain)
  pos, neg = (labels == 1).sum(0), (labels == 0).sum(0)
  w = np.where((pos > 0) & (neg > 0), neg / np.maximum(pos, 1), 1.0)
  return w.astype(np.float32)
