"""A tiny regression task shared by the core tests (not a test module itself)."""
import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from cxrjax.core.loop import Task
from cxrjax.data.iterators import ShuffledBatches


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dense(16)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    return nn.Dense(1)(nn.relu(x))[:, 0]


def make_task(name="toy", nan_at_step=None):
  model = MLP()

  def init(rng):
    return dict(model.init(rng, jnp.zeros((1, 4))))

  def loss(params, batch, ctx):
    pred, updates = model.apply({"params": params, "batch_stats": ctx.state["batch_stats"]},
                                batch["x"], train=True, mutable=["batch_stats"])
    mse = jnp.mean((pred - batch["y"]) ** 2)
    if nan_at_step is not None:  # poison one step's loss through the data
      mse = mse * batch["poison"].mean()
    return mse, {"terms": {"mse": mse}, "state": {"batch_stats": updates["batch_stats"]}}

  return Task(name=name, init=init, loss=loss)


def make_data(n=96, batch=16, seed=0, poison_batch=None):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(n, 4)).astype(np.float32)
  y = (x @ np.array([1.0, -2.0, 0.5, 3.0], np.float32) + 0.1).astype(np.float32)
  arrays = {"x": x, "y": y}
  it = ShuffledBatches(arrays, batch, seed=seed)
  if poison_batch is not None:
    arrays["poison"] = np.ones(n, np.float32)
    it = _Poisoned(ShuffledBatches(arrays, batch, seed=seed), poison_batch)
  return it


class _Poisoned:
  def __init__(self, inner, bad):
    self.inner, self.bad = inner, bad

  def __next__(self):
    pos = self.inner.position
    b = next(self.inner)
    if pos == self.bad:
      b["poison"] = np.full_like(b["poison"], np.nan)
    return b

  def get_state(self):
    return self.inner.get_state()

  def set_state(self, s):
    self.inner.set_state(s)


OPTIM = dict(name="adamw", lr=1e-2, schedule="cosine", warmup_steps=3, weight_decay=1e-4,
             grad_clip=1.0)
EMA = dict(beta=0.99, update_after_step=2, update_every=2)
