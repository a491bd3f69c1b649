"""RadDiffusion's data: multi-view studies of a prepared dataset, as training batches and as arrays.

A study is up to data.max_views views, frontal first (data.pipeline orders them), each resized to
data.image_size and scaled to [0, 1]; a view mask says which exist (a study with one view is a
plain ViT input). Labels follow the seed (D.2.2): the uncertain policy of data.uncertain (U-Ones)
then NaN -> 0, 14 CheXpert labels.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from cxrjax.core.writers import say
from cxrjax.data import registry
from cxrjax.data.errors import DataError
from cxrjax.data.image_batches import RowSubset
from cxrjax.data.labels import VIEW_INDEX
from cxrjax.data.pipeline import PipelineConfig, StudyPipeline

LATERAL = VIEW_INDEX["L"]


def open_dataset(dc, workdir: str) -> dict:
  """{split: source} of config.data (phantoms rendered on first use)."""
  data_dir = dc.data_dir or os.path.join(workdir, "data")
  return registry.open_study_dataset(dc.builder, data_dir, list(dc.builder_config), tuple(dc.splits),
                                     hint="set data.splits")


def pipeline_config(dc, batch_size: int, seed: int, *, train: bool) -> PipelineConfig:
  kw = dict(image_size=dc.image_size, max_views=dc.max_views, views=None, uncertain=dc.uncertain,
            read_threads=dc.read_threads)
  if train:
    return PipelineConfig(global_batch_size=batch_size, seed=seed, **kw)
  return PipelineConfig.for_eval(batch_size, seed=seed, **kw)


def seed_labels(labels: np.ndarray) -> np.ndarray:
  """Labels after the uncertain policy -> {0, 1}: unmentioned (NaN) counts as negative (D.2.2)."""
  return np.nan_to_num(np.asarray(labels, np.float32), nan=0.0)


class StudyBatches:
  """The loop's BatchIterator: {'images': (B, V, S, S) uint8, 'view_mask': (B, V) bool,
  'labels': (B, 14) float32 in {0, 1}} from a training StudyPipeline."""

  def __init__(self, pipeline: StudyPipeline):
    self.pipeline = pipeline

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    b = next(self.pipeline)
    return {"images": b["images"], "view_mask": b["view_mask"], "labels": seed_labels(b["labels"])}

  def get_state(self) -> dict:
    return self.pipeline.get_state()

  def set_state(self, state: dict) -> None:
    self.pipeline.set_state(state)


@dataclasses.dataclass
class Studies:
  """Every study of a split (or its first `limit`), in memory: images (N, V, S, S) uint8,
  view_mask (N, V) bool, views (N, V) int32 (labels.VIEWS indices, -1 padding), labels (N, 14)
  {0, 1}."""
  images: np.ndarray
  view_mask: np.ndarray
  views: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)

  def frontal_only(self) -> "Studies":
    """The same studies with their lateral views masked out (the multi-view comparison)."""
    return dataclasses.replace(self, view_mask=self.view_mask & (self.views != LATERAL))

  def take(self, rows: np.ndarray) -> "Studies":
    return Studies(self.images[rows], self.view_mask[rows], self.views[rows], self.labels[rows])


def load_studies(source, dc, *, seed: int, limit: int | None = None, name: str = "") -> Studies:
  """Reads (the first `limit` studies of) a split once, un-augmented; studies without a single
  view are refused (there is nothing to encode)."""
  sub = source if limit is None or limit >= len(source) else RowSubset(source, np.arange(limit))
  pipeline = StudyPipeline(sub, pipeline_config(dc, 64, seed, train=False))
  parts = [{k: b[k][b["_mask"]] for k in ("images", "view_mask", "views", "labels")} for b in pipeline]
  studies = Studies(*(np.concatenate([p[k] for p in parts]) for k in ("images", "view_mask", "views",
                                                                       "labels")))
  studies.labels = seed_labels(studies.labels)
  empty = np.flatnonzero(~studies.view_mask.any(axis=1))
  if empty.size:
    raise DataError(f"split {name}: {empty.size} stud(ies) have no image (first at position "
                    f"{empty[0]}); every study needs at least one view")
  say(f"[data] {name}: {len(studies)} studies, {int(studies.view_mask.sum())} views "
      f"({int((studies.views == LATERAL).sum())} lateral)")
  return studies
