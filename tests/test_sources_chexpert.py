"""CheXpert source and builder on a tiny fake download with the real layout and CSV columns:
label mapping by name, views, study ids, demographics join, patient-level hash splits, the TFDS
builder read back without TensorFlow, skip_bad, and DataErrors for bad input."""

import math
import sys

import numpy as np
import pandas as pd
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from cxrjax.data.builders import Chexpert, ChexpertConfig
from cxrjax.data.errors import DataError
from cxrjax.data.labels import CHEXPERT_LABELS, VIEWS
from cxrjax.data.sources import TABLE_COLUMNS, chexpert

# CheXpert's own column order, NOT labels.CHEXPERT_LABELS' alphabetical one.
CHEXPERT_ORDER = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity",
                  "Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis",
                  "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
                  "Support Devices"]
COLUMNS = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_ORDER]
SMALL = "CheXpert-v1.0-small"
TRAIN_PATIENTS = [f"patient{i:05d}" for i in range(1, 9)]
LABELS_P1 = {"Cardiomegaly": "1.0", "Lung Opacity": "-1.0", "Fracture": "0.0"}


def _row(split, patient, study, view_file, sex, age, fl, appa, labels):
  return [f"{SMALL}/{split}/{patient}/{study}/{view_file}", sex, age, fl, appa,
          *[labels.get(n, "") for n in CHEXPERT_ORDER]]


def make_chexpert(root, *, extra_train_rows=(), demo=True):
  """Writes the fake tree: 8 train patients (patient00001 has a 2-view and a 1-view study),
  one validation patient; returns root (the folder containing CheXpert-v1.0-small)."""
  rng = np.random.default_rng(0)
  train = []
  for p in TRAIN_PATIENTS:
    sex = "Unknown" if p == "patient00002" else ("Female" if p == "patient00001" else "Male")
    labels = LABELS_P1 if p == "patient00001" else {"No Finding": "1.0"}
    train.append(_row("train", p, "study1", "view1_frontal.jpg", sex, "68", "Frontal", "AP",
                      labels))
  train.insert(1, _row("train", "patient00001", "study1", "view2_lateral.jpg", "Female", "68",
                       "Lateral", "", LABELS_P1))
  train.insert(2, _row("train", "patient00001", "study2", "view1_frontal.jpg", "Female", "69",
                       "Frontal", "PA", {"Edema": "1.0"}))
  train.extend(extra_train_rows)
  valid = [_row("valid", "patient64541", "study1", "view1_frontal.jpg", "Male", "73", "Frontal",
                "PA", {"Pleural Effusion": "1.0"}),
           _row("valid", "patient64541", "study1", "view2_lateral.jpg", "Male", "73", "Lateral",
                "", {"Pleural Effusion": "1.0"})]
  for r in train + valid:
    path = root / r[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
      Image.fromarray(rng.integers(0, 255, (20, 28), dtype=np.uint8)).save(path)
  pd.DataFrame(train, columns=COLUMNS).to_csv(root / SMALL / "train.csv", index=False)
  pd.DataFrame(valid, columns=COLUMNS).to_csv(root / SMALL / "valid.csv", index=False)
  if demo:
    pd.DataFrame([["patient00001", "Female", "68", "White", "Non-Hispanic/Non-Latino"],
                  ["patient00002", "Male", "70", "Asian", "Non-Hispanic/Non-Latino"]],
                 columns=["PATIENT", "GENDER", "AGE_AT_CXR", "PRIMARY_RACE", "ETHNICITY"]
                 ).to_csv(root / "CHEXPERT DEMO.csv", index=False)
  return root


@pytest.fixture(scope="module")
def chex_root(tmp_path_factory):
  return make_chexpert(tmp_path_factory.mktemp("chexpert"))


def test_table_maps_labels_by_name_and_views(chex_root):
  t = chexpert.load_table(chex_root, test_fraction=0.5)
  assert tuple(t.columns) == TABLE_COLUMNS
  r = t.set_index("image_path")
  lat = r.loc[str(chex_root / SMALL / "train/patient00001/study1/view2_lateral.jpg")]
  got = np.array([lat[n] for n in CHEXPERT_LABELS], np.float32)
  want = np.full(14, np.nan, np.float32)
  for name, v in LABELS_P1.items():
    want[CHEXPERT_LABELS.index(name)] = float(v)
  np.testing.assert_array_equal(got, want)
  assert lat.view == "L" and lat.study_id == "patient00001/study1"
  assert lat.patient_id == "patient00001" and lat.site == "Stanford"
  assert set(t.view) == {"AP", "PA", "L"}
  # the root may also be the CheXpert-v1.0-small folder itself
  assert len(chexpert.load_table(chex_root / SMALL, test_fraction=0.5)) == len(t)


def test_demographics_join(chex_root):
  t = chexpert.load_table(chex_root).drop_duplicates("patient_id").set_index("patient_id")
  assert t.loc["patient00001", "race"] == "White" and t.loc["patient00001", "sex_male"] == 0
  assert t.loc["patient00002", "sex_male"] == 1  # CSV says Unknown: DEMO's GENDER fills in
  assert t.loc["patient00003", "race"] == "" and t.loc["patient00003", "age_years"] == 68
  assert t.loc["patient00001", "age_years"] == 68


def test_patient_level_hash_split(chex_root):
  t = chexpert.load_table(chex_root, test_fraction=0.5)
  assert t.groupby("patient_id").split.nunique().max() == 1
  assert set(t[t.patient_id == "patient64541"].split) == {"validation"}
  assert set(t.split) == {"train", "validation", "test"}
  again = chexpert.load_table(chex_root, test_fraction=0.5)
  assert list(again.split) == list(t.split)  # deterministic
  other = chexpert.load_table(chex_root, test_fraction=0.5, seed=1)
  assert list(other.split) != list(t.split)
  assert set(chexpert.load_table(chex_root, test_fraction=0.0).split) == {"train", "validation"}


def test_builder_reads_back_without_tensorflow(chex_root, tmp_path):
  b = Chexpert(config=ChexpertConfig(name="t16", image_size=16, test_fraction=0.5),
               data_dir=tmp_path, file_format="array_record")
  b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=chex_root))
  srcs = b.as_data_source()
  patients = {s: {src[i]["patient_id"] for i in range(len(src))} for s, src in srcs.items()}
  assert not (patients["train"] & patients["test"])
  assert patients["validation"] == {b"patient64541"}
  assert sum(len(s) for s in srcs.values()) == 10  # 9 train studies + 1 validation study
  ex = srcs["validation"][0]
  assert [VIEWS[v] for v in ex["views"]] == ["PA", "L"]  # frontal first
  assert ex["images"][0].shape == (16, 16, 1)
  assert ex["labels"][CHEXPERT_LABELS.index("Pleural Effusion")] == 1
  assert math.isnan(ex["labels"][CHEXPERT_LABELS.index("Edema")])
  assert ex["race"] == b"" and ex["sex_male"] == 1 and ex["findings"] == b""
  assert "tensorflow" not in sys.modules


def test_skip_bad_writes_skipped_csv(tmp_path, capsys):
  root = make_chexpert(tmp_path / "c")
  bad = root / SMALL / "train/patient00003/study1/view1_frontal.jpg"
  bad.write_bytes(bad.read_bytes()[:40])  # truncated JPEG
  (root / SMALL / "train/patient00001/study1/view2_lateral.jpg").unlink()
  cfg = ChexpertConfig(name="skip", image_size=8, test_fraction=0.5, skip_bad=True)
  b = Chexpert(config=cfg, data_dir=tmp_path / "data", file_format="array_record")
  b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=root))
  skipped = pd.read_csv(b.data_path / "skipped.csv")
  assert len(skipped) == 2
  assert set(skipped.path.str.rsplit("/", n=3).str[-3:].str.join("/")) == {
      "patient00003/study1/view1_frontal.jpg", "patient00001/study1/view2_lateral.jpg"}
  assert "skipped 2 bad image(s)" in capsys.readouterr().out
  srcs = b.as_data_source()
  ids = {srcs[s][i]["study_id"] for s in srcs for i in range(len(srcs[s]))}
  assert b"patient00003/study1" not in ids  # its only image was bad: the study is dropped
  assert sum(len(s) for s in srcs.values()) == 9
  # without skip_bad the same tree fails, naming the file and the CSV line
  strict = Chexpert(config=ChexpertConfig(name="strict", image_size=8, test_fraction=0.5),
                    data_dir=tmp_path / "data", file_format="array_record")
  either = (r"(view1_frontal\.jpg: cannot decode image|view2_lateral\.jpg: image file not found)"
            r".*train\.csv line")
  with pytest.raises(DataError, match=either):
    strict.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=root))


def test_bad_inputs(tmp_path):
  bad_label = _row("train", "patient00009", "study1", "view1_frontal.jpg", "Male", "50",
                   "Frontal", "AP", {"Edema": "yes"})
  root = make_chexpert(tmp_path / "a", extra_train_rows=[bad_label])
  with pytest.raises(DataError, match=r"train\.csv line 12, column 'Edema'.*'yes'"):
    chexpert.load_table(root)
  bad_view = _row("train", "patient00009", "study1", "view1_frontal.jpg", "Male", "50",
                  "Frontal", "SIDEWAYS", {})
  root = make_chexpert(tmp_path / "b", extra_train_rows=[bad_view])
  with pytest.raises(DataError, match=r"train\.csv line 12.*unknown view 'SIDEWAYS'"):
    chexpert.load_table(root)
  root = make_chexpert(tmp_path / "c")
  df = pd.read_csv(root / SMALL / "valid.csv", dtype=str).drop(columns="Frontal/Lateral")
  df.to_csv(root / SMALL / "valid.csv", index=False)
  with pytest.raises(DataError, match=r"valid\.csv: missing column\(s\) \['Frontal/Lateral'\]"):
    chexpert.load_table(root)
  (tmp_path / "empty").mkdir()
  with pytest.raises(DataError, match=r"empty: no CheXpert train\.csv/valid\.csv found"):
    chexpert.load_table(tmp_path / "empty")
  b = Chexpert(data_dir=tmp_path / "data", file_format="array_record")
  with pytest.raises(DataError, match=r"cxr_chexpert: .*does not exist or is empty"):
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=tmp_path / "empty"))


def test_xlsx_demographics_need_openpyxl(tmp_path):
  try:
    import openpyxl  # noqa: F401
    pytest.skip("openpyxl is installed; the no-openpyxl message cannot be shown")
  except ImportError:
    pass
  root = make_chexpert(tmp_path / "x", demo=False)
  (root / "CHEXPERT DEMO.xlsx").write_bytes(b"PK\x03\x04 not really a workbook")
  with pytest.raises(DataError, match=r"CHEXPERT DEMO\.xlsx: reading \.xlsx needs openpyxl"):
    chexpert.load_table(root)
