"""Tests for cxrjax.data.paired_embeddings: round trips through every on-disk form (its readers
and writers), the config dispatch of cxrjax.data.paired_sources, and one DataError per way the
data can be wrong."""

import numpy as np
import pandas as pd
import pytest

from cxrjax.core.errors import ConfigError
from cxrjax.data import synthetic_pe
from cxrjax.data.errors import DataError
from cxrjax.data.normalize import fit_normalizer
from cxrjax.data.paired_embeddings import (
    PairedSplit, cxr_accession, load_npz, load_seed_layout, load_table, make_split, to_npz,
    to_seed_layout, to_table, validate)
from cxrjax.data.paired_sources import load

SMALL = dict(seed=3, n_labelled=12, n_unlabelled=6, n_valid=5, n_test=5, cxr_dim=6, ctpa_dim=4)


@pytest.fixture(scope="module")
def small():
  return synthetic_pe.generate(**SMALL)


def assert_same(got, want):
  assert set(got) == set(want)
  for split in want:
    for field in ("cxr", "ctpa", "label", "ids"):
      g, w = getattr(got[split], field), getattr(want[split], field)
      assert g.dtype == w.dtype, (split, field)
      np.testing.assert_array_equal(g, w, err_msg=f"{split}.{field}")


def test_seed_layout_round_trip(small, tmp_path):
  root, ctpa_dir, cxr_dir = to_seed_layout(small, tmp_path)
  assert sorted(p.name for p in root.glob("y_*.csv")) == [
      "y_test.csv", "y_train.csv", "y_unlabelled.csv", "y_valid.csv"]
  assert small["train"].ids[0].startswith("0")  # the leading zero must survive the CSV
  assert_same(load_seed_layout(root, ctpa_dir, cxr_dir), small)
  # relative dirs are taken relative to root
  assert_same(load_seed_layout(root, "ctpa", "cxr"), small)


def test_seed_layout_accepts_row_vectors_and_skips_unlabelled_when_absent(small, tmp_path):
  data = {k: v for k, v in small.items() if k != "unlabelled"}
  root, ctpa_dir, cxr_dir = to_seed_layout(data, tmp_path)
  first = small["train"].ids[0]
  np.save(ctpa_dir / f"{first}.npy", small["train"].ctpa[:1])  # (1, D), as torch features[None]
  assert_same(load_seed_layout(root, ctpa_dir, cxr_dir), data)


def test_npz_round_trip(small, tmp_path):
  path = to_npz(small, tmp_path / "pairs")
  assert path.name == "pairs.npz"
  assert_same(load_npz(path), small)


@pytest.mark.parametrize("name,flat", [("t.parquet", False), ("t.parquet", True), ("t.csv", True)])
def test_table_round_trip(small, tmp_path, name, flat):
  path = to_table(small, tmp_path / name, flat=flat)
  assert_same(load_table(path), small)


def test_load_dispatches_on_source(small, tmp_path):
  root, ctpa_dir, cxr_dir = to_seed_layout(small, tmp_path / "seed")
  npz = to_npz(small, tmp_path / "d.npz")
  table = to_table(small, tmp_path / "t.parquet")
  assert_same(load({"source": "seed_layout", "root": str(root), "ctpa_dir": str(ctpa_dir),
                    "cxr_dir": str(cxr_dir), "normalize": "minmax"}), small)  # unrelated key ignored
  assert_same(load({"source": "npz", "path": str(npz)}), small)
  assert_same(load({"source": "table", "table": {"path": str(table)}, "npz": {"path": "x"}}), small)
  assert_same(load({"source": "synthetic", **SMALL}), small)
  assert_same(load({"source": "synthetic", "synthetic": SMALL}), small)
  # a config holding every source's settings at once, as configs/prior.py does
  full = dict(source="synthetic", synthetic=SMALL, path="", normalize="minmax",
              seed_layout=dict(root="", ctpa_dir="", cxr_dir=""))
  assert_same(load(full), small)
  assert_same(load({**full, "source": "npz", "path": str(npz)}), small)
  assert_same(load({**full, "source": "seed_layout", "seed_layout": dict(
      root=str(root), ctpa_dir="ctpa", cxr_dir="cxr")}), small)


@pytest.mark.parametrize("cfg,match", [
    ({"source": "hdf5"}, "choose one of"),
    ({"source": "npz"}, r"needs non-empty key\(s\) \['path'\]"),
    ({"source": "seed_layout", "seed_layout": {"root": "", "ctpa_dir": "", "cxr_dir": ""}},
     r"needs non-empty key\(s\) \['root', 'ctpa_dir', 'cxr_dir'\]"),
    ({"source": "synthetic", "synthetic": {"n_lablled": 3}}, "unknown key"),
])
def test_load_config_errors(cfg, match):
  with pytest.raises(ConfigError, match=match):
    load(cfg)


def test_paired_split_labelled_and_len(small):
  sp = small["unlabelled"]
  assert len(sp) == 6 and len(sp.labelled()) == 0
  assert len(small["train"].labelled()) == len(small["train"])
  mixed = make_split(np.zeros((3, 2)), np.zeros((3, 2)), [1, np.nan, 0], ["a", "b", "c"])
  assert isinstance(mixed, PairedSplit)
  assert list(mixed.labelled().ids) == ["a", "c"]


# --------------------------------------------------------------------------- #
# error cases: each mutates a valid seed layout (or data) and names the culprit
# --------------------------------------------------------------------------- #
def _csv(root, split):
  return pd.read_csv(root / f"y_{split}.csv", dtype=str, keep_default_na=False)


def _write(df, root, split):
  df.to_csv(root / f"y_{split}.csv", index=False)


def missing_npy(root, ctpa, cxr, d):
  victim = ctpa / f"{d['train'].ids[3]}.npy"
  victim.unlink()
  return [str(victim), "y_train.csv line 5"]


def wrong_dim_npy(root, ctpa, cxr, d):
  victim = ctpa / f"{d['valid'].ids[1]}.npy"
  np.save(victim, np.zeros(5, np.float32))
  return [str(victim), "shape (5,)", "expected (4,)"]


def nan_embedding(root, ctpa, cxr, d):
  x = d["test"].cxr[2].copy()
  x[1] = np.nan
  name = f"{cxr_accession(d['test'].ids[2])}.npy"
  np.save(cxr / name, x)
  return [str(cxr / name), "y_test.csv line 4", "NaN"]


def empty_split_csv(root, ctpa, cxr, d):
  _write(_csv(root, "valid").iloc[:0], root, "valid")
  return ["y_valid.csv", "empty"]


def duplicate_accession(root, ctpa, cxr, d):
  df = _csv(root, "train")
  _write(pd.concat([df, df.iloc[[4]]]), root, "train")
  return ["y_train.csv line 14", "duplicate", d["train"].ids[4], "line 6"]


def missing_column(root, ctpa, cxr, d):
  _write(_csv(root, "test").drop(columns="PE"), root, "test")
  return ["y_test.csv", "missing column", "'PE'", "CT_Accession_number"]


def label_two(root, ctpa, cxr, d):
  df = _csv(root, "train")
  df.loc[2, "PE"] = "2"
  _write(df, root, "train")
  return ["y_train.csv line 4", "'2'", d["train"].ids[2]]


def leakage(root, ctpa, cxr, d):
  test = _csv(root, "test")
  _write(pd.concat([test, _csv(root, "train").iloc[[7]]]), root, "test")
  return ["leakage", "'train'", "'test'", d["train"].ids[7]]


def missing_split_file(root, ctpa, cxr, d):
  (root / "y_test.csv").unlink()
  return ["y_test.csv", "not found"]


def missing_label_in_labelled_split(root, ctpa, cxr, d):
  df = _csv(root, "valid")
  df.loc[0, "PE"] = ""
  _write(df, root, "valid")
  return ["y_valid.csv line 2", "y_unlabelled.csv"]


@pytest.mark.parametrize("mutate", [
    missing_npy, wrong_dim_npy, nan_embedding, empty_split_csv, duplicate_accession,
    missing_column, label_two, leakage, missing_split_file, missing_label_in_labelled_split],
    ids=lambda f: f.__name__)
def test_seed_layout_errors_name_the_culprit(small, tmp_path, mutate):
  root, ctpa, cxr = to_seed_layout(small, tmp_path)
  expected = mutate(root, ctpa, cxr, small)
  with pytest.raises(DataError) as info:
    load_seed_layout(root, ctpa, cxr)
  for part in expected:
    assert part in str(info.value), (part, str(info.value))


def test_constant_train_data_for_minmax_is_a_data_error():
  with pytest.raises(DataError, match="constant"):
    fit_normalizer("minmax", np.full((4, 3), 2.5))


def _copy(d, **splits):
  out = dict(d)
  out.update(splits)
  return out


@pytest.mark.parametrize("case,match", [
    ("dims", r"split 'valid': cxr dim 5 differs from split 'train' \(6\)"),
    ("nan", r"split 'valid': ctpa embedding of id '20000001' \(row 1\) contains NaN"),
    ("dup", r"duplicate id\(s\) 'x'"),
    ("nan_train", "NaN only in 'unlabelled'"),
    ("missing", r"missing required split\(s\) \['test'\]"),
    ("unknown", r"unknown split name\(s\) \['val'\]"),
    ("lengths", "fields differ in length"),
    ("leak_unlabelled", "appear in both 'unlabelled' and 'test'"),
])
def test_validate_in_memory(small, case, match):
  tr, va = small["train"], small["valid"]
  data = {
      "dims": lambda: _copy(small, valid=make_split(va.cxr[:, :5], va.ctpa, va.label, va.ids)),
      "nan": lambda: _copy(small, valid=make_split(
          va.cxr, np.where(np.arange(len(va))[:, None] == 1, np.inf, va.ctpa), va.label, va.ids)),
      "dup": lambda: _copy(small, train=make_split(tr.cxr[:2], tr.ctpa[:2], tr.label[:2], ["x", "x"])),
      "nan_train": lambda: _copy(small, train=make_split(tr.cxr, tr.ctpa, np.full(len(tr), np.nan), tr.ids)),
      "missing": lambda: {k: v for k, v in small.items() if k != "test"},
      "unknown": lambda: _copy(small, val=va),
      "lengths": lambda: _copy(small, train=make_split(tr.cxr, tr.ctpa[:-1], tr.label, tr.ids)),
      "leak_unlabelled": lambda: _copy(small, unlabelled=make_split(
          va.cxr, va.ctpa, np.full(len(va), np.nan), small["test"].ids)),
  }[case]()
  with pytest.raises(DataError, match=match):
    validate(data)


def test_npz_and_table_errors(small, tmp_path):
  arrays = {f"{s}_{f}": getattr(sp, f) for s, sp in small.items() for f in ("cxr", "ctpa", "label")}
  np.savez(tmp_path / "bad.npz", val_cxr=np.zeros((2, 2)), **arrays)
  with pytest.raises(DataError, match=r"bad\.npz: unexpected array\(s\) \['val_cxr'\]"):
    load_npz(tmp_path / "bad.npz")
  np.savez(tmp_path / "nolabel.npz", **{k: v for k, v in arrays.items() if k != "test_label"})
  with pytest.raises(DataError, match=r"missing array\(s\) \['test_label'\]"):
    load_npz(tmp_path / "nolabel.npz")
  df = pd.read_parquet(to_table(small, tmp_path / "t.parquet"))
  df.drop(columns="label").to_parquet(tmp_path / "nolab.parquet")
  with pytest.raises(DataError, match=r"nolab\.parquet: missing column\(s\) \['label'\]"):
    load_table(tmp_path / "nolab.parquet")
  df.loc[3, "cxr"] = np.zeros(2, np.float32)
  df.to_parquet(tmp_path / "ragged.parquet")
  with pytest.raises(DataError, match=rf"row 3 \(id '{small['train'].ids[3]}'\): cxr has length 2"):
    load_table(tmp_path / "ragged.parquet")
  flat = pd.read_csv(to_table(small, tmp_path / "f.csv", flat=True), dtype=str)
  flat.drop(columns="ctpa_2").to_csv(tmp_path / "gap.csv", index=False)
  with pytest.raises(DataError, match=r"gap\.csv: flattened columns ctpa_0..ctpa_3 are missing \[2\]"):
    load_table(tmp_path / "gap.csv")
