"""Phantom reports: a simple keyword labeller (regex per label, sentence-level negation and
hedge cues) recovers the truth of the labels it finds mentioned, and the text varies."""
import re

import numpy as np

from cxrjax.data.labels import CHEXPERT_LABELS, LABEL_INDEX
from cxrjax.data.phantoms.attributes import PhantomConfig, sample_study
from cxrjax.data.phantoms.reports import write_report

_KEYWORDS = {
    "Atelectasis": r"atelectasis|atelectatic",
    "Cardiomegaly": r"cardiomegaly|heart (size )?is (\w+ )?enlarged|enlargement of the cardiac silhouette",
    "Consolidation": r"consolidation",
    "Edema": r"edema",
    "Enlarged Cardiomediastinum": r"mediastin\w* (widening|is (not )?widened)|widening of the mediastinum"
                                  r"|mediastinum is (not )?widened|enlarged cardiomediastinal",
    "Fracture": r"fracture",
    "Lung Lesion": r"nodule|\bmass\b",
    "Lung Opacity": r"opacit(y|ies)",
    "Pleural Effusion": r"effusion",
    "Pleural Other": r"pleural thickening",
    "Pneumonia": r"pneumonia",
    "Pneumothorax": r"pneumothorax",
    "Support Devices": r"tube|catheter|pacemaker|support devices",
    "No Finding": r"no acute cardiopulmonary|normal chest radiograph",
}
# Sentences that negate a label without a leading "no".
_NEGATIVE = {
    "Cardiomegaly": r"heart size (and mediastinal contours )?(is|are) normal|normal heart size"
                    r"|cardiomediastinal silhouette is within normal limits",
    "Enlarged Cardiomediastinum": r"mediastinal contours (is|are) normal|cardiomediastinal silhouette is within"
                                  r"|mediastinum is not widened",
    "Lung Opacity": r"lungs are clear",
}
_NEG_CUE = re.compile(r"\b(no|without|negative for)\b")
_HEDGE_CUE = re.compile(r"possible|possibly|cannot exclude|cannot be excluded|may represent|questionable")
_OPACITY_CHILDREN = ("Consolidation", "Edema", "Atelectasis", "Lung Lesion", "Pneumonia")


def keyword_labels(findings: str, impression: str) -> np.ndarray:
  """(14,) float32 in {1, 0, -1, NaN} read from the text; positive wins over negative."""
  out = np.full(len(CHEXPERT_LABELS), np.nan, np.float32)
  for sentence in re.split(r"(?<=\.)\s+", f"{findings} {impression}".lower()):
    for name, pattern in _KEYWORDS.items():
      j = LABEL_INDEX[name]
      if name in _NEGATIVE and re.search(_NEGATIVE[name], sentence):
        value = 0.0
      elif re.search(pattern, sentence):
        value = -1.0 if _HEDGE_CUE.search(sentence) else 0.0 if (
            _NEG_CUE.search(sentence) and name != "No Finding") else 1.0
      else:
        continue
      if np.isnan(out[j]) or value != 0.0:
        out[j] = value
  lo = LABEL_INDEX["Lung Opacity"]
  if any(out[LABEL_INDEX[c]] in (1.0, -1.0) for c in _OPACITY_CHILDREN) and out[lo] != -1.0:
    out[lo] = 1.0  # children imply the parent
  return out


def test_keyword_labeller_agrees_with_truth():
  config = PhantomConfig(uncertain_rate=0.1, label_noise=0.05)
  agree = total = 0
  stored_agree = stored_total = 0
  for i in range(600):
    a = sample_study(3, i, config)
    f, imp = write_report(a, np.random.default_rng([3, i]))
    read = keyword_labels(f, imp)
    mentioned = ~np.isnan(read)
    agree += int(((read[mentioned] != 0) == a.truth[mentioned]).sum())
    total += int(mentioned.sum())
    # Mentions and hedges follow the stored labels (before label noise, which flips 0/1 only).
    both = mentioned | ~np.isnan(a.labels)
    stored_total += int(both.sum())
    stored_agree += int((mentioned[both] == ~np.isnan(a.labels[both])).sum())
    assert not (a.labels == -1.0)[mentioned & (read == 0)].any(), (i, f, imp)
  assert total > 600 * 3
  assert agree / total >= 0.95, agree / total
  assert stored_agree / stored_total >= 0.95, stored_agree / stored_total


def test_reports_vary_and_name_sides_and_sizes():
  texts, sides, sizes = set(), 0, 0
  for i in range(200):
    a = sample_study(0, i)
    f, imp = write_report(a, np.random.default_rng(i))
    assert f and imp and f.endswith(".") and imp.endswith(".")
    texts.add(f)
    j = LABEL_INDEX["Pleural Effusion"]
    if a.truth[j] and a.labels[j] == 1.0:
      sides += bool(re.search(r"right|left|bilateral", f.lower()))
      sizes += bool(re.search(r"small|moderate|large", f.lower()))
      assert "effusion" in f
  assert len(texts) > 150
  assert sides > 10 and sizes == sides


def test_normal_study_reads_normal_and_same_rng_same_text():
  cfg = PhantomConfig()
  normal = next(a for a in (sample_study(1, i, cfg) for i in range(100))
                if a.truth[LABEL_INDEX["No Finding"]] and not a.devices)
  f, imp = write_report(normal, np.random.default_rng(0))
  assert re.search(r"no acute cardiopulmonary|normal chest radiograph", imp.lower())
  read = keyword_labels(f, imp)
  others = [j for j, n in enumerate(CHEXPERT_LABELS) if n != "No Finding"]
  assert read[LABEL_INDEX["No Finding"]] == 1.0
  assert not np.nan_to_num(read[others], nan=0.0).any(), (f, imp)
  assert write_report(normal, np.random.default_rng(5)) == write_report(normal, np.random.default_rng(5))
