"""Loading config files from Python (notebooks, tests, benchmarks), as the launcher does."""
from __future__ import annotations

import importlib.util
import os

import ml_collections

from cxrjax.core.errors import ConfigError


def load_config(spec: str, overrides: dict | None = None) -> ml_collections.ConfigDict:
  """`load_config("configs/prior.py:tiny", {"train.steps": 50})` -> a locked ConfigDict.

  spec: a config file path (relative to the cwd), optionally ":variant".
  overrides: dotted field -> value, checked like `--config.a.b=v` (unknown fields fail).
  """
  path, _, variant = spec.partition(":")
  if not os.path.exists(path):
    raise ConfigError(f"config file {path!r} not found (relative to {os.getcwd()})")
  module_spec = importlib.util.spec_from_file_location(
      f"cxrjax_config_{os.path.splitext(os.path.basename(path))[0]}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(variant or None)
  config.lock()
  for dotted, value in (overrides or {}).items():
    node = config
    *parents, leaf = dotted.split(".")
    try:
      for p in parents:
        node = node[p]
      node[leaf] = value
    except (AttributeError, KeyError, TypeError) as e:
      raise ConfigError(f"cannot set config field {dotted}={value!r}: {e}") from e
  return config
