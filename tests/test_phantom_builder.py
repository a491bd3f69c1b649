"""The phantom TFDS builder: prepares array_record without TensorFlow, reads back through
as_data_source with the study layout, splits by patient, and a failed prepare leaves nothing
that reads as complete."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import tensorflow_datasets as tfds
from cxrjax.core.errors import ConfigError
from cxrjax.data.builders.cxr_phantoms import CxrPhantoms, CxrPhantomsConfig
from cxrjax.data.labels import VIEW_INDEX


def stand_in(attrs, size):
  """Trivial renderer: a flat frontal (grey level = site) and a black lateral when present."""
  images, views = [np.full((size, size), 10 * attrs.site, np.uint8)], [attrs.frontal_view]
  if attrs.has_lateral:
    images.append(np.zeros((size, size), np.uint8)), views.append("L")
  return images, views


def _builder(data_dir, name="tiny", render=stand_in, **kw):
  cfg = CxrPhantomsConfig(name=name, size=64, num_studies=30, render=render, **kw)
  return CxrPhantoms(config=cfg, data_dir=str(data_dir), file_format="array_record")


def test_prepare_and_read_back(tmp_path):
  b = _builder(tmp_path)
  b.download_and_prepare()
  src = _builder(tmp_path).as_data_source()  # a fresh builder finds the prepared dataset
  assert set(src) == {"train", "validation", "test"}
  assert sum(len(s) for s in src.values()) == 30
  patients = {}
  for split, s in src.items():
    for i in range(len(s)):
      ex = s[i]
      assert set(ex) >= {"study_id", "patient_id", "images", "views", "labels", "age_years", "sex_male",
                         "race", "site", "findings", "impression", "phantom"}
      assert len(ex["images"]) == len(ex["views"]) >= 1
      assert all(im.shape == (64, 64, 1) and im.dtype == np.uint8 for im in ex["images"])
      assert ex["views"][0] in (VIEW_INDEX["PA"], VIEW_INDEX["AP"])
      assert ex["labels"].shape == (14,) and ex["phantom"]["tabular"].shape == (80,)
      site = int(ex["site"].decode().split("_")[1])
      assert (ex["images"][0] == 10 * site).all()
      patients.setdefault(ex["patient_id"], set()).add(split)
  assert all(len(s) == 1 for s in patients.values())  # no patient in two splits
  assert len(patients) < 30  # some patients have several studies


def test_frontal_only_and_bad_config(tmp_path):
  b = _builder(tmp_path, name="tiny_frontal", views="frontal")
  b.download_and_prepare()
  src = b.as_data_source()
  assert all(len(s[i]["images"]) == 1 for s in src.values() for i in range(len(s)))
  for bad in (dict(size=32), dict(views="lateral"), dict(num_studies=0), dict(shortcut_label="Nope")):
    with pytest.raises(ConfigError):
      CxrPhantomsConfig(name="bad", **bad)


def test_interrupted_prepare_is_not_complete(tmp_path):
  calls = []

  def failing(attrs, size):
    calls.append(1)
    if len(calls) > 12:
      raise RuntimeError("renderer died")
    return stand_in(attrs, size)

  with pytest.raises(RuntimeError, match="renderer died"):
    _builder(tmp_path, render=failing).download_and_prepare()
  # Nothing of the half-written dataset is left where TFDS looks for it.
  assert not list((tmp_path / "cxr_phantoms" / "tiny").glob("1.0.0*"))
  fresh = _builder(tmp_path)
  assert not fresh.is_prepared()
  assert fresh.as_data_source() == {}  # TFDS lists no split of an unprepared dataset
  with pytest.raises(Exception):
    fresh.as_data_source("train")
  fresh.download_and_prepare()  # a rerun starts clean and completes
  assert sum(len(s) for s in fresh.as_data_source().values()) == 30


def test_no_tensorflow_import(tmp_path):
  code = textwrap.dedent(f"""
      import sys, numpy as np
      from cxrjax.data.builders.cxr_phantoms import CxrPhantoms, CxrPhantomsConfig
      def r(a, s):
        return [np.zeros((s, s), np.uint8)], ["PA"]
      b = CxrPhantoms(config=CxrPhantomsConfig(name="t", size=64, num_studies=8, render=r),
                      data_dir={str(tmp_path)!r}, file_format="array_record")
      b.download_and_prepare()
      n = sum(len(s) for s in b.as_data_source().values())
      ex = b.as_data_source()["train"][0]
      assert n == 8 and ex["images"][0].shape == (64, 64, 1), n
      assert "tensorflow" not in sys.modules, "tensorflow was imported"
      print("ok")
  """)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]
