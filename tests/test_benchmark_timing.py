"""benchmarks/common: time_train_step, the loop every step benchmark times with, and
alternate_rounds, the JAX-against-PyTorch scripts' alternating timing."""
import jax.numpy as jnp

from launch_util import load_benchmark

common = load_benchmark("common")


def test_time_train_step_threads_state_and_counts_steps():
  calls = []

  def step(state, batch):
    calls.append(int(state))
    return state + batch, {"loss": jnp.float32(state)}

  state, timing = common.time_train_step(step, jnp.int32(0), jnp.int32(1), repeats=3,
                                         steps_per_repeat=4, warmup=2)
  # compile call + 2 warm-up + 3 rounds of 4; each call sees the state the previous one returned
  assert calls == list(range(1 + 2 + 12)) and int(state) == 15
  assert len(timing["times"]) == 3
  assert sorted(timing["times"])[1] == round(timing["sec_per_step"], 4)  # median of the rounds
  assert timing["sec_per_step"] >= 0 and timing["cpu_s_per_step"] >= 0 and timing["compile_s"] >= 0


def test_alternate_rounds_interleaves_variants_and_divides_by_units():
  order = []

  def run(name, seconds_per_unit):
    def go(n):
      order.append((name, n))
      common.time.sleep(seconds_per_unit * n)
    return go

  times, cpu = common.alternate_rounds({"jax": run("jax", 0.002), "torch": run("torch", 0.01)},
                                       rounds=3, per_round=2)
  assert order == [("jax", 2), ("torch", 2)] * 3  # alternating, per_round units each call
  assert len(times["jax"]) == len(times["torch"]) == len(cpu["jax"]) == 3
  # per unit, not per round: a sleeping run costs its wall time and almost no CPU
  assert all(t >= 0.002 for t in times["jax"]) and all(t >= 0.01 for t in times["torch"])
  assert sorted(times["torch"])[1] > sorted(times["jax"])[1]
  assert sorted(cpu["torch"])[1] < 0.005
