"""XLA CPU flags cxrjax sets by default (``CXRJAX_XLA_CPU_DEFAULTS=0`` turns them off).

jaxlib 0.10 runs convolutions on CPU through YNNPACK. For the convolutions of DenseNet and the
phantom CNNs its kernels are slower than XLA's older Eigen path, so cxrjax hands convolutions
back to Eigen (``--xla_cpu_experimental_ynn_fusion_type=-individual_convolution``; dots stay
on YNNPACK, which is faster for them). Measured on the 2-core development machine, fp32:

  3x3 convolution 128->32 at (16, 56, 56): forward 39 -> 26 ms, forward + backward 147 -> 98 ms
  DenseNet-121 train step, batch 16 at 224x224: 3.77 -> 3.02 s (benchmarks/densenet_step.py)

XLA reads XLA_FLAGS once, when its CPU backend starts, so this must run before the first jax
computation: ``import cxrjax`` does it. It only edits the environment variable (no jax import),
never overrides a ynn fusion setting the user wrote, does nothing on other jaxlib versions
(an unknown flag is fatal to XLA, and the trade-off was measured on 0.10 only), and has no
effect on GPUs.
"""
from __future__ import annotations

import os
from importlib import metadata

EIGEN_CONVOLUTIONS = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
_TESTED_JAXLIB = ("0.10.",)


def default_flags(jaxlib_version: str | None) -> list[str]:
  """The flags cxrjax adds for this jaxlib version (empty when the version was not measured)."""
  if jaxlib_version is None or not jaxlib_version.startswith(_TESTED_JAXLIB):
    return []
  return [EIGEN_CONVOLUTIONS]


def merged_xla_flags(existing: str, flags: list[str]) -> str:
  """`existing` XLA_FLAGS plus each of `flags` whose option the user did not already set."""
  out = existing.split()
  for flag in flags:
    option = flag.split("=", 1)[0]
    if not any(f.split("=", 1)[0] == option for f in out):
      out.append(flag)
  return " ".join(out)


def apply_defaults(environ=os.environ) -> None:
  """Add cxrjax's default XLA CPU flags to environ['XLA_FLAGS'] (see the module docstring)."""
  if environ.get("CXRJAX_XLA_CPU_DEFAULTS", "1") == "0":
    return
  try:
    version = metadata.version("jaxlib")
  except metadata.PackageNotFoundError:
    version = None
  flags = default_flags(version)
  if flags:
    environ["XLA_FLAGS"] = merged_xla_flags(environ.get("XLA_FLAGS", ""), flags)
