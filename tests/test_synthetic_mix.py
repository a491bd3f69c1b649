"""Tests for cxrjax.evaluate.synthetic_mix: RayGen's synthetic class counts and prompt labels."""
import numpy as np
import pytest

from cxrjax.evaluate.synthetic_mix import (RAYGEN_CLASSES, first_fraction, inverse_frequency_counts,
                                           prompt_labels)

# Real positives per class in RAYGEN_CLASSES order (spec C.9.4).
POSITIVES = [1307, 1312, 226, 855, 217, 260, 1148, 1537, 629, 326]
WORKED = {"Fracture": 920, "Consolidation": 786, "Lung Lesion": 783, "Pneumothorax": 687,
          "Pneumonia": 512, "Edema": 376, "Lung Opacity": 195, "Atelectasis": 155,
          "Cardiomegaly": 135, "Pleural Effusion": 130}


def test_class_order():
  assert RAYGEN_CLASSES == ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Fracture",
                            "Lung Lesion", "Lung Opacity", "Pleural Effusion", "Pneumonia",
                            "Pneumothorax")


def test_inverse_frequency_counts_worked_example():
  counts = inverse_frequency_counts(POSITIVES, RAYGEN_CLASSES, 4684)
  assert counts == WORKED
  assert list(counts) == list(WORKED)  # rarest real class first
  assert sum(counts.values()) == 4679
  assert inverse_frequency_counts(POSITIVES) == WORKED  # the defaults are RayGen's


def test_inverse_frequency_counts_small_cases():
  # Sorted ascending (b=1, a=3, c=6), proportions (0.1, 0.3, 0.6) reversed: b 6, a 3, c 1.
  assert inverse_frequency_counts([3, 1, 6], ["a", "b", "c"], 10) == {"b": 6, "a": 3, "c": 1}
  # Ties keep the names' order (a stable sort), and int() truncates.
  assert inverse_frequency_counts([2, 2, 1], ["a", "b", "c"], 7) == {"c": 2, "a": 2, "b": 1}
  with pytest.raises(ValueError):
    inverse_frequency_counts([1, 2], ["a", "b", "c"], 10)


def test_first_fraction_half_set():
  half = first_fraction(WORKED, 0.5)
  assert sum(half.values()) == 2337
  assert half["Fracture"] == 460 and half["Lung Lesion"] == 391 and half["Lung Opacity"] == 97
  assert first_fraction(WORKED, 1.0) == WORKED
  with pytest.raises(ValueError):
    first_fraction(WORKED, 1.5)


def test_prompt_labels_fixed_and_faithful_bug():
  prompts = ["Atelectasis", "pneumothorax", "Pneumonia", "PLEURAL EFFUSION"]
  fixed = prompt_labels(prompts)
  assert fixed.shape == (4, 10) and fixed.dtype == np.float32
  np.testing.assert_array_equal(fixed.sum(1), 1.0)
  assert [int(i) for i in fixed.argmax(1)] == [0, 9, 8, 7]
  buggy = prompt_labels(prompts, RAYGEN_CLASSES, faithful_pneumothorax_bug=True)
  assert [int(i) for i in buggy.argmax(1)] == [0, 8, 8, 7]
  assert buggy[:, 9].sum() == 0  # Pneumothorax is never positive in the seed's synthetic labels
  every = prompt_labels(list(RAYGEN_CLASSES))
  np.testing.assert_array_equal(every, np.eye(10, dtype=np.float32))
  with pytest.raises(ValueError, match="not among the labels"):
    prompt_labels(["No Finding"])
