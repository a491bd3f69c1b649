"""The classifier's data: a prepared TFDS study dataset, its batches and model inputs.

Every split is read through data.pipeline.StudyPipeline (frontal views, one per study, the
uncertain policy applied), streamed rather than decoded into memory, so MIMIC-CXR-sized datasets
work as the phantoms do.
"""
from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np

from cxrjax.core.writers import say
from cxrjax.data import augment as aug_lib
from cxrjax.data import cli
from cxrjax.data.errors import DataError
from cxrjax.data.labels import NUM_LABELS, apply_uncertain_policy
from cxrjax.data.pipeline import PipelineConfig, StudyPipeline

INTENSITIES = ("unit", "xrv")


def open_dataset(dc, workdir: str) -> dict:
  """{split: TFDS data source} of config.data; renders cxr_phantoms on first use, and for a
  real-data builder names the `python -m cxrjax.data prepare` command when it is not prepared."""
  classes = cli.builder_classes()
  if dc.builder not in classes:
    raise DataError(f"data.builder={dc.builder!r}; choose one of {sorted(classes)}")
  cls = classes[dc.builder]
  data_dir = os.path.expanduser(dc.data_dir) if dc.data_dir else os.path.join(workdir, "data")
  items = list(dc.builder_config)
  if dc.builder == "cxr_phantoms":
    builder = cli.make_builder(cls, cli.make_config(cls, items), data_dir)
    if not builder.is_prepared():
      say(f"[data] rendering {dc.builder} {builder.builder_config.name} into {data_dir}")
      builder.download_and_prepare()
  else:
    builder = cli.open_prepared(cls, data_dir, items)
  sources = builder.as_data_source()
  missing = [s for s in dc.splits if s not in sources]
  if missing:
    raise DataError(f"{dc.builder} {builder.builder_config.name} in {data_dir} has no split(s) "
                    f"{missing}; it has {sorted(sources)} (set data.splits)")
  return {s: sources[s] for s in dc.splits}


def pipeline_config(dc, batch_size: int, seed: int, augment=None, *, train: bool) -> PipelineConfig:
  kw = dict(image_size=dc.image_size, max_views=1, views=tuple(dc.views), uncertain=dc.uncertain,
            read_threads=dc.read_threads)
  if train:
    return PipelineConfig(global_batch_size=batch_size, seed=seed, augment=augment, **kw)
  return PipelineConfig.for_eval(batch_size, seed=seed, **kw)


def augment_config(cfg, image_size: int) -> aug_lib.AugmentConfig:
  return aug_lib.AugmentConfig(size=image_size, scale=tuple(cfg.scale), rotate_deg=cfg.rotate_deg,
                               translate=cfg.translate, brightness=cfg.brightness,
                               contrast=cfg.contrast, hflip_prob=cfg.hflip_prob)


class ImageLabelBatches:
  """A StudyPipeline's batches reduced to {'image': (B, S, S) uint8, 'labels': (B, 14) float32
  with NaN = unlabelled} (+ '_mask' (B,) bool in eval mode: a real study with a kept view); the
  loop's BatchIterator. A study with no view of data.views gets all-NaN targets."""

  def __init__(self, pipeline: StudyPipeline, with_mask: bool = False):
    self.pipeline, self.with_mask = pipeline, with_mask

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    b = next(self.pipeline)
    has_view = b["view_mask"][:, 0]  # studies without a kept view: no image, so no targets
    out = {"image": b["images"][:, 0],
           "labels": np.where(has_view[:, None], b["labels"], np.nan).astype(np.float32)}
    if self.with_mask:
      out["_mask"] = b["_mask"] & has_view
    return out

  def get_state(self) -> dict:
    return self.pipeline.get_state()

  def set_state(self, state: dict) -> None:
    self.pipeline.set_state(state)


def model_input(images, intensity: str, channels: int):
  """(B, S, S) uint8 -> (B, S, S, channels) float32: [-1, 1] ('unit') or torchxrayvision's
  [-1024, 1024] ('xrv'), the grey image replicated when channels == 3."""
  x = jnp.asarray(images).astype(jnp.float32) * (2.0 / 255.0) - 1.0
  if intensity == "xrv":
    x = x * 1024.0
  x = x[..., None]
  return jnp.repeat(x, channels, axis=-1) if channels != 1 else x


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
