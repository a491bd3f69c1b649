"""The study-dataset builders by name, their configs from ``key=value`` items, and opening one.

* ``builder_classes`` / ``builder_class``: registered name -> TFDS builder class (cxr_phantoms,
  mimic_cxr_jpg, cxr_chexpert, cxr_folder; data/builders).
* ``make_config``: ``key=value`` items -> a builder config. A key sets a field of the builder's
  config dataclass, converted to the field's type; fields of a nested dataclass (the phantom
  world's PhantomConfig, the folder's FolderSpec) are given by their own name (``ap_rate=0.4``)
  or dotted (``phantom.ap_rate=0.4``). Overrides apply to the builder's default config, or to the
  built-in one named by ``name=``; a config with overrides gets a name derived from them (its
  folder in data_dir) unless ``name=`` gives one. ``config_items`` is the inverse.
* ``open_prepared``: the builder of a prepared dataset, or a DataError naming the prepare command.
* ``open_study_dataset``: ``{split: TFDS data source}`` for a system; renders phantoms on first use.

The command line (``python -m cxrjax.data``, cli.py) and the systems share these. TFDS is imported
inside the functions that need it, so importing this module stays cheap.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import hashlib
import os
import re
import shlex
import sys
import types
import typing
from pathlib import Path
from typing import Sequence

from cxrjax.core.errors import ConfigError
from cxrjax.core.quiet_logs import drop_absl_messages
from cxrjax.data.errors import DataError

if typing.TYPE_CHECKING:
  import tensorflow_datasets as tfds

__all__ = ["builder_classes", "builder_class", "config_keys", "make_config", "config_items",
           "make_builder", "prepared_configs", "open_prepared", "open_study_dataset"]

# TFDS warns (through absl's logger) about three things this module does on purpose, each time a
# dataset is opened: configs made from key=value items, phantoms rendered into a fresh variant
# folder, and image decoding by PIL where OpenCV is absent. Those lines are dropped; every other
# TFDS message is left alone.
EXPECTED_TFDS_WARNINGS = ("Using custom data configuration", "Variant folder",
                          "OpenCV is not installed")
drop_absl_messages(EXPECTED_TFDS_WARNINGS)

# BuilderConfig's own fields: TFDS bookkeeping, not dataset knobs ('name' is handled apart).
_BASE_FIELDS = ("name", "version", "release_notes", "supported_versions", "description", "tags")
_HIDDEN = ("render",)  # a Python callable: cannot come from a command line
_TRUE, _FALSE = ("true", "1", "yes", "y", "on"), ("false", "0", "no", "n", "off")


def builder_classes() -> dict:
  """Registered name -> builder class (imported here: the import pulls in TFDS and pandas)."""
  from cxrjax.data.builders import Chexpert, CxrFolder, CxrPhantoms, MimicCxrJpg
  return {cls.name: cls for cls in (CxrPhantoms, MimicCxrJpg, Chexpert, CxrFolder)}


def builder_class(name: str):
  """The builder class registered as ``name``; ConfigError naming the choices otherwise."""
  classes = builder_classes()
  if name not in classes:
    raise ConfigError(f"unknown dataset builder {name!r}; choose one of {sorted(classes)}")
  return classes[name]


# --------------------------------------------------------------------------- #
# key=value items -> a builder config, and back
# --------------------------------------------------------------------------- #
def _field_types(cls) -> dict[str, object]:
  """Field name -> resolved type of a dataclass. typing.get_type_hints would also resolve
  BuilderConfig's annotations, which name types TFDS does not import at runtime."""
  out = {}
  for f in dataclasses.fields(cls):
    if f.name in _BASE_FIELDS or f.name in _HIDDEN:
      continue
    t = f.type
    if isinstance(t, str):  # `from __future__ import annotations` keeps them as strings
      owner = next(c for c in cls.__mro__ if f.name in vars(c).get("__annotations__", {}))
      t = eval(t, {**vars(typing), **vars(sys.modules[owner.__module__])})  # pylint: disable=eval-used
    out[f.name] = t
  return out


def config_keys(config_cls) -> dict[str, tuple[tuple[str, ...], object]]:
  """Accepted key -> (field path, type). A nested dataclass's fields are reachable dotted and, when
  no top-level field has the name, bare; nested fields shadowed by a top-level one are left out
  (CxrPhantomsConfig's own shortcut fields override PhantomConfig's)."""
  top = _field_types(config_cls)
  keys = {}
  for name, t in top.items():
    if dataclasses.is_dataclass(t):
      for sub, st in _field_types(t).items():
        if sub not in top:
          keys[f"{name}.{sub}"] = ((name, sub), st)
          keys.setdefault(sub, ((name, sub), st))
    else:
      keys[name] = ((name,), t)
  return keys


def _parse(text: str, tp) -> object:
  """One command-line string -> a value of type ``tp``; ValueError says what was expected."""
  if typing.get_origin(tp) in (typing.Union, types.UnionType):
    args = typing.get_args(tp)
    if type(None) in args and text.strip().lower() in ("none", "null", ""):
      return None
    rest = [a for a in args if a is not type(None)]
    # `str | tuple[str, ...]` (StudyConfig.views): a comma list is the tuple, else the string.
    tuples = [a for a in rest if typing.get_origin(a) is tuple]
    if tuples and ("," in text or len(rest) == 1):
      return _parse(text, tuples[0])
    return _parse(text, next(a for a in rest if a not in tuples))
  origin = typing.get_origin(tp)
  if origin is tuple:
    return tuple(s.strip() for s in text.split(",") if s.strip())
  if origin in (dict, collections.abc.Mapping):
    pairs = [p.split(":", 1) for p in text.split(",") if p.strip()]
    if any(len(p) != 2 for p in pairs):
      raise ValueError("expected name:column pairs separated by commas, e.g. Edema:edema,Cardiomegaly:cm")
    return {k.strip(): v.strip() for k, v in pairs}
  if tp is bool:
    if text.strip().lower() in _TRUE + _FALSE:
      return text.strip().lower() in _TRUE
    raise ValueError("expected true or false")
  if tp is int:
    try:
      return int(text)
    except ValueError:
      raise ValueError("expected an integer") from None
  if tp is float:
    try:
      return float(text)
    except ValueError:
      raise ValueError("expected a number") from None
  if tp is str:
    return text
  raise ValueError(f"fields of type {tp} cannot be set from the command line")


def _slug(parsed: dict) -> str:
  """A folder name from the overrides: readable, deterministic, hashed when long."""
  parts = []
  for path, v in sorted(parsed.items()):
    v = ",".join(f"{a}:{b}" for a, b in v.items()) if isinstance(v, dict) else \
        ",".join(v) if isinstance(v, tuple) else v
    parts.append(f"{path[-1]}-{v}")
  text = re.sub(r"[^A-Za-z0-9.,_-]+", "_", "_".join(parts)).replace(",", "+")
  if len(text) > 64:
    text = f"{text[:55]}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"
  return text


def make_config(builder_cls, items: list[str] | None):
  """``--config`` items -> the builder config (validated by its own __post_init__)."""
  builtin = {c.name: c for c in builder_cls.BUILDER_CONFIGS}
  default = builder_cls.DEFAULT_BUILDER_CONFIG_NAME or builder_cls.BUILDER_CONFIGS[0].name
  keys = config_keys(type(builder_cls.BUILDER_CONFIGS[0]))
  listing = ", ".join(["name"] + [k for k, (p, _) in keys.items() if "." not in k])
  name, parsed = None, {}
  for item in items or ():
    key, sep, text = item.partition("=")
    if not sep:
      raise ConfigError(f"--config expects key=value, got {item!r}; valid keys: {listing}")
    if key == "name":
      name = text
      continue
    if key not in keys:
      raise ConfigError(f"unknown config key {key!r} for {builder_cls.name}{_whose(key, builder_cls)}; "
                        f"valid keys: {listing}")
    path, tp = keys[key]
    try:
      parsed[path] = _parse(text, tp)
    except ValueError as e:
      raise ConfigError(f"bad value {text!r} for config key {key!r}: {e}") from None
  if name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", name):
    raise ConfigError(f"config name {name!r} must be letters, digits and . _ + - (a folder name)")
  base = builtin.get(name, builtin[default])
  if not parsed:
    # A built-in config as is, or a name alone: a custom config prepared earlier (to read) or
    # the default fields under a new folder.
    return base if name is None or name in builtin else dataclasses.replace(base, name=name)
  fields = {p[0]: v for p, v in parsed.items() if len(p) == 1}
  for outer in {p[0] for p in parsed if len(p) == 2}:
    sub = {p[1]: v for p, v in parsed.items() if len(p) == 2 and p[0] == outer}
    fields[outer] = dataclasses.replace(getattr(base, outer), **sub)
  if name is None or name in builtin:
    name = f"{name}_{_slug(parsed)}" if name else _slug(parsed)
  canonical = " ".join(f"{'.'.join(p)}={v!r}" for p, v in sorted(parsed.items()))
  try:
    config = dataclasses.replace(base, name=name, description=f"{base.name} with {canonical}", **fields)
  except (TypeError, ValueError) as e:  # ConfigError is a ValueError
    raise ConfigError(f"{builder_cls.name} config: {e}") from None
  _check_views(config)
  return config


def _whose(key: str, builder_cls) -> str:
  """' (a key of cxr_phantoms: ...)' when another builder takes ``key``: the items were most
  likely written for that builder (a system config's defaults) and kept when the builder changed."""
  others = [name for name, cls in builder_classes().items()
            if cls is not builder_cls and key in config_keys(type(cls.BUILDER_CONFIGS[0]))]
  if not others:
    return ""
  return (f" (it is a key of {', '.join(others)}: these items were written for another builder; "
          f"give {builder_cls.name}'s own, or none for its default config)")


def _check_views(config) -> None:
  """Real-data builders take a view filter; catch a typo here rather than midway into prepare."""
  from cxrjax.data.builders.study_builder import StudyConfig
  from cxrjax.data.labels import VIEWS
  if isinstance(config, StudyConfig) and config.views != "*":
    views = (config.views,) if isinstance(config.views, str) else config.views
    if bad := [v for v in views if v not in VIEWS]:
      raise ConfigError(f"views: unknown view(s) {bad}; use '*' or a comma list of {list(VIEWS)}")


def _format(value) -> str:
  """A field value as ``_parse`` reads it back."""
  if value is None:
    return "none"
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, tuple):  # a trailing comma keeps a 1-tuple a tuple under `str | tuple`
    return ",".join(value) + ("," if len(value) == 1 else "")
  if isinstance(value, collections.abc.Mapping):
    return ",".join(f"{k}:{v}" for k, v in value.items())
  return repr(value) if isinstance(value, float) else str(value)


def config_items(builder_cls, config) -> list[str]:
  """A builder config object -> ``key=value`` items that ``make_config`` turns back into it.

  The items are ``name=`` plus the fields that differ from the built-in config it is based on
  (the one of its name, else the default); ``make_config`` returns the same fields and name, with
  a description of its own. Fields the command line cannot set (``render``) are left out, as they
  are not part of a dataset's identity.
  """
  builtin = {c.name: c for c in builder_cls.BUILDER_CONFIGS}
  default = builder_cls.DEFAULT_BUILDER_CONFIG_NAME or builder_cls.BUILDER_CONFIGS[0].name
  base = builtin.get(config.name, builtin[default])
  items = [f"name={config.name}"]
  for key, (path, _) in config_keys(type(config)).items():
    if len(path) == 2 and "." not in key:  # the bare alias of a dotted key
      continue
    value, was = config, base
    for part in path:
      value, was = getattr(value, part), getattr(was, part)
    if value != was:
      items.append(f"{key}={_format(value)}")
  return items


# --------------------------------------------------------------------------- #
# finding a prepared dataset
# --------------------------------------------------------------------------- #
def make_builder(builder_cls, config, data_dir: str):
  return builder_cls(config=config, data_dir=data_dir, file_format="array_record")


def prepared_configs(builder_cls, data_dir: str) -> list[str]:
  """Names of the configs of ``builder_cls`` prepared (completely) under data_dir."""
  root = Path(data_dir) / builder_cls.name
  version = str(builder_cls.VERSION)
  return sorted(p.name for p in root.glob("*") if (p / version / "dataset_info.json").is_file())


def open_prepared(builder_cls, data_dir: str, items: list[str] | None):
  """The builder of a prepared dataset, or a DataError telling the user the prepare command."""
  items = list(items or ())  # no --config: the default config, or the only one prepared
  return _prepared(builder_cls, make_config(builder_cls, items), data_dir, items)


def stored_items(builder_cls, name: str, data_dir: str) -> list[str] | None:
  """The ``key=value`` items a dataset prepared under ``name`` recorded (features.metadata), or
  None when it is not prepared or predates the record."""
  import json
  path = Path(data_dir) / builder_cls.name / name / str(builder_cls.VERSION) / "metadata.json"
  try:
    items = json.loads(path.read_text()).get("config_items")
  except (OSError, ValueError, AttributeError):
    return None
  return list(items) if items else None


def _prepared(builder_cls, config, data_dir: str, items: list[str] | None):
  """``open_prepared`` for a config made already; ``items`` None: the caller gave the config
  object itself, so neither another prepared config is taken nor are its items known.

  Items that name a config and set nothing else are completed from what the dataset recorded
  when it was prepared, so its builder has the prepared fields (image size, label names, ...)
  rather than the builder's defaults; the line printed on opening says which they are."""
  stored = stored_items(builder_cls, config.name, data_dir)
  if items is not None and stored and all(i.startswith("name=") for i in items):
    config = make_config(builder_cls, stored)
  builder = make_builder(builder_cls, config, data_dir)
  if builder.is_prepared():
    shown = " ".join(i for i in (stored or []) if not i.startswith("name=")) or "the defaults"
    print(f"[data] {builder_cls.name} {config.name!r} in {data_dir}, prepared with {shown}",
          flush=True)
    return builder
  prepared = prepared_configs(builder_cls, data_dir)
  if items is not None and not items and len(prepared) == 1:  # one candidate: take it, and say so
    print(f"note: using {builder_cls.name} config {prepared[0]!r}, the only one prepared in {data_dir}",
          file=sys.stderr)
    return open_prepared(builder_cls, data_dir, [f"name={prepared[0]}"])
  items = config_items(builder_cls, config) if items is None else items
  command = " ".join(["python -m cxrjax.data prepare", builder_cls.name, "--data_dir", shlex.quote(data_dir)]
                     + (["--config", *map(shlex.quote, items)] if items else []))
  others = f" (prepared there: {', '.join(prepared)}; pick one with --config name=NAME)" if prepared else ""
  raise DataError(f"{builder_cls.name} config {config.name!r} is not prepared in {data_dir}; "
                  f"run first: {command}{others}")


# --------------------------------------------------------------------------- #
# a system's dataset
# --------------------------------------------------------------------------- #
def open_study_dataset(builder: str, data_dir: str,
                       config: Sequence[str] | tfds.core.BuilderConfig | None, splits: Sequence[str], *,
                       render_if_missing: bool = True, hint: str = "") -> dict[str, typing.Any]:
  """``{split: TFDS data source}`` of dataset ``builder`` in ``data_dir``, in ``splits``' order.

  config: the ``key=value`` items of ``make_config`` (a list; empty or None = the default config)
  or a config object of the builder's config class, used as is (a system that names its own
  dataset, as FMKD does). A dataset the builder renders itself (cxr_phantoms) is rendered on first
  use, with a progress line. Otherwise (real data, or ``render_if_missing`` False) a dataset that
  is not prepared raises the DataError of ``open_prepared``, naming the ``python -m cxrjax.data
  prepare`` command; like ``open_prepared``, empty items take the only config prepared in
  data_dir when there is one. A split the dataset lacks raises a DataError naming the splits it
  has, then ``hint`` (what the caller's user can change, e.g. "set data.splits").
  """
  from cxrjax.data.builders.study_builder import StudyBuilder

  cls = builder_class(builder)
  data_dir = os.path.expanduser(str(data_dir))
  if isinstance(config, str):  # a lone item would be read character by character
    raise TypeError(f"config must be a list of key=value items or a config object, got the string {config!r}")
  config_cls = type(cls.BUILDER_CONFIGS[0])
  if isinstance(config, config_cls):
    items, made = None, config
  elif dataclasses.is_dataclass(config):
    raise TypeError(f"{builder} takes a {config_cls.__name__}, got a {type(config).__name__}")
  else:
    items = list(config or ())
    made = make_config(cls, items)
  if issubclass(cls, StudyBuilder) or not render_if_missing:  # real data is the user's to prepare
    ds = _prepared(cls, made, data_dir, items)
  else:
    ds = make_builder(cls, made, data_dir)
    if not ds.is_prepared():
      from cxrjax.core.writers import say  # late: it imports jax, which the command line does not need
      size = f" ({made.num_studies} studies, {made.size} px)" if hasattr(made, "num_studies") else ""
      say(f"[data] rendering {builder} {made.name}{size} into {data_dir}")
      ds.download_and_prepare()
  sources = ds.as_data_source()
  missing = [s for s in splits if s not in sources]
  if missing:
    raise DataError(f"{builder} {ds.builder_config.name} in {data_dir} has no split(s) {missing}; "
                    f"it has {sorted(sources)}" + (f"; {hint}" if hint else ""))
  return {s: sources[s] for s in splits}
