"""benchmarks/common.time_train_step: the loop every step benchmark times with."""
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
