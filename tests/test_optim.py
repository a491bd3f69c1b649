"""core.optim: the seed's one-cycle lr and beta1 (parity with torch), frozen parameter groups."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxrjax.core import loop
from cxrjax.core.errors import ConfigError
from cxrjax.core.mesh import create_mesh
from cxrjax.core.optim import make_optimizer, make_schedule, one_cycle_momentum
from toy_task import make_data, make_task


def _torch_one_cycle(total, max_lr, params=None, grads=None):
  """(lr per step, beta1 per step, final params) of torch Adam + OneCycleLR (seed B.4)."""
  torch = pytest.importorskip("torch")
  p = torch.nn.Parameter(torch.tensor(params if params is not None else [0.0]))
  opt = torch.optim.Adam([p], lr=1.0)
  sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=total)
  lrs, b1s = [], []
  for step in range(total):
    lrs.append(opt.param_groups[0]["lr"])
    b1s.append(opt.param_groups[0]["betas"][0])
    if grads is not None:
      p.grad = torch.tensor(grads(step, p.detach().numpy()))
      opt.step()
    else:
      opt.step()
    sched.step()
  return np.array(lrs), np.array(b1s), p.detach().numpy()


@pytest.mark.parametrize("total", [7, 100, 1234])
def test_one_cycle_lr_and_beta1_match_torch(total):
  lrs, b1s, _ = _torch_one_cycle(total, 1e-2)
  lr, b1 = make_schedule(name="one_cycle", lr=1e-2, total_steps=total), one_cycle_momentum(total)
  steps = jnp.arange(total)
  np.testing.assert_allclose(np.asarray(jax.vmap(lr)(steps)), lrs, rtol=2e-5, atol=1e-9)
  np.testing.assert_allclose(np.asarray(jax.vmap(b1)(steps)), b1s, rtol=0, atol=2e-7)


def test_adam_with_cycled_beta1_matches_torch():
  # Whole optimiser: same gradients in, same parameters out (bias correction with the
  # current beta1, as torch's Adam computes it).
  total, x0 = 30, np.array([1.0, -2.0, 0.5], np.float32)
  grad = lambda step, p: (2 * p * (1 + step % 3)).astype(np.float32)
  _, _, want = _torch_one_cycle(total, 1e-1, x0, grad)
  tx, _ = make_optimizer(dict(name="adamw", lr=1e-1, schedule="one_cycle", weight_decay=0.0,
                              weight_decay_mask="none", cycle_momentum=True), total)
  p = jnp.asarray(x0)
  state = tx.init(p)
  for step in range(total):
    updates, state = tx.update(jnp.asarray(grad(step, np.asarray(p))), state, p)
    p = p + updates
  np.testing.assert_allclose(np.asarray(p), want, rtol=1e-5, atol=1e-6)


def test_cycle_momentum_needs_adamw_one_cycle():
  with pytest.raises(ConfigError, match="cycle_momentum"):
    make_optimizer(dict(name="adamw", lr=1e-3, schedule="cosine", cycle_momentum=True), 10)
  with pytest.raises(ConfigError, match="momentum_range"):
    make_optimizer(dict(name="adamw", lr=1e-3, schedule="one_cycle", cycle_momentum=True,
                        momentum_range=(0.95, 0.85)), 10)


def _two_group_task():
  """The toy MLP split into {'body': first Dense, 'head': the rest}, as a backbone + head."""
  task = make_task()

  def init(rng):
    v = task.init(rng)
    p = v["params"]
    return {"params": {"body": {"Dense_0": p["Dense_0"]},
                       "head": {k: p[k] for k in p if k != "Dense_0"}},
            "batch_stats": v["batch_stats"]}

  def loss(params, batch, rng, batch_stats):
    return task.loss({**params["body"], **params["head"]}, batch, rng, batch_stats)

  return loop.Task("frozen", init, loss)


def test_frozen_group_stays_and_head_trains(tmp_path):
  optim = dict(name="adamw", lr=1e-2, schedule="constant", weight_decay=1e-2, frozen=("body",))
  compiled = loop.compile_task(_two_group_task(), mesh=create_mesh(), optim=optim,
                               num_steps=10, seed=0)
  state = compiled.init()
  body0, head0 = jax.device_get(state.params["body"]), jax.device_get(state.params["head"])
  stats0 = jax.device_get(state.batch_stats)
  data = make_data()
  for _ in range(5):
    state, _ = compiled.step(state, next(data))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params["body"]), body0)
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), jax.device_get(state.params["head"]), head0)
  assert min(jax.tree.leaves(moved)) > 0
  # Batch statistics still move: a frozen backbone in train mode (the FMKD seed's LP leak).
  assert any(float(np.abs(a - b).max()) > 0 for a, b in
             zip(jax.tree.leaves(jax.device_get(state.batch_stats)), jax.tree.leaves(stats0)))
  # The gradient into the frozen group is stopped, not just discarded: none is computed.
  def dots(frozen):
    c = loop.compile_task(_two_group_task(), mesh=create_mesh(), optim={**optim, "frozen": frozen},
                          num_steps=10, seed=0)
    return c.step.lower(c.init(), next(data)).as_text().count("dot_general")
  assert dots(("body",)) < dots(())


def test_frozen_unknown_group_is_a_clear_error():
  optim = dict(name="adamw", lr=1e-2, schedule="constant", frozen=("backbone",))
  with pytest.raises(ConfigError, match="backbone"):
    loop.compile_task(_two_group_task(), mesh=create_mesh(), optim=optim, num_steps=10, seed=0)


def test_loss_without_batch_stats_is_a_clear_error():
  task = make_task()
  bad = loop.Task("bad", task.init, lambda p, b, r, s: (lambda v: (v[0], {"terms": v[1]["terms"]}))(
      task.loss(p, b, r, s)))
  compiled = loop.compile_task(bad, mesh=create_mesh(), optim=dict(lr=1e-2, schedule="constant"),
                               num_steps=10, seed=0)
  with pytest.raises(ValueError, match="aux\\['batch_stats'\\]"):
    compiled.step(compiled.init(), next(make_data()))
