"""Image decoding (PNG 8/16-bit, RGB JPEG, DICOM via pydicom), centre-crop resizing, the generic
folder source with a FolderSpec, its TFDS builder, and DataErrors naming file and row."""

import sys

import numpy as np
import pandas as pd
import pydicom  # noqa: F401  (the 'test' extra installs it; the library needs it only for DICOM)
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from cxrjax.data.builders import CxrFolder, FolderConfig
from cxrjax.data.errors import DataError
from cxrjax.data.labels import CHEXPERT_LABELS, VIEWS
from cxrjax.data.sources import FolderSpec, folder, load_image, resize_square


def write_dicom(path, pixels, *, photometric="MONOCHROME2", slope=None, intercept=None,
                window=None):
  """A minimal single-frame uncompressed 16-bit (12 stored) DICOM file."""
  from pydicom.dataset import Dataset, FileMetaDataset
  from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
  ds.Modality, ds.PatientID = "DX", "p1"
  ds.Rows, ds.Columns = pixels.shape
  ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
  ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
  if slope is not None:
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
  if window is not None:
    ds.WindowCenter, ds.WindowWidth = window
  ds.PixelData = pixels.astype("<u2").tobytes()
  try:
    ds.save_as(path, enforce_file_format=True)  # pydicom >= 3
  except TypeError:
    ds.is_little_endian, ds.is_implicit_VR = True, False
    ds.save_as(path, write_like_original=False)


def ramp(lo, hi, shape=(16, 16)):
  return np.linspace(lo, hi, shape[0] * shape[1]).reshape(shape)


def test_png_8_and_16_bit(tmp_path):
  img8 = ramp(0, 255).astype(np.uint8)
  img8[3, 4] = 77
  Image.fromarray(img8).save(tmp_path / "a.png")
  np.testing.assert_array_equal(load_image(tmp_path / "a.png"), img8)
  img16 = ramp(1000, 3000).astype(np.uint16)
  Image.fromarray(img16).save(tmp_path / "b.png")
  with Image.open(tmp_path / "b.png") as im:
    assert im.mode.startswith("I")  # really stored as 16-bit
  out = load_image(tmp_path / "b.png")
  assert out.dtype == np.uint8 and out[0, 0] == 0 and out[-1, -1] == 255  # its own range
  assert abs(int(out[8, 0]) - 128) <= 2
  deep = load_image(tmp_path / "b.png", sixteen_bit="bitdepth")
  assert deep[-1, -1] == round(3000 / 65535 * 255)


def test_rgb_jpeg_becomes_gray(tmp_path):
  rgb = np.zeros((16, 16, 3), np.uint8)
  rgb[..., 1] = 200
  Image.fromarray(rgb).save(tmp_path / "c.jpg", quality=100)
  out = load_image(tmp_path / "c.jpg")
  assert out.shape == (16, 16) and abs(int(out.mean()) - round(0.587 * 200)) <= 3


def test_dicom_monochrome1_is_inverted(tmp_path):
  px = ramp(0, 4095).astype(np.uint16)
  write_dicom(tmp_path / "m1.dcm", px, photometric="MONOCHROME1")
  write_dicom(tmp_path / "m2.dcm", px, photometric="MONOCHROME2")
  m1, m2 = load_image(tmp_path / "m1.dcm"), load_image(tmp_path / "m2.dcm")
  assert m1[0, 0] == 255 and m1[-1, -1] == 0  # raw 0 is white in MONOCHROME1
  assert m2[0, 0] == 0 and m2[-1, -1] == 255
  np.testing.assert_array_equal(m1.astype(int), 255 - m2.astype(int))


def test_dicom_rescale_and_window(tmp_path):
  px = np.zeros((16, 16), np.uint16)
  px[0, 1], px[0, 2], px[0, 3] = 200, 500, 1500  # HU = 2 * raw - 1000: -600, 0, 2000
  write_dicom(tmp_path / "w.dcm", px, slope=2, intercept=-1000, window=(0, 2000))
  out = load_image(tmp_path / "w.dcm")
  assert out[0, 0] == 0 and out[0, 3] == 255  # -1000 at the window floor, 2000 clipped
  assert abs(int(out[0, 1]) - 51) <= 2 and abs(int(out[0, 2]) - 128) <= 2
  raw = load_image(tmp_path / "w.dcm", apply_voi=False)  # no window: min..max of HU
  assert raw[0, 3] == 255 and abs(int(raw[0, 2]) - 85) <= 2


def test_corrupt_and_truncated_files_name_the_file(tmp_path):
  write_dicom(tmp_path / "t.dcm", ramp(0, 4095).astype(np.uint16))
  data = (tmp_path / "t.dcm").read_bytes()
  (tmp_path / "t.dcm").write_bytes(data[:-200])
  with pytest.raises(DataError, match=r"t\.dcm: cannot decode DICOM pixel data"):
    load_image(tmp_path / "t.dcm")
  (tmp_path / "h.dcm").write_bytes(data[:150])
  with pytest.raises(DataError, match=r"h\.dcm: (cannot read DICOM|DICOM has no pixel data)"):
    load_image(tmp_path / "h.dcm")
  noise = np.random.default_rng(0).integers(0, 255, (16, 16), dtype=np.uint8)  # incompressible
  Image.fromarray(noise).save(tmp_path / "ok.png")
  (tmp_path / "bad.png").write_bytes((tmp_path / "ok.png").read_bytes()[:150])
  with pytest.raises(DataError, match=r"bad\.png: cannot decode image"):
    load_image(tmp_path / "bad.png")
  (tmp_path / "junk.jpg").write_bytes(b"not an image")
  with pytest.raises(DataError, match=r"junk\.jpg: cannot decode image"):
    load_image(tmp_path / "junk.jpg")
  with pytest.raises(DataError, match=r"gone\.png: image file not found"):
    load_image(tmp_path / "gone.png")


def test_resize_square_centre_crops_the_long_side():
  img = np.full((20, 40), 128, np.uint8)
  img[:, :10] = 0  # left and right bands lie outside the central 20 x 20
  img[:, 30:] = 255
  np.testing.assert_array_equal(resize_square(img, 20), np.full((20, 20), 128, np.uint8))
  small = resize_square(img, 8)
  assert small.shape == (8, 8) and (small == 128).all()
  tall = resize_square(np.arange(60, dtype=np.uint8).reshape(30, 2), 2)
  np.testing.assert_array_equal(tall, [[28, 29], [30, 31]])


SPEC = FolderSpec(csv="meta/table.csv", image_dir="img", path="file", patient_id="pid",
                  study_id="accession", view="projection", age="age", sex="gender",
                  labels={"Cardiomegaly": "cardio", "Edema": "edema"}, report="text",
                  split="fold", site="hospital")
COLS = ["file", "pid", "accession", "projection", "age", "gender", "cardio", "edema", "text",
        "fold", "hospital"]
REPORT = "INDICATION: dyspnea.\nFINDINGS: Big heart.\nIMPRESSION: Cardiomegaly."


def make_folder(root, rows=None):
  """p1 (train): a PA PNG-8 and a lateral DICOM (MONOCHROME1) in one study;
  p2 (validation): a 16-bit PNG; p3 (test): an RGB JPEG with no view."""
  (root / "img").mkdir(parents=True)
  (root / "meta").mkdir()
  Image.fromarray(ramp(0, 255).astype(np.uint8)).save(root / "img/p1_pa.png")
  write_dicom(root / "img/p1_lat.dcm", ramp(0, 4095).astype(np.uint16), photometric="MONOCHROME1")
  Image.fromarray(ramp(0, 60000).astype(np.uint16)).save(root / "img/p2.png")
  Image.fromarray(np.full((16, 24, 3), 90, np.uint8)).save(root / "img/p3.jpg")
  rows = rows or [
      ["p1_lat.dcm", "p1", "A1", "LATERAL", "60", "F", "1", "-1", REPORT, "train", "X"],
      ["p1_pa.png", "p1", "A1", "PA", "60", "F", "1", "-1", REPORT, "train", "X"],
      ["p2.png", "p2", "A2", "AP", "", "M", "0", "", "", "val", "Y"],
      ["p3.jpg", "p3", "A3", "", "45", "", "", "", "no headers here", "test", "Y"]]
  pd.DataFrame(rows, columns=COLS).to_csv(root / "meta/table.csv", index=False)
  return root


def test_folder_table_with_spec(tmp_path):
  t = folder.load_table(make_folder(tmp_path / "f"), SPEC)
  r = t.set_index(t.image_path.str.rsplit("/", n=1).str[-1])
  assert list(r.loc[["p1_pa.png", "p1_lat.dcm", "p2.png", "p3.jpg"], "view"]) == [
      "PA", "L", "AP", "UNKNOWN"]
  assert r.loc["p1_pa.png", "study_id"] == "p1/A1"
  assert dict(zip(t.patient_id, t.split)) == {"p1": "train", "p2": "validation", "p3": "test"}
  assert r.loc["p1_pa.png", "Cardiomegaly"] == 1 and r.loc["p1_pa.png", "Edema"] == -1
  assert np.isnan(r.loc["p1_pa.png", "Atelectasis"])  # not in the spec: unknown
  assert (r.loc["p1_pa.png", "findings"], r.loc["p1_pa.png", "impression"]) == (
      "Big heart.", "Cardiomegaly.")
  assert (r.loc["p3.jpg", "findings"], r.loc["p3.jpg", "impression"]) == ("no headers here", "")
  assert r.loc["p2.png", "sex_male"] == 1 and np.isnan(r.loc["p2.png", "age_years"])
  assert r.loc["p2.png", "site"] == "Y"
  # no split column: a hash of the patient id, the same for every image of a patient
  hashed = folder.load_table(tmp_path / "f", FolderSpec(csv="meta/table.csv", image_dir="img",
                                                        path="file", patient_id="pid"))
  assert hashed.groupby("patient_id").split.nunique().max() == 1
  assert hashed.study_id.nunique() == 4  # no study column: each image its own study


def test_folder_builder_reads_back(tmp_path):
  root = make_folder(tmp_path / "f")
  cfg = FolderConfig(name="t16", image_size=16, max_views=2, spec=SPEC, encoding="png")  # exact pixels
  b = CxrFolder(config=cfg, data_dir=tmp_path / "data", file_format="array_record")
  b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=root))
  srcs = b.as_data_source()
  assert {k: len(v) for k, v in srcs.items()} == {"train": 1, "validation": 1, "test": 1}
  ex = srcs["train"][0]
  assert [VIEWS[v] for v in ex["views"]] == ["PA", "L"]
  pa, lat = ex["images"][0][..., 0], ex["images"][1][..., 0]
  np.testing.assert_array_equal(pa, ramp(0, 255).astype(np.uint8))  # 16 x 16: no resize
  assert lat[0, 0] == 255 and lat[-1, -1] == 0  # MONOCHROME1 inverted
  assert ex["labels"][CHEXPERT_LABELS.index("Cardiomegaly")] == 1
  assert ex["impression"] == b"Cardiomegaly." and ex["site"] == b"X" and ex["age_years"] == 60
  p3 = srcs["test"][0]["images"][0]
  assert p3.shape == (16, 16, 1) and abs(int(p3.mean()) - 90) <= 2
  assert "tensorflow" not in sys.modules


def test_folder_bad_inputs(tmp_path):
  base = make_folder(tmp_path / "ok")
  rows = pd.read_csv(base / "meta/table.csv", dtype=str, keep_default_na=False).values.tolist()
  leak = [r[:] for r in rows]
  leak[1][9] = "test"  # p1's second image in another split
  with pytest.raises(DataError, match=r"table\.csv: 1 patient.*'p1' in \['test', 'train'\]"):
    folder.load_table(make_folder(tmp_path / "leak", leak), SPEC)
  bad = [r[:] for r in rows]
  bad[2][6] = "0.5"
  with pytest.raises(DataError, match=r"table\.csv line 4, column 'cardio'"):
    folder.load_table(make_folder(tmp_path / "lab", bad), SPEC)
  bad = [r[:] for r in rows]
  bad[3][3] = "TOP-DOWN"
  with pytest.raises(DataError, match=r"table\.csv line 5: unknown view 'TOP-DOWN'"):
    folder.load_table(make_folder(tmp_path / "view", bad), SPEC)
  with pytest.raises(DataError, match=r"table\.csv: missing column\(s\) \['race'\]"):
    folder.load_table(base, FolderSpec(csv="meta/table.csv", path="file", patient_id="pid",
                                       race="race"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(DataError, match=r"empty: folder is empty"):
    folder.load_table(tmp_path / "empty", SPEC)
  none = make_folder(tmp_path / "none")
  pd.DataFrame(columns=COLS).to_csv(none / "meta/table.csv", index=False)
  with pytest.raises(DataError, match=r"table\.csv: no images listed"):
    folder.load_table(none, SPEC)
  gone = make_folder(tmp_path / "gone")
  (gone / "img/p2.png").unlink()
  b = CxrFolder(config=FolderConfig(name="g", image_size=8, spec=SPEC), data_dir=tmp_path / "d",
                file_format="array_record")
  with pytest.raises(DataError, match=r"p2\.png: image file not found.*table\.csv line 4"):
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=gone))
  assert not b.is_prepared()
