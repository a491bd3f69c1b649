"""RayGen's VQ-GAN train step (spec raygen_and_raddiffusion.md §C.3): JAX against PyTorch.

  python benchmarks/vqgan_step.py                     # the seed's sizes: 256 px, batch 4, fp32
  python benchmarks/vqgan_step.py --perceptual        # + the DenseNet perceptual term on both sides
  python benchmarks/vqgan_step.py --quick             # tiny sizes, 2 rounds: checks the plumbing
  python benchmarks/vqgan_step.py --device gpu --dtype bfloat16 --batch 32 --peak_tflops 989  # H100

Sizes (defaults = the seed's): VQ-GAN ch 128, ch_mult (1,1,2,2,4), 2 res blocks, attention only in
the mid blocks, z = embed = 256, 1024 codes; PatchGAN ndf 64, 3 layers. Loss weights and optimizers
are configs/raygen.py:tokenizer_paper's (L1 1, codebook 1 (legacy, beta 0.25), hinge GAN loss with
disc_weight 0.8 and taming's adaptive weight on the decoder's last kernel, no entropy term; two
Adams with betas (0.5, 0.9), lr 1.8e-5). The perceptual term is off by default (LPIPS-VGG has no
offline weights); --perceptual adds the system's stand-in, a frozen DenseNet's dense-block outputs
compared as LPIPS does with uniform channel weights (--perceptual_net small: configs/raygen.py's
CPU net, (2,2,2,2) x 16; paper: DenseNet-121 as :tokenizer_paper).

JAX: the stage's own step, core.task.compile_task over systems.raygen.tokenizer.vqgan_task (two
updates of one jitted, donated step: the generator with the adaptive weight, then the
discriminator on reconstructions recomputed with the generator's new weights; the PatchGAN's batch
statistics and the code-usage EMA as collections; the NaN guard). The state's step is set to
disc_start (30001), so every timed step runs both updates.
PyTorch: taming-transformers' VQModel (Encoder, Decoder, VectorQuantizer2 legacy), the Pix2Pix
NLayerDiscriminator and VQLPIPSWithDiscriminator's two losses, written compactly here under taming's
state-dict names, NCHW as taming runs: the generator's loss, the adaptive weight by two
autograd.grad on decoder.conv_out.weight, backward, Adam step; then the discriminator's hinge loss
on D(x) and D(x_hat) (x_hat recomputed without a graph), backward, Adam step. Lightning's optimizer
toggling is reproduced with requires_grad. With --perceptual the torch side runs
cxrjax.models.densenet_torch (torchvision's DenseNet) the same way.
Both start from the same weights (torch's init, converted by models.vqgan_convert /
densenet_convert into the JAX state), and the first step of each is compared term by term (L1,
codebook, adversarial, adaptive weight, perceptual, discriminator loss and logits) before any
timing: the run stops when they differ by more than --check_rtol (relative; an absolute floor of
1e-5; the discriminator terms on x_hat, which follow the generator's first Adam step, get 10 x
that), unless --no_check.

Timing: JAX and torch in alternating rounds in this one process (the machine's load moves both
alike), --steps_per_round steps a round, medians over --rounds rounds after compilation and
--warmup steps; torch on --threads threads (default: this machine's cores). Model FLOP per step
(matmul and convolution FLOPs, 2 x MACs, counted from the forward programs' jaxprs) =
4 F_vq + 8 F_D (+ 3 F_P with --perceptual): the generator's forward and backward (3 F_vq), D's
forward and input gradient on x_hat (2 F_D), the perceptual net on x and x_hat and its input
gradient (3 F_P); the discriminator update's x_hat (F_vq) and D's forward and backward on x and
x_hat (6 F_D). The adaptive weight's extra passes (torch backpropagates twice more through D and
the perceptual net) are not counted. Achieved FLOP/s is divided by the same run's large fp32
matmul rate (benchmarks/common.py: 5184x512 @ 512x2048, jit), or by --peak_tflops on a GPU.

Prints JSON lines on stdout (the run's setup, the numerics check, one row per framework, a summary
with torch_over_jax = torch s/step / JAX s/step; the issue's target on CPU: >= 1.0) and a human
summary on stderr; --json_out FILE also writes them to FILE. --device gpu runs torch on CUDA with
TF32 allowed (XLA's default for fp32 on GPUs), --dtype bfloat16 makes the JAX modules compute in
bf16 and torch run under autocast(bfloat16). --no_torch times JAX alone.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import numpy as np

from common import (JsonLines, add_comparison_args, alternate_rounds,  # benchmarks/common.py
                    matmul_peak_flops, parse_comparison_args, select_backend)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = dict(image_size=32, batch=2, ch=32, ch_mult=[1, 2], num_res_blocks=1, z=16, n_embed=64,
             ndf=8, disc_layers=2, rounds=2, steps_per_round=1, warmup=2)
AFTER_UPDATE = ("discriminator/logits_fake", "discriminator/d_loss")  # D(x_hat) after G's update
AFTER_UPDATE_SLACK = 10.0


# ----------------------------------------------------------------------------- FLOP counting

def jaxpr_flops(fn, *args) -> float:
  """Matmul + convolution FLOPs (2 x MACs) of fn(*args)'s jaxpr, sub-jaxprs included."""
  import jax

  def count(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
      name = eqn.primitive.name
      out = eqn.outvars[0].aval.shape if eqn.outvars else ()
      if name == "dot_general":
        (contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        total += 2.0 * math.prod(out) * math.prod(lhs[d] for d in contract)
      elif name == "conv_general_dilated":
        rhs = eqn.invars[1].aval.shape
        total += 2.0 * math.prod(out) * math.prod(
            rhs[d] for d in eqn.params["dimension_numbers"].rhs_spec[1:])
      else:
        subs = [count(getattr(x, "jaxpr", x)) for v in eqn.params.values()
                for x in (v if isinstance(v, (tuple, list)) else (v,))
                if hasattr(getattr(x, "jaxpr", x), "eqns")]
        if subs:
          total += (max(subs) if name == "cond" else sum(subs)) * eqn.params.get("length", 1)
    return total

  return count(jax.make_jaxpr(fn)(*args).jaxpr)


# ----------------------------------------------------------------------------- PyTorch reference
def torch_modules(args, pc):
  """(vq, disc, perceptual feature fn or None, perceptual net or None): taming's modules."""
  from cxrjax.models.vqgan_torch import build_nlayer_discriminator, build_taming_vqmodel

  # No attention inside the levels: the seed's attn_resolutions [24] is none of its pyramid's
  # 512..32 px levels (spec C.3); the mid blocks keep theirs.
  vq = build_taming_vqmodel(args.ch, args.ch_mult, args.num_res_blocks, (), args.image_size,
                            args.z, args.z, args.n_embed)
  disc = build_nlayer_discriminator(args.ndf, args.disc_layers)
  if not args.perceptual:
    return vq, disc, None, None
  from cxrjax.models.densenet_torch import build_torch_densenet
  net = build_torch_densenet(tuple(pc.block_config), 14, in_chans=1, growth_rate=pc.growth_rate,
                             num_init_features=pc.num_init_features).eval()
  for p in net.parameters():
    p.requires_grad_(False)
  wanted = {f"denseblock{i + 1}" for i in pc.blocks}

  def feature_maps(images):  # PerceptualNet.feature_maps: grey, 'unit' intensity, eval mode
    h, maps = images.mean(1, keepdim=True), []
    for name, module in net.features.named_children():
      h = module(h)
      if name in wanted:
        maps.append(h)
        if len(maps) == len(wanted):
          return maps
    return maps

  return vq, disc, feature_maps, net


def torch_step_fn(args, vq, disc, feature_maps, weights, optims, device, x):
  """step(record) -> the torch reference's terms (floats when record, else None)."""
  import torch
  from torch.nn import functional as F
  def adam(params, o):
    return torch.optim.Adam(params, lr=o["lr"], betas=(o["b1"], o["b2"]), eps=o["eps"])
  opt_g = adam(vq.parameters(), optims["generator"])
  opt_d = adam(disc.parameters(), optims["discriminator"])
  last = vq.decoder.conv_out.weight
  autocast = lambda: torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

  def unit(f):
    f = f.float()
    return f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)

  def perceptual(a, b):
    with torch.no_grad():
      fa = feature_maps(a)
    fb = feature_maps(b)
    return sum(((unit(p) - unit(q)) ** 2).sum(1).mean((1, 2)) for p, q in zip(fa, fb)).mean()

  def step(record=False):
    for p in disc.parameters():  # Lightning's toggle_optimizer(generator)
      p.requires_grad_(False)
    with autocast():
      recon, qloss = vq(x)
      recon = recon.float()
      rec = (x - recon).abs().mean()
      per = perceptual(x, recon) if weights.perceptual else torch.zeros((), device=x.device)
      nll = weights.pixel * rec + weights.perceptual * per
      g = -disc(recon).float().mean()
    nll_grad = torch.autograd.grad(nll, last, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g, last, retain_graph=True)[0]
    lam = torch.clamp(nll_grad.norm() / (g_grad.norm() + 1e-4), 0.0, 1e4).detach()
    lam = lam * weights.disc_weight
    loss = nll + lam * g + weights.codebook * qloss.float()
    opt_g.zero_grad(set_to_none=True)
    loss.backward()
    opt_g.step()
    for p in disc.parameters():
      p.requires_grad_(True)
    with autocast():
      with torch.no_grad():
        recon = vq(x)[0]
      real, fake = disc(x).float(), disc(recon).float()
      d_loss = 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())
    opt_d.zero_grad(set_to_none=True)
    d_loss.backward()
    opt_d.step()
    if record:
      return {"generator/l1": rec.item(), "generator/codebook": qloss.item(),
              "generator/perceptual": per.item(), "generator/g_adv": g.item(),
              "generator/adaptive_weight": lam.item(), "generator/loss": loss.item(),
              "discriminator/d_loss": d_loss.item(),
              "discriminator/logits_real": real.mean().item(),
              "discriminator/logits_fake": fake.mean().item()}
    return None

  return step


# ----------------------------------------------------------------------------- JAX
def jax_setup(args, config, pc, torch_nets, host):
  """(step(state, batch), state, batch, forward FLOPs of the parts, GanWeights): the system's
  step, its state holding the torch reference's initial weights, past the discriminator's start."""
  import jax
  import jax.numpy as jnp
  from cxrjax.core import mesh as mesh_lib
  from cxrjax.core.task import compile_task
  from cxrjax.models.densenet_convert import convert_state_dict as convert_densenet
  from cxrjax.models.patchgan import NLayerDiscriminator
  from cxrjax.models.vqgan_convert import convert_discriminator, convert_state_dict
  from cxrjax.systems.raygen.perceptual import PerceptualNet, network
  from cxrjax.systems.raygen.tokenizer import GanWeights, vqgan_model, vqgan_task

  vc, s, dtype = config.vqgan, args.image_size, jnp.dtype(args.dtype)
  model = vqgan_model(vc, s).clone(dtype=dtype)
  disc = NLayerDiscriminator(in_channels=3, ndf=vc.disc_ndf, n_layers=vc.disc_layers, dtype=dtype)
  weights = GanWeights(vc.pixel_weight, vc.perceptual_weight if args.perceptual else 0.0,
                       vc.codebook_weight, vc.entropy_weight, vc.entropy_temperature, vc.disc_start,
                       vc.disc_weight)
  vq_t, disc_t, _, net_t = torch_nets
  mesh = mesh_lib.create_mesh()
  perceptual, frozen = None, None
  if args.perceptual:
    module = network(pc, 14).clone(dtype=dtype)
    sd = {k: v.detach().cpu().numpy() for k, v in net_t.state_dict().items()}
    variables = convert_densenet(sd, module, in_chans=1)
    perceptual = PerceptualNet(module, variables, "unit", 1, tuple(pc.blocks))
    frozen = {"perceptual": variables}
    frozen = jax.device_put(frozen, mesh_lib.tree_shardings(frozen, mesh))
  task = vqgan_task(model, disc, perceptual, weights, s)
  compiled = compile_task(task, mesh=mesh, optim=config.vqgan_train.optim.to_dict(),
                          num_steps=config.vqgan_train.steps)
  state = compiled.init(0)
  # The torch reference's initial weights, so that the first steps can be compared.
  def sd(m, prefix=""):
    return {prefix + k: v.detach().cpu().numpy() for k, v in m.state_dict().items()}
  d_vars = convert_discriminator(sd(disc_t, "loss.discriminator."), disc)
  new = {"vqgan": convert_state_dict(sd(vq_t), model)["params"], "discriminator": d_vars["params"]}
  put = lambda new, old: jax.device_put(jnp.asarray(new, old.dtype), old.sharding)
  stats = jax.tree.map(put, d_vars["batch_stats"], state.collections["batch_stats"])
  collections = dict(state.collections, batch_stats=stats)
  state = state.replace(params=jax.tree.map(put, new, state.params), collections=collections,
                        step=put(vc.disc_start, state.step))  # past the discriminator's start
  batch = mesh_lib.global_batch({k: v[mesh_lib.process_slice(args.batch)] for k, v in host.items()},
                                mesh)
  # Forward FLOPs of the parts (the perceptual net only up to its last compared block).
  x = jnp.zeros((args.batch, s, s, 3), jnp.float32)
  flops = {"vqgan": jaxpr_flops(lambda p, x: model.apply({"params": p}, x), new["vqgan"], x),
           "discriminator": jaxpr_flops(
               lambda v, x: disc.apply(v, x, train=True, mutable=["batch_stats"]), d_vars, x)}
  if args.perceptual:
    cut = network(pc, 14).clone(block_config=tuple(pc.block_config)[:max(pc.blocks) + 1])
    v = jax.eval_shape(lambda: cut.init(jax.random.PRNGKey(0), x[..., :1]))
    flops["perceptual"] = jaxpr_flops(lambda v, x: cut.apply(v, x, train=False), v, x[..., :1])
  return compiled.bind(frozen), state, batch, flops, weights


# ----------------------------------------------------------------------------- main
def parse_args():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--image_size", type=int, default=256, help="square crops")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--ch", type=int, default=128)
  p.add_argument("--ch_mult", type=int, nargs="+", default=[1, 1, 2, 2, 4])
  p.add_argument("--num_res_blocks", type=int, default=2)
  p.add_argument("--z", type=int, default=256, help="z_channels = embed_dim")
  p.add_argument("--n_embed", type=int, default=1024)
  p.add_argument("--ndf", type=int, default=64)
  p.add_argument("--disc_layers", type=int, default=3)
  p.add_argument("--perceptual", action="store_true", help="add the DenseNet perceptual term")
  p.add_argument("--perceptual_net", choices=("small", "paper"), default="small",
                 help="small: configs/raygen.py:tokenizer's DenseNet; paper: DenseNet-121")
  p.add_argument("--check_rtol", type=float, default=0.0,
                 help="0: 1e-3 on CPU in fp32, 3e-2 with TF32 (GPU), 1e-1 in bfloat16")
  add_comparison_args(p, rounds=5, per_round="steps_per_round", per_round_default=2)
  return parse_comparison_args(p, QUICK)


def main() -> None:
  args = parse_args()
  backend, device = select_backend(args.device)
  import jax
  from cxrjax.core.allocator import active_allocator
  from cxrjax.core.config import load_config
  emit = JsonLines()

  config = load_config(os.path.join(ROOT, "configs", "raygen.py:tokenizer_paper"))
  config.unlock()
  config.data.image_size = args.image_size
  config.vqgan.update(ch=args.ch, ch_mult=tuple(args.ch_mult), num_res_blocks=args.num_res_blocks,
                      z_channels=args.z, embed_dim=args.z, n_embed=args.n_embed, disc_ndf=args.ndf,
                      disc_layers=args.disc_layers)
  pc = load_config(os.path.join(ROOT, "configs", "raygen.py:" + (
      "tokenizer" if args.perceptual_net == "small" else "tokenizer_paper"))).perceptual
  matmul = matmul_peak_flops()
  peak = args.peak_tflops * 1e12 if args.peak_tflops else matmul

  import torch
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  if device == "cuda":  # like XLA's default for fp32 dots and convolutions on GPUs
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
  torch_nets = torch_modules(args, pc)
  vq_t, disc_t, feature_maps, net_t = torch_nets
  for m in (vq_t, disc_t, net_t):
    if m is not None:
      m.to(device)
  rng = np.random.default_rng(0)
  side = args.image_size
  host = {"images": rng.integers(0, 256, (args.batch, side, side), dtype=np.uint8)}
  emit({"bench": "vqgan_step", "backend": backend, "device_kind": jax.devices()[0].device_kind,
        "jax": jax.__version__, "torch": torch.__version__, "torch_threads": args.threads,
        "dtype": args.dtype, "image_size": args.image_size, "batch": args.batch, "ch": args.ch,
        "ch_mult": args.ch_mult, "num_res_blocks": args.num_res_blocks, "z": args.z,
        "n_embed": args.n_embed, "ndf": args.ndf, "disc_layers": args.disc_layers,
        "perceptual": args.perceptual and args.perceptual_net, "allocator": active_allocator(),
        "matmul_fp32_flop_per_s": matmul, "peak_flop_per_s": peak,
        "reference": "nominal" if args.peak_tflops else "measured_fp32_matmul",
        "loadavg": os.getloadavg()})

  step, state, batch, flops, weights = jax_setup(args, config, pc, torch_nets, host)
  flop = 4 * flops["vqgan"] + 8 * flops["discriminator"] + 3 * flops.get("perceptual", 0.0)
  t0 = time.perf_counter()
  state, metrics = step(state, batch)  # compiles; the numerics check's JAX side
  jax_terms = {k: float(v) for k, v in jax.device_get(metrics["mean"]).items()}
  compile_s = time.perf_counter() - t0
  x = torch.from_numpy(host["images"]).float().to(device) * (2.0 / 255.0) - 1.0
  x = x[:, None].expand(-1, 3, -1, -1).contiguous()
  torch_step = torch_step_fn(args, vq_t, disc_t, feature_maps, weights,
                             config.vqgan_train.optim.to_dict(), device, x)
  check = "skipped (--no_torch)"
  if not args.no_torch:
    torch_terms = torch_step(record=True)
    rtol = args.check_rtol or (1e-1 if args.dtype == "bfloat16" else
                               3e-2 if device == "cuda" else 1e-3)
    diffs = {k: abs(jax_terms[k] - v) / max(abs(v), 1e-5 / rtol) for k, v in torch_terms.items()}
    # D(x_hat) is taken after the generator's first Adam step, which moves every weight by about
    # lr * sign(g): a rounding difference in a near-zero gradient flips a sign, so those terms
    # get AFTER_UPDATE_SLACK x the tolerance (measured at the seed's sizes: 1.2e-3 relative on
    # the fake logits while everything before the update agrees to 2e-4).
    ok = all(d <= rtol * (AFTER_UPDATE_SLACK if k in AFTER_UPDATE else 1.0)
             for k, d in diffs.items())
    worst = max(diffs, key=diffs.get)
    emit({"check": "first step, same weights", "ok": ok, "rtol": rtol, "worst": worst,
          "rel_diff": {k: float(f"{v:.3g}") for k, v in diffs.items()}, "jax": jax_terms,
          "torch": torch_terms})
    check = f"{'ok' if ok else 'FAILED'} (worst {diffs[worst]:.1e} relative, {worst})"
    if not ok and not args.no_check:
      sys.exit("error: the JAX and torch steps disagree (see the check line); "
               "--no_check times anyway")

  def sync():
    if device == "cuda":
      torch.cuda.synchronize()

  holder = [state]

  def run_jax(n):
    s = holder[0]
    for _ in range(n):
      s, m = step(s, batch)
    jax.block_until_ready((s, m))
    holder[0] = s

  def run_torch(n):
    for _ in range(n):
      torch_step()
    sync()

  runs = {"jax": run_jax, **({} if args.no_torch else {"torch": run_torch})}
  for run in runs.values():
    if args.warmup:
      run(args.warmup)
  times, cpu = alternate_rounds(runs, args.rounds, args.steps_per_round)
  sec = {k: statistics.median(v) for k, v in times.items()}
  for k, v in sec.items():
    emit({"variant": k, "dtype": args.dtype, "sec_per_step": v, "images_per_s": args.batch / v,
          "times": [round(t, 4) for t in times[k]], "cpu_s_per_step": statistics.median(cpu[k]),
          "model_flop_per_step": flop, "achieved_flop_per_s": flop / v, "mfu": flop / v / peak,
          "mfu_vs_matmul": flop / v / matmul,
          **({"compile_and_first_step_s": compile_s} if k == "jax" else {})})
  summary = {"flop_parts_forward": flops, "loadavg_at_end": os.getloadavg()}
  if "torch" in sec:
    summary["torch_over_jax"] = sec["torch"] / sec["jax"]
  emit(summary)
  say = lambda s: print(s, file=sys.stderr)
  say(f"\nVQ-GAN train step, {args.image_size} px, batch {args.batch}, {args.dtype}, {backend} "
      f"({jax.devices()[0].device_kind}), torch {args.threads} threads, perceptual "
      f"{args.perceptual_net if args.perceptual else 'off'}; check {check}")
  say(f"  model {flop / 1e9:.1f} GFLOP/step; reference {peak / 1e9:.0f} GFLOP/s "
      f"({'nominal' if args.peak_tflops else 'fp32 matmul, this run'})")
  for k, v in sec.items():
    say(f"  {k:6s} {v:8.3f} s/step  {args.batch / v:8.2f} images/s  {flop / v / 1e9:8.1f} GFLOP/s"
        f"  {100 * flop / v / peak:5.1f} % of reference")
  if "torch" in sec:
    say(f"  torch / JAX = {sec['torch'] / sec['jax']:.2f}x  (target >= 1.0x on CPU)")
  emit.save(args.json_out)


if __name__ == "__main__":
  from cxrjax.core.allocator import reexec_with_allocator
  reexec_with_allocator([sys.executable, *sys.argv], os.environ.get("CXRJAX_ALLOCATOR", "tcmalloc"))
  main()
