"""Label/view conventions (data/labels.py) and image encodings (data/features.py)."""
import math

import numpy as np
import pytest
from PIL import Image

from cxrjax.data.errors import DataError
from cxrjax.data.features import encode_image, study_features
from cxrjax.data.labels import (CHEXPERT_LABELS, LABEL_INDEX, apply_uncertain_policy,
                                no_finding_implies_negatives, normalize_view, parse_label,
                                parse_label_row)


def test_views_map_onto_the_vocabulary_and_typos_fail():
  assert [normalize_view(v) for v in ("PA", "ap", "LATERAL", "LL", " ap  supine ", "", None,
                                      float("nan"))] == ["PA", "AP", "L", "L", "AP", "UNKNOWN",
                                                         "UNKNOWN", "UNKNOWN"]
  with pytest.raises(DataError, match=r"row 7: unknown view 'PAA'"):
    normalize_view("PAA", where="row 7: ")


def test_labels_parse_to_four_values_and_others_fail():
  assert [parse_label(v) for v in ("1", "0.0", " -1 ", 1, 0.0, -1.0)] == [1, 0, -1, 1, 0, -1]
  assert all(math.isnan(parse_label(v)) for v in ("", "  ", "nan", None, float("nan")))
  for bad in ("2", "yes", 0.5, -2):
    with pytest.raises(DataError, match="not one of 1, 0, -1 or blank"):
      parse_label(bad, where="x.csv line 3: ")
  with pytest.raises(DataError, match="expected 14 label values"):
    parse_label_row(["1"] * 13)


def test_uncertain_policies():
  raw = np.array([1, 0, -1, np.nan], np.float32)
  np.testing.assert_array_equal(apply_uncertain_policy(raw, "ignore"), [1, 0, np.nan, np.nan])
  np.testing.assert_array_equal(apply_uncertain_policy(raw, "ones"), [1, 0, 1, np.nan])
  np.testing.assert_array_equal(apply_uncertain_policy(raw, "zeros"), [1, 0, 0, np.nan])
  with pytest.raises(ValueError, match="uncertain policy"):
    apply_uncertain_policy(raw, "maybe")


def test_no_finding_fills_unmentioned_pathologies_but_not_devices():
  row = np.full(len(CHEXPERT_LABELS), np.nan, np.float32)
  row[LABEL_INDEX["No Finding"]] = 1
  row[LABEL_INDEX["Edema"]] = -1  # an explicit mention is kept
  out = no_finding_implies_negatives(row[None])[0]
  assert out[LABEL_INDEX["Edema"]] == -1 and out[LABEL_INDEX["Atelectasis"]] == 0
  assert math.isnan(out[LABEL_INDEX["Support Devices"]])
  other = row.copy()
  other[LABEL_INDEX["No Finding"]] = np.nan
  assert np.isnan(no_finding_implies_negatives(other)[LABEL_INDEX["Atelectasis"]])


def test_png_is_lossless_and_jpeg_close():
  rng = np.random.default_rng(0)
  y, x = np.mgrid[:64, :64]
  img = np.clip(100 + 60 * np.sin(x / 9) * np.cos(y / 7) + rng.normal(0, 3, (64, 64)), 0, 255)
  img = img.astype(np.uint8)
  png = np.asarray(Image.open(encode_image(img, "png")))
  np.testing.assert_array_equal(png, img)
  jpg = np.asarray(Image.open(encode_image(img[..., None], "jpeg")))
  assert jpg.shape == img.shape and np.abs(jpg.astype(int) - img).mean() < 2.0
  with pytest.raises(ValueError, match="encoding"):
    encode_image(img, "webp")
  with pytest.raises(TypeError, match="uint8"):
    encode_image(img.astype(np.float32), "png")
  assert study_features(encoding="png")["images"].feature.encoding_format == "png"
