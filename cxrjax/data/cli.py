"""`python -m cxrjax.data prepare|stats|sheet <builder> --data_dir DIR ...`: prepare a study dataset,
summarise one, or draw a contact sheet of one.

  prepare cxr_phantoms --data_dir D --config size=64 num_studies=30 views=frontal_lateral
  prepare mimic_cxr_jpg --data_dir D --manual_dir ~/mimic-cxr-jpg --config image_size=256 views=PA,AP
  stats cxr_phantoms --data_dir D --config size=64 num_studies=30 [--json stats.json]
  sheet cxr_phantoms --data_dir D --out sheet.png [--split train --n 12 --seed 0 --by_label]

Builders: cxr_phantoms, mimic_cxr_jpg, cxr_chexpert, cxr_folder (data/builders). ``--config
key=value`` sets a field of the builder's config dataclass, converted to the field's type; fields
of a nested dataclass (the phantom world's PhantomConfig, the folder's FolderSpec) are given by
their own name (``ap_rate=0.4``, ``study_id=study``) or dotted (``phantom.ap_rate=0.4``). Overrides
apply to the builder's default config, or to the built-in one named by ``name=``. A config with
overrides gets a name derived from them (a folder in data_dir) unless ``name=`` gives one, so
`stats` and `sheet` find the dataset from the same ``--config``; without ``--config`` they take
the default config, or the only one prepared in data_dir. The builders by name and the parsing of
``--config`` live in registry.py, which the systems use too; this module is the commands.

Errors the user can fix end with one line `error: ...` and exit status 2.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import shutil
import sys
import time
from pathlib import Path

from cxrjax.core.errors import ConfigError, CxrjaxError
from cxrjax.data.errors import DataError
from cxrjax.data.registry import builder_classes, make_builder, make_config, open_prepared


def split_sizes(builder) -> str:
  return ", ".join(f"{s} {info.num_examples}" for s, info in builder.info.splits.items())


# --------------------------------------------------------------------------- #
# stats
# --------------------------------------------------------------------------- #
def _counts(values) -> dict[str, int]:
  """Value -> count, most common first; '' (unknown) counted as 'unknown'."""
  return dict(collections.Counter(v or "unknown" for v in values).most_common())


def split_stats(meta: dict) -> dict:
  """The summary of one split from ``sheet.read_meta``'s arrays (plain JSON types)."""
  import numpy as np
  from cxrjax.data.labels import VIEWS

  n = len(meta["study_id"])
  prevalence = {name: {"positive": int((col == 1).sum()), "negative": int((col == 0).sum()),
                       "uncertain": int((col == -1).sum()), "unmentioned": int(np.isnan(col).sum())}
                for name, col in zip(meta["label_names"], meta["labels"].T)}
  views = collections.Counter(v for vs in meta["views"] for v in vs)
  age = meta["age_years"][~np.isnan(meta["age_years"])]
  q = np.percentile(age, [25, 50, 75]) if len(age) else [None] * 3
  sex = meta["sex_male"]
  male, female = int((sex == 1).sum()), int((sex == 0).sum())
  has_f, has_i = meta["findings"] != "", meta["impression"] != ""
  return {
      "studies": n, "images": int(sum(len(vs) for vs in meta["views"])),
      "patients": len(set(meta["patient_id"])), "prevalence": prevalence,
      "views": {v: views[v] for v in VIEWS},
      "view_combinations": _counts("+".join(vs) for vs in meta["views"]),
      "age": {"known": int(len(age)), "mean": float(age.mean()) if len(age) else None,
              "sd": float(age.std()) if len(age) else None,
              "q25": q[0] and float(q[0]), "median": q[1] and float(q[1]), "q75": q[2] and float(q[2])},
      "sex": {"male": male, "female": female, "unknown": n - male - female,
              "male_fraction": male / (male + female) if male + female else None},
      "race": _counts(meta["race"]), "site": _counts(meta["site"]),
      "reports": {"findings": float(has_f.mean()), "impression": float(has_i.mean()),
                  "either": float((has_f | has_i).mean())},
  }


def format_stats(result: dict) -> str:
  """The stats as text: a block per split."""
  lines = [f"{result['builder']} config {result['config']!r} ({result['path']})"]
  for split, s in result["splits"].items():
    n = s["studies"]
    lines += ["", f"== {split}: {n} studies, {s['images']} images, {s['patients']} patients ==",
              f"{'label':<28}{'pos':>6}{'neg':>6}{'unc':>6}{'unment':>8}{'pos %':>8}"]
    for name, c in s["prevalence"].items():
      lines.append(f"{name:<28}{c['positive']:>6}{c['negative']:>6}{c['uncertain']:>6}"
                   f"{c['unmentioned']:>8}{100 * c['positive'] / n:>7.1f}%")
    join = lambda d: ", ".join(f"{k} {v}" for k, v in d.items())  # noqa: E731
    lines.append(f"views: {join(s['views'])}; per study: {join(s['view_combinations'])}")
    a = s["age"]
    lines.append(f"age: mean {a['mean']:.1f} ± {a['sd']:.1f}, quartiles {a['q25']:.1f} / "
                 f"{a['median']:.1f} / {a['q75']:.1f} (known for {a['known']})" if a["known"] else "age: unknown")
    x = s["sex"]
    ratio = f" (male {100 * x['male_fraction']:.1f}%)" if x["male_fraction"] is not None else ""
    lines += [f"sex: {x['male']} male, {x['female']} female, {x['unknown']} unknown{ratio}",
              f"race: {join(s['race'])}", f"site: {join(s['site'])}",
              "reports: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in s["reports"].items())]
  return "\n".join(lines)


# --------------------------------------------------------------------------- #
# commands
# --------------------------------------------------------------------------- #
@contextlib.contextmanager
def _removed_on_failure(data_dir: Path, builder_name: str, config_name: str):
  """Removes what a failed prepare created and left empty of data: the data_dir itself when it
  did not exist, else TFDS's bookkeeping folders (the builder's and the config's folders,
  downloads/) that were not there before. TFDS removes its own incomplete.* folder."""
  candidates = [data_dir, data_dir / builder_name, data_dir / builder_name / config_name,
                data_dir / "downloads"]
  existed = {p: p.exists() for p in candidates}
  try:
    yield
  except BaseException:
    for p in candidates:  # outermost first: removing it removes the rest
      if not existed[p] and p.exists():
        shutil.rmtree(p, ignore_errors=True)
        if p == data_dir:
          break
    leftover_config = data_dir / builder_name / ".config"
    if not existed[data_dir / builder_name] and leftover_config.exists():
      shutil.rmtree(data_dir / builder_name, ignore_errors=True)
    raise


def prepare(args) -> None:
  """Writes the dataset as array_record; an already prepared one is reported and kept."""
  import tensorflow_datasets as tfds
  from cxrjax.data.builders.study_builder import StudyBuilder

  cls = builder_classes()[args.builder]
  config = make_config(cls, args.config)
  builder = make_builder(cls, config, args.data_dir)
  path = Path(builder.data_path)
  if builder.is_prepared():
    info = json.loads((path / "dataset_info.json").read_text())
    stored = info.get("configDescription")
    if stored and config.description and stored != config.description:
      raise ConfigError(f"{path} holds config {config.name!r} prepared as '{stored}', not "
                        f"'{config.description}'; give this one another --config name=NAME")
    print(f"already prepared: {path} ({split_sizes(builder)} studies)")
    return
  if path.exists():  # a version folder without dataset_info.json: not TFDS's, or half-deleted
    raise DataError(f"{path} exists but holds no complete dataset; delete it, then prepare again")
  # TFDS writes into incomplete.*_<version> and renames it when done; an interrupted prepare leaves
  # that folder behind, never reused: say so, as it may be large.
  for left in sorted(path.parent.glob(f"incomplete.*_{path.name}")):
    print(f"note: {left} is left from an interrupted prepare and will not be reused; delete it to "
          f"free space", file=sys.stderr)
  manual = args.manual_dir
  if issubclass(cls, StudyBuilder):
    if manual is None:
      raise ConfigError(f"{cls.name} reads your own download: pass --manual_dir DIR "
                        f"({' '.join(cls.MANUAL_DOWNLOAD_INSTRUCTIONS.split()[:12])} ...)")
    if not Path(manual).is_dir():
      raise DataError(f"--manual_dir {manual} is not a directory")
  elif manual is not None:
    raise ConfigError(f"{cls.name} renders its studies and reads no download; drop --manual_dir")
  with _removed_on_failure(Path(args.data_dir), cls.name, config.name):
    if issubclass(cls, StudyBuilder):  # a bad CSV or spec stops here, before anything is announced
      builder.load_checked_table(manual)
    print(f"preparing {cls.name} config {config.name!r} into {path}", flush=True)
    args.progress_shown = True  # TFDS's progress bars follow
    start = time.time()
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
  print(f"prepared {path}: {split_sizes(builder)} studies in {time.time() - start:.1f} s")


def stats(args) -> None:
  from cxrjax.data import sheet as sh
  builder = open_prepared(builder_classes()[args.builder], args.data_dir, args.config)
  result = {"builder": args.builder, "config": builder.builder_config.name,
            "path": str(builder.data_path), "splits": {}}
  for split in builder.info.splits:
    result["splits"][split] = split_stats(sh.read_meta(builder, split))
  print(format_stats(result))
  if args.json:
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json}")


def sheet(args) -> None:
  from cxrjax.data import sheet as sh
  builder = open_prepared(builder_classes()[args.builder], args.data_dir, args.config)
  splits = list(builder.info.splits)
  if args.split not in splits:
    raise DataError(f"split {args.split!r} is not in {builder.data_path}; it has {splits}")
  if args.n < 1:
    raise ConfigError(f"--n must be >= 1, got {args.n}")
  meta = sh.read_meta(builder, args.split)
  rows = sh.pick_by_label(meta) if args.by_label else sh.pick_random(meta, args.n, args.seed)
  source = builder.as_data_source(args.split)
  records = {i: source[i] for _, i in rows if i is not None}
  title = f"{args.builder}/{builder.builder_config.name} {args.split}"
  size = sh.draw(rows, records, meta, args.out, title=title, by_label=args.by_label, dpi=args.dpi)
  print(f"wrote {args.out} ({size[0]} x {size[1]} px, {len(records)} studies)")


def _parser(builders: list[str]) -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m cxrjax.data", description=__doc__.split("\n\n")[0])
  sub = p.add_subparsers(dest="command", required=True)

  def common(name: str, help_: str) -> argparse.ArgumentParser:
    s = sub.add_parser(name, help=help_)
    s.add_argument("builder", choices=builders)
    s.add_argument("--data_dir", required=True, help="TFDS data directory")
    s.add_argument("--config", nargs="+", action="extend", metavar="KEY=VALUE",
                   help="builder config fields, e.g. size=128 num_studies=2000 (name=NAME names it)")
    return s

  s = common("prepare", "prepare a dataset (array_record)")
  s.add_argument("--manual_dir", help="the download, for mimic_cxr_jpg / cxr_chexpert / cxr_folder")
  s = common("stats", "studies, images, patients, label prevalence, views, demographics per split")
  s.add_argument("--json", help="also write the numbers to this JSON file")
  s = common("sheet", "contact sheet PNG of studies: views, labels, demographics, report")
  s.add_argument("--out", required=True, help="PNG to write")
  s.add_argument("--split", default="train")
  s.add_argument("--n", type=int, default=12, help="studies drawn at random (without --by_label)")
  s.add_argument("--seed", type=int, default=0)
  s.add_argument("--by_label", action="store_true",
                 help="one row per label: its most severe (phantoms) or first positive study")
  s.add_argument("--dpi", type=int, default=100)
  return p


def main(argv: list[str] | None = None) -> None:
  from absl import logging
  # TFDS logs a warning per custom config and per PIL decode fallback; neither is actionable here.
  logging.set_verbosity(logging.ERROR)
  args = _parser(list(builder_classes())).parse_args(argv)
  try:
    {"prepare": prepare, "stats": stats, "sheet": sheet}[args.command](args)
  except CxrjaxError as e:
    # TFDS's progress bars end without a newline (or erase themselves, leaving the cursor
    # mid-screen): after one, start the error on a line of its own.
    sys.stdout.flush()
    lead = "\n" if getattr(args, "progress_shown", False) else ""
    print(f"{lead}error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
    sys.exit(2)
