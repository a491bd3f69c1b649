"""Train-step throughput of the CXR->CTPA diffusion prior, with MFU.

  python benchmarks/prior_step.py                      # paper, ref_small, default; batch 64
  python benchmarks/prior_step.py --variants default --batch 64 256 --dtype bfloat16

Prints one JSON line per (variant, batch, dtype): steps/s and examples/s (median over
--repeats timed runs of --steps steps after warm-up), parameter count, model FLOP per
step (3x the forward matmul FLOPs, models.prior.flops_per_example), achieved FLOP/s and
its fraction of a reference: on CPU the machine's own large fp32 matmul throughput
measured here (the practical peak), on GPU the device's nominal dense peak (--peak_tflops).
The step is the one the training loop runs (core.task.compile_task): the full loss with
the frozen classifier head, AdamW, clipping, EMA and the NaN guard.

Runs under tcmalloc when the library is installed, as the reference PyTorch figures did
(``CXRJAX_ALLOCATOR=system`` for the process's own malloc; see cxrjax/core/allocator.py).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from common import matmul_peak_flops, time_train_step  # benchmarks/common.py

import jax
import jax.numpy as jnp
import numpy as np

from cxrjax.core import diffusion
from cxrjax.core.allocator import active_allocator
from cxrjax.core.config import load_config
from cxrjax.core.mesh import create_mesh, global_batch, process_slice, replicated
from cxrjax.core.task import compile_task
from cxrjax.models.heads import EmbeddingClassifier
from cxrjax.models.prior import flops_per_example, num_params
from cxrjax.systems.prior.diffusion_prior import build_network, ema_kwargs, prior_task
from cxrjax.tasks.embedding_head import TrainedHead

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The small reference: the seed's PyTorch prior at dim 256, depth 4, 4 heads, 81 tokens.
REFERENCE_SMALL = {"data.synthetic.ctpa_dim": 256, "data.synthetic.cxr_dim": 256,
                   "prior.max_text_len": 77}


def bench(variant: str, batch: int, dtype: str, steps: int, repeats: int) -> dict:
  if variant == "ref_small":
    config = load_config(os.path.join(ROOT, "configs", "prior.py"), REFERENCE_SMALL)
  else:
    config = load_config(os.path.join(ROOT, "configs", f"prior.py:{variant}"))
  config.unlock()
  dim = config.data.synthetic.ctpa_dim
  config.train.batch_size = batch
  config.prior.dtype = dtype
  net = build_network(config, dim, dim)
  sched = diffusion.make_schedule(config.diffusion.schedule, config.diffusion.timesteps)
  head = EmbeddingClassifier(hidden=tuple(config.classifier.hidden))
  teacher = TrainedHead(head, {"params": head.init(jax.random.PRNGKey(1), jnp.zeros((1, dim)))["params"],
                               "mean": np.zeros(dim, np.float32), "inv_std": np.ones(dim, np.float32)})
  task = prior_task(net, sched, cxr_dim=dim, config=config, teacher=teacher,
                    unnormalize=lambda z: z * 2.0 + 0.5)
  mesh = create_mesh()
  compiled = compile_task(task, mesh=mesh, optim=config.train.optim.to_dict(), num_steps=10_000,
                          ema=ema_kwargs(config))
  state = compiled.init(0)
  rng = np.random.default_rng(0)
  local = process_slice(batch)
  host = {"cxr": rng.uniform(-1, 1, (batch, dim)).astype(np.float32),
          "ctpa": rng.uniform(-1, 1, (batch, dim)).astype(np.float32),
          "label": np.full((batch,), np.nan, np.float32)}
  gbatch = global_batch({k: v[local] for k, v in host.items()}, mesh)
  frozen = jax.device_put({"teacher": teacher.variables}, replicated(mesh))
  state, timing = time_train_step(compiled.bind(frozen), state, gbatch, repeats,
                                  steps_per_repeat=steps)
  sec = timing["sec_per_step"]
  p = config.prior
  seq = p.max_text_len + 4
  flop = 3 * batch * flops_per_example(dim, p.depth, p.heads, p.dim_head, p.ff_mult, seq)
  return {"variant": variant, "batch": batch, "dtype": dtype, "seq_len": seq,
          "params": num_params(state.params), "steps_per_s": 1 / sec,
          "examples_per_s": batch / sec, "model_flop_per_step": flop,
          "achieved_flop_per_s": flop / sec, **timing, "backend": jax.default_backend(),
          "devices": jax.device_count(), "device_kind": jax.devices()[0].device_kind}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variants", nargs="+", default=["paper", "ref_small", "default"],
                      help="config variants; ref_small = default at dim 256 with 81 tokens")
  parser.add_argument("--batch", nargs="+", type=int, default=[64])
  parser.add_argument("--dtype", nargs="+", default=["float32"])
  parser.add_argument("--steps", type=int, default=3, help="timed steps per repeat")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--peak_tflops", type=float, default=0.0,
                      help="nominal dense peak of the accelerator for MFU (e.g. 989 for H100 bf16)")
  args = parser.parse_args()
  peak = args.peak_tflops * 1e12 if args.peak_tflops else matmul_peak_flops()
  print(json.dumps({"reference": "nominal" if args.peak_tflops else "measured_fp32_matmul",
                    "peak_flop_per_s": peak, "backend": jax.default_backend(),
                    "allocator": active_allocator()}), flush=True)
  for variant in args.variants:
    for batch in args.batch:
      for dtype in args.dtype:
        row = bench(variant, batch, dtype, args.steps, args.repeats)
        row["mfu"] = row["achieved_flop_per_s"] / peak
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
  # The reference PyTorch figures were measured with tcmalloc: compare like with like unless
  # told otherwise (CXRJAX_ALLOCATOR=system|glibc_tuned).
  from cxrjax.core.allocator import reexec_with_allocator
  reexec_with_allocator([sys.executable, *sys.argv], os.environ.get("CXRJAX_ALLOCATOR", "tcmalloc"))
  main()
