"""TFDS builders of CXR study datasets, all writing data/features.py's study spec."""
from cxrjax.data.builders.chexpert import Chexpert, ChexpertConfig
from cxrjax.data.builders.folder import CxrFolder, FolderConfig
from cxrjax.data.builders.mimic_cxr import MimicConfig, MimicCxrJpg
from cxrjax.data.builders.study_builder import StudyBuilder, StudyConfig
from cxrjax.data.builders.cxr_phantoms import CxrPhantoms, CxrPhantomsConfig
