"""The base of the TFDS builders that read a user's local download (``manual_dir``).

A subclass names its source (``_load_table(root) -> standard table``, sources.table) and its
``MANUAL_DOWNLOAD_INSTRUCTIONS``; this base turns the table into study examples
(data/features.py: up to ``max_views`` images per study, frontal first, ``image_size``^2,
JPEG or PNG)
for the splits train / validation / test (a split the download has no image of is left out,
since TFDS cannot write an empty one). Nothing is downloaded.

Usage (array_record needs no TensorFlow; neither does reading)::

  b = CxrFolder(config=FolderConfig(name='mine', spec=spec), data_dir=out,
                file_format='array_record')
  b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=root))
  src = b.as_data_source()['train']   # src[i]: one study, see data/features.py

TFDS writes into a temporary directory and renames it only when every split is written, so a
failed prepare (e.g. a DataError on a bad image) leaves no dataset that reads as complete.
With ``skip_bad`` the builder instead logs bad images to ``skipped.csv`` in the prepared
dataset's directory and prints how many it skipped.
"""
from __future__ import annotations

import abc
import dataclasses
import inspect
from pathlib import Path

import pandas as pd
import tensorflow_datasets as tfds
from etils import epath

from cxrjax.data.errors import DataError
from cxrjax.data.features import study_features
from cxrjax.data.sources import examples
from cxrjax.data.sources.table import SPLITS, SkipLog, select_views

SKIPPED_CSV = "skipped.csv"


@dataclasses.dataclass(eq=False)
class StudyConfig(tfds.core.BuilderConfig):
  """What every real-data builder is configured by. A custom config needs a name of its own
  (TFDS refuses a custom config named like a built-in one); the name is a folder in data_dir.

  image_size: side of the square images (centre-cropped, then resized; sources.images).
  max_views: K, the most images kept per study (frontal first).
  views: view filter, '*' or a tuple of labels.VIEWS such as ('PA', 'AP').
  skip_bad: log and skip bad images (skipped.csv) instead of failing on the first one.
  encoding: 'jpeg' (quality 95) or 'png' (lossless, ~3x slower to decode); data/features.py.
  """
  image_size: int = 256
  max_views: int = 2
  views: str | tuple[str, ...] = "*"
  skip_bad: bool = False
  encoding: str = "jpeg"


class StudyBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Abstract: subclasses define _load_table, MANUAL_DOWNLOAD_INSTRUCTIONS and BUILDER_CONFIGS."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  DESCRIPTION = "Chest X-ray studies from a local download."
  HOMEPAGE = ""

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS's own lookup goes through importlib_resources (absent without etils[epath]'s
    # extras) only to find a checksums file, which a manual-download builder has none of.
    return epath.Path(inspect.getfile(cls))

  @abc.abstractmethod
  def _load_table(self, root: Path) -> pd.DataFrame:
    """The manual_dir -> the standard image table (sources.table)."""

  def _info(self) -> tfds.core.DatasetInfo:
    # Built directly: dataset_info_from_configs() looks for metadata files inside an installed
    # TFDS dataset package and fails for builders defined elsewhere.
    return tfds.core.DatasetInfo(
        builder=self, description=self.DESCRIPTION, features=study_features(encoding=self.builder_config.encoding),
        homepage=self.HOMEPAGE or None, supervised_keys=None)

  def _manual_root(self, dl_manager) -> Path:
    try:
      return Path(dl_manager.manual_dir)
    except AssertionError as e:  # TFDS's way of saying "missing or empty"
      raise DataError(f"{self.name}: {e}") from None

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    table = self._load_table(self._manual_root(dl_manager))
    kept = select_views(table, cfg.views)
    present = [s for s in SPLITS if (kept.split == s).any()]
    if not present:
      raise DataError(f"{self.name}: no images of views {cfg.views!r} in the download")
    return {s: self._generate_examples(table, s) for s in present}

  def _generate_examples(self, table: pd.DataFrame, split: str):
    cfg = self.builder_config
    yield from examples.generate(table, split, image_size=cfg.image_size,
                                 max_views=cfg.max_views, views=cfg.views,
                                 skip_log=self._skip_log, encoding=cfg.encoding)

  def _download_and_prepare(self, dl_manager, download_config):
    self._skip_log = SkipLog() if self.builder_config.skip_bad else None
    super()._download_and_prepare(dl_manager, download_config)
    if self._skip_log is not None:
      # self.data_dir is TFDS's temporary directory here, renamed along with the data.
      self._skip_log.write(self.data_dir, SKIPPED_CSV)

  def download_and_prepare(self, *args, **kwargs):
    self._skip_log = None
    super().download_and_prepare(*args, **kwargs)
    if self._skip_log is not None:
      print(f"{self.name}: skipped {len(self._skip_log)} bad image(s); list in "
            f"{Path(self.data_dir) / SKIPPED_CSV}")
