"""A dataset with labels of its own (issue 17): the folder names them, the prepared dataset records
them, and the pipeline, stats, sheet and the classifier use them; a model trained on one label set
is evaluated on another by name, the unmatched listed."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from cxrjax.core.errors import ConfigError
from cxrjax.data import cli, registry
from cxrjax.data.builders import CxrFolder
from cxrjax.data.features import label_names
from cxrjax.data.labels import CHEXPERT_LABELS, match_label_names
from cxrjax.data.pipeline import PipelineConfig, StudyPipeline
from cxrjax.data.sources import FolderSpec, folder
from launch_util import ROOT, launch, ok


def covid_folder(root, n=24, columns=("covid", "normal")):
  """n PNGs, one patient each, no view column; label columns named by `columns`."""
  (root / "images").mkdir(parents=True)
  rows = ["path,patient_id," + ",".join(columns)]
  for i in range(n):
    img = np.random.default_rng(i).integers(0, 120, (24, 24), dtype=np.uint8)
    img[8:16, 8:16] += 120 * (i % 2)  # COVID-19 studies carry a bright square
    Image.fromarray(img).save(root / f"images/{i}.png")
    rows.append(f"images/{i}.png,p{i},{i % 2},{1 - i % 2}")
  (root / "labels.csv").write_text("\n".join(rows) + "\n")
  return root


def test_label_names_of_a_folder_spec():
  assert FolderSpec().label_names() == CHEXPERT_LABELS
  assert FolderSpec(labels={"Edema": "e"}).label_names() == CHEXPERT_LABELS  # comparable with CheXpert
  assert FolderSpec(labels={"Edema": "e"}, label_set="own").label_names() == ("Edema",)
  assert FolderSpec(labels={"COVID-19": "c", "No Finding": "n"}).label_names() == ("COVID-19", "No Finding")
  with pytest.raises(ConfigError, match="not CheXpert labels"):
    FolderSpec(labels={"COVID-19": "c"}, label_set="chexpert").label_names()
  with pytest.raises(ConfigError, match="clash"):
    FolderSpec(labels={"split": "c"}).label_names()


def test_matching_label_names():
  cols = match_label_names(["COVID-19", "No Finding", "Edema"], ["no_finding", "Pneumonia", "covid-19"])
  assert cols == ([0, 1], [2, 0], ["Edema"], ["Pneumonia"])


def test_prepared_folder_carries_its_own_labels(tmp_path, capsys):
  root = covid_folder(tmp_path / "f", n=10)
  data_dir = str(tmp_path / "d")
  cli.main(["prepare", "cxr_folder", "--data_dir", data_dir, "--manual_dir", str(root), "--config",
            "name=covid", "labels=COVID-19:covid,No Finding:normal", "image_size=16"])
  table = folder.load_table(root, FolderSpec(labels={"COVID-19": "covid", "No Finding": "normal"}))
  assert list(table.columns[4:6]) == ["COVID-19", "No Finding"]
  b = registry.open_prepared(CxrFolder, data_dir, ["name=covid"])
  src = b.as_data_source("train")
  assert label_names(src) == ("COVID-19", "No Finding") and src[0]["labels"].shape == (2,)
  batch = next(StudyPipeline(src, PipelineConfig(global_batch_size=2, image_size=8, max_views=1,
                                                 views=("PA", "AP"), read_threads=0)))
  assert batch["labels"].shape == (2, 2) and batch["view_mask"].all()  # UNKNOWN admitted
  capsys.readouterr()
  cli.main(["stats", "cxr_folder", "--data_dir", data_dir, "--json", str(tmp_path / "s.json")])
  stats = json.loads((tmp_path / "s.json").read_text())
  assert list(stats["splits"]["train"]["prevalence"]) == ["COVID-19", "No Finding"]
  cli.main(["sheet", "cxr_folder", "--data_dir", data_dir, "--by_label", "--out", str(tmp_path / "s.png")])
  assert "wrote" in capsys.readouterr().out


def test_classifier_trains_on_own_labels_and_evaluates_another_set_by_name(tmp_path):
  data_dir = str(tmp_path / "d")
  cli.main(["prepare", "cxr_folder", "--data_dir", data_dir, "--manual_dir",
            str(covid_folder(tmp_path / "f")), "--config", "name=covid",
            "labels=COVID-19:covid,No Finding:normal", "image_size=16", "test_fraction=0.3"])
  cli.main(["prepare", "cxr_folder", "--data_dir", data_dir, "--manual_dir",
            str(covid_folder(tmp_path / "g", n=8, columns=("nf", "pna"))), "--config", "name=other",
            "labels=No Finding:nf,Pneumonia:pna", "image_size=16", "label_set=own"])
  tiny = os.path.join(ROOT, "configs/classifier.py:tiny")
  run = str(tmp_path / "run")
  common = ("--config", tiny, "--workdir", run, "--config.data.builder=cxr_folder",
            f"--config.data.data_dir={data_dir}", "--config.data.builder_config=('name=covid',)",
            "--config.eval.batch_size=8")
  proc = ok(launch(*common))
  assert "2 labels (COVID-19, No Finding)" in proc.stdout and "admits UNKNOWN" in proc.stdout
  assert "# DenseNet classifier on cxr_folder/covid (tiny), test split" in proc.stdout
  with open(os.path.join(run, "results.json")) as f:
    r = json.load(f)
  assert [row["label"] for row in r["per_label"]] == ["COVID-19", "No Finding"]
  assert r["dataset"] == "cxr_folder/covid" and r["counts"]["test_scored"] > 0
  proc = ok(launch(*common, "--config.eval.builder=cxr_folder",
                   "--config.eval.builder_config=('name=other',)", "--config.eval.split=train"))
  assert "training steps" not in proc.stdout
  assert "only the model has ['COVID-19']; only the data has ['Pneumonia']" in proc.stdout
  assert "# DenseNet classifier on cxr_folder/other (tiny), train split" in proc.stdout
  assert "| No Finding |" in proc.stdout and "| COVID-19 |" not in proc.stdout
