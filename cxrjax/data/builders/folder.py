"""TFDS builder for a generic folder of PNG / JPEG / DICOM radiographs plus a CSV.

The CSV's columns are named by a sources.folder.FolderSpec carried in the config; one example
per study (data/features.py), with the spec's label names (CheXpert's 14 or the folder's own).
Splits: the spec's split column, else a hash of the patient id; patient-level either way. Layout: sources/folder.py.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd

from cxrjax.data.builders.study_builder import StudyBuilder, StudyConfig
from cxrjax.data.sources import folder
from cxrjax.data.sources.folder import FolderSpec


@dataclasses.dataclass(eq=False)
class FolderConfig(StudyConfig):
  """StudyConfig plus spec, the CSV column mapping (default: labels.csv with path and
  patient_id columns and label columns named like the CheXpert labels). K defaults to 1."""
  max_views: int = 1
  spec: FolderSpec = dataclasses.field(default_factory=FolderSpec)

  def __post_init__(self):
    self.label_names()  # a bad labels / label_set stops here, before anything is written

  def label_names(self) -> tuple[str, ...]:
    return self.spec.label_names()


class CxrFolder(StudyBuilder):
  """A folder of chest X-rays described by a CSV; config 'default' uses FolderSpec()."""

  DESCRIPTION = "Chest X-ray studies from a local folder of images and a CSV."
  BUILDER_CONFIGS = [FolderConfig(name="default")]
  SPLIT_HINT = ("change it with --config validation_fraction=F test_fraction=F, or give a split "
                "column (split=COLUMN)")
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Put the images (PNG, JPEG, 8- or 16-bit; DICOM with pydicom installed) and one CSV, one row
  per image, in manual_dir; describe the CSV's columns with a FolderSpec in a FolderConfig
  (see cxrjax/data/sources/folder.py).
  """

  def _load_table(self, root: Path) -> pd.DataFrame:
    return folder.load_table(root, self.builder_config.spec)
