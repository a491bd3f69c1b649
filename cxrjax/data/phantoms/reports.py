"""Templated but varied radiology reports of phantom studies.

``write_report(attrs, rng)`` -> (findings, impression). The text follows the study's truth
(never a stored label that label noise flipped) and its mention pattern: a finding is described
when present (hedged -- "possible", "cannot exclude" -- where the stored label is -1, i.e. the
labeller read an uncertain mention), negated when absent but mentioned (stored 0, or a 0/1 that
label noise flipped), and left out when the stored label is NaN. So a keyword labeller run over
the report recovers the truth of every label it finds mentioned.

Variation: several templates per finding, synonyms, severity words (small/moderate/large for
pleural air and fluid, mild/moderate/severe otherwise, nodule vs mass by diameter), laterality
words (right/left/bilateral), named devices, grouped negations ("No pleural effusion or
pneumothorax."), and shuffled sentence order within and across the anatomical groups. A study
with no pathology reads like "The lungs are clear. Heart size is normal." with the impression
"No acute cardiopulmonary process.". Lung Opacity is written on its own only when none of its
children (consolidation, edema, atelectasis, lesion, pneumonia) is present: they imply it.
"""
from __future__ import annotations

import numpy as np

from cxrjax.data.labels import LABEL_INDEX
from cxrjax.data.phantoms import study as st

__all__ = ["write_report"]

_I = LABEL_INDEX
_SIDE = {st.RIGHT: "right", st.LEFT: "left", st.BILATERAL: "bilateral", st.NONE: ""}
# Anatomical groups, in the usual reading order; each label belongs to one.
_GROUPS = {
    "devices": ("Support Devices",),
    "lungs": ("Lung Opacity", "Consolidation", "Pneumonia", "Atelectasis", "Edema", "Lung Lesion"),
    "pleura": ("Pleural Effusion", "Pneumothorax", "Pleural Other"),
    "heart": ("Cardiomegaly", "Enlarged Cardiomediastinum"),
    "bones": ("Fracture",),
}
_OPACITY_CHILDREN = ("Consolidation", "Edema", "Atelectasis", "Lung Lesion", "Pneumonia")
# Noun phrases used in grouped negations ("No X, Y or Z.").
_NEG_NOUN = {"Consolidation": ("focal consolidation", "consolidation"), "Edema": ("pulmonary edema", "edema"),
             "Pneumonia": ("pneumonia",), "Atelectasis": ("atelectasis",),
             "Lung Lesion": ("suspicious pulmonary nodule", "lung nodule or mass"),
             "Lung Opacity": ("focal opacity", "focal airspace opacity"),
             "Pleural Effusion": ("pleural effusion", "effusion"), "Pneumothorax": ("pneumothorax",),
             "Pleural Other": ("pleural thickening",), "Fracture": ("acute rib fracture", "displaced fracture"),
             "Cardiomegaly": ("cardiomegaly",), "Enlarged Cardiomediastinum": ("mediastinal widening",)}
_HEDGES = ("Possible {x}.", "Cannot exclude {x}.", "{X} cannot be excluded.", "Findings may represent {x}.",
           "Questionable {x}.", "Possibly {x}.")


def _pick(rng: np.random.Generator, options):
  return options[int(rng.integers(len(options)))]


def _cap(s: str) -> str:
  return s[:1].upper() + s[1:]


def _size(sev: float) -> str:
  return "small" if sev < 0.35 else "moderate" if sev < 0.7 else "large"


def _degree(sev: float) -> str:
  return "mild" if sev < 0.35 else "moderate" if sev < 0.7 else "severe"


def _ordinal(n: int) -> str:
  return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def _noun_phrase(name: str, a: st.StudyAttributes) -> str:
  """A lower-case noun phrase naming a present finding with its size and side (for hedges)."""
  j = _I[name]
  sev, side = float(a.severity[j]), _SIDE[int(a.laterality[j])]
  side_w = f"{side} " if side else ""
  return {
      "Atelectasis": f"{side_w}atelectasis", "Cardiomegaly": "mild cardiomegaly" if sev < 0.35 else "cardiomegaly",
      "Consolidation": f"{side_w}consolidation", "Edema": f"{_degree(sev)} pulmonary edema",
      "Enlarged Cardiomediastinum": "mediastinal widening", "Fracture": f"{side} rib fracture",
      "Lung Lesion": f"{side} pulmonary nodule", "Lung Opacity": f"{side_w}opacity",
      "Pleural Effusion": f"{_size(sev)} {side_w}pleural effusion{'s' if side == 'bilateral' else ''}",
      "Pleural Other": f"{side_w}pleural thickening", "Pneumonia": f"{side_w}pneumonia",
      "Pneumothorax": f"{_size(sev)} {side} pneumothorax",
  }[name]


def _positive(name: str, a: st.StudyAttributes, rng) -> str:
  """One sentence describing a present finding (certain)."""
  j = _I[name]
  sev, lat = float(a.severity[j]), int(a.laterality[j])
  side, size, deg = _SIDE[lat], _size(sev), _degree(sev)
  if name == "Pleural Effusion":
    if lat == st.BILATERAL:
      return _pick(rng, (f"{_cap(size)} bilateral pleural effusions.", f"Bilateral {size} pleural effusions.",
                         f"There are {size} bilateral effusions."))
    return _pick(rng, (f"{_cap(size)} {side} pleural effusion.", f"There is a {size} {side} pleural effusion.",
                       f"{_cap(side)} {size} effusion."))
  if name == "Pneumothorax":
    return _pick(rng, (f"{_cap(size)} {side} pneumothorax.", f"There is a {size} {side} apical pneumothorax.",
                       f"{_cap(side)} pneumothorax, {size} in size."))
  if name == "Cardiomegaly":
    adv = {"mild": "mildly", "moderate": "moderately", "severe": "severely"}[deg]
    return _pick(rng, (f"{_cap(deg)} cardiomegaly.", f"The heart is {adv} enlarged.",
                       f"Heart size is {adv} enlarged.", f"{_cap(deg)} enlargement of the cardiac silhouette."))
  if name == "Enlarged Cardiomediastinum":
    return _pick(rng, ("The mediastinum is widened.", "Enlarged cardiomediastinal silhouette.",
                       f"{_cap(deg)} widening of the mediastinum."))
  if name == "Edema":
    return _pick(rng, (f"{_cap(deg)} pulmonary edema.", f"{_cap(deg)} interstitial edema.",
                       f"Findings are consistent with {deg} pulmonary edema."))
  if name == "Atelectasis":
    where = "bibasilar" if lat == st.BILATERAL else side
    return _pick(rng, (f"{_cap(deg)} {where} atelectasis.", f"There is {deg} {where} atelectasis.",
                       f"{_cap(where)} atelectasis, {deg}."))
  if name == "Consolidation":
    where = "bilateral" if lat == st.BILATERAL else f"{side}-sided"
    lung = "both lungs" if lat == st.BILATERAL else f"the {side} lung"
    return _pick(rng, (f"{_cap(where)} consolidation.", f"There is {where} airspace consolidation.",
                       f"Consolidation in {lung}."))
  if name == "Pneumonia":
    lung = "both lungs" if lat == st.BILATERAL else f"the {side} lung"
    return _pick(rng, (f"Findings are concerning for pneumonia in {lung}.", f"{_cap(side)} pneumonia.",
                       f"Airspace disease in {lung} compatible with pneumonia."))
  if name == "Lung Lesion":
    mm = int(round(2 * a.lesion_radius * 120))  # radius is a fraction of a ~12 cm lung width
    noun = "nodule" if mm < 30 else "mass"
    return _pick(rng, (f"{_cap(side)} lung {noun} measuring approximately {mm} mm.",
                       f"There is a {mm} mm {noun} in the {side} lung.", f"{_cap(noun)} in the {side} lung."))
  if name == "Lung Opacity":
    return _pick(rng, (f"{_cap(side)} patchy opacity.", f"Hazy opacity in the {side} lung.",
                       f"{_cap(side)} ground-glass opacities.") if lat != st.BILATERAL else
                 ("Patchy bilateral opacities.", "Bilateral hazy opacities."))
  if name == "Fracture":
    rib = _ordinal(a.fracture_rib + 1)
    kind = "displaced" if sev > 0.5 else "nondisplaced"
    return _pick(rng, (f"Acute fracture of the {side} {rib} rib.", f"{_cap(side)} {rib} rib fracture.",
                       f"There is a {kind} fracture of the {side} {rib} rib."))
  if name == "Pleural Other":
    return _pick(rng, (f"{_cap(side)} pleural thickening.", f"{_cap(side)} apical pleural thickening."))
  raise ValueError(name)


def _devices(a: st.StudyAttributes, rng) -> list[str]:
  out = []
  if a.devices & st.DEVICE_ETT:
    out.append(_pick(rng, (f"Endotracheal tube terminates {int(rng.integers(2, 7))} cm above the carina.",
                           "Endotracheal tube in standard position.")))
  if a.devices & st.DEVICE_NG_TUBE:
    out.append(_pick(rng, ("Enteric tube courses below the diaphragm.", "Nasogastric tube tip is in the stomach.")))
  if a.devices & st.DEVICE_CENTRAL_LINE:
    out.append(_pick(rng, ("Right internal jugular central venous catheter terminates in the SVC.",
                           "Central venous catheter tip projects over the cavoatrial junction.")))
  if a.devices & st.DEVICE_PACEMAKER:
    out.append(_pick(rng, ("Left chest wall pacemaker with leads in the right atrium and ventricle.",
                           "Dual-lead pacemaker is unchanged in position.")))
  return out


def _join_or(nouns: list[str]) -> str:
  return nouns[0] if len(nouns) == 1 else ", ".join(nouns[:-1]) + " or " + nouns[-1]


def _negations(names: list[str], rng) -> list[str]:
  """Sentences negating absent-but-mentioned findings of one group, some grouped."""
  names = list(names)
  out = []
  if "Cardiomegaly" in names and "Enlarged Cardiomediastinum" in names and rng.random() < 0.6:
    names.remove("Cardiomegaly"), names.remove("Enlarged Cardiomediastinum")
    out.append(_pick(rng, ("Heart size and mediastinal contours are normal.",
                           "The cardiomediastinal silhouette is within normal limits.")))
  if "Lung Opacity" in names and rng.random() < 0.6:
    names.remove("Lung Opacity")
    out.append(_pick(rng, ("The lungs are clear.", "Lungs are clear.")))
  singles = {"Cardiomegaly": ("Heart size is normal.", "Normal heart size."),
             "Enlarged Cardiomediastinum": ("Mediastinal contours are normal.",
                                            "The mediastinum is not widened.")}
  for name in [n for n in names if n in singles]:
    names.remove(name)
    out.append(_pick(rng, singles[name] + (f"No {_NEG_NOUN[name][0]}.",)))
  rng.shuffle(names)
  while names:
    k = int(rng.integers(1, min(3, len(names)) + 1))
    chunk, names = names[:k], names[k:]
    nouns = _join_or([_pick(rng, _NEG_NOUN[n]) for n in chunk])
    out.append(_pick(rng, (f"No {nouns}.", f"There is no {nouns}.", f"No evidence of {nouns}.")))
  return out


def _describe(name: str, a: st.StudyAttributes, rng) -> str:
  if a.labels[_I[name]] == -1.0:
    x = _noun_phrase(name, a)
    return _pick(rng, _HEDGES).format(x=x, X=_cap(x))
  return _positive(name, a, rng)


def _present(a: st.StudyAttributes) -> list[str]:
  """Present findings the report names (Lung Opacity only when no child implies it)."""
  names = [n for g in _GROUPS.values() for n in g if n != "Support Devices" and a.truth[_I[n]]]
  if any(a.truth[_I[c]] for c in _OPACITY_CHILDREN) and "Lung Opacity" in names:
    names.remove("Lung Opacity")
  return names


def write_report(attrs: st.StudyAttributes, rng: np.random.Generator) -> tuple[str, str]:
  """(findings, impression) of one study; ``rng`` picks the wording only."""
  a = attrs
  present = _present(a)
  groups = []
  for gname, members in _GROUPS.items():
    if gname == "devices":
      positives, negatives = _devices(a, rng), []
    else:
      positives = [_describe(n, a, rng) for n in members if n in present]
      negatives = _negations([n for n in members if not a.truth[_I[n]] and not np.isnan(a.labels[_I[n]])], rng)
    # Within a group, abnormal findings lead (in random order), then the pertinent negatives.
    groups.append([positives[i] for i in rng.permutation(len(positives))]
                  + [negatives[i] for i in rng.permutation(len(negatives))])
  if rng.random() < 0.5:  # devices stay first and bones last; lungs/pleura/heart vary in order
    middle = groups[1:4]
    groups[1:4] = [middle[i] for i in rng.permutation(3)]
  findings = " ".join(s for g in groups for s in g)
  if not findings:  # nothing abnormal and no pertinent negative: say what was imaged
    views = f"{a.frontal_view} and lateral views" if a.has_lateral else f"{a.frontal_view} view"
    findings = f"{views} of the chest were obtained." if a.has_lateral else f"{views} of the chest was obtained."

  if not present:
    impression = _pick(rng, ("No acute cardiopulmonary process.", "No acute cardiopulmonary abnormality.",
                             "Normal chest radiograph." if not a.devices else "No acute cardiopulmonary process."))
  else:
    top = sorted(present, key=lambda n: -float(a.severity[_I[n]]))[:int(rng.integers(1, 4))]
    impression = " ".join(_describe(n, a, rng) for n in top)
  if a.devices and rng.random() < 0.3:
    impression += " Support devices as described."
  return findings, impression
