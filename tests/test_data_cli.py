"""`python -m cxrjax.data prepare|stats|sheet`, run as a user would (subprocesses), on a 30-study
64 px phantom dataset; plus the --config parsing of the real-data builders (data/registry.py),
in process."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cxrjax.core.errors import ConfigError
from cxrjax.data import cli, registry
from cxrjax.data.builders import Chexpert, CxrFolder, CxrPhantoms, MimicCxrJpg
from cxrjax.data.builders.cxr_phantoms import SPLIT_FRACTIONS, SPLITS
from cxrjax.data.labels import CHEXPERT_LABELS
from cxrjax.data.phantoms.attributes import patient_of, sample_study, split_of_patient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = ["size=64", "num_studies=30", "views=frontal_lateral"]


def run(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "cxrjax.data", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)


def ok(proc):
  assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
  return proc


def one_line_error(proc, *needles):
  """Exit 2 with a single `error: ...` line on stderr naming every needle, and no traceback."""
  assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
  lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
  errors = [ln for ln in lines if ln.startswith("error: ")]
  assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  for needle in needles:
    assert needle in errors[0], errors[0]
  return errors[0]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("phantoms"))
  proc = ok(run("prepare", "cxr_phantoms", "--data_dir", data_dir, "--config", *CONFIG))
  last = proc.stdout.strip().splitlines()[-1]
  assert last.startswith("prepared ") and "studies in" in last and "train" in last, last
  return data_dir


def expected_counts():
  """Per split: studies and label value counts straight from the phantom world's sampler."""
  pcfg = registry.make_config(CxrPhantoms, CONFIG).phantom_config()
  out = {}
  for i in range(30):
    split = SPLITS[split_of_patient(0, int(patient_of(i, pcfg)), SPLIT_FRACTIONS)]
    labels = sample_study(0, i, pcfg).labels
    entry = out.setdefault(split, {"studies": 0, "positive": np.zeros(14, int), "unmentioned": np.zeros(14, int)})
    entry["studies"] += 1
    entry["positive"] += labels == 1
    entry["unmentioned"] += np.isnan(labels)
  return out


def test_stats_match_the_sampler(prepared, tmp_path):
  out = tmp_path / "stats.json"
  proc = ok(run("stats", "cxr_phantoms", "--data_dir", prepared, "--config", *CONFIG, "--json", str(out)))
  assert "== train: " in proc.stdout and "Pleural Effusion" in proc.stdout
  stats = json.loads(out.read_text())
  splits = stats["splits"]
  assert sum(s["studies"] for s in splits.values()) == 30
  expected = expected_counts()
  assert set(splits) == set(expected)
  for name, s in splits.items():
    assert s["studies"] == expected[name]["studies"]
    assert s["images"] == sum(s["views"].values()) == sum(
        n * (k.count("+") + 1) for k, n in s["view_combinations"].items())
    assert 1 <= s["patients"] <= s["studies"]
    for k, label in enumerate(CHEXPERT_LABELS):
      c = s["prevalence"][label]
      assert c["positive"] == expected[name]["positive"][k], (name, label)
      assert c["unmentioned"] == expected[name]["unmentioned"][k], (name, label)
      assert sum(c.values()) == s["studies"]
    assert s["sex"]["male"] + s["sex"]["female"] + s["sex"]["unknown"] == s["studies"]
    assert sum(s["race"].values()) == sum(s["site"].values()) == s["studies"]
    assert s["age"]["known"] == s["studies"] and 18 <= s["age"]["q25"] <= s["age"]["q75"] <= 95
    assert s["reports"]["either"] == 1.0


def _png(path):
  from PIL import Image
  image = np.asarray(Image.open(path).convert("L"), np.float32)
  return image.shape, image


def test_sheets(prepared, tmp_path):
  out = tmp_path / "sheet.png"
  ok(run("sheet", "cxr_phantoms", "--data_dir", prepared, "--config", *CONFIG, "--out", str(out), "--n", "8"))
  (h, w), image = _png(out)
  # 8 studies: 4 per row, each 2 views of 2 in (+0.2 in gap) over 1.8 in of text; 0.4 in title; 100 dpi.
  assert abs(w - 4 * 420) <= 2 and abs(h - (40 + 2 * 380)) <= 2, (w, h)
  assert image.std() > 20 and (image < 128).mean() > 0.1  # images drawn, not a blank page
  by_label = tmp_path / "by_label.png"
  proc = ok(run("sheet", "cxr_phantoms", "--data_dir", prepared, "--config", *CONFIG, "--out",
                str(by_label), "--by_label", "--split", "train"))
  (h, w), image = _png(by_label)
  assert abs(w - 1000) <= 2 and abs(h - (40 + 14 * 210)) <= 2, (w, h)  # 13 labels + No Finding
  assert image.std() > 20 and "wrote" in proc.stdout


def test_errors_and_rerun(prepared, tmp_path):
  one_line_error(run("prepare", "cxr_phantoms", "--data_dir", str(tmp_path), "--config", "bogus_key=1"),
                 "bogus_key", "valid keys", "num_studies")
  one_line_error(run("prepare", "cxr_phantoms", "--data_dir", str(tmp_path), "--config", "size=big"),
                 "size", "integer")
  one_line_error(run("prepare", "cxr_phantoms", "--data_dir", str(tmp_path), "--config", "size=32"), "size")
  one_line_error(run("stats", "cxr_phantoms", "--data_dir", str(tmp_path / "empty"), "--config", *CONFIG),
                 "not prepared", "python -m cxrjax.data prepare cxr_phantoms", "size=64")
  one_line_error(run("sheet", "cxr_phantoms", "--data_dir", prepared, "--config", *CONFIG, "--out",
                     str(tmp_path / "x.png"), "--split", "nope"), "nope", "train")
  proc = ok(run("prepare", "cxr_phantoms", "--data_dir", prepared, "--config", *CONFIG))
  assert "already prepared" in proc.stdout
  # The same folder name with other settings is refused rather than read as the old data.
  name = registry.make_config(CxrPhantoms, CONFIG).name
  one_line_error(run("prepare", "cxr_phantoms", "--data_dir", prepared, "--config", f"name={name}"),
                 "another --config name")


def test_config_parsing_of_real_builders(capsys):
  folder = registry.make_config(CxrFolder, ["study_id=study", "labels=Edema:ed,Cardiomegaly:cm",
                                            "views=PA,AP", "skip_bad=yes", "image_size=128", "race=none"])
  assert folder.spec.study_id == "study" and dict(folder.spec.labels) == {"Edema": "ed", "Cardiomegaly": "cm"}
  assert folder.views == ("PA", "AP") and folder.skip_bad is True and folder.image_size == 128
  assert folder.spec.race is None and folder.name != "default"
  assert registry.make_config(CxrFolder, ["spec.csv=meta.csv"]).spec.csv == "meta.csv"
  mimic = registry.make_config(MimicCxrJpg, ["labeler=negbio", "reports=false", "max_views=1"])
  assert (mimic.labeler, mimic.reports, mimic.max_views) == ("negbio", False, 1)
  assert registry.make_config(Chexpert, []).name == "default"
  assert registry.make_config(CxrPhantoms, ["name=frontal_lateral_256"]).size == 256
  phantom = registry.make_config(CxrPhantoms, ["ap_rate=0.5", "shortcut_label=Pleural Effusion",
                                               "shortcut_strength=0.8"])
  assert phantom.phantom.ap_rate == 0.5 and phantom.phantom_config().shortcut_label == "Pleural Effusion"
  for bad, needle in ((["views=PA,XX"], "XX"), (["max_views=two"], "max_views"),
                      (["labels=Edema"], "name:column"), (["image_size"], "key=value")):
    with pytest.raises(ConfigError, match=needle):
      registry.make_config(Chexpert if "labels" not in bad[0] else CxrFolder, bad)
  with pytest.raises(SystemExit) as e:  # a real-data builder needs its download
    cli.main(["prepare", "cxr_chexpert", "--data_dir", "/nonexistent/cxr"])
  assert e.value.code == 2 and "--manual_dir" in capsys.readouterr().err
  assert set(registry.builder_classes()) == {"cxr_phantoms", "mimic_cxr_jpg", "cxr_chexpert", "cxr_folder"}
  keys = registry.config_keys(type(CxrFolder.BUILDER_CONFIGS[0]))
  assert keys["csv"] == keys["spec.csv"] == (("spec", "csv"), str)
