"""RadDiffusion's pretraining step on CPU (or GPU): JAX MAE and diffusion-MAE against PyTorch.

  python benchmarks/raddiffusion_step.py                 # xs, 16 studies x 2 views, 256 px, mask 0.5
  python benchmarks/raddiffusion_step.py --size b --dtype bfloat16 --batch 64 --no_torch  # GPU

The JAX step is the one the training loop runs (core.task.compile_task over
systems.raddiffusion.pretrain.Pretrainer's task: masking, the study encoder with the bottleneck
CLS, the decoder, the masked MSE, AdamW). The reference is transformers' ViTMAEForPreTraining at
the same sizes with the seed's study averaging added (forward hooks replacing each image's CLS
by its study's mean after every encoder and decoder layer, as models/bottleneck.py does), AdamW,
torch 2 threads. The two are timed in alternating rounds in this one process, so the machine's
load moves both alike. Prints JSON lines: each variant's median s/step and images/s, the ratios,
the process's peak RSS, and with --peak_tflops (GPU) the MFU of the JAX steps.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

from common import matmul_peak_flops  # benchmarks/common.py


def jax_steps(args):
  """{scheme: (step, state, batch)} for the JAX MAE and diffusion-MAE steps."""
  import numpy as np
  from cxrjax.core.config import load_config
  from cxrjax.core.mesh import create_mesh, global_batch, process_slice
  from cxrjax.core.task import compile_task
  from cxrjax.systems.raddiffusion.pretrain import pretrainer

  config = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "raddiffusion.py"))
  config.unlock()
  patch = {"xs": 32, "s": 32, "b": 16}[args.size]
  config.model.update(size=args.size, image_size=args.image_size, patch_size=patch,
                      mask_ratio=args.mask_ratio, dtype=args.dtype)
  config.data.image_size = args.image_size
  mesh = create_mesh()
  rng = np.random.default_rng(0)
  local = process_slice(args.batch)
  host = {"images": rng.integers(0, 256, (args.batch, 2, args.image_size, args.image_size),
                                 dtype=np.uint8),
          "view_mask": np.ones((args.batch, 2), bool)}
  batch = global_batch({k: v[local] for k, v in host.items()}, mesh)
  out = {}
  for scheme in ("mae", "diffmae"):
    pt = pretrainer(config, scheme)
    compiled = compile_task(pt.task(scheme, 2), mesh=mesh, optim=config.pretrain.optim.to_dict(),
                            num_steps=10_000)
    out[scheme] = [compiled.bind(), compiled.init(0), batch, pt]
  return out


def torch_step(args):
  """A step function of the PyTorch reference (see the module docstring)."""
  import torch
  from transformers import ViTMAEConfig, ViTMAEForPreTraining
  from cxrjax.models.vit import vit_size
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  s = vit_size(args.size)
  config = ViTMAEConfig(
      image_size=args.image_size, patch_size={"xs": 32, "s": 32, "b": 16}[args.size], num_channels=1,
      hidden_size=s.hidden, num_hidden_layers=s.depth, num_attention_heads=s.heads,
      intermediate_size=s.mlp, decoder_hidden_size=s.decoder_hidden,
      decoder_num_hidden_layers=s.decoder_depth, decoder_num_attention_heads=s.decoder_heads,
      decoder_intermediate_size=s.decoder_mlp, mask_ratio=args.mask_ratio or s.mask_ratio,
      norm_pix_loss=True, layer_norm_eps=1e-12)
  model = ViTMAEForPreTraining(config).train()
  views = 2

  def study_mean_cls(module, inputs, output):
    h = output[0] if isinstance(output, tuple) else output
    cls = h[:, 0].reshape(-1, views, h.shape[-1]).mean(dim=1)
    h = torch.cat([cls.repeat_interleave(views, dim=0)[:, None], h[:, 1:]], dim=1)
    return (h, *output[1:]) if isinstance(output, tuple) else h

  encoder_layers = getattr(model.vit, "layers", None) or model.vit.encoder.layer  # 5.x or 4.x
  for layer in list(encoder_layers) + list(model.decoder.decoder_layers):
    layer.register_forward_hook(study_mean_cls)
  opt = torch.optim.AdamW(model.parameters(), lr=1.4e-4, weight_decay=0.05)
  x = torch.rand(args.batch * views, 1, args.image_size, args.image_size)

  def step():
    opt.zero_grad(set_to_none=True)
    loss = model(pixel_values=x).loss
    loss.backward()
    opt.step()
    return loss.item()

  return step


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", choices=("xs", "s", "b"), default="xs")
  parser.add_argument("--batch", type=int, default=16, help="studies of 2 views")
  parser.add_argument("--image_size", type=int, default=256)
  parser.add_argument("--mask_ratio", type=float, default=0.0, help="0: the size's own")
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--steps_per_round", type=int, default=3)
  parser.add_argument("--no_torch", action="store_true")
  parser.add_argument("--peak_tflops", type=float, default=0.0,
                      help="nominal dense peak of the accelerator for MFU (e.g. 989 for H100 bf16)")
  args = parser.parse_args()
  import jax
  from cxrjax.core.allocator import active_allocator
  from cxrjax.models.vit import flops_per_view
  peak = args.peak_tflops * 1e12 if args.peak_tflops else matmul_peak_flops()
  print(json.dumps({"reference": "nominal" if args.peak_tflops else "measured_fp32_matmul",
                    "peak_flop_per_s": peak, "backend": jax.default_backend(),
                    "device_kind": jax.devices()[0].device_kind, "allocator": active_allocator(),
                    "loadavg": os.getloadavg()}), flush=True)
  runs = jax_steps(args)
  compile_s = {}
  for scheme, run in runs.items():  # compile + two warm-up steps
    t0 = time.perf_counter()
    for _ in range(3):
      run[1], metrics = run[0](run[1], run[2])
    jax.block_until_ready(metrics)
    compile_s[scheme] = time.perf_counter() - t0
  torch_fn = None if args.no_torch else torch_step(args)
  if torch_fn:
    for _ in range(2):
      torch_fn()
  times = {k: [] for k in (*runs, *(("torch",) if torch_fn else ()))}
  for _ in range(args.rounds):  # alternating rounds
    for scheme, run in runs.items():
      t0 = time.perf_counter()
      for _ in range(args.steps_per_round):
        run[1], metrics = run[0](run[1], run[2])
      jax.block_until_ready((run[1], metrics))
      times[scheme].append((time.perf_counter() - t0) / args.steps_per_round)
    if torch_fn:
      t0 = time.perf_counter()
      for _ in range(args.steps_per_round):
        torch_fn()
      times["torch"].append((time.perf_counter() - t0) / args.steps_per_round)
  sec = {k: statistics.median(v) for k, v in times.items()}
  images = 2 * args.batch
  # Model FLOPs of the encoder (3x forward for a training step); the small decoder is left out.
  flop = 3 * images * flops_per_view(args.size, args.mask_ratio or None)
  for k, v in sec.items():
    row = {"variant": k, "size": args.size, "studies": args.batch, "views": 2,
           "image_size": args.image_size, "dtype": args.dtype if k != "torch" else "float32",
           "sec_per_step": v, "images_per_s": images / v, "times": [round(t, 4) for t in times[k]],
           "compile_and_warmup_s": compile_s.get(k)}
    if k != "torch":
      row["encoder_flop_per_step"] = flop
      row["mfu_encoder"] = flop / v / peak
    print(json.dumps(row), flush=True)
  summary = {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
             "diffmae_over_mae": sec["diffmae"] / sec["mae"], "loadavg_at_end": os.getloadavg()}
  if torch_fn:
    summary["torch_over_jax_mae"] = sec["torch"] / sec["mae"]
  print(json.dumps(summary), flush=True)


if __name__ == "__main__":
  from cxrjax.core.allocator import reexec_with_allocator
  reexec_with_allocator([sys.executable, *sys.argv], os.environ.get("CXRJAX_ALLOCATOR", "tcmalloc"))
  main()
