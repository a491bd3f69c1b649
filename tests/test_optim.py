"""core.optim: the seed's one-cycle lr and beta1 (parity with torch), frozen parameter groups,
torch Adam and the epoch-stepped schedules (parity with torch), no_decay patterns, optim_block."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from cxrjax.core import checks, loop
from cxrjax.core.task import compile_task
from cxrjax.core import optim as optim_lib
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

  def loss(params, batch, ctx):
    return task.loss({**params["body"], **params["head"]}, batch, ctx)

  return loop.Task("frozen", init, loss)


def test_frozen_group_stays_and_head_trains(tmp_path):
  optim = dict(name="adamw", lr=1e-2, schedule="constant", weight_decay=1e-2, frozen=("body",))
  compiled = compile_task(_two_group_task(), mesh=create_mesh(), optim=optim, num_steps=10)
  state = compiled.init(0)
  body0, head0 = jax.device_get(state.params["body"]), jax.device_get(state.params["head"])
  stats0 = jax.device_get(state.collections["batch_stats"])
  data = make_data()
  step = compiled.bind()
  for _ in range(5):
    state, _ = step(state, next(data))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params["body"]), body0)
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), jax.device_get(state.params["head"]), head0)
  assert min(jax.tree.leaves(moved)) > 0
  # Batch statistics still move: a frozen backbone in train mode (the FMKD seed's LP leak).
  assert any(float(np.abs(a - b).max()) > 0 for a, b in
             zip(jax.tree.leaves(jax.device_get(state.collections["batch_stats"])),
                 jax.tree.leaves(stats0)))
  # The gradient into the frozen group is stopped, not just discarded: none is computed.
  def dots(frozen):
    c = compile_task(_two_group_task(), mesh=create_mesh(), optim={**optim, "frozen": frozen},
                     num_steps=10)
    return c.step.lower(c.init(0), next(data), None, None).as_text().count("dot_general")
  assert dots(("body",)) < dots(())


def test_frozen_unknown_group_is_a_clear_error():
  optim = dict(name="adamw", lr=1e-2, schedule="constant", frozen=("backbone",))
  with pytest.raises(ConfigError, match="backbone"):
    compile_task(_two_group_task(), mesh=create_mesh(), optim=optim, num_steps=10)


def test_collection_a_loss_does_not_return_is_carried_unchanged():
  task = make_task()
  quiet = loop.Task("quiet", task.init,
                    lambda p, b, ctx: (lambda v: (v[0], {"terms": v[1]["terms"]}))(task.loss(p, b, ctx)))
  compiled = compile_task(quiet, mesh=create_mesh(), optim=dict(lr=1e-2, schedule="constant"),
                          num_steps=10)
  state = compiled.init(0)
  stats0 = jax.device_get(state.collections["batch_stats"])
  state, _ = compiled.bind()(state, next(make_data()))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.collections["batch_stats"]), stats0)


# --- torch Adam (coupled L2), epoch-stepped schedules, no_decay patterns, optim_block ---------

def _torch_adam(x0, b0, grad, steps, *, lr, weight_decay, clip):
  """(w, b) after `steps` of torch Adam, w decayed and the bias b not (two param groups)."""
  torch = pytest.importorskip("torch")
  w, b = torch.nn.Parameter(torch.tensor(x0)), torch.nn.Parameter(torch.tensor(b0))
  opt = torch.optim.Adam([{"params": [w], "weight_decay": weight_decay},
                          {"params": [b], "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.99), eps=1e-7)
  for step in range(steps):
    gw, gb = grad(step, w.detach().numpy(), b.detach().numpy())
    w.grad, b.grad = torch.tensor(gw), torch.tensor(gb)
    if clip:
      torch.nn.utils.clip_grad_norm_([w, b], clip)
    opt.step()
  return w.detach().numpy(), b.detach().numpy()


@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_adam_with_coupled_weight_decay_matches_torch(clip):
  # ndim>=2 decays the kernel and not the bias, as the two torch groups do; gradients of
  # norm > 1 so the clip acts (torch divides by norm + 1e-6, hence the tolerance).
  rng = np.random.default_rng(0)
  x0 = rng.normal(size=(3, 4)).astype(np.float32)
  b0 = rng.normal(size=(4,)).astype(np.float32)
  grad = lambda step, w, b: ((w * (1 + step % 3) + 0.5).astype(np.float32),
                             (np.sin(b + step) * 3).astype(np.float32))
  want_w, want_b = _torch_adam(x0, b0, grad, 25, lr=1e-2, weight_decay=0.1, clip=clip)
  tx, _ = make_optimizer(dict(name="adam", lr=1e-2, schedule="constant", weight_decay=0.1,
                              weight_decay_mask="ndim>=2", b1=0.9, b2=0.99, eps=1e-7,
                              grad_clip=clip), 25)
  p = {"w": jnp.asarray(x0), "b": jnp.asarray(b0)}
  state = tx.init(p)
  update = jax.jit(tx.update)
  for step in range(25):
    gw, gb = grad(step, np.asarray(p["w"]), np.asarray(p["b"]))
    updates, state = update({"w": jnp.asarray(gw), "b": jnp.asarray(gb)}, state, p)
    p = optax.apply_updates(p, updates)
  assert np.abs(np.asarray(p["w"]) - want_w).max() <= 1e-6
  assert np.abs(np.asarray(p["b"]) - want_b).max() <= 1e-6
  # Coupled decay differs from adamw's decoupled one: the test would notice a mix-up.
  assert np.abs(x0 - want_w).max() > 1e-2


def test_adam_frozen_group_stays():
  tx, _ = make_optimizer(dict(name="adam", lr=1e-2, schedule="constant", weight_decay=0.1,
                              frozen=("body",)), 10)
  p = {"body": {"w": jnp.ones((2, 2))}, "head": {"w": jnp.ones((2, 2))}}
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, p), tx.init(p), p)
  np.testing.assert_array_equal(updates["body"]["w"], np.zeros((2, 2)))
  assert np.all(np.asarray(updates["head"]["w"]) < 0)


def _torch_epoch_lrs(make_scheduler, total, steps_per_epoch):
  """lr at each optimizer step of torch SGD(lr=0.1) + a scheduler stepped after each epoch."""
  torch = pytest.importorskip("torch")
  opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
  sched = make_scheduler(torch.optim.lr_scheduler, opt)
  lrs = []
  for step in range(total):
    lrs.append(opt.param_groups[0]["lr"])
    opt.step()
    if (step + 1) % steps_per_epoch == 0:
      sched.step()
  return np.array(lrs)


@pytest.mark.parametrize("total,steps_per_epoch", [(50, 5), (53, 5), (7, 1), (300, 12)])
def test_epoch_linear_matches_cyclegan_lambda_rule(total, steps_per_epoch):
  epochs = total // steps_per_epoch
  # pytorch-CycleGAN / PathomicFusion define_scheduler, lr_policy='linear', verbatim.
  epoch_count, niter, niter_decay = 1, 0, epochs

  def lambda_rule(epoch):
    return 1.0 - max(0, epoch + epoch_count - niter) / float(niter_decay + 1)

  want = _torch_epoch_lrs(lambda s, opt: s.LambdaLR(opt, lr_lambda=lambda_rule), total,
                          steps_per_epoch)
  lr = make_schedule(name="epoch_linear", lr=0.1, total_steps=total,
                     steps_per_epoch=steps_per_epoch)
  got = np.asarray(jax.vmap(lr)(jnp.arange(total)))
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
  assert got[0] == pytest.approx(0.1 * epochs / (epochs + 1))


@pytest.mark.parametrize("total,steps_per_epoch,step_epochs,gamma",
                         [(60, 3, 4, 0.5), (100, 7, 1, 0.9), (40, 10, 3, 0.1), (20, 2, 2, 1.0)])
def test_epoch_step_matches_torch_step_lr(total, steps_per_epoch, step_epochs, gamma):
  want = _torch_epoch_lrs(lambda s, opt: s.StepLR(opt, step_size=step_epochs, gamma=gamma), total,
                          steps_per_epoch)
  tx, lr = make_optimizer(dict(name="sgd", lr=0.1, schedule="epoch_step", momentum=0.0,
                               steps_per_epoch=steps_per_epoch, step_epochs=step_epochs,
                               gamma=gamma), total)
  np.testing.assert_allclose(np.asarray(jax.vmap(lr)(jnp.arange(total))), want, rtol=1e-6)
  # The optimizer uses the same lr: plain SGD on a unit gradient moves by -lr(step).
  p = jnp.zeros(())
  state = tx.init(p)
  for step in range(total):
    updates, state = tx.update(jnp.ones(()), state, p)
    assert float(updates) == pytest.approx(-want[step], rel=1e-6)


def test_epoch_schedules_reject_warmup_and_missing_keys():
  base = dict(name="adam", lr=1e-3, steps_per_epoch=10)
  for schedule in ("epoch_linear", "epoch_step"):
    with pytest.raises(ConfigError, match="warmup_steps"):
      make_optimizer({**base, "schedule": schedule, "warmup_steps": 5, "step_epochs": 1}, 100)
    with pytest.raises(ConfigError, match="steps_per_epoch"):
      make_optimizer({**base, "schedule": schedule, "steps_per_epoch": 0, "step_epochs": 1}, 100)
  with pytest.raises(ConfigError, match="step_epochs"):
    make_optimizer({**base, "schedule": "epoch_step"}, 100)
  with pytest.raises(ConfigError, match="gamma"):
    make_optimizer({**base, "schedule": "epoch_step", "step_epochs": 2, "gamma": 1.5}, 100)
  with pytest.raises(ConfigError, match="steps_per_epoch"):  # fewer steps than one epoch
    make_optimizer({**base, "schedule": "epoch_linear"}, 9)


NO_DECAY = ("*/bias", "*cls_token", "*mask_token", "*pos_embed*", "*LayerNorm*/scale")


def _vit_like_params():
  return {"encoder": {"Dense_0": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)},
                      "LayerNorm_0": {"scale": jnp.ones(4), "bias": jnp.ones(4)}},
          "cls_token": jnp.ones((1, 1, 4)), "pos_embed": jnp.ones((1, 5, 4)),
          "query": jnp.ones(4)}


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd"])
@pytest.mark.parametrize("rule,decayed", [("ndim>=2", {"encoder/Dense_0/kernel"}),
                                          ("all", {"encoder/Dense_0/kernel", "query"}),
                                          ("none", set())])
def test_no_decay_patterns_exempt_leaves(name, rule, decayed):
  # Zero gradients, so only weight decay moves a leaf. cls_token and pos_embed have ndim 3
  # (the rule alone would decay them); query matches no pattern (only the rule decides).
  tx, _ = make_optimizer(dict(name=name, lr=0.1, schedule="constant", weight_decay=0.5,
                              weight_decay_mask=rule, no_decay=NO_DECAY), 10)
  params = _vit_like_params()
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  moved = {path for path, u in _paths(updates) if np.abs(np.asarray(u)).max() > 0}
  assert moved == decayed


def test_decay_mask_by_path():
  mask = dict(_paths(optim_lib.decay_mask(_vit_like_params(), "all", NO_DECAY)))
  assert mask == {"encoder/Dense_0/kernel": True, "encoder/Dense_0/bias": False,
                  "encoder/LayerNorm_0/scale": False, "encoder/LayerNorm_0/bias": False,
                  "cls_token": False, "pos_embed": False, "query": True}
  # Patterns are case-sensitive and match the whole path.
  mask = dict(_paths(optim_lib.decay_mask(_vit_like_params(), "all", ("bias", "*layernorm*"))))
  assert mask["encoder/Dense_0/bias"] and mask["encoder/LayerNorm_0/scale"]
  with pytest.raises(ConfigError, match="no_decay"):
    make_optimizer(dict(name="adamw", lr=0.1, schedule="constant", no_decay="*/bias"), 10)


def _paths(tree):
  return [(optim_lib.param_path(path), leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _optim_block(**kw):
  block = dict(name="adamw", lr=1e-3, weight_decay=0.0, weight_decay_mask="ndim>=2",
               schedule="cosine", warmup_steps=0, grad_clip=0.0)
  return ml_collections.ConfigDict({**block, **kw})


def test_optim_block_accepts_old_and_new_blocks():
  checks.optim_block(_optim_block(), "train.optim")  # no new keys at all
  checks.optim_block(_optim_block(name="adam", schedule="epoch_linear", steps_per_epoch=10,
                                  no_decay=("*/bias", "*cls_token")), "train.optim")
  checks.optim_block(_optim_block(name="sgd", schedule="epoch_step", steps_per_epoch=10,
                                  gamma=0.5, step_epochs=3, no_decay=["*/bias"]), "train.optim")


@pytest.mark.parametrize("kw,field", [
    (dict(name="rmsprop"), "train.optim.name"),
    (dict(schedule="epoch_linear"), "train.optim.steps_per_epoch"),
    (dict(schedule="epoch_step", steps_per_epoch=0, step_epochs=1), "train.optim.steps_per_epoch"),
    (dict(schedule="epoch_linear", steps_per_epoch=10, warmup_steps=5), "train.optim.warmup_steps"),
    (dict(schedule="epoch_step", steps_per_epoch=10, step_epochs=2, gamma=0.0),
     "train.optim.gamma"),
    (dict(schedule="epoch_step", steps_per_epoch=10, step_epochs=2, gamma=1.5),
     "train.optim.gamma"),
    (dict(schedule="epoch_step", steps_per_epoch=10), "train.optim.step_epochs"),
    (dict(schedule="epoch_step", steps_per_epoch=10, step_epochs=0), "train.optim.step_epochs"),
    (dict(no_decay="*/bias"), "train.optim.no_decay"),
    (dict(no_decay=("*/bias", 3)), "train.optim.no_decay")])
def test_optim_block_names_the_bad_field(kw, field):
  with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
    checks.optim_block(_optim_block(**kw), "train.optim")
