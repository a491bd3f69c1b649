"""cxrjax.data.registry: open_study_dataset (phantoms rendered once, the unprepared real-data and
missing-split errors, a config object as FMKD passes one) and config_items, make_config's inverse."""
import contextlib
import dataclasses
import io

import pytest

from cxrjax.core.errors import ConfigError
from cxrjax.data import registry
from cxrjax.data.builders import Chexpert, CxrFolder, CxrPhantoms, CxrPhantomsConfig, MimicCxrJpg
from cxrjax.data.errors import DataError

ITEMS = ["size=64", "num_studies=12", "views=frontal"]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
  """A 12-study 64 px phantom dataset, rendered by the first open; (data_dir, sources, output)."""
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  out = io.StringIO()  # capsys is per test; this fixture is per module
  with contextlib.redirect_stdout(out):
    sources = registry.open_study_dataset("cxr_phantoms", data_dir, ITEMS, ("train",))
  return data_dir, sources, out.getvalue().splitlines()


def test_phantoms_render_on_first_use_only(rendered, capsys):
  data_dir, first, lines = rendered
  name = registry.make_config(CxrPhantoms, ITEMS).name
  assert [ln for ln in lines if ln.startswith("[data] rendering cxr_phantoms")] == [
      f"[data] rendering cxr_phantoms {name} (12 studies, 64 px) into {data_dir}"]
  assert list(first) == ["train"] and 1 <= len(first["train"]) <= 12
  again = registry.open_study_dataset("cxr_phantoms", data_dir, ITEMS, ("train",))
  assert "rendering" not in capsys.readouterr().out
  assert len(again["train"]) == len(first["train"])
  assert again["train"][0]["study_id"] == first["train"][0]["study_id"]


def test_a_config_object_opens_the_same_dataset(rendered, capsys):
  # FMKD names its phantom config itself; the object is used as is, so the dataset is found.
  data_dir, first, _ = rendered
  config = registry.make_config(CxrPhantoms, ITEMS)
  got = registry.open_study_dataset("cxr_phantoms", data_dir, config, ("train",), render_if_missing=False)
  assert "rendering" not in capsys.readouterr().out and len(got["train"]) == len(first["train"])


def test_tfds_warnings_about_what_the_registry_does_on_purpose_are_dropped():
  import logging

  # The filter on absl's logger is asked directly: whether a warning reaches a handler also
  # depends on the levels other tests (and absl's flags) leave behind.
  logger = logging.getLogger("absl")

  def passes(msg, *args):
    return bool(logger.filter(logging.LogRecord("absl", logging.WARNING, __file__, 1, msg, args, None)))

  # TFDS's own format strings (tensorflow_datasets 4.9: dataset_builder, file_utils, image_feature)
  assert not passes("Using custom data configuration: %s", "num_studies-12_size-64_views-frontal")
  assert not passes("Variant folder %s has no %s", "/data/cxr_phantoms/x/1.0.0", "dataset_info.json")
  assert not passes("OpenCV is not installed. We recommend using OpenCV because it is faster")
  assert passes("something else from TFDS: %s", "kept")


def test_a_missing_split_names_the_splits_there_are(rendered):
  data_dir, first, _ = rendered
  with pytest.raises(DataError, match=r"has no split\(s\) \['bogus'\]; it has \[.*'train'.*\]; set data.splits"):
    registry.open_study_dataset("cxr_phantoms", data_dir, ITEMS, ("train", "bogus"), hint="set data.splits")


def test_unprepared_real_data_names_the_prepare_command(tmp_path, capsys):
  data_dir = str(tmp_path / "tfds")
  with pytest.raises(DataError) as e:
    registry.open_study_dataset("mimic_cxr_jpg", data_dir, ["image_size=64", "views=PA,AP"], ("train",))
  message = str(e.value)
  assert "not prepared" in message
  assert f"python -m cxrjax.data prepare mimic_cxr_jpg --data_dir {data_dir} --config image_size=64 views=PA,AP" \
      in message
  assert "rendering" not in capsys.readouterr().out  # real data is never rendered


def test_unrendered_phantoms_without_rendering_name_the_exact_prepare_command(tmp_path):
  config = CxrPhantomsConfig(name="fmkd_64px_12_s3", size=64, num_studies=12, views="frontal", seed=3)
  with pytest.raises(DataError, match="run first: python -m cxrjax.data prepare cxr_phantoms") as e:
    registry.open_study_dataset("cxr_phantoms", str(tmp_path), config, ("train",), render_if_missing=False)
  items = str(e.value).split("--config ", 1)[1].split()
  assert items == ["name=fmkd_64px_12_s3", "size=64", "num_studies=12", "seed=3"]
  assert not list(tmp_path.iterdir())  # nothing was written


def test_bad_arguments():
  with pytest.raises(ConfigError, match=r"unknown dataset builder 'chexpert_v9'; choose one of \["):
    registry.open_study_dataset("chexpert_v9", "/tmp", [], ("train",))
  with pytest.raises(TypeError, match="string"):
    registry.open_study_dataset("cxr_phantoms", "/tmp", "size=64", ("train",))
  with pytest.raises(TypeError, match="CxrPhantomsConfig"):
    registry.open_study_dataset("cxr_phantoms", "/tmp", Chexpert.BUILDER_CONFIGS[0], ("train",))


@pytest.mark.parametrize("builder_cls,config", [
    # FMKD's builder_config(data): a shortcut, a seed and its own name
    (CxrPhantoms, CxrPhantomsConfig(name="fmkd_64px_300_s1_pleuraleffusion0.8", size=64, num_studies=300,
                                    views="frontal", shortcut_label="Pleural Effusion",
                                    shortcut_strength=0.8, seed=1)),
    (CxrPhantoms, CxrPhantomsConfig(name="fmkd_64px_300_s0", size=64, num_studies=300, views="frontal")),
    (CxrPhantoms, CxrPhantoms.BUILDER_CONFIGS[1]),
    (CxrFolder, registry.make_config(CxrFolder, ["study_id=study", "labels=Edema:ed,Cardiomegaly:cm",
                                                 "views=PA", "race=none", "spec.csv=m.csv"])),
    (MimicCxrJpg, registry.make_config(MimicCxrJpg, ["labeler=negbio", "reports=false", "views=PA,AP"])),
])
def test_config_items_round_trip(builder_cls, config):
  items = registry.config_items(builder_cls, config)
  assert items[0] == f"name={config.name}"
  back = registry.make_config(builder_cls, items)
  for f in dataclasses.fields(config):
    if f.name not in ("description", "render"):
      assert getattr(back, f.name) == getattr(config, f.name), f.name
