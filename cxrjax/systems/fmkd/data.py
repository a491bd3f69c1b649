"""FMKD stage 1: the phantom dataset, its per-image metadata, and the batches every stage reads.

The dataset is the CxrPhantoms TFDS builder (frontal views only, one image per study, so a study
id names an image as the seed's `<basename>.dat` names do). Each split is kept two ways:
  * ``Split``: un-augmented images (N, S, S) uint8 decoded once, plus labels and demographics, for
    feature extraction, evaluation and the bias analysis;
  * ``augmented_batches``: a StudyPipeline over a subset of a split with augmentation on, whose
    batches carry the ``index`` of each study, through which stored per-study arrays (teacher
    embeddings, labels) are looked up: the student sees an augmented image while its target is
    the teacher's embedding of the un-augmented one (spec B.4).
Labels follow the seed (B.1): target 1 only where the stored label is 1; uncertain (-1) and
unmentioned (NaN) become 0.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Sequence

import numpy as np

from cxrjax.data import augment as aug_lib
from cxrjax.data import registry
from cxrjax.data.builders.cxr_phantoms import CxrPhantomsConfig
from cxrjax.data.errors import DataError
from cxrjax.data.image_batches import ImageBatches, RowSubset
from cxrjax.data.labels import LABEL_INDEX
from cxrjax.data.pipeline import PipelineConfig, StudyPipeline

SPLITS = ("train", "validation", "test")


@dataclasses.dataclass
class Split:
  """One split, row-aligned with its TFDS source. N rows, S = image size, 14 labels.

  images (N, S, S) uint8 un-augmented; labels (N, 14) float32 in {0, 1} (seed rule);
  ids (N,) str study ids; race, sex, disease, age_bin (N,) str; site (N,) int; marker (N,) int
  (the injected shortcut token drawn or not).
  """
  name: str
  source: object
  images: np.ndarray
  labels: np.ndarray
  ids: np.ndarray
  race: np.ndarray
  sex: np.ndarray
  disease: np.ndarray
  age_bin: np.ndarray
  site: np.ndarray
  marker: np.ndarray

  def __len__(self) -> int:
    return len(self.ids)

  def take(self, rows: np.ndarray, name: str | None = None) -> "Split":
    """The rows `rows` of this split as a Split of its own (its source re-indexed too)."""
    rows = np.asarray(rows)
    fields = {f.name: getattr(self, f.name)[rows] for f in dataclasses.fields(self)
              if f.name not in ("name", "source")}
    return Split(name or self.name, RowSubset(self.source, rows), **fields)

  def rows_of_sites(self, sites: Sequence[int]) -> np.ndarray:
    return np.flatnonzero(np.isin(self.site, list(sites)))

  def groups(self, rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The subgroup labels of the bias analysis, {name: (n,)}."""
    rows = np.arange(len(self)) if rows is None else rows
    return {"race": self.race[rows], "sex": self.sex[rows], "disease": self.disease[rows],
            "age_bin": self.age_bin[rows], "marker": self.marker[rows].astype(str),
            "site": self.site[rows].astype(str)}


def seed_labels(stored: np.ndarray) -> np.ndarray:
  """(..., 14) stored {1, 0, -1, NaN} -> {1, 0}: 1 only where the label is 1 (seed B.1)."""
  return (np.asarray(stored) == 1.0).astype(np.float32)


def disease_of(labels: np.ndarray) -> np.ndarray:
  """The seed's 3-way disease: 'No Finding' if that is 1, overridden by 'Pleural Effusion',
  else 'Others'. labels (N, 14) in {0, 1} -> (N,) str."""
  out = np.full(len(labels), "Others", dtype=object)
  out[labels[:, LABEL_INDEX["No Finding"]] == 1] = "No Finding"
  out[labels[:, LABEL_INDEX["Pleural Effusion"]] == 1] = "Pleural Effusion"
  return out.astype(str)


def age_bin_of(age: np.ndarray) -> np.ndarray:
  """The seed's age bins 0..7 for <=20, <=30, ..., <=80, >80 (B.1), as str."""
  return np.digitize(np.asarray(age, np.float64), [20, 30, 40, 50, 60, 70, 80], right=True).astype(str)


def builder_config(data) -> CxrPhantomsConfig:
  """The CxrPhantoms config of `config.data`; its name encodes everything that defines it."""
  shortcut = data.shortcut_label or None
  tag = f"_{shortcut.replace(' ', '').lower()}{data.shortcut_strength:g}" if shortcut else ""
  name = f"fmkd_{data.builder_size}px_{data.num_studies}_s{data.phantom_seed}{tag}"
  return CxrPhantomsConfig(name=name, size=data.builder_size, num_studies=data.num_studies,
                           views="frontal", shortcut_label=shortcut,
                           shortcut_strength=data.shortcut_strength, seed=data.phantom_seed)


def prepare(data, workdir: str) -> dict:
  """Builds (once) and opens the phantom dataset; returns {split name: TFDS data source}."""
  data_dir = data.data_dir or os.path.join(workdir, "data")
  return registry.open_study_dataset("cxr_phantoms", data_dir, builder_config(data), SPLITS,
                                     hint=f"raise data.num_studies (now {data.num_studies})")


def _text(v) -> str:
  return v.decode() if isinstance(v, bytes) else str(v)


def load_split(name: str, source, image_size: int) -> Split:
  """Decodes every study of `source` once: its frontal image resized to `image_size`."""
  n = len(source)
  images = np.zeros((n, image_size, image_size), np.uint8)
  stored = np.zeros((n, 14), np.float32)
  ids, race, sex, site, age, marker = [], [], [], [], [], []
  for i in range(n):
    ex = source[i]
    images[i] = aug_lib.resize(ex["images"][0], image_size)
    stored[i] = ex["labels"]
    ids.append(_text(ex["study_id"]))
    race.append(_text(ex["race"]) or "unknown")
    sex.append({1.0: "Male", 0.0: "Female"}.get(float(ex["sex_male"]), "unknown"))
    site_text = _text(ex["site"])
    site.append(int(site_text.rsplit("_", 1)[-1]) if site_text else -1)
    age.append(float(ex["age_years"]))
    marker.append(int(ex["phantom"]["shortcut"] >= 0.5) if "phantom" in ex else 0)
  labels = seed_labels(stored)
  return Split(name, source, images, labels, np.array(ids), np.array(race), np.array(sex),
               disease_of(labels), age_bin_of(np.array(age)), np.array(site, np.int64),
               np.array(marker, np.int64))


def augmented_batches(split: Split, rows: np.ndarray, per_row: Mapping[str, np.ndarray], *,
                      batch_size: int, image_size: int, seed: int,
                      augment: aug_lib.AugmentConfig | None) -> ImageBatches:
  """Infinite augmented batches of rows `rows` of a split, with per-row arrays attached:
  {'image': (B, S, S) uint8 augmented, **{k: per_row[k][row]}}. The pipeline's index (position in
  the subset) is mapped back to the split row, so stored arrays are looked up for exactly the
  study whose image is in the batch."""
  for k, v in per_row.items():
    if len(v) != len(split):
      raise ValueError(f"per-row array {k!r} has {len(v)} rows, split {split.name} has {len(split)}")
  pipeline = StudyPipeline(RowSubset(split.source, rows), PipelineConfig(
      global_batch_size=batch_size, seed=seed, image_size=image_size, max_views=1,
      views=("PA", "AP"), uncertain="zeros", augment=augment, read_threads=1))
  return ImageBatches(pipeline, labels=False, per_row=per_row, rows=rows)
