"""MIMIC-CXR-JPG source and builder on a tiny fake download with the real layout and columns:
table contents, report sections, demographics, study grouping, patient-level splits, the TFDS
builder read back without TensorFlow, and one DataError per way the download can be wrong."""

import gzip
import math
import sys

import numpy as np
import pandas as pd
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from cxrjax.data.builders import MimicConfig, MimicCxrJpg
from cxrjax.data.errors import DataError
from cxrjax.data.labels import CHEXPERT_LABELS, VIEWS
from cxrjax.data.sources import TABLE_COLUMNS, group_studies, mimic_cxr
from cxrjax.data.sources.reports import split_report

P = "mimic-cxr-2.0.0-"
REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with cough

 FINDINGS:
 PA and lateral views of the chest.  No focal
 consolidation.

 IMPRESSION:
 No acute process.

 ADDENDUM:  see below
 IMPRESSION:  Final: no pneumonia.
"""
# (subject, study, dicom, ViewPosition, split, StudyDate)
IMAGES = [
    ("10000032", "50414267", "d1", "LATERAL", "train", "21800506"),
    ("10000032", "50414267", "d2", "PA", "train", "21800506"),
    ("10000032", "53189527", "d3", "AP", "train", "21820101"),
    ("10000764", "57375967", "d4", "LL", "validate", "21320101"),
    ("10000764", "57375967", "d5", "AP", "validate", "21320101"),
    ("10000764", "57375967", "d6", "PA", "validate", "21320101"),
    ("11000001", "58000001", "d7", "", "test", "21500101"),
]


def _labels(study):
  """A distinct label row per study, in the CSV's (alphabetical) column order."""
  base = {"50414267": {"Cardiomegaly": "1.0", "Edema": "-1.0", "No Finding": ""},
          "53189527": {"No Finding": "1.0"},
          "57375967": {"Pleural Effusion": "0.0", "Support Devices": "1.0"},
          "58000001": {"Pneumothorax": "1.0"}}[study]
  return {n: base.get(n, "") for n in CHEXPERT_LABELS}


def _write_csv(path, rows, columns):
  pd.DataFrame(rows, columns=columns).to_csv(path, index=False)


def make_mimic(root, *, split_rows=None, label_override=None, view_override=None):
  """Writes the fake MIMIC-CXR-JPG tree; returns root."""
  root.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  meta = []
  for subj, study, dicom, view, _, date in IMAGES:
    d = root / "files" / f"p{subj[:2]}" / f"p{subj}" / f"s{study}"
    d.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (32, 24), dtype=np.uint8)).save(d / f"{dicom}.jpg")
    view = view_override.get(dicom, view) if view_override else view
    meta.append([dicom, subj, study, "CHEST (PA AND LAT)", view, 32, 24, date, "120000.0",
                 "CHEST (PA AND LAT)", "postero-anterior", "Erect"])
  _write_csv(root / f"{P}metadata.csv.gz", meta,
             ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription",
              "ViewPosition", "Rows", "Columns", "StudyDate", "StudyTime",
              "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
              "PatientOrientationCodeSequence_CodeMeaning"])
  studies = sorted({(s, st) for s, st, *_ in IMAGES})
  for labeler in ("chexpert", "negbio"):
    rows = []
    for subj, study in studies:
      lab = _labels(study)
      if labeler == "negbio":
        lab["Atelectasis"] = "1.0"  # tells the two labelers apart
      if label_override and study in label_override:
        lab.update(label_override[study])
      rows.append([subj, study, *[lab[n] for n in CHEXPERT_LABELS]])
    _write_csv(root / f"{P}{labeler}.csv.gz", rows, ["subject_id", "study_id", *CHEXPERT_LABELS])
  split_rows = split_rows or [[dicom, study, subj, split]
                              for subj, study, dicom, _, split, _ in IMAGES]
  _write_csv(root / f"{P}split.csv.gz", split_rows, ["dicom_id", "study_id", "subject_id", "split"])
  (root / "files/p10/p10000032/s50414267.txt").write_text(REPORT)
  (root / "files/p10/p10000764/s57375967.txt").write_text("FINDINGS: Only findings here.\n")
  _write_csv(root / "patients.csv.gz", [["10000032", "F", "52", "2180"],
                                        ["10000764", "M", "76", "2132"]],
             ["subject_id", "gender", "anchor_age", "anchor_year"])
  with gzip.open(root / "admissions.csv.gz", "wt") as f:
    f.write("subject_id,hadm_id,race\n10000032,1,WHITE\n10000032,2,OTHER\n10000032,3,WHITE\n"
            "10000764,4,BLACK/AFRICAN AMERICAN\n")
  return root


@pytest.fixture(scope="module")
def mimic_root(tmp_path_factory):
  return make_mimic(tmp_path_factory.mktemp("mimic") / "mimic-cxr-jpg" / "2.0.0")


def test_split_report_sections():
  findings, impression = split_report(REPORT)
  assert findings == "PA and lateral views of the chest. No focal consolidation."
  assert impression == "Final: no pneumonia."  # the last IMPRESSION wins
  assert split_report("FINDINGS: a.\n") == ("a.", "")
  assert split_report("IMPRESSION: b.") == ("", "b.")
  assert split_report("no sections at all") == ("", "")
  assert split_report("") == ("", "")
  assert split_report("FINDINGS AND IMPRESSION: c.") == ("c.", "c.")


def test_table(mimic_root):
  t = mimic_cxr.load_table(mimic_root)
  assert tuple(t.columns) == TABLE_COLUMNS
  assert len(t) == len(IMAGES)
  r = t.set_index(t.image_path.str.rsplit("/", n=1).str[-1])
  assert r.loc["d1.jpg", "view"] == "L" and r.loc["d4.jpg", "view"] == "L"
  assert r.loc["d7.jpg", "view"] == "UNKNOWN"
  assert r.loc["d2.jpg", "image_path"] == str(mimic_root / "files/p10/p10000032/s50414267/d2.jpg")
  assert r.loc["d1.jpg", "Cardiomegaly"] == 1 and r.loc["d1.jpg", "Edema"] == -1
  assert math.isnan(r.loc["d1.jpg", "No Finding"])
  assert r.loc["d3.jpg", "No Finding"] == 1
  assert dict(zip(t.patient_id, t.split)) == {
      "10000032": "train", "10000764": "validation", "11000001": "test"}
  # demographics: age = anchor_age + (study year - anchor_year); race = most frequent
  assert r.loc["d1.jpg", "age_years"] == 52 and r.loc["d3.jpg", "age_years"] == 54
  assert r.loc["d1.jpg", "sex_male"] == 0 and r.loc["d4.jpg", "sex_male"] == 1
  assert r.loc["d1.jpg", "race"] == "WHITE" and r.loc["d7.jpg", "race"] == ""
  assert math.isnan(r.loc["d7.jpg", "age_years"])
  # reports
  assert r.loc["d2.jpg", "impression"] == "Final: no pneumonia."
  assert r.loc["d5.jpg", "findings"] == "Only findings here."
  assert r.loc["d5.jpg", "impression"] == ""
  assert r.loc["d3.jpg", "findings"] == ""
  negbio = mimic_cxr.load_table(mimic_root, labeler="negbio")
  assert (negbio.Atelectasis == 1).all() and not (t.Atelectasis == 1).any()


def test_group_studies(mimic_root):
  t = mimic_cxr.load_table(mimic_root)
  studies = {s.study_id: s for s in group_studies(t, max_views=2)}
  assert list(studies["57375967"].rows.view) == ["PA", "AP"]  # frontal first, K = 2
  assert list(studies["50414267"].rows.view) == ["PA", "L"]
  three = group_studies(t, max_views=3, split="validation")
  assert [list(s.rows.view) for s in three] == [["PA", "AP", "L"]]
  frontal = {s.study_id: list(s.rows.view) for s in group_studies(t, max_views=2,
                                                                  views=("PA", "AP"))}
  assert frontal == {"50414267": ["PA"], "53189527": ["AP"], "57375967": ["PA", "AP"]}
  assert [s.study_id for s in group_studies(t, max_views=1, views="L")] == [
      "50414267", "57375967"]


def test_builder_reads_back_without_tensorflow(mimic_root, tmp_path):
  cfg = MimicConfig(name="t16", image_size=16, max_views=2)
  b = MimicCxrJpg(config=cfg, data_dir=tmp_path, file_format="array_record")
  b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=mimic_root))
  srcs = b.as_data_source()
  assert {k: len(v) for k, v in srcs.items()} == {"train": 2, "validation": 1, "test": 1}
  ex = srcs["validation"][0]
  assert ex["study_id"] == b"57375967" and ex["patient_id"] == b"10000764"
  assert [VIEWS[v] for v in ex["views"]] == ["PA", "AP"]
  assert len(ex["images"]) == 2 and ex["images"][0].shape == (16, 16, 1)
  assert ex["images"][0].dtype == np.uint8
  want = np.full(len(CHEXPERT_LABELS), np.nan, np.float32)
  want[CHEXPERT_LABELS.index("Support Devices")] = 1
  want[CHEXPERT_LABELS.index("Pleural Effusion")] = 0
  np.testing.assert_array_equal(ex["labels"], want)
  assert ex["findings"] == b"Only findings here." and ex["age_years"] == 76
  train = {srcs["train"][i]["study_id"]: srcs["train"][i] for i in range(2)}
  assert train[b"50414267"]["impression"] == b"Final: no pneumonia."
  assert "tensorflow" not in sys.modules


def test_split_file_leak_is_an_error(tmp_path):
  rows = [[d, st, s, "test" if d == "d3" else sp] for s, st, d, _, sp, _ in IMAGES]
  root = make_mimic(tmp_path / "m", split_rows=rows)
  with pytest.raises(DataError, match=r"split\.csv.*patient '10000032'.*patient-level"):
    mimic_cxr.load_table(root)


def test_bad_label_names_file_line_and_column(tmp_path):
  root = make_mimic(tmp_path / "m", label_override={"53189527": {"Edema": "2"}})
  with pytest.raises(DataError, match=r"chexpert\.csv\.gz line 3, column 'Edema'.*label 2"):
    mimic_cxr.load_table(root)


def test_unknown_view_names_file_and_line(tmp_path):
  root = make_mimic(tmp_path / "m", view_override={"d3": "OBLIQUE-ISH"})
  with pytest.raises(DataError, match=r"metadata\.csv\.gz line 4.*unknown view 'OBLIQUE-ISH'"):
    mimic_cxr.load_table(root)


def test_missing_column_and_file(tmp_path):
  root = make_mimic(tmp_path / "m")
  meta = pd.read_csv(root / f"{P}metadata.csv.gz", dtype=str).drop(columns="ViewPosition")
  meta.to_csv(root / f"{P}metadata.csv.gz", index=False)
  with pytest.raises(DataError, match=r"metadata\.csv\.gz: missing column\(s\) \['ViewPosition'\]"):
    mimic_cxr.load_table(root)
  root = make_mimic(tmp_path / "m2")
  (root / f"{P}split.csv.gz").unlink()
  with pytest.raises(DataError, match=r"no mimic-cxr-2.0.0-split table found"):
    mimic_cxr.load_table(root)


def test_missing_image_fails_prepare_and_leaves_nothing_complete(tmp_path):
  root = make_mimic(tmp_path / "m")
  (root / "files/p10/p10000764/s57375967/d5.jpg").unlink()
  data_dir = tmp_path / "data"
  b = MimicCxrJpg(config=MimicConfig(name="t8", image_size=8), data_dir=data_dir,
                  file_format="array_record")
  with pytest.raises(DataError, match=r"d5\.jpg: image file not found.*metadata\.csv\.gz line 6"):
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=root))
  assert not list(data_dir.rglob("dataset_info.json"))  # the temp dir was removed, not renamed
  again = MimicCxrJpg(config=MimicConfig(name="t8", image_size=8), data_dir=data_dir,
                      file_format="array_record")
  assert not again.is_prepared() and not again.as_data_source()  # no split reads as complete
  fixed = make_mimic(tmp_path / "m")  # the image is back: the same data_dir now prepares
  again.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=fixed))
  assert again.is_prepared() and len(again.as_data_source()["validation"]) == 1
