"""core.control: ReduceOnPlateau against torch's ReduceLROnPlateau, EarlyStopping against
Lightning's rule (known answers), and both resumed through JSON."""
import json
import math

import numpy as np
import pytest

from cxrjax.core.control import EarlyStopping, ReduceOnPlateau
from cxrjax.core.errors import ConfigError


def _torch_scales(values, **kw):
  """lr after each ReduceLROnPlateau.step of torch SGD with lr=1.0 (min_lr = min_scale)."""
  torch = pytest.importorskip("torch")
  opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
  kw = dict(kw)
  kw["min_lr"] = kw.pop("min_scale", 0.0)
  sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, **kw)
  scales = []
  for v in values:
    sched.step(v)
    scales.append(opt.param_groups[0]["lr"])
  return scales


def _random_walk(seed, n=200):
  # Steps of mixed size with long flat stretches, so both improvements and plateaus occur.
  rng = np.random.default_rng(seed)
  steps = rng.normal(size=n) * rng.choice([0.0, 1e-5, 1e-2, 1.0], size=n)
  return list(np.cumsum(steps) + rng.choice([1.0, -1.0]) * 5.0)


SETTINGS = [
    dict(mode="min"),
    dict(mode="max", factor=0.5, patience=2),
    dict(mode="min", factor=0.5, patience=0, cooldown=2, threshold=1e-3, threshold_mode="abs"),
    dict(mode="max", factor=0.3, patience=1, cooldown=1, threshold=0.05, threshold_mode="rel"),
    dict(mode="min", factor=0.1, patience=1, min_scale=1e-3),
    dict(mode="max", factor=0.7, patience=3, cooldown=3, threshold=0.0, threshold_mode="abs",
         min_scale=0.2),
    dict(mode="min", factor=0.9, patience=0, min_scale=0.5, eps=0.06),  # eps skips the last cut
]

HAND_MADE = [
    [1.0] * 30,  # one long plateau
    [5, 4, 3, 3, 3, 3, 3, 2, 2.9999, 2.99999, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    [0.1, 0.2, 0.3, 0.3, 0.3, 0.31, 0.30, 0.29, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5],
    [-3.0, -3.0, -2.9, -3.1, -3.1, -3.1, -3.1, -3.1, -3.1, -3.3, -3.3, -3.3, -3.3],  # rel, < 0
    [1.0, float("nan"), 0.9, float("nan"), float("nan"), float("nan"), 0.5, 0.5, 0.5, 0.5],
]


@pytest.mark.parametrize("settings", SETTINGS)
def test_reduce_on_plateau_matches_torch(settings):
  for values in HAND_MADE + [_random_walk(seed) for seed in range(4)]:
    ours = ReduceOnPlateau("val_loss", **settings)
    got = [ours.update(v) for v in values]
    want = _torch_scales(values, **settings)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
  # The settings do reduce on these sequences (otherwise the comparison proves little).
  assert min(got) < 1.0


def test_reduce_on_plateau_floor_and_eps():
  ours = ReduceOnPlateau("auc", mode="max", factor=0.5, patience=0, min_scale=0.2)
  assert [ours.update(0.5) for _ in range(5)] == [1.0, 0.5, 0.25, 0.2, 0.2]
  # A cut that would change the scale by less than eps is skipped altogether.
  ours = ReduceOnPlateau("auc", mode="max", factor=0.99, patience=0, eps=0.05)
  assert [ours.update(0.5) for _ in range(3)] == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("settings", SETTINGS)
@pytest.mark.parametrize("k", [0, 1, 7, 40])
def test_reduce_on_plateau_resumes_exactly(settings, k):
  values = _random_walk(11, 60) + HAND_MADE[4]
  whole = ReduceOnPlateau("val_loss", **settings)
  want = [whole.update(v) for v in values]
  first = ReduceOnPlateau("val_loss", **settings)
  got = [first.update(v) for v in values[:k]]
  saved = json.dumps(first.state_dict(), allow_nan=False)  # strict JSON: best may be +-inf
  resumed = ReduceOnPlateau("val_loss", **settings)
  resumed.load_state_dict(json.loads(saved))
  got += [resumed.update(v) for v in values[k:]]
  assert got == want
  assert resumed.state_dict() == whole.state_dict()


def _stops(values, **kw):
  es = EarlyStopping("val_loss", **kw)
  return [es.update(v) for v in values], es


def test_early_stopping_known_answers():
  stops, es = _stops([1.0, 0.9, 0.95, 0.9, 0.91], mode="min", patience=3)
  assert stops == [False, False, False, False, True] and (es.best, es.wait) == (0.9, 3)
  # min_delta: 0.89 is not better than 0.9 by more than 0.05, 0.8 is.
  stops, es = _stops([0.9, 0.89, 0.8, 0.79, 0.78], mode="min", patience=2, min_delta=0.05)
  assert stops == [False, False, False, False, True] and (es.best, es.wait) == (0.8, 2)
  stops, es = _stops([0.5, 0.6, 0.6, 0.7, 0.65], mode="max", patience=1)
  assert stops == [False, False, True, False, True] and (es.best, es.wait) == (0.7, 1)
  # patience 0 stops at the first evaluation without improvement.
  stops, _ = _stops([3.0, 2.0, 2.0], mode="min", patience=0)
  assert stops == [False, False, True]
  # Non-finite values never improve, -inf included (Lightning with check_finite=False
  # would take -inf as a new best in 'min' mode).
  stops, es = _stops([1.0, float("nan"), -math.inf, math.inf, 0.5], mode="min", patience=4)
  assert stops == [False, False, False, False, False] and (es.best, es.wait) == (0.5, 0)
  stops, es = _stops([float("nan")] * 3, mode="max", patience=3)
  assert stops == [False, False, True] and es.best == -math.inf


@pytest.mark.parametrize("k", [0, 2, 5, 9])
def test_early_stopping_resumes_exactly(k):
  values = [1.0, 0.8, 0.8, float("nan"), 0.79, 0.7, 0.71, 0.72, 0.7, 0.69, 0.75, 0.76, 0.8]
  want, whole = _stops(values, mode="min", patience=3, min_delta=0.005)
  first = EarlyStopping("val_loss", mode="min", patience=3, min_delta=0.005)
  got = [first.update(v) for v in values[:k]]
  resumed = EarlyStopping("val_loss", mode="min", patience=3, min_delta=0.005)
  resumed.load_state_dict(json.loads(json.dumps(first.state_dict(), allow_nan=False)))
  got += [resumed.update(v) for v in values[k:]]
  assert got == want and resumed.state_dict() == whole.state_dict()
  assert any(want)


def test_bad_settings_and_mismatched_state_are_clear_errors():
  for kw, field in [(dict(mode="up"), "mode"), (dict(factor=1.0), "factor"),
                    (dict(threshold_mode="pct"), "threshold_mode"), (dict(patience=-1), "patience"),
                    (dict(cooldown=1.5), "cooldown"), (dict(min_scale=-0.1), "min_scale")]:
    with pytest.raises(ConfigError, match=field):
      ReduceOnPlateau("val_loss", **kw)
  for kw, field in [(dict(mode="up"), "mode"), (dict(patience=-1), "patience"),
                    (dict(min_delta=-0.1), "min_delta")]:
    with pytest.raises(ConfigError, match=field):
      EarlyStopping("val_loss", **kw)
  with pytest.raises(ValueError, match="auc"):
    ReduceOnPlateau("val_loss").load_state_dict(ReduceOnPlateau("auc").state_dict())
  with pytest.raises(ValueError, match="max"):
    EarlyStopping("auc").load_state_dict(EarlyStopping("auc", mode="max").state_dict())
