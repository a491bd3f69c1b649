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
dataset's directory and prints how many it skipped. Images left out for other reasons go to the
same file whatever ``skip_bad`` says: a CSV row repeated exactly (stored once) and, under
``skip_bad``, a file whose bytes were already written in another split (sources.identity).

Before writing, the builder warns (stderr) about splits too small to measure anything
(< ``TINY_SPLIT`` studies) and labels with one class in an evaluation split, naming the config
keys that change the split (``SPLIT_HINT``). The dataset's metadata records its label names and
the config items it was prepared with (features.metadata).
"""
from __future__ import annotations

import abc
import dataclasses
import inspect
import sys
from pathlib import Path

import pandas as pd
import tensorflow_datasets as tfds
from etils import epath

from cxrjax.data.errors import DataError
from cxrjax.data.features import metadata, study_features
from cxrjax.data.labels import CHEXPERT_LABELS
from cxrjax.data.sources import examples
from cxrjax.data.sources.identity import ContentIndex
from cxrjax.data.sources.table import SPLITS, SkipLog, label_columns, select_views

SKIPPED_CSV = "skipped.csv"
TINY_SPLIT = 30  # studies: fewer and a split's metrics are mostly noise


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

  def label_names(self) -> tuple[str, ...]:
    """The dataset's label names: CheXpert's 14 unless a builder's config declares others."""
    return CHEXPERT_LABELS


class StudyBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Abstract: subclasses define _load_table, MANUAL_DOWNLOAD_INSTRUCTIONS and BUILDER_CONFIGS."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  DESCRIPTION = "Chest X-ray studies from a local download."
  HOMEPAGE = ""
  SPLIT_HINT = ""  # the config keys that change the split, for the small-split warning

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
    from cxrjax.data.registry import config_items  # late: registry imports the builders
    cfg = self.builder_config
    names = cfg.label_names()
    return tfds.core.DatasetInfo(
        builder=self, description=self.DESCRIPTION,
        features=study_features(encoding=cfg.encoding, label_names=names),
        metadata=metadata(names, config_items(type(self), cfg)),
        homepage=self.HOMEPAGE or None, supervised_keys=None)

  def _manual_root(self, dl_manager) -> Path:
    try:
      return Path(dl_manager.manual_dir)
    except AssertionError as e:  # TFDS's way of saying "missing or empty"
      raise DataError(f"{self.name}: {e}") from None

  def load_checked_table(self, root: Path | str) -> pd.DataFrame:
    """The download's table, checked and kept for the prepare that follows: the command line
    calls this first, so a bad CSV or config stops before anything is written or announced."""
    cached = getattr(self, "_table", None)
    if cached is not None and cached[0] == str(root):
      return cached[1]
    cfg = self.builder_config
    table = self._load_table(Path(root))
    kept = select_views(table, cfg.views)
    if not kept.split.isin(SPLITS).any():
      raise DataError(f"{self.name}: no images of views {cfg.views!r} in the download")
    if label_columns(table) != tuple(cfg.label_names()):  # a source out of step with its config
      raise DataError(f"{self.name}: the table's labels {label_columns(table)} are not the "
                      f"config's {cfg.label_names()}")
    _warn_small_splits(kept, self.SPLIT_HINT)
    self._table = (str(root), table)
    return table

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    table = self.load_checked_table(self._manual_root(dl_manager))
    for path, source, reason in table.attrs.get("repeated", []):
      self._skip_log.add(path, reason, source, kind="repeated row")
    if repeated := len(table.attrs.get("repeated", [])):
      print(f"{self.name}: {repeated} CSV row(s) repeat an earlier row exactly; each image is "
            f"stored once (listed in {SKIPPED_CSV})", file=sys.stderr)
    present = [s for s in SPLITS if (select_views(table, cfg.views).split == s).any()]
    self._contents = ContentIndex()
    return {s: self._generate_examples(table, s) for s in present}

  def _generate_examples(self, table: pd.DataFrame, split: str):
    cfg = self.builder_config
    yield from examples.generate(table, split, image_size=cfg.image_size,
                                 max_views=cfg.max_views, views=cfg.views,
                                 skip_log=self._skip_log if cfg.skip_bad else None,
                                 encoding=cfg.encoding, contents=self._contents)

  def _download_and_prepare(self, dl_manager, download_config):
    self._skip_log = SkipLog()
    super()._download_and_prepare(dl_manager, download_config)
    if len(self._skip_log) or self.builder_config.skip_bad:
      # self.data_dir is TFDS's temporary directory here, renamed along with the data.
      self._skip_log.write(self.data_dir, SKIPPED_CSV)

  def download_and_prepare(self, *args, **kwargs):
    self._skip_log = None
    super().download_and_prepare(*args, **kwargs)
    if self._skip_log is not None and (len(self._skip_log) or self.builder_config.skip_bad):
      print(f"{self.name}: skipped {self._skip_log.summary() or 'nothing'}; list in "
            f"{Path(self.data_dir) / SKIPPED_CSV}")


def _warn_small_splits(table: pd.DataFrame, hint: str) -> None:
  """stderr warnings: a split with < TINY_SPLIT studies; an evaluation split where a label that
  the dataset knows has one class (no AUROC can be computed there)."""
  names = label_columns(table)
  studies = table.groupby("study_id", sort=False).first()
  known = [n for n in names if studies[n].isin((0.0, 1.0)).any()]
  hint = f"; {hint}" if hint else ""
  for split in SPLITS:
    rows = studies[studies.split == split]
    if 0 < len(rows) < TINY_SPLIT:
      print(f"warning: split {split} has {len(rows)} studies ({rows.patient_id.nunique()} "
            f"patients): its metrics will be mostly noise{hint}", file=sys.stderr)
    if split == "train" or len(rows) == 0:
      continue
    pos, neg = (rows[known] == 1).sum(), (rows[known] == 0).sum()
    one = [f"{n} ({'only positive' if pos[n] else 'only negative' if neg[n] else 'never known'})"
           for n in known if not (pos[n] and neg[n])]
    if one:
      print(f"warning: in split {split}, {len(one)} label(s) have one class, so no AUROC: "
            f"{', '.join(one[:5])}{' ...' if len(one) > 5 else ''}{hint}", file=sys.stderr)
