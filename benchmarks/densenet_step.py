"""Train-step throughput of the DenseNet classifiers (models.densenet), with MFU.

  python benchmarks/densenet_step.py                          # DenseNet-121, batch 16, 224x224, fp32
  python benchmarks/densenet_step.py --concat concat buffer   # both dense-block variants
  python benchmarks/densenet_step.py --dtype bfloat16 --batch 128 --peak_tflops 989   # on a GPU

The step is the one the training loop runs (core.task.compile_task): BCE-with-logits on 14
labels (losses.classification.masked_sigmoid_bce), batch norm in train mode with its running stats
updated through the task's aux['batch_stats'], SGD with momentum 0.9 (--optim adamw for AdamW),
the NaN guard, jitted with the state donated. Inputs are 3-channel (the torchvision reference
configuration). Prints one JSON line per (model, concat, remat, batch, dtype): s/step and
images/s as the median of --repeats timed steps after compilation and 2 warm-up steps, plus the
median process CPU seconds per step (all threads): on a shared machine wall time swings with
the neighbours' load, CPU time much less, so compare variants by both.

Model FLOP per step = 3 x the analytic forward conv + linear FLOPs that cxrjax runs
(models.densenet.flops_per_example with its transitions pooled before their convolution, 2 x
MACs; 5.21 GFLOP per 224x224 image for DenseNet-121, torchvision's count is 5.67).
MFU is against --peak_tflops when given (a GPU's nominal dense peak), else against this CPU's
large fp32 matmul throughput measured in the same run. The PyTorch reference is
benchmarks/densenet_step_torch.py. Runs under tcmalloc when installed (cxrjax.core.allocator).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from common import matmul_peak_flops, time_train_step  # benchmarks/common.py


def densenet_task(model, size: int):
  """A core Task training `model` (3-channel size x size inputs) with masked BCE; the loss
  returns the updated batch_stats, which the loop keeps when the step is finite."""
  import jax.numpy as jnp
  from cxrjax.core.task import Task
  from cxrjax.losses.classification import masked_sigmoid_bce

  def init(rng):
    return model.init(rng, jnp.zeros((1, size, size, 3), jnp.float32), train=False)

  def loss(params, batch, ctx):
    (logits, _), updates = model.apply({"params": params, **ctx.state},
                                       batch["image"], train=True, mutable=["batch_stats"])
    value = masked_sigmoid_bce(logits, batch["labels"])
    return value, {"terms": {"bce": value}, "state": {"batch_stats": updates["batch_stats"]}}

  return Task(name="densenet", init=init, loss=loss)


def bench(args, model_depth: int, concat: str, remat: bool, batch: int, dtype: str,
          barriers: str) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from cxrjax.core.mesh import create_mesh, global_batch, process_slice
  from cxrjax.core.task import compile_task
  from cxrjax.models.densenet import BLOCK_CONFIGS, DenseNet, flops_per_example, num_params

  model = DenseNet(block_config=BLOCK_CONFIGS[model_depth], num_classes=14, concat=concat,
                   remat=remat, fusion_barriers={"auto": None, "on": True, "off": False}[barriers],
                   dtype=jnp.dtype(dtype))
  mesh = create_mesh()
  optim = {"name": args.optim, "lr": 0.01, "schedule": "constant", "momentum": 0.9}
  compiled = compile_task(densenet_task(model, args.size), mesh=mesh, optim=optim, num_steps=10_000)
  state = compiled.init(0)
  rng = np.random.default_rng(0)
  local = process_slice(batch)
  host = {"image": rng.normal(size=(batch, args.size, args.size, 3)).astype(np.float32),
          "labels": (rng.uniform(size=(batch, 14)) > 0.5).astype(np.float32)}
  gbatch = global_batch({k: v[local] for k, v in host.items()}, mesh)
  state, timing = time_train_step(compiled.bind(), state, gbatch, args.repeats)
  sec = timing["sec_per_step"]
  flop = 3 * batch * flops_per_example(BLOCK_CONFIGS[model_depth], args.size, 3, 14,
                                       pool_first_transitions=True)
  return {"model": f"densenet{model_depth}", "concat": concat, "remat": remat,
          "fusion_barriers": barriers, "batch": batch,
          "size": args.size, "dtype": dtype, "optim": args.optim,
          "params": num_params(state.params), "images_per_s": batch / sec,
          **timing, "model_flop_per_step": flop, "achieved_flop_per_s": flop / sec,
          "backend": jax.default_backend(),
          "devices": jax.device_count(), "device_kind": jax.devices()[0].device_kind}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", nargs="+", type=int, choices=(121, 169), default=[121])
  parser.add_argument("--batch", nargs="+", type=int, default=[16])
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--dtype", nargs="+", default=["float32"])
  parser.add_argument("--concat", nargs="+", choices=("concat", "buffer"), default=["concat"])
  parser.add_argument("--remat", nargs="+", type=int, choices=(0, 1), default=[0])
  parser.add_argument("--fusion_barriers", nargs="+", choices=("auto", "on", "off"),
                      default=["auto"], help="DenseNet(fusion_barriers=): auto = on CPU only")
  parser.add_argument("--optim", choices=("sgd", "adamw"), default="sgd")
  parser.add_argument("--repeats", type=int, default=5, help="timed steps")
  parser.add_argument("--peak_tflops", type=float, default=0.0,
                      help="nominal dense peak of the accelerator for MFU (e.g. 989 for H100 bf16)")
  args = parser.parse_args()
  import jax
  from cxrjax.core.allocator import active_allocator
  peak = args.peak_tflops * 1e12 if args.peak_tflops else matmul_peak_flops()
  print(json.dumps({"reference": "nominal" if args.peak_tflops else "measured_fp32_matmul",
                    "peak_flop_per_s": peak, "backend": jax.default_backend(),
                    "allocator": active_allocator(), "loadavg": os.getloadavg()}), flush=True)
  for depth in args.model:
    for concat in args.concat:
      for remat in args.remat:
        for batch in args.batch:
          for dtype in args.dtype:
            for barriers in args.fusion_barriers:
              row = bench(args, depth, concat, bool(remat), batch, dtype, barriers)
              row["mfu"] = row["achieved_flop_per_s"] / peak
              print(json.dumps(row), flush=True)


if __name__ == "__main__":
  # The PyTorch reference runs under tcmalloc too: compare like with like unless told otherwise.
  from cxrjax.core.allocator import reexec_with_allocator
  reexec_with_allocator([sys.executable, *sys.argv], os.environ.get("CXRJAX_ALLOCATOR", "tcmalloc"))
  main()
