"""The one feature spec every CXR study builder writes (phantoms, MIMIC-CXR-JPG, CheXpert, folder).

One example is one study: up to K views of one patient on one day, each an encoded 8-bit
grayscale image, with the study's labels, demographics and report. Pipelines read any builder
the same way; the phantom builder adds a ``phantom`` dict of ground truth on top.

Images are given to TFDS as encoded bytes (``encode_image``): TFDS encodes numpy images with
TensorFlow, which is optional here, but passes encoded bytes through and decodes with PIL.
The encoding is a builder option: 'jpeg' (quality 95, the default; MIMIC-CXR-JPG and CheXpert
ship JPEGs anyway) decodes ~3x faster than 'png' (measured on 256^2 phantoms: 0.30 vs 0.9-1.0
ms), which keeps the input pipeline ahead of training on small CPUs; 'png' is lossless.

Example layout (as ``tfds.data_source`` returns it):
  study_id, patient_id: bytes
  images:    list of V arrays (H, W, 1) uint8, 1 <= V <= max_views
  views:     list of V ints, indices into labels.VIEWS
  labels:    (C,) float32 in {1, 0, -1, NaN}, uncertain kept (see labels.py), in the order of
             the dataset's label names: CHEXPERT_LABELS (C = 14) unless the builder declares its
             own, which it records in the dataset's metadata (``label_names``, ``metadata``)
  age_years, sex_male: float32, NaN when unknown
  race, site: bytes, b'' when unknown
  findings, impression: bytes, b'' when the source has no report
  phantom (phantom builder only): severity (14,) float32 in [0, 1]; tabular (TABULAR_DIM,) float32;
    grade int64 in {0, 1, 2}; pe int64 in {0, 1}; shortcut float32 in {0, 1}
"""
from __future__ import annotations

import io

import numpy as np
import tensorflow_datasets as tfds

from typing import Sequence

from cxrjax.data.labels import CHEXPERT_LABELS, NUM_LABELS, VIEWS

TABULAR_DIM = 80
IMAGE_ENCODINGS = ("jpeg", "png")
JPEG_QUALITY = 95


def check_encoding(encoding: str) -> str:
  if encoding not in IMAGE_ENCODINGS:
    raise ValueError(f"image encoding must be one of {IMAGE_ENCODINGS}, got {encoding!r}")
  return encoding


def encode_image(image: np.ndarray, encoding: str = "jpeg") -> io.BytesIO:
  """(H, W) or (H, W, 1) uint8 -> a JPEG (quality 95) or PNG file object that TFDS's Image
  feature accepts without TensorFlow."""
  from PIL import Image

  image = np.asarray(image)
  if image.ndim == 3:
    image = image[..., 0]
  if image.dtype != np.uint8:
    raise TypeError(f"expected uint8 image, got {image.dtype}")
  buf = io.BytesIO()
  if check_encoding(encoding) == "jpeg":
    Image.fromarray(image, mode="L").save(buf, format="JPEG", quality=JPEG_QUALITY)
  else:
    Image.fromarray(image, mode="L").save(buf, format="PNG", compress_level=1)
  buf.seek(0)
  return buf


def encode_png(image: np.ndarray) -> io.BytesIO:
  """``encode_image(image, 'png')``: lossless."""
  return encode_image(image, "png")


def metadata(label_names: Sequence[str], config_items: Sequence[str] = ()) -> tfds.core.MetadataDict:
  """What a prepared dataset records beside its features (TFDS writes it as metadata.json): its
  label names, in the order of ``labels``, and the ``key=value`` items it was prepared with
  (registry.config_items), so opening it by name alone rebuilds the same config."""
  return tfds.core.MetadataDict(label_names=list(label_names), config_items=list(config_items))


def label_names(source) -> tuple[str, ...]:
  """The label names of a study source: a TFDS data source's recorded ``label_names``; else (a
  dataset prepared before they were recorded, or a plain list of studies) CheXpert's 14 when
  there are 14 labels, otherwise label_0, label_1, ..."""
  info = getattr(source, "dataset_info", None)
  names = (getattr(info, "metadata", None) or {}).get("label_names") if info is not None else None
  if names:
    return tuple(names)
  count = len(source[0]["labels"]) if len(source) else NUM_LABELS
  return CHEXPERT_LABELS if count == NUM_LABELS else tuple(f"label_{i}" for i in range(count))


def study_features(*, phantom: bool = False, encoding: str = "jpeg",
                   label_names: Sequence[str] = CHEXPERT_LABELS) -> tfds.features.FeaturesDict:
  """The FeaturesDict of one study (see the module docstring); ``encoding`` names the format the
  builder writes its images in, ``label_names`` the labels (their count is the labels' length)."""
  spec = {
      "study_id": tfds.features.Text(),
      "patient_id": tfds.features.Text(),
      "images": tfds.features.Sequence(
          tfds.features.Image(shape=(None, None, 1), dtype=np.uint8,
                              encoding_format=check_encoding(encoding))),
      "views": tfds.features.Sequence(tfds.features.ClassLabel(names=list(VIEWS))),
      "labels": tfds.features.Tensor(shape=(len(label_names),), dtype=np.float32),
      "age_years": tfds.features.Scalar(dtype=np.float32),
      "sex_male": tfds.features.Scalar(dtype=np.float32),
      "race": tfds.features.Text(),
      "site": tfds.features.Text(),
      "findings": tfds.features.Text(),
      "impression": tfds.features.Text(),
  }
  if phantom:
    spec["phantom"] = tfds.features.FeaturesDict({
        "severity": tfds.features.Tensor(shape=(NUM_LABELS,), dtype=np.float32),
        "tabular": tfds.features.Tensor(shape=(TABULAR_DIM,), dtype=np.float32),
        "grade": tfds.features.Scalar(dtype=np.int64),
        "pe": tfds.features.Scalar(dtype=np.int64),
        "shortcut": tfds.features.Scalar(dtype=np.float32),
    })
  return tfds.features.FeaturesDict(spec)
