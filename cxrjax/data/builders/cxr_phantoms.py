"""TFDS builder of the phantom world: rendered studies in the one study spec, like real data.

Each config fixes the world (``seed``, ``PhantomConfig`` knobs, the injected shortcut), the
image size (64..512), the number of studies and the views ('frontal': one PA/AP image per
study; 'frontal_lateral': a lateral too in ``lateral_rate`` of studies). Studies are numbered
0..num_studies-1; study i is ``world.make_example(seed, i, ...)``, so any config draws the same
patients, labels and reports whatever its size. Splits train / validation / test go by PATIENT
(``split_of_patient(seed, patient, (0.8, 0.1, 0.1))``): no patient is in two splits. A split
with no patient (possible for tiny datasets) is not written.

Usage (array_record needs no TensorFlow; neither does reading)::

  b = CxrPhantoms(config=CxrPhantomsConfig(name='tiny', size=64, num_studies=40),
                  data_dir=out, file_format='array_record')
  b.download_and_prepare()
  src = b.as_data_source()['train']    # src[i]: one study, see data/features.py

TFDS writes into ``<version>.incomplete*`` and renames it only when every split is written, so
a prepare that fails midway leaves nothing that ``as_data_source()`` reads as complete.
``render`` in the config swaps the renderer (tests use a trivial stand-in); it is not part of
the dataset's identity, so give a custom renderer a config name of its own.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Callable

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from cxrjax.core.errors import ConfigError
from cxrjax.data.features import IMAGE_ENCODINGS, metadata, study_features
from cxrjax.data.labels import CHEXPERT_LABELS
from cxrjax.data.phantoms.attributes import PhantomConfig, patient_of, split_of_patient
from cxrjax.data.phantoms.world import make_example

SPLITS = ("train", "validation", "test")
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
VIEW_MODES = ("frontal", "frontal_lateral")


@dataclasses.dataclass(eq=False)
class CxrPhantomsConfig(tfds.core.BuilderConfig):
  """One phantom dataset. A custom config needs a name of its own (a folder in data_dir).

  size: image side, 64..512. num_studies: studies 0..num_studies-1 across all splits.
  views: 'frontal' or 'frontal_lateral'. shortcut_label / shortcut_strength: the injected
  shortcut (see phantoms.attributes). seed: the world. phantom: the other PhantomConfig knobs
  (its shortcut and lateral fields are overridden by this config's). render: renderer override
  ``render(attrs, size) -> (images, view_names)``; None = phantoms.render.render_views.
  encoding: 'jpeg' (quality 95, decodes ~3x faster) or 'png' (lossless pixels); data/features.py.
  """
  size: int = 128
  num_studies: int = 2000
  views: str = "frontal_lateral"
  shortcut_label: str | None = None
  shortcut_strength: float = 0.0
  seed: int = 0
  phantom: PhantomConfig = dataclasses.field(default_factory=PhantomConfig)
  render: Callable | None = None
  encoding: str = "jpeg"

  def __post_init__(self):
    if not 64 <= self.size <= 512:
      raise ConfigError(f"CxrPhantomsConfig {self.name!r}: size must be in 64..512, got {self.size}")
    if self.num_studies < 1:
      raise ConfigError(f"CxrPhantomsConfig {self.name!r}: num_studies must be >= 1, got {self.num_studies}")
    if self.views not in VIEW_MODES:
      raise ConfigError(f"CxrPhantomsConfig {self.name!r}: views must be one of {VIEW_MODES}, got {self.views!r}")
    if self.encoding not in IMAGE_ENCODINGS:
      raise ConfigError(f"CxrPhantomsConfig {self.name!r}: encoding must be one of {IMAGE_ENCODINGS}, "
                        f"got {self.encoding!r}")
    self.phantom_config()  # validates the shortcut fields now, not midway through a prepare

  def phantom_config(self) -> PhantomConfig:
    """The PhantomConfig this dataset samples from (config fields applied)."""
    lateral = self.phantom.lateral_rate if self.views == "frontal_lateral" else 0.0
    return dataclasses.replace(self.phantom, shortcut_label=self.shortcut_label,
                               shortcut_strength=self.shortcut_strength, lateral_rate=lateral)


class CxrPhantoms(tfds.core.GeneratorBasedBuilder):
  """Phantom chest radiograph studies with ground truth (``phantom`` feature)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [
      CxrPhantomsConfig(name="frontal_128", description="5k studies, one 128^2 frontal view each.",
                        size=128, num_studies=5000, views="frontal"),
      CxrPhantomsConfig(name="frontal_lateral_256", description="20k studies, 256^2 frontal + lateral.",
                        size=256, num_studies=20000, views="frontal_lateral"),
      CxrPhantomsConfig(name="shortcut_effusion_128",
                        description="5k frontal studies; a marker tracks Pleural Effusion (strength 0.8).",
                        size=128, num_studies=5000, views="frontal", shortcut_label="Pleural Effusion",
                        shortcut_strength=0.8),
  ]
  DEFAULT_CONFIG_NAME = "frontal_128"

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS's own lookup goes through importlib_resources only to find a checksums file, which a
    # builder that downloads nothing has none of.
    return epath.Path(inspect.getfile(cls))

  def _info(self) -> tfds.core.DatasetInfo:
    # Built directly: dataset_info_from_configs() looks for metadata files inside an installed
    # TFDS dataset package and fails for builders defined elsewhere.
    from cxrjax.data.registry import config_items  # late: registry imports the builders
    return tfds.core.DatasetInfo(
        builder=self, features=study_features(phantom=True, encoding=self.builder_config.encoding),
        metadata=metadata(CHEXPERT_LABELS, config_items(type(self), self.builder_config)),
        supervised_keys=None,
        description="Procedurally rendered chest radiograph studies with known labels, severities, "
                    "reports, a tabular vector and a PE state (cxrjax phantom world).")

  def _study_splits(self) -> np.ndarray:
    """(num_studies,) split index of every study, by its patient."""
    cfg = self.builder_config
    patients = patient_of(np.arange(cfg.num_studies), cfg.phantom_config())
    by_patient = {p: split_of_patient(cfg.seed, int(p), SPLIT_FRACTIONS) for p in np.unique(patients)}
    return np.array([by_patient[p] for p in patients])

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    splits = self._study_splits()
    # A tiny dataset may have no patient in a split; TFDS refuses to write an empty one.
    return {name: self._generate_examples(np.flatnonzero(splits == k))
            for k, name in enumerate(SPLITS) if (splits == k).any()}

  def _generate_examples(self, indices: np.ndarray):
    cfg = self.builder_config
    pcfg = cfg.phantom_config()
    for index in indices:
      example = make_example(cfg.seed, int(index), pcfg, cfg.size, render=cfg.render,
                             encoding=cfg.encoding)
      yield example["study_id"], example
