"""PyTorch reference for benchmarks/densenet_step.py: a DenseNet train step on CPU.

  python benchmarks/densenet_step_torch.py                  # DenseNet-121, batch 16, 224x224, 2 threads

A compact DenseNet with torchvision's module names and code path (concatenate the feature list
in every layer, BN -> ReLU -> conv), fp32, channels-first as torchvision runs by default, SGD
with momentum, BCE-with-logits on 14 labels, batch norm in train mode. torchvision itself is not
installed beside torch 2.13 here, hence the copy (tests/test_densenet.py has the same one). Prints
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
from collections import OrderedDict

BLOCKS = {"121": (6, 12, 24, 16), "169": (6, 12, 32, 32)}


def build_densenet(block_config, num_classes: int, in_chans: int = 3, growth: int = 32,
                   bn_size: int = 4, init_features: int = 64):
  """torchvision.models.DenseNet's structure and state-dict names, without the package."""
  import torch
  from torch import nn

  class DenseLayer(nn.Module):
    def __init__(self, cin):
      super().__init__()
      self.norm1 = nn.BatchNorm2d(cin)
      self.relu1 = nn.ReLU(inplace=True)
      self.conv1 = nn.Conv2d(cin, bn_size * growth, 1, bias=False)
      self.norm2 = nn.BatchNorm2d(bn_size * growth)
      self.relu2 = nn.ReLU(inplace=True)
      self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)

    def forward(self, feats):
      x = self.conv1(self.relu1(self.norm1(torch.cat(feats, 1))))
      return self.conv2(self.relu2(self.norm2(x)))

  class DenseBlock(nn.ModuleDict):
    def forward(self, x):
      feats = [x]
      for layer in self.values():
        feats.append(layer(feats))
      return torch.cat(feats, 1)

  class DenseNet(nn.Module):
    def __init__(self):
      super().__init__()
      self.features = nn.Sequential(OrderedDict([
          ("conv0", nn.Conv2d(in_chans, init_features, 7, 2, 3, bias=False)),
          ("norm0", nn.BatchNorm2d(init_features)), ("relu0", nn.ReLU(inplace=True)),
          ("pool0", nn.MaxPool2d(3, 2, 1))]))
      c = init_features
      for i, n in enumerate(block_config):
        block = DenseBlock()
        for j in range(n):
          block.add_module(f"denselayer{j + 1}", DenseLayer(c + j * growth))
        self.features.add_module(f"denseblock{i + 1}", block)
        c += n * growth
        if i != len(block_config) - 1:
          self.features.add_module(f"transition{i + 1}", nn.Sequential(OrderedDict([
              ("norm", nn.BatchNorm2d(c)), ("relu", nn.ReLU(inplace=True)),
              ("conv", nn.Conv2d(c, c // 2, 1, bias=False)), ("pool", nn.AvgPool2d(2, 2))])))
          c //= 2
      self.features.add_module("norm5", nn.BatchNorm2d(c))
      self.classifier = nn.Linear(c, num_classes)
      for m in self.modules():  # torchvision's initialisation
        if isinstance(m, nn.Conv2d):
          nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, nn.BatchNorm2d):
          nn.init.constant_(m.weight, 1)
          nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.Linear):
          nn.init.constant_(m.bias, 0)

    def forward(self, x):
      f = torch.relu(self.features(x))
      return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(f, 1), 1))

  return DenseNet()


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
  model = build_densenet(BLOCKS[args.model], 14).train()
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
