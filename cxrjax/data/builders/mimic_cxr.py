"""TFDS builder for MIMIC-CXR-JPG v2.0.0 read from the user's own download (``manual_dir``).

One example per study (data/features.py): up to K views, frontal first, with the study's
CheXpert or NegBio labels, MIMIC-IV demographics when patients.csv / admissions.csv are given,
and FINDINGS / IMPRESSION when the report .txt files are. Splits: the official
mimic-cxr-2.0.0-split.csv (train / validate -> validation / test), checked to be
patient-level. Layout: sources/mimic_cxr.py.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd

from cxrjax.data.builders.study_builder import StudyBuilder, StudyConfig
from cxrjax.data.sources import mimic_cxr


@dataclasses.dataclass(eq=False)
class MimicConfig(StudyConfig):
  """StudyConfig plus labeler: 'chexpert' or 'negbio'; reports: read the report .txt files."""
  labeler: str = "chexpert"
  reports: bool = True


class MimicCxrJpg(StudyBuilder):
  """MIMIC-CXR-JPG studies; configs 'chexpert' (default) and 'negbio' at 256 px, K = 2."""

  DESCRIPTION = "MIMIC-CXR-JPG v2.0.0 chest X-ray studies (Johnson et al., PhysioNet)."
  HOMEPAGE = "https://physionet.org/content/mimic-cxr-jpg/2.0.0/"
  BUILDER_CONFIGS = [MimicConfig(name="chexpert", labeler="chexpert"),
                     MimicConfig(name="negbio", labeler="negbio")]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  MIMIC-CXR-JPG needs PhysioNet credentialing; download it yourself from
  https://physionet.org/content/mimic-cxr-jpg/2.0.0/ and pass its folder as manual_dir:
    manual_dir/mimic-cxr-2.0.0-{metadata,chexpert,negbio,split}.csv[.gz]
    manual_dir/files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg
  Optional: the reports (files/pXX/pSUBJECT/sSTUDY.txt, from MIMIC-CXR's
  mimic-cxr-reports.zip) and MIMIC-IV patients.csv[.gz] / admissions.csv[.gz] (in manual_dir
  or manual_dir/hosp) for age, sex and race.
  """

  def _load_table(self, root: Path) -> pd.DataFrame:
    cfg = self.builder_config
    return mimic_cxr.load_table(root, labeler=cfg.labeler, reports=cfg.reports)
