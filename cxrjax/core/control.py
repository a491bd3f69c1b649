"""Controllers driven by evaluation metrics: host-side Python, called once per evaluation.

`ReduceOnPlateau` follows PyTorch's `torch.optim.lr_scheduler.ReduceLROnPlateau` step for step,
on a learning-rate *scale* that starts at 1.0 (the loop multiplies every optimizer update by
it): torch's lr with a base lr of 1.0, so min_scale is torch's min_lr / base lr. A value is
an improvement when it beats `best` by `threshold` (relative: best * (1 -+ threshold), or
absolute: best -+ threshold); after more than `patience` evaluations without one the scale
is multiplied by `factor` (floored at min_scale, and skipped when it would change by less than
eps), then `cooldown` evaluations pass in which bad evaluations are not counted.

`EarlyStopping` follows PyTorch Lightning's `EarlyStopping` callback (monitor, mode, patience,
min_delta): an improvement is value < best - min_delta ('min') or value > best + min_delta
('max'); otherwise wait += 1, and training stops once wait >= patience. A non-finite value is
never an improvement (Lightning's check_finite would stop at once; here it only waits).

`StageControl` is what the training loop keeps of them for one stage, with the best evaluation so
far; its `to_json()` is saved with every checkpoint.

Both keep their whole state in `state_dict()` (JSON types only: non-finite floats are written
as the strings 'inf', '-inf', 'nan'), so a run resumed from a checkpoint continues exactly.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

from cxrjax.core.errors import ConfigError

MODES = ("min", "max")
THRESHOLD_MODES = ("rel", "abs")


def _to_json(x: float) -> float | str:
  # Strict JSON has no inf / nan; best starts at +-inf.
  return x if math.isfinite(x) else repr(float(x))


def _check_state(d: dict, keys: tuple, owner) -> None:
  missing = [k for k in keys if k not in d]
  if missing:
    raise ValueError(f"{type(owner).__name__} state is missing {missing}")
  if (d["metric"], d["mode"]) != (owner.metric, owner.mode):
    raise ValueError(f"{type(owner).__name__} state watches {d['metric']!r} ({d['mode']}); "
                     f"this one watches {owner.metric!r} ({owner.mode})")


@dataclasses.dataclass(eq=False)
class ReduceOnPlateau:
  """torch ReduceLROnPlateau on an lr scale (see the module docstring).

  metric: the evaluation metric it watches. mode: 'min' or 'max'. factor: 0 < factor < 1.
  patience, cooldown: evaluations (ints >= 0). threshold >= 0 with threshold_mode 'rel' | 'abs'.
  min_scale >= 0: the floor. eps: a reduction smaller than this is skipped.
  State (read-only by convention): scale, best, num_bad, cooldown_counter, num_updates.
  """
  metric: str
  mode: str = "min"
  factor: float = 0.1
  patience: int = 10
  threshold: float = 1e-4
  threshold_mode: str = "rel"
  cooldown: int = 0
  min_scale: float = 0.0
  eps: float = 1e-8
  scale: float = dataclasses.field(init=False, default=1.0)
  best: float = dataclasses.field(init=False, default=math.inf)
  num_bad: int = dataclasses.field(init=False, default=0)
  cooldown_counter: int = dataclasses.field(init=False, default=0)
  num_updates: int = dataclasses.field(init=False, default=0)

  def __post_init__(self):
    field = f"ReduceOnPlateau({self.metric!r})"
    if self.mode not in MODES:
      raise ConfigError(f"{field}.mode={self.mode!r}; choose one of {', '.join(MODES)}")
    if self.threshold_mode not in THRESHOLD_MODES:
      raise ConfigError(f"{field}.threshold_mode={self.threshold_mode!r}; choose one of "
                        f"{', '.join(THRESHOLD_MODES)}")
    if not 0 < self.factor < 1:
      raise ConfigError(f"{field}.factor={self.factor!r} must be in (0, 1)")
    for key in ("patience", "cooldown"):
      value = getattr(self, key)
      if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{field}.{key}={value!r} must be an integer >= 0")
    for key in ("threshold", "min_scale", "eps"):
      if not getattr(self, key) >= 0:
        raise ConfigError(f"{field}.{key}={getattr(self, key)!r} must be >= 0")
    self.best = math.inf if self.mode == "min" else -math.inf

  def _is_better(self, value: float) -> bool:
    # torch's comparisons verbatim, quirks included (rel with a negative best).
    if self.threshold_mode == "rel":
      if self.mode == "min":
        return value < self.best * (1.0 - self.threshold)
      return value > self.best * (self.threshold + 1.0)
    if self.mode == "min":
      return value < self.best - self.threshold
    return value > self.best + self.threshold

  def update(self, value: float) -> float:
    """Takes one evaluation's metric value; returns the lr scale to use from now on."""
    value = float(value)
    self.num_updates += 1
    if self._is_better(value):  # nan is never better
      self.best, self.num_bad = value, 0
    else:
      self.num_bad += 1
    if self.cooldown_counter > 0:
      self.cooldown_counter -= 1
      self.num_bad = 0  # bad evaluations in the cooldown do not count
    if self.num_bad > self.patience:
      new = max(self.scale * self.factor, self.min_scale)
      if self.scale - new > self.eps:
        self.scale = new
      self.cooldown_counter, self.num_bad = self.cooldown, 0
    return self.scale

  def state_dict(self) -> dict[str, Any]:
    return {"metric": self.metric, "mode": self.mode, "scale": self.scale,
            "best": _to_json(self.best), "num_bad": self.num_bad,
            "cooldown_counter": self.cooldown_counter, "num_updates": self.num_updates}

  def load_state_dict(self, d: dict[str, Any]) -> None:
    """Restores state_dict()'s values. The settings stay this object's own (a resumed run may
    change patience, say), but metric and mode must match: best is meaningless otherwise."""
    _check_state(d, ("metric", "mode", "scale", "best", "num_bad", "cooldown_counter",
                     "num_updates"), self)
    self.scale, self.best = float(d["scale"]), float(d["best"])
    self.num_bad, self.cooldown_counter = int(d["num_bad"]), int(d["cooldown_counter"])
    self.num_updates = int(d["num_updates"])


@dataclasses.dataclass(eq=False)
class EarlyStopping:
  """Lightning EarlyStopping (see the module docstring).

  metric: the evaluation metric it watches. mode: 'min' or 'max'. patience: evaluations
  without improvement before stopping (int >= 0; 0 stops at the first one). min_delta >= 0.
  State: best (+-inf before the first finite value), wait, num_updates.
  """
  metric: str
  mode: str = "min"
  patience: int = 3
  min_delta: float = 0.0
  best: float = dataclasses.field(init=False, default=math.inf)
  wait: int = dataclasses.field(init=False, default=0)
  num_updates: int = dataclasses.field(init=False, default=0)

  def __post_init__(self):
    field = f"EarlyStopping({self.metric!r})"
    if self.mode not in MODES:
      raise ConfigError(f"{field}.mode={self.mode!r}; choose one of {', '.join(MODES)}")
    if isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience < 0:
      raise ConfigError(f"{field}.patience={self.patience!r} must be an integer >= 0")
    if not self.min_delta >= 0:
      raise ConfigError(f"{field}.min_delta={self.min_delta!r} must be >= 0")
    self.best = math.inf if self.mode == "min" else -math.inf

  def update(self, value: float) -> bool:
    """Takes one evaluation's metric value; True when training should stop now."""
    value = float(value)
    self.num_updates += 1
    improved = math.isfinite(value) and (value < self.best - self.min_delta if self.mode == "min"
                                         else value > self.best + self.min_delta)
    if improved:
      self.best, self.wait = value, 0
      return False
    self.wait += 1
    return self.wait >= self.patience

  def state_dict(self) -> dict[str, Any]:
    return {"metric": self.metric, "mode": self.mode, "best": _to_json(self.best),
            "wait": self.wait, "num_updates": self.num_updates}

  def load_state_dict(self, d: dict[str, Any]) -> None:
    """Restores state_dict()'s values; metric and mode must match this object's."""
    _check_state(d, ("metric", "mode", "best", "wait", "num_updates"), self)
    self.best, self.wait = float(d["best"]), int(d["wait"])
    self.num_updates = int(d["num_updates"])


def from_block(block, cls):
  """A `cls` (ReduceOnPlateau or EarlyStopping) from a config block {'enabled': bool, **its
  settings}, or None when the block is empty or disabled."""
  if not block:
    return None
  settings = block.to_dict() if hasattr(block, "to_dict") else dict(block)
  if not settings.pop("enabled", True):
    return None
  try:
    return cls(**settings)
  except TypeError as e:  # an unknown or missing setting
    raise ConfigError(f"{cls.__name__} block {settings}: {e}") from e


class StageControl:
  """What evaluation decides for one stage of the loop (the best evaluation, the plateau's lr
  scale, an early stop) and its JSON state, saved with every checkpoint. `schedule` is a
  core.loop.Schedule: its best_metric / best_mode and copies of its plateau / early_stop."""

  def __init__(self, schedule):
    self.schedule = schedule
    self.plateau = copy.deepcopy(schedule.plateau)
    self.early_stop = copy.deepcopy(schedule.early_stop)
    self.lr_scale = 1.0
    self.best_step: int | None = None
    self.best_value: float | None = None
    self.best_eval: dict = {}
    self.last_eval: dict = {}
    self.stopped_at: int | None = None

  def observe(self, step: int, scalars: dict) -> bool:
    """Feeds one evaluation; returns whether it is a new best (to be saved now)."""
    self.last_eval = dict(scalars)
    for ctl in (self.plateau, self.early_stop):
      if ctl is not None and ctl.metric not in scalars:
        raise ConfigError(f"{type(ctl).__name__} watches {ctl.metric!r}, which evaluation does "
                          f"not return (it returns {sorted(scalars)})")
    if self.plateau is not None:
      self.lr_scale = float(self.plateau.update(scalars[self.plateau.metric]))
    if self.early_stop is not None and self.early_stop.update(scalars[self.early_stop.metric]):
      self.stopped_at = step
    metric = self.schedule.best_metric
    if metric is None:
      return False
    if metric not in scalars:
      raise ConfigError(f"best_metric {metric!r} is not among the evaluation's results "
                        f"{sorted(scalars)}")
    value = float(scalars[metric])
    better = math.isfinite(value) and (self.best_value is None or (
        value > self.best_value if self.schedule.best_mode == "max" else value < self.best_value))
    if better:
      self.best_step, self.best_value, self.best_eval = step, value, dict(scalars)
    return better

  def to_json(self) -> dict:
    return {"lr_scale": self.lr_scale, "best_step": self.best_step, "best_value": self.best_value,
            "best_eval": self.best_eval, "last_eval": self.last_eval, "stopped_at": self.stopped_at,
            "plateau": self.plateau.state_dict() if self.plateau else None,
            "early_stop": self.early_stop.state_dict() if self.early_stop else None}

  def load(self, d: dict) -> None:
    self.lr_scale = float(d.get("lr_scale", 1.0))
    self.best_step, self.best_value = d.get("best_step"), d.get("best_value")
    self.best_eval, self.last_eval = d.get("best_eval") or {}, d.get("last_eval") or {}
    self.stopped_at = d.get("stopped_at")
    if self.plateau is not None and d.get("plateau") is not None:
      self.plateau.load_state_dict(d["plateau"])
    if self.early_stop is not None and d.get("early_stop") is not None:
      self.early_stop.load_state_dict(d["early_stop"])
