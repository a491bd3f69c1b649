"""Real data as users bring it (issue 17): no silent empty training, repeated rows and copies
across splits caught, and the clearer messages. Every input is a tiny file written here."""
import io

import numpy as np
import pandas as pd
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from cxrjax.core.errors import ConfigError
from cxrjax.data import cli, registry
from cxrjax.data.builders import CxrFolder, CxrPhantoms, FolderConfig
from cxrjax.data.errors import DataError
from cxrjax.data.image_batches import ImageBatches
from cxrjax.data.labels import VIEW_INDEX
from cxrjax.data.pipeline import PipelineConfig, StudyPipeline
from cxrjax.data.sources import FolderSpec, folder, load_image
from cxrjax.data.sources.table import read_csv

UNK, PA, L = VIEW_INDEX["UNKNOWN"], VIEW_INDEX["PA"], VIEW_INDEX["L"]


def png(path, seed):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.random.default_rng(seed).integers(0, 255, (12, 12), dtype=np.uint8)).save(path)


def dicom(path, *, view=None, jpeg=False):
  """An 8-bit DICOM, uncompressed or JPEG Baseline, with an optional ViewPosition."""
  from pydicom.dataset import Dataset, FileMetaDataset
  from pydicom.encaps import encapsulate
  from pydicom.uid import (ExplicitVRLittleEndian, JPEGBaseline8Bit, SecondaryCaptureImageStorage,
                           generate_uid)
  px = np.random.default_rng(0).integers(0, 255, (32, 32), dtype=np.uint8)
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
  meta.TransferSyntaxUID = JPEGBaseline8Bit if jpeg else ExplicitVRLittleEndian
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
  ds.Modality, ds.Rows, ds.Columns, ds.SamplesPerPixel = "DX", 32, 32, 1
  ds.PhotometricInterpretation = "MONOCHROME2"
  ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
  if view:
    ds.ViewPosition = view
  if jpeg:
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, format="JPEG", quality=90)
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
  else:
    ds.PixelData = px.tobytes()
  path.parent.mkdir(parents=True, exist_ok=True)
  ds.save_as(path, enforce_file_format=True)


def csv(root, header, rows, name="labels.csv"):
  root.mkdir(parents=True, exist_ok=True)
  (root / name).write_text("\n".join([header, *rows]) + "\n")
  return root


def prepare(root, data_dir, name="t", **kw):
  b = CxrFolder(config=FolderConfig(name=name, image_size=8, **kw), data_dir=data_dir,
                file_format="array_record")
  b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=root))
  return b


def study(views, labels=(1.0, 0.0)):
  return dict(images=[np.full((8, 8, 1), 9, np.uint8) for _ in views], views=list(views),
              labels=np.array(labels, np.float32), age_years=np.float32(50), sex_male=np.float32(1))


# --------------------------------------------------------------------------- #
# A1: views from DICOM; nothing usable is an error naming the filter
# --------------------------------------------------------------------------- #
def test_views_come_from_the_dicom_header_without_a_view_column(tmp_path):
  dicom(tmp_path / "a.dcm", view="AP")
  dicom(tmp_path / "b.dcm")           # no ViewPosition
  dicom(tmp_path / "c.dcm", view="LL")
  png(tmp_path / "d.png", 0)
  csv(tmp_path, "path,patient_id,view", ["a.dcm,p1,", "b.dcm,p2,", "c.dcm,p3,", "d.png,p4,PA"])
  t = folder.load_table(tmp_path, FolderSpec(view="view"))
  views = dict(zip(t.image_path.str.rsplit("/", n=1).str[-1], t.view))
  assert views == {"a.dcm": "AP", "b.dcm": "UNKNOWN", "c.dcm": "L", "d.png": "PA"}
  t = folder.load_table(tmp_path, FolderSpec())  # no view column at all
  assert dict(zip(t.image_path.str.rsplit("/", n=1).str[-1], t.view))["a.dcm"] == "AP"


def test_unknown_views_are_admitted_when_no_view_is_known(capsys):
  src = [study([UNK]) for _ in range(6)]
  cfg = PipelineConfig(global_batch_size=4, image_size=8, max_views=1, views=("PA", "AP"), read_threads=0)
  b = next(StudyPipeline(src, cfg))
  assert b["view_mask"].all()
  assert "admits UNKNOWN" in capsys.readouterr().out
  strict = PipelineConfig(global_batch_size=4, image_size=8, max_views=1, views=("PA", "AP"),
                          admit_unknown=False, read_threads=0)
  with pytest.raises(DataError, match=r"view filter views=\('PA', 'AP'\).*UNKNOWN 6"):
    next(StudyPipeline(src, strict))


def test_a_filter_that_removes_everything_stops_training_and_evaluation():
  laterals = [study([L]) for _ in range(5)]
  for cfg in (PipelineConfig(global_batch_size=2, image_size=8, max_views=1, views=("PA", "AP"),
                             read_threads=0),
              PipelineConfig.for_eval(4, image_size=8, max_views=1, views=("PA",), read_threads=0)):
    with pytest.raises(DataError, match=r"removes every study.*views are: L 5.*'L'"):
      next(StudyPipeline(laterals, cfg))
  # An unlucky first batch (all laterals) in data that has frontal views goes on.
  mixed = [study([L])] * 2 + [study([PA])]
  pipe = StudyPipeline(mixed, PipelineConfig(global_batch_size=2, image_size=8, max_views=1,
                                             views=("PA",), shuffle=False, read_threads=0))
  assert not next(pipe)["view_mask"].any()


def test_batches_without_any_label_stop_with_the_reason():
  cfg = PipelineConfig(global_batch_size=2, image_size=8, max_views=1, read_threads=0)
  blank = [study([PA], (np.nan, np.nan)) for _ in range(4)]
  with pytest.raises(DataError, match=r"no usable study.*no label values.*labels=NAME:COLUMN"):
    next(ImageBatches(StudyPipeline(blank, cfg)))
  unsure = [study([PA], (-1.0, np.nan)) for _ in range(4)]
  with pytest.raises(DataError, match=r"uncertain='ignore' masks.*data.uncertain=ones"):
    next(ImageBatches(StudyPipeline(unsure, cfg)))
  assert np.isfinite(next(ImageBatches(StudyPipeline(
      unsure, PipelineConfig(global_batch_size=2, image_size=8, max_views=1, uncertain="ones",
                             read_threads=0))))["labels"]).any()


# --------------------------------------------------------------------------- #
# A2-A4: one image listed twice; one file under two patients
# --------------------------------------------------------------------------- #
def test_an_exact_repeated_row_is_stored_once_and_reported(tmp_path):
  for i in range(3):
    png(tmp_path / "f" / f"{i}.png", i)
  rows = ["0.png,p0,1", "1.png,p1,0", "2.png,p2,1", "1.png,p1,0"]
  root = csv(tmp_path / "f", "path,patient_id,Edema", rows)
  t = folder.load_table(root)
  assert len(t) == 3 and [r[1].rsplit(" ", 1)[-1] for r in t.attrs["repeated"]] == ["5"]
  b = prepare(root, tmp_path / "d")
  assert sum(len(s) for s in b.as_data_source().values()) == 3
  skipped = pd.read_csv(b.data_path / "skipped.csv")
  assert list(skipped.columns) == ["path", "csv_line", "reason"]
  assert skipped.csv_line[0].endswith("labels.csv line 5") and "repeat of" in skipped.reason[0]


def test_one_image_listed_with_conflicting_values_is_refused(tmp_path):
  png(tmp_path / "0.png", 0)
  root = csv(tmp_path, "path,patient_id,Edema", ["0.png,p0,0", "0.png,p0,1"])
  with pytest.raises(DataError, match=r"line 3: image .*0\.png is listed again with other values "
                                      r"than at .*line 2: Edema 0 vs 1;"):
    folder.load_table(root)
  csv(tmp_path, "path,patient_id,Edema", ["0.png,p0,1", "0.png,p9,1"])
  with pytest.raises(DataError, match=r"patient_id 'p0' vs 'p9'"):
    folder.load_table(tmp_path)


def test_one_file_under_two_patients_in_two_splits(tmp_path):
  root = tmp_path / "f"
  for i in range(3):
    png(root / f"{i}.png", i)
  (root / "copy.png").write_bytes((root / "0.png").read_bytes())
  csv(root, "path,patient_id,split,Edema",
      ["0.png,p0,train,1", "1.png,p1,train,0", "2.png,p2,test,1", "copy.png,p9,test,1"])
  with pytest.raises(DataError, match=r"copy\.png: same file content as .*0\.png .*patient 'p0', "
                                      r"split train.*split test"):
    prepare(root, tmp_path / "d", spec=FolderSpec(split="split"))
  b = prepare(root, tmp_path / "d", name="skip", spec=FolderSpec(split="split"), skip_bad=True)
  assert {k: len(v) for k, v in b.as_data_source().items()} == {"train": 2, "test": 1}
  skipped = pd.read_csv(b.data_path / "skipped.csv")
  assert skipped.path[0].endswith("copy.png") and "leaks" in skipped.reason[0]


# --------------------------------------------------------------------------- #
# B: clearer messages
# --------------------------------------------------------------------------- #
def test_another_builders_keys_are_named_as_such():
  with pytest.raises(ConfigError, match=r"unknown config key 'size' for cxr_folder \(it is a key of "
                                        r"cxr_phantoms: these items were written for another builder"):
    registry.make_config(CxrFolder, ["size=128"])
  from cxrjax.systems.classifier.data import builder_items
  phantom = ("size=64",)
  assert builder_items("cxr_folder", (), phantom) == [] and builder_items("cxr_phantoms", (), phantom) == ["size=64"]


def test_truncated_jpeg_dicom_says_truncated(tmp_path):
  dicom(tmp_path / "j.dcm", jpeg=True)
  assert load_image(tmp_path / "j.dcm").shape == (32, 32)
  data = (tmp_path / "j.dcm").read_bytes()
  (tmp_path / "t.dcm").write_bytes(data[:-300])
  with pytest.warns(UserWarning), pytest.raises(DataError, match=r"t\.dcm: DICOM pixel data is truncated"):
    load_image(tmp_path / "t.dcm")


def test_latin1_csv_names_the_line(tmp_path):
  (tmp_path / "l.csv").write_bytes("path,patient_id\na.png,p1\nb.png,Jos\xe9\n".encode("latin-1"))
  with pytest.raises(DataError, match=r"l\.csv line 3: not UTF-8 text \(byte 0xe9.*re-save the CSV as UTF-8"):
    read_csv(tmp_path / "l.csv")
  (tmp_path / "bom.csv").write_bytes("\ufeffpath,patient_id\na.png,p1\n".encode("utf-8"))
  assert list(read_csv(tmp_path / "bom.csv").columns) == ["path", "patient_id"]


def test_a_bad_label_cell_is_shown_as_written_and_stops_even_under_skip_bad(tmp_path):
  png(tmp_path / "0.png", 0)
  root = csv(tmp_path, "path,patient_id,Edema", ["0.png,p0,2"])
  with pytest.raises(DataError, match=r"line 2, column 'Edema': label 2 is not one of"):
    prepare(root, tmp_path / "d", skip_bad=True)


def test_small_splits_and_one_class_labels_are_warned_about(tmp_path, capsys):
  for i in range(4):
    png(tmp_path / f"{i}.png", i)
  root = csv(tmp_path, "path,patient_id,split,Edema",
             ["0.png,p0,train,1", "1.png,p1,train,0", "2.png,p2,test,0", "3.png,p3,test,0"])
  b = CxrFolder(config=FolderConfig(name="w", spec=FolderSpec(split="split")), data_dir=tmp_path / "d")
  b.load_checked_table(root)
  err = capsys.readouterr().err
  assert "warning: split test has 2 studies (2 patients)" in err and "split=COLUMN" in err
  assert "in split test, 1 label(s) have one class, so no AUROC: Edema (only negative)" in err


def test_a_failed_prepare_announces_nothing_and_leaves_no_folder(tmp_path, capsys):
  png(tmp_path / "f/0.png", 0)
  csv(tmp_path / "f", "path,patient_id,Edema", ["0.png,p0,7"])
  data_dir = tmp_path / "d"
  with pytest.raises(SystemExit):
    cli.main(["prepare", "cxr_folder", "--data_dir", str(data_dir), "--manual_dir", str(tmp_path / "f")])
  out, err = capsys.readouterr()
  assert "preparing" not in out and err.startswith("error: ") and not data_dir.exists()
  csv(tmp_path / "f", "path,patient_id,Edema", ["0.png,p0,1", "gone.png,p1,0"])  # fails while writing
  data_dir.mkdir()
  with pytest.raises(SystemExit):
    cli.main(["prepare", "cxr_folder", "--data_dir", str(data_dir), "--manual_dir", str(tmp_path / "f")])
  out, err = capsys.readouterr()
  assert "preparing" in out and "\nerror: " in err and "gone.png: image file not found" in err
  assert list(data_dir.iterdir()) == []


def test_opening_by_name_rebuilds_the_prepared_config(tmp_path, capsys):
  items = ["name=small", "size=64", "num_studies=6", "views=frontal"]
  cli.main(["prepare", "cxr_phantoms", "--data_dir", str(tmp_path), "--config", *items])
  capsys.readouterr()
  b = registry.open_prepared(CxrPhantoms, str(tmp_path), ["name=small"])
  assert (b.builder_config.size, b.builder_config.num_studies) == (64, 6)
  assert "prepared with size=64 num_studies=6" in capsys.readouterr().out
