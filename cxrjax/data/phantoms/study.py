"""What a phantom study is before it is drawn: the contract between sampling and rendering.

``attributes.sample_study(seed, index, config)`` fills a ``StudyAttributes``;
``render.render_views(attrs, size)`` draws its views; ``reports.write_report(attrs, rng)``
writes its text. Everything the image shows must come from these fields (plus the
study's own ``render_seed``), so the frontal and lateral views, the labels and the report
agree by construction.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from cxrjax.data.labels import NUM_LABELS

# Laterality codes (per label): where a sign sits. NONE for absent or midline findings.
NONE, RIGHT, LEFT, BILATERAL = 0, 1, 2, 3

# Kinds of support device (bit flags in ``devices``).
DEVICE_ETT, DEVICE_NG_TUBE, DEVICE_CENTRAL_LINE, DEVICE_PACEMAKER = 1, 2, 4, 8


@dataclasses.dataclass(frozen=True)
class StudyAttributes:
  """Ground truth of one phantom study. Sides are the patient's (RIGHT = image left on a PA/AP view).

  Fields:
    study_id, patient_id: str
    render_seed: int          seeds every random texture of this study's images
    age_years: float          18..95
    sex_male: float           1.0 male, 0.0 female
    race: str                 demographic group label (e.g. 'group_a'); no direct visual sign
    site: int                 acquisition site / scanner index, 0..num_sites-1
    habitus: float            body build, -1 (thin) .. +1 (large); scales body outline and soft tissue
    inspiration: float        0..1, lung height (poor .. deep inspiration)
    rotation: float           patient rotation in degrees (small, a few degrees)
    frontal_view: str         'PA' or 'AP' (AP: supine-ish, magnified heart, scapulae over lungs)
    has_lateral: bool         whether the study includes a lateral view
    ctr: float                cardiothoracic ratio actually drawn (> 0.5 exactly when Cardiomegaly)
    mediastinum_width: float  fraction of thoracic width (enlarged above ~0.33)
    labels: (14,) float32     CheXpert-style stored labels in {1, 0, -1, NaN} (what a labeller wrote;
                              may differ from the truth by uncertainty and label noise)
    truth: (14,) bool         what the image really shows
    severity: (14,) float32   in [0, 1], 0 where absent; drives the size/density of each sign
    laterality: (14,) int8    NONE / RIGHT / LEFT / BILATERAL per label
    lesion_xy: (2,) float32   nodule/mass centre in lung-relative coordinates ([0, 1]^2 within the lung
                              named by laterality), meaningful when Lung Lesion is present
    lesion_radius: float      nodule/mass radius as a fraction of lung width
    fracture_rib: int         index of the broken rib (0 = first visible rib), -1 if none
    devices: int              bit flags DEVICE_* (0 if no Support Devices)
    shortcut: float           1.0 when the injected shortcut marker is drawn, else 0.0
    pe: int                   pulmonary embolism (for the prior's paired CTPA side)
    grade: int                3-class severity grade (for GMCD's tabular modality)
    tabular: (80,) float32    lab/genomic vector, partly informative of ``grade``
  """
  study_id: str
  patient_id: str
  render_seed: int
  age_years: float
  sex_male: float
  race: str
  site: int
  habitus: float
  inspiration: float
  rotation: float
  frontal_view: str
  has_lateral: bool
  ctr: float
  mediastinum_width: float
  labels: np.ndarray
  truth: np.ndarray
  severity: np.ndarray
  laterality: np.ndarray
  lesion_xy: np.ndarray
  lesion_radius: float
  fracture_rib: int
  devices: int
  shortcut: float
  pe: int
  grade: int
  tabular: np.ndarray

  def __post_init__(self):
    for name in ("labels", "truth", "severity", "laterality"):
      if np.shape(getattr(self, name)) != (NUM_LABELS,):
        raise ValueError(f"{name} must have shape ({NUM_LABELS},), got {np.shape(getattr(self, name))}")
