"""Pure pieces of the core: EMA decay, schedules, weight-decay masks, iterators, shardings."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxrjax.core import ema, optim
from cxrjax.core.errors import ConfigError
from cxrjax.core.mesh import create_mesh, param_sharding
from cxrjax.data.iterators import ShuffledBatches


@pytest.mark.parametrize("k,expected", [(110, 0.79782), (200, 0.95389), (1000, 0.98928),
                                        (13000, 0.99818)])
def test_ema_decay_matches_ema_pytorch_defaults(k, expected):
  mode, decay = ema.ema_decay(k)
  assert int(mode) == 2
  assert float(decay) == pytest.approx(expected, abs=2e-5)


@pytest.mark.parametrize("k,mode", [(0, ema.COPY), (5, ema.KEEP), (50, ema.COPY), (100, ema.COPY),
                                    (105, ema.KEEP)])
def test_ema_copy_and_keep_steps(k, mode):
  assert int(ema.ema_decay(k)[0]) == mode


def test_ema_update_is_exact_on_copy_and_keep():
  params = {"w": jnp.arange(4.0)}
  old = {"w": jnp.full(4, 7.0)}
  np.testing.assert_array_equal(ema.ema_update(old, params, 0)["w"], params["w"])
  np.testing.assert_array_equal(ema.ema_update(old, params, 3)["w"], old["w"])
  _, d = ema.ema_decay(110)
  np.testing.assert_allclose(ema.ema_update(old, params, 110)["w"], d * 7.0 + (1 - d) * params["w"],
                             rtol=1e-6)


def test_warmup_matches_pytorch_linear_warmup():
  sched = optim.make_schedule(name="constant", lr=1.1e-4, total_steps=100, warmup_steps=50)
  assert float(sched(0)) == pytest.approx(1.1e-4 / 50)  # the seed's first step already moves
  assert float(sched(49)) == pytest.approx(1.1e-4)
  assert float(sched(99)) == pytest.approx(1.1e-4)


def test_cosine_and_linear_decay_end_points():
  cos = optim.make_schedule(name="cosine", lr=1.0, total_steps=110, warmup_steps=10, end_lr_factor=0.1)
  lin = optim.make_schedule(name="linear", lr=1.0, total_steps=110, warmup_steps=10)
  assert float(cos(10)) == pytest.approx(1.0) and float(cos(110)) == pytest.approx(0.1)
  assert float(cos(60)) == pytest.approx(0.55)
  assert float(lin(60)) == pytest.approx(0.5) and float(lin(110)) == pytest.approx(0.0)


def test_bad_schedule_and_mask_names():
  with pytest.raises(ConfigError, match="cosine"):
    optim.make_schedule(name="cosin", lr=1.0, total_steps=10)
  with pytest.raises(ConfigError, match="ndim>=2"):
    optim.decay_mask({"w": jnp.ones((2, 2))}, "some")


def test_decay_mask_is_the_dalle2_grouping():
  params = {"dense": {"kernel": jnp.ones((4, 4))}, "norm": {"g": jnp.ones(4)},
            "learned_query": jnp.ones(4), "null_kv": jnp.ones((2, 4))}
  mask = optim.decay_mask(params, "ndim>=2")
  assert mask == {"dense": {"kernel": True}, "norm": {"g": False}, "learned_query": False,
                  "null_kv": True}


def test_adamw_masked_decay_leaves_vectors_alone():
  tx, _ = optim.make_optimizer(dict(name="adamw", lr=0.1, schedule="constant", weight_decay=0.5),
                               total_steps=10)
  params = {"w": jnp.ones((2, 2)), "g": jnp.ones(2)}
  grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
  np.testing.assert_array_equal(updates["g"], np.zeros(2))


def test_iterator_covers_each_epoch_once_and_resumes():
  arrays = {"x": np.arange(10)}
  it = ShuffledBatches(arrays, 5, seed=3)
  epoch = np.concatenate([next(it)["x"] for _ in range(2)])
  assert sorted(epoch) == list(range(10))
  state = it.get_state()
  expected = [next(it)["x"] for _ in range(3)]
  again = ShuffledBatches(arrays, 5, seed=3)
  again.set_state(state)
  for e in expected:
    np.testing.assert_array_equal(next(again)["x"], e)
  with pytest.raises(ValueError, match="seed"):
    ShuffledBatches(arrays, 5, seed=4).set_state(state)


def test_batches_straddle_epochs_with_fixed_shape():
  it = ShuffledBatches({"x": np.arange(7)}, 4, seed=0)
  seen = np.concatenate([next(it)["x"] for _ in range(7)])  # 28 rows = 4 epochs of 7
  assert all(len(b) == 4 for b in np.split(seen, 7))
  for e in range(4):
    assert sorted(seen[7 * e:7 * (e + 1)]) == list(range(7))


def test_fsdp_rule_shards_largest_divisible_dimension():
  mesh = create_mesh(data=1, fsdp=1)
  assert param_sharding((512, 2048), mesh).spec == jax.sharding.PartitionSpec()
  with pytest.raises(ConfigError, match="fsdp"):
    create_mesh(fsdp=3 if jax.device_count() % 3 else 7)


def test_fsdp_mesh_in_eight_device_subprocess(tmp_path):
  """(data=4, fsdp=2): the FSDP rule splits big parameters, and the toy loop on it matches
  the (data=8) mesh, batches being split over both axes."""
  import os
  import subprocess
  import sys
  script = f"""
import sys; sys.path.insert(0, {os.path.dirname(__file__)!r})
import jax, numpy as np
from jax.sharding import PartitionSpec as P
from cxrjax.core import loop as loop_lib
from cxrjax.core.mesh import create_mesh, param_sharding
from toy_task import EMA, OPTIM, make_data, make_task
fsdp = create_mesh(data=4, fsdp=2)
assert param_sharding((512, 2048), fsdp).spec == P(None, 'fsdp'), param_sharding((512, 2048), fsdp)
assert param_sharding((1000, 300), fsdp).spec == P('fsdp', None)
assert param_sharding((7, 9), fsdp).spec == P()
out = []
for i, mesh in enumerate((fsdp, create_mesh())):
  res = loop_lib.train(make_task(), make_data(), mesh=mesh, workdir=sys.argv[1] + str(i),
      schedule=loop_lib.Schedule(num_steps=12, log_every=6, checkpoint_every=6),
      optim=OPTIM, seed=0, ema=EMA, tensorboard=False)
  out.append(jax.tree.leaves(jax.device_get(res.state.params)))
for a, b in zip(*out):
  np.testing.assert_allclose(a, b, atol=1e-6)
print("ok", jax.device_count())
"""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "w")], env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "ok 8" in proc.stdout
