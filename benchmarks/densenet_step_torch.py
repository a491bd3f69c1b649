"""PyTorch reference for benchmarks/densenet_step.py: a DenseNet train step on CPU.

  python benchmarks/densenet_step_torch.py                  # DenseNet-121, batch 16, 224x224, 2 threads

torchvision's DenseNet as cxrjax.models.densenet_torch rebuilds it (the reference of the parity
tests; torchvision itself does not install beside torch 2.13), channels-first as torchvision runs
by default, SGD with momentum, BCE-with-logits on 14 labels, batch norm in train mode. Prints
one JSON line: the median s/step over --repeats timed steps after --warmup steps, and the median
process CPU seconds per step. Runs under tcmalloc when available, like the JAX benchmark
(cxrjax.core.allocator). Needs the `torch` extra; tests never run it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

BLOCKS = {"121": (6, 12, 24, 16), "169": (6, 12, 32, 32)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", choices=sorted(BLOCKS), default="121")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                      help="bfloat16: torch.autocast on CPU (the counterpart of densenet_step.py "
                           "--dtype bfloat16: bf16 convolutions and activations, fp32 parameters)")
  args = parser.parse_args()
  import torch
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  from cxrjax.models.densenet_torch import build_torch_densenet
  model = build_torch_densenet(BLOCKS[args.model], 14).train()
  opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
  x = torch.randn(args.batch, 3, args.size, args.size)
  y = (torch.rand(args.batch, 14) > 0.5).float()

  def step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bfloat16"):
      logits = model(x)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), y)
    loss.backward()
    opt.step()
    return loss.item()

  for _ in range(args.warmup):
    step()
  times, cpu = [], []
  for _ in range(args.repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    step()
    times.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  sec = statistics.median(times)
  print(json.dumps({"framework": "torch", "torch": torch.__version__, "model": f"densenet{args.model}",
                    "batch": args.batch, "size": args.size, "threads": args.threads, "dtype": args.dtype,
                    "sec_per_step": sec, "images_per_s": args.batch / sec, "times": [round(t, 4) for t in times],
                    "cpu_s_per_step": statistics.median(cpu),
                    "allocator": os.environ.get("CXRJAX_ALLOCATOR_ACTIVE", "system"),
                    "loadavg_at_end": os.getloadavg()}), flush=True)


if __name__ == "__main__":
  from cxrjax.core.allocator import reexec_with_allocator
  reexec_with_allocator([sys.executable, *sys.argv], os.environ.get("CXRJAX_ALLOCATOR", "tcmalloc"))
  main()
