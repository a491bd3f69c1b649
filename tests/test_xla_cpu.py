"""cxrjax's default XLA CPU flags (cxrjax/core/xla_cpu.py)."""
import os
import subprocess
import sys

from cxrjax.core import xla_cpu


def test_flags_only_for_measured_jaxlib_versions():
  assert xla_cpu.default_flags("0.10.2") == [xla_cpu.EIGEN_CONVOLUTIONS]
  assert xla_cpu.default_flags("0.11.0") == []
  assert xla_cpu.default_flags(None) == []


def test_merge_keeps_user_flags_and_never_overrides_an_option():
  flag = xla_cpu.EIGEN_CONVOLUTIONS
  assert xla_cpu.merged_xla_flags("", [flag]) == flag
  merged = xla_cpu.merged_xla_flags("--xla_force_host_platform_device_count=8", [flag])
  assert merged.split() == ["--xla_force_host_platform_device_count=8", flag]
  mine = "--xla_cpu_experimental_ynn_fusion_type=dot"
  assert xla_cpu.merged_xla_flags(mine, [flag]) == mine
  assert xla_cpu.merged_xla_flags(flag, [flag]) == flag


def test_opt_out_leaves_environment_alone():
  env = {"CXRJAX_XLA_CPU_DEFAULTS": "0", "XLA_FLAGS": "--a=1"}
  xla_cpu.apply_defaults(env)
  assert env["XLA_FLAGS"] == "--a=1"


_PROBE = """
import cxrjax, jax, jax.numpy as jnp
x = jnp.ones((2, 32, 32, 64)); w = jnp.ones((3, 3, 64, 32))
conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
    x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')))
hlo = conv.lower(x, w).compile().as_text()
assert float(conv(x, w)[0, 4, 4, 0]) == 9 * 64
root = [line for line in hlo.splitlines() if line.lstrip().startswith('ROOT')][-1]
print('ynn-conv' if 'ynn_fusion' in root else 'eigen-conv')
"""


def test_importing_cxrjax_moves_convolutions_off_ynnpack():
  # In a fresh process (XLA reads its flags once): this jaxlib accepts the flag, and with the
  # defaults the compiled convolution is no longer a YNNPACK fusion; with the opt-out it is.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  if not xla_cpu.default_flags(xla_cpu.metadata.version("jaxlib")):
    return  # another jaxlib: cxrjax sets nothing (test_flags_only_for_measured_jaxlib_versions)
  run = lambda e: subprocess.run([sys.executable, "-c", _PROBE], env=e, capture_output=True,
                                 text=True, check=True).stdout.split()[-1]
  assert run(env) == "eigen-conv"
  assert run({**env, "CXRJAX_XLA_CPU_DEFAULTS": "0"}) == "ynn-conv"
