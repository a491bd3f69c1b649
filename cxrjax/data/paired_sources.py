"""Paired CXR/CTPA embeddings from a config: ``data.source`` picks a reader or the generator.

``load(config)`` dispatches on ``config["source"]``:

* ``seed_layout``, ``npz``, ``table``: the readers of ``paired_embeddings``;
* ``synthetic``: ``synthetic_pe.generate``.

It sits above both modules so that neither imports the other back: the generator builds on
the format's container, and the format knows no generator.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

from cxrjax.core.errors import ConfigError
from cxrjax.data import paired_embeddings, synthetic_pe
from cxrjax.data.paired_embeddings import PairedData

__all__ = ["SOURCES", "load"]

# data.source -> the function that makes PairedData from the source's keyword arguments.
SOURCES: Mapping[str, Callable[..., PairedData]] = {
    "seed_layout": paired_embeddings.load_seed_layout,
    "npz": paired_embeddings.load_npz,
    "table": paired_embeddings.load_table,
    "synthetic": synthetic_pe.generate,
}


def load(config: Mapping[str, Any]) -> PairedData:
  """Load from a mapping such as ``dict(config.data)``, dispatching on ``config["source"]``.

  The loader's keyword arguments come from ``config[source]`` when that is a mapping
  (unknown keys are errors), else from the top-level keys the loader accepts (others,
  such as a normaliser setting, are ignored). Empty-string or None values count as unset.
  ``synthetic`` takes ``synthetic_pe.generate``'s arguments, e.g.
  ``{"source": "synthetic", "seed": 1, "n_labelled": 100}``. The result has passed
  ``paired_embeddings.validate``.
  """
  cfg = dict(config)
  source = cfg.get("source")
  if source not in SOURCES:
    raise ConfigError(f"data.source is {source!r}; choose one of {list(SOURCES)}")
  fn = SOURCES[source]
  params = inspect.signature(fn).parameters
  nested = cfg.get(source)
  if nested is not None and hasattr(nested, "keys"):
    kwargs = dict(nested)
    if unknown := sorted(set(kwargs) - set(params)):
      raise ConfigError(f"data.{source}: unknown key(s) {unknown}; accepted: {list(params)}")
  else:
    kwargs = {k: v for k, v in cfg.items() if k in params}
  kwargs = {k: v for k, v in kwargs.items() if v is not None and v != ""}  # "" / None: unset
  missing = [k for k, p in params.items() if p.default is p.empty and k not in kwargs]
  if missing:
    raise ConfigError(f"data.source={source!r} needs non-empty key(s) {missing}")
  data = fn(**kwargs)
  if source == "synthetic":  # the readers validate what they read; the generator does not
    paired_embeddings.validate(data)
  return data
