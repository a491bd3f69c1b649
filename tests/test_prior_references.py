"""The prior table's linear references and the label-efficiency curve's config checks."""
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from cxrjax.core.config import load_config
from cxrjax.core.errors import ConfigError
from cxrjax.systems.prior import validate_config
from cxrjax.systems.prior.curve import point_config
from cxrjax.systems.prior.references import ridge_map, soft_label_regression
from launch_util import ROOT


def test_hard_soft_labels_give_the_plain_logistic_regression():
  # A soft label of exactly 0 or 1 gives its twin row zero weight: the fit is the ordinary one.
  rng = np.random.default_rng(0)
  x = rng.normal(size=(300, 5))
  y = (x[:, 0] + 0.5 * rng.normal(size=300) > 0).astype(float)
  scorer = soft_label_regression(x, y, inverse_regularisation=0.1)
  z = (x - x.mean(0)) / x.std(0)
  plain = LogisticRegression(C=0.1, max_iter=5000).fit(z, y)
  np.testing.assert_allclose(scorer(x[:20]), plain.predict_proba(z[:20])[:, 1], atol=1e-5)


def test_soft_labels_are_fitted_as_probabilities():
  # Soft labels drawn from a known logistic model: the fitted probabilities recover it.
  rng = np.random.default_rng(1)
  x = rng.normal(size=(4000, 3))
  p = 1 / (1 + np.exp(-(1.5 * x[:, 0] - x[:, 1])))
  scorer = soft_label_regression(x, p, inverse_regularisation=100.0)
  assert np.abs(scorer(x) - p).max() < 0.02


def test_ridge_map_recovers_a_linear_map_in_the_targets_units():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(500, 4)) * [1.0, 3.0, 0.5, 2.0] + 7.0
  w = rng.normal(size=(4, 6))
  ctpa = x @ w + 10.0
  mapped = ridge_map(x, ctpa, alpha=1e-6)(x[:10])
  assert mapped.dtype == np.float32 and mapped.shape == (10, 6)
  np.testing.assert_allclose(mapped, ctpa[:10], rtol=1e-4, atol=1e-3)


def _config(variant="tiny", **overrides):
  return load_config(f"{ROOT}/configs/prior.py:{variant}", overrides)


def test_curve_config_checks():
  validate_config(_config("curve_tiny"))
  with pytest.raises(ConfigError, match="needs data.source='synthetic'"):
    validate_config(_config("curve_tiny", **{"data.source": "npz", "data.path": "x.npz"}))
  with pytest.raises(ConfigError, match="must both be given"):
    validate_config(_config(**{"curve.labelled": (32, 64)}))
  with pytest.raises(ConfigError, match="distinct integers >= 2"):
    validate_config(_config("curve_tiny", **{"curve.labelled": (32, 32)}))
  with pytest.raises(ConfigError, match="eval.references.ridge_alpha"):
    validate_config(_config(**{"eval.references.ridge_alpha": 0.0}))


def test_a_curve_point_is_the_job_at_its_sizes_without_a_curve():
  config = _config("curve")
  point = point_config(config, 50, 10000)
  assert (point.data.synthetic.n_labelled, point.data.synthetic.n_unlabelled) == (50, 10000)
  assert tuple(point.curve.labelled) == () and tuple(point.curve.unlabelled) == ()
  assert point.train.to_dict() == config.train.to_dict()
  assert config.data.synthetic.n_labelled == 300  # the job's own config is left alone
