"""What generated radiographs are worth, measured as the seed does (C.9) and beyond it.

* FID between real test images and one generation per test report (C.9.1): the pooled features of
  a DenseNet, N-1 covariances, scipy's sqrtm. The seed's network is torchxrayvision's
  DenseNet-121 (eval.fid_network when the user has the file, read with xrv's normalisation,
  centre crop and 224 px area resize); offline it is the phantom classifier (perceptual.py), on
  its own input convention. FIDs from different networks are not comparable: the table names it.
* MS-SSIM diversity (C.9.2): two generations per prompt, torchmetrics' defaults after the seed's
  per-image preprocessing (resize to 512, divide by the image's max); lower = more diverse.
* Prompt fidelity (beyond the seed; the phantom world knows the truth): prompts naming one finding,
  scored by the phantom classifier at a threshold that flags each finding on real validation
  images as often as it is present there; the rate on prompted generations against the rate on
  generations from a normal report and on real test images. Where the prompt names a side, the
  side agreement of a left-right probe fitted on real images whose reports name the side.
"""
from __future__ import annotations

import os

import numpy as np

from cxrjax.data.wordpiece import clean_impression
from cxrjax.evaluate import generation
from cxrjax.models.densenet_convert import load_densenet
from cxrjax.tasks.image_classifier import ImageNetwork

# Prompts in the phantom reports' own wording (data/phantoms/reports.py), one finding each.
FIDELITY_PROMPTS = (
    ("Pleural Effusion", "right", "Large right pleural effusion."),
    ("Pleural Effusion", "left", "Large left pleural effusion."),
    ("Cardiomegaly", "", "Moderate cardiomegaly."),
    ("Pneumothorax", "right", "Large right pneumothorax."),
    ("Edema", "", "Moderate pulmonary edema."),
    ("Consolidation", "left", "Left lower lobe consolidation."),
)
NORMAL_PROMPT = "No acute cardiopulmonary abnormality."


def to_uint8(images: np.ndarray) -> np.ndarray:
  """(N, S, S) in [0, 1] -> uint8, as a saved PNG holds them."""
  return np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)


def fid_network(classifier, path: str) -> tuple[ImageNetwork, str]:
  """The FID feature network: torchxrayvision's DenseNet from `path` (xrv intensities), else the
  phantom classifier. Returns it and the name the table shows."""
  if not path:
    return classifier.network(), "phantom-trained DenseNet (this run's classifier stage)"
  module, variables, extras = load_densenet(path)
  return ImageNetwork(module, variables, "xrv", extras["in_chans"]), os.path.basename(path)


def resized_for(images: np.ndarray, path: str) -> np.ndarray:
  """Images as the FID network reads them: the seed's centre crop and 224 px area resize for a
  torchxrayvision network (path given), unchanged for the phantom classifier."""
  if not path:
    return images
  x = generation.xrv_preprocess(images, size=224)[..., 0]  # [-1024, 1024]
  return np.round((x + 1024.0) * (255.0 / 2048.0)).clip(0, 255).astype(np.uint8)


def fid(evaluator: ImageNetwork, real: np.ndarray, fake: np.ndarray, mesh, batch_size: int) -> float:
  """FID of the evaluator's pooled features: real and fake (N, S, S) uint8."""
  _, f_real = evaluator.extract(real, mesh, batch_size)
  _, f_fake = evaluator.extract(fake, mesh, batch_size)
  return generation.fid_from_features(f_real.astype(np.float64), f_fake.astype(np.float64))


def diversity(first: np.ndarray, second: np.ndarray, batch_size: int) -> float:
  """The seed's MS-SSIM between two generations per prompt, averaged over prompts; (N, S, S) in
  [0, 1] each."""
  return float(generation.mssim_diversity(list(first), list(second), size=512,
                                          batch_size=batch_size))


def flag_thresholds(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """Per label, the logit above which the classifier flags the finding as often as it is present
  among the labelled real images ((N, C) each; NaN labels ignored). +inf where never present."""
  out = np.full(labels.shape[1], np.inf, np.float32)
  for j in range(labels.shape[1]):
    known = np.isfinite(labels[:, j])
    rate = labels[known, j].mean() if known.any() else 0.0
    if rate > 0:
      out[j] = np.quantile(logits[known, j], 1.0 - rate)
  return out


def side_score(images: np.ndarray) -> np.ndarray:
  """(N, S, S) -> (N,): mean density of the image's left half minus its right half, lower two
  thirds (the patient's right lies on the image's left in a frontal film)."""
  x = images.astype(np.float32)
  s = x.shape[-1]
  lower = x[:, s // 3:, :]
  return lower[:, :, : s // 2].mean(axis=(1, 2)) - lower[:, :, s - s // 2:].mean(axis=(1, 2))


def side_of_report(text: str, finding_words: str) -> str:
  """'right' / 'left' when the cleaned report names exactly one side next to the finding."""
  t = clean_impression(text)
  right = f"right {finding_words}" in t or f"right sided {finding_words}" in t
  left = f"left {finding_words}" in t or f"left sided {finding_words}" in t
  return "right" if right and not left else "left" if left and not right else ""


def fit_side_probe(images: np.ndarray, texts: list) -> dict:
  """A one-number left/right probe for pleural effusions fitted on real images: the sign of
  side_score that marks a right effusion and its accuracy on those real images (the instrument's
  own accuracy, so the agreement on generations can be read against it)."""
  sides = np.array([side_of_report(t, "pleural effusion") for t in texts])
  keep = sides != ""
  if keep.sum() < 4 or len(set(sides[keep])) < 2:
    return {"sign": 1.0, "accuracy": float("nan"), "n": int(keep.sum())}
  score = side_score(images[keep])
  is_right = sides[keep] == "right"
  sign = 1.0 if score[is_right].mean() > score[~is_right].mean() else -1.0
  accuracy = float(np.mean((sign * score > 0) == is_right))
  return {"sign": sign, "accuracy": accuracy, "n": int(keep.sum())}


def prompt_fidelity(generated: dict, normal: np.ndarray, real_test: np.ndarray,
                    evaluator: ImageNetwork, thresholds: np.ndarray, label_names: list,
                    side_probe: dict, mesh, batch_size: int) -> list:
  """One row per fidelity prompt: {'finding', 'side', 'prompt', 'n', 'flag_rate' on its
  generations, 'normal_rate' on generations from NORMAL_PROMPT, 'real_rate' on real test images,
  'side_agreement' (NaN without a side)}. generated: {prompt: (n, S, S) uint8}."""

  def rates(images):
    logits, _ = evaluator.extract(images, mesh, batch_size)
    return (logits > thresholds).mean(axis=0)

  normal_rates, real_rates = rates(normal), rates(real_test)
  rows = []
  for finding, side, prompt in FIDELITY_PROMPTS:
    if finding not in label_names:
      continue
    j = label_names.index(finding)
    images = generated[prompt]
    agreement = float("nan")
    if side and finding == "Pleural Effusion":
      said_right = side_probe["sign"] * side_score(images) > 0
      agreement = float(np.mean(said_right == (side == "right")))
    rows.append({"finding": finding, "side": side, "prompt": prompt, "n": len(images),
                 "flag_rate": float(rates(images)[j]), "normal_rate": float(normal_rates[j]),
                 "real_rate": float(real_rates[j]), "side_agreement": agreement})
  return rows
