"""RayGen's data: one frontal image and its report text per study, each split read once into memory.

The seed keeps one AP image per study and the IMPRESSION section of its report (spec C.2). A split
here is `Reports`: the first frontal view of every study (resized to data.image_size, uint8), the
report text (the fields named by data.report_fields, joined by a space, then the seed's cleaning:
letters and spaces only, lower case) and the labels (the uncertain policy of data.uncertain, NaN
kept for unmentioned findings). Every stage's batches come from these arrays
(data.iterators.ShuffledBatches), so the VQ-GAN, the text encoder and the generator see the same
studies.
"""
from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np

from cxrjax.core.writers import say
from cxrjax.data import registry
from cxrjax.data.errors import DataError
from cxrjax.data.pipeline import PipelineConfig, StudyPipeline
from cxrjax.data.wordpiece import clean_impression

FRONTAL = ("PA", "AP")


def open_dataset(dc, workdir: str) -> dict:
  """{split: source} of config.data (phantoms rendered on first use)."""
  data_dir = dc.data_dir or os.path.join(workdir, "data")
  return registry.open_study_dataset(dc.builder, data_dir, list(dc.builder_config), tuple(dc.splits),
                                     hint="set data.splits")


@dataclasses.dataclass
class Reports:
  """A split in memory: images (N, S, S) uint8 (one frontal view per study), texts (N,) cleaned
  report strings, labels (N, C) float32 in {1, 0, NaN}, index (N,) the studies' source rows."""
  images: np.ndarray
  texts: list
  labels: np.ndarray
  index: np.ndarray

  def __len__(self) -> int:
    return len(self.images)

  def take(self, rows) -> "Reports":
    rows = np.asarray(rows)
    return Reports(self.images[rows], [self.texts[i] for i in rows], self.labels[rows],
                   self.index[rows])


def report_text(study, fields) -> str:
  """The study's report as the seed feeds it to the tokenizer: the named fields joined, cleaned
  (spec C.2.2)."""
  parts = []
  for f in fields:
    value = study.get(f, b"")
    parts.append(value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value))
  return clean_impression(" ".join(p for p in parts if p))


def load_reports(source, dc, *, seed: int, name: str, limit: int = 0) -> Reports:
  """Reads a split (its first `limit` studies when limit > 0) once, un-augmented: studies with no
  frontal view are left out (the seed keeps one AP image per study); a split left empty is an
  error naming data.views."""
  if limit and limit < len(source):
    from cxrjax.data.image_batches import RowSubset
    source = RowSubset(source, np.arange(limit))
  config = PipelineConfig.for_eval(64, seed=seed, image_size=dc.image_size, max_views=1,
                                   views=tuple(dc.views), uncertain=dc.uncertain,
                                   read_threads=dc.read_threads)
  images, labels, index = [], [], []
  for b in StudyPipeline(source, config):
    b = {k: b[k] for k in ("_mask", "view_mask", "images", "labels", "index")}
    if jax.process_count() > 1:  # each process read its block of the batch: every process
      b = multihost_utils.process_allgather(b, tiled=True)  # keeps the whole split, in order
    keep = b["_mask"] & b["view_mask"][:, 0]
    images.append(b["images"][keep, 0])
    labels.append(b["labels"][keep])
    index.append(b["index"][keep])
  index = np.concatenate(index).astype(np.int64)
  if not index.size:
    raise DataError(f"split {name}: no study has a view in data.views={tuple(dc.views)}")
  texts = [report_text(source[int(i)], dc.report_fields) for i in index]
  empty = sum(not t for t in texts)
  if empty:
    say(f"[data] {name}: {empty} of {len(texts)} studies have an empty report in "
        f"{tuple(dc.report_fields)}; they train as unconditional examples")
  out = Reports(np.concatenate(images), texts, np.concatenate(labels).astype(np.float32), index)
  say(f"[data] {name}: {len(out)} studies, one frontal view each, reports from "
      f"{'+'.join(dc.report_fields)} ({np.mean([len(t.split()) for t in texts]):.0f} words on average)")
  return out


def unit_images(images):
  """(B, S, S) uint8 -> (B, S, S, 3) float32 in [-1, 1], grey replicated: the seed's VQ-GAN input
  (the RGB of a greyscale JPEG, scaled 2x - 1). Runs inside the compiled step."""
  x = jnp.asarray(images).astype(jnp.float32) * (2.0 / 255.0) - 1.0
  return jnp.repeat(x[..., None], 3, axis=-1)


def to_uint8(images) -> np.ndarray:
  """(B, S, S, 3) decoder output -> (B, S, S) uint8: clamped to [-1, 1] as the seed's decode
  wrapper, channels averaged."""
  x = np.clip(np.asarray(images, np.float32), -1.0, 1.0).mean(axis=-1)
  return np.round((x + 1.0) * 127.5).astype(np.uint8)
