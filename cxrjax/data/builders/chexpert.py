"""TFDS builder for CheXpert read from the user's own download (``manual_dir``).

One example per study (data/features.py): up to K views, frontal first, CheXpert's labels
mapped by name onto labels.CHEXPERT_LABELS, Sex/Age from the CSV and race from the optional
CHEXPERT DEMO file. Splits, patient-level: valid.csv -> validation; train.csv patients ->
train / test by a hash of the patient id. Layout: sources/chexpert.py.

Registered as 'cxr_chexpert': TFDS ships its own 'chexpert' builder.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd

from cxrjax.data.builders.study_builder import StudyBuilder, StudyConfig
from cxrjax.data.sources import chexpert


@dataclasses.dataclass(eq=False)
class ChexpertConfig(StudyConfig):
  """StudyConfig plus test_fraction / seed: share of train.csv patients held out as test."""
  test_fraction: float = 0.1
  seed: int = 0


class Chexpert(StudyBuilder):
  """CheXpert studies; config 'default': 256 px, K = 2, all views, 10% of patients test."""

  name = "cxr_chexpert"
  DESCRIPTION = "CheXpert chest X-ray studies (Irvin et al., Stanford ML Group)."
  HOMEPAGE = "https://stanfordmlgroup.github.io/competitions/chexpert/"
  BUILDER_CONFIGS = [ChexpertConfig(name="default")]
  SPLIT_HINT = "change the test share with --config test_fraction=F"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  CheXpert needs registration; download it yourself (CheXpert-v1.0-small or CheXpert-v1.0)
  and pass the folder CONTAINING it as manual_dir:
    manual_dir/CheXpert-v1.0-small/{train,valid}.csv
    manual_dir/CheXpert-v1.0-small/{train,valid}/patientNNNNN/studyN/viewN_frontal.jpg
  Optional: 'CHEXPERT DEMO.csv' (or .xlsx with openpyxl installed) in manual_dir for race.
  """

  def _load_table(self, root: Path) -> pd.DataFrame:
    cfg = self.builder_config
    return chexpert.load_table(root, test_fraction=cfg.test_fraction, seed=cfg.seed)
