"""RayGen's masked-token transformer (ModelV2): train step, JAX against PyTorch; JAX generation.

Spec: shared/spec/raygen_and_raddiffusion.md §C.5-C.8.

  python benchmarks/raygen_step.py                    # the seed's sizes: 1024 tokens, width 1024,
                                                      # 6 layers, 8 heads, GEGLU FFN 4096, text
                                                      # states (4, 256, 768), batch 4, fp32
  python benchmarks/raygen_step.py --torch_variants seed sdpa   # + torch's fused attention path
  python benchmarks/raygen_step.py --quick            # tiny sizes, 2 rounds: checks the plumbing
  python benchmarks/raygen_step.py --device gpu --dtype bfloat16 --batch 16 --peak_tflops 989

Train step. JAX: the step the training loop runs (core.task.compile_task: one jitted step with the
state donated, Adam as torch's (lr 1e-5, betas (0.9, 0.999), no decay, the seed's), the NaN guard)
over a Task written here: models.maskgit.TokenTransformer, losses.masked_tokens' cosine masking (r ~
U(0, 1), round(N cos(pi r / 2)) positions, at least 1) and masked_token_loss (CE averaged over all
masked tokens of the batch), attention dropout 0.1 on the probabilities as the seed's
nn.MultiheadAttention (--attention_dropout). The text states are given: random (B, T, 768) arrays
L2-normalised over the sequence axis as RayGen feeds its projector; the frozen CXR-BERT that
produces them is not run (benchmarks/bert_forward.py times it; the seed runs it inside every step).
PyTorch: the seed's ModelV2 (models/maskgit_torch.py, under its module names:
nn.MultiheadAttention(batch_first=True, dropout) for self- and cross-attention without pre-norms,
the GEGLU FFN, LayerNorm_3 after every layer, learned positions, text projector (nn.Identity when
--text_dim equals --width, as the seed's) and head), the same masking written in torch,
F.cross_entropy(ignore_index=-1), torch.optim.Adam, on --threads threads (default: this machine's
cores). --torch_variants: 'seed' calls the attention as the seed does (need_weights left True:
explicit bmm + softmax + dropout and the averaged weights returned); 'sdpa' passes
need_weights=False, torch's fused scaled_dot_product_attention path. Both frameworks start from the
same weights (torch's init converted by models.maskgit_convert); before timing, their logits (eval
mode, float32, full-precision matmuls) and the masked CE on one fixed mask are compared: the run
stops when max |logit difference| > --check_atol (1e-4) unless --no_check.

Generation (JAX only): models.mask_decoding.decode with the model (make_tokens_to_logits), RayGen's
production setting K = --gen_steps 3, T0 = 1.3, top-k filter 0.5, --gen_batch 16 prompts, jitted
whole; images/s counts generated code grids: turning codes into pixels (the VQ-GAN decoder) is
excluded.

Timing: JAX and torch in alternating rounds in this one process (the machine's load moves both
alike), --steps_per_round steps a round, medians over --rounds rounds after compilation and --warmup
steps; generation: median of --gen_reps calls after compilation and one call. Model FLOP (2 x MACs
of the matmuls, attention included, counted analytically; embeddings, norms, softmax not counted):
forward = B (depth (8 N D^2 + 4 N^2 D + 4 N D^2 + 4 T D^2 + 4 N T D + 6 N D H) + 2 T E D + 2 N D C),
N image tokens, T text tokens, E text width, D width, H FFN width, C codes (273 GFLOP per image at
the seed's sizes); train step = 3 x forward; generation = K x forward. Achieved FLOP/s is divided
by the same run's large fp32 matmul rate (benchmarks/common.py: 5184x512 @ 512x2048, jit; the
issue's target: >= 70 %, and >= 1.2x faster than torch; the seed's own code took 20.66 s/step on
this machine kind), or by --peak_tflops on a GPU.

Prints JSON lines on stdout (the run's setup, the check, one row per train-step variant, the
generation row, a summary with torch_over_jax = torch s/step / JAX s/step per torch variant) and a
human summary on stderr; --json_out FILE also writes the JSON lines to FILE. --device gpu runs torch
on CUDA with TF32 allowed (XLA's default for fp32 on GPUs); --dtype bfloat16 makes JAX's dense
layers and attention compute in bf16 (residual stream, norms, softmax and logits stay fp32) and
torch run under autocast(bfloat16) (the seed trained under fp16 autocast).
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

QUICK = dict(codebook=64, tokens=64, width=64, depth=2, heads=4, ffn=128, text_tokens=16,
             text_dim=32, batch=2, gen_batch=2, rounds=2, steps_per_round=1, warmup=2, gen_reps=1)


def forward_flops(b, n, t, e, d, depth, h, c) -> float:
  """Matmul FLOPs (2 x MACs) of one ModelV2 forward over b images (see the module doc)."""
  self_attn = 2 * n * d * 3 * d + 2 * n * d * d + 4 * n * n * d      # qkv, out, scores + values
  cross = 2 * n * d * d + 2 * t * d * 2 * d + 2 * n * d * d + 4 * n * t * d  # q, kv, out, attn
  ffn = 2 * n * d * 2 * h + 2 * n * h * d                              # GEGLU in, out
  return float(b * (depth * (self_attn + cross + ffn) + 2 * t * e * d + 2 * n * d * c))


# ----------------------------------------------------------------------------- PyTorch reference
def torch_masking(codes, mask_id):
  """The seed's ModelV2.forward masking: (inputs, labels with -1 where not masked)."""
  import torch
  b, n = codes.shape
  r = torch.rand(b, device=codes.device)
  count = torch.clamp(torch.round(n * torch.cos(r * math.pi * 0.5)), min=1)
  mask = torch.rand(b, n, device=codes.device).argsort(dim=-1) < count[:, None]
  return torch.where(mask, mask_id, codes), torch.where(mask, codes, -1)


# ----------------------------------------------------------------------------- JAX
def jax_task(model, batch: int):
  """The train step's Task: cosine masking, the transformer with attention dropout, masked CE."""
  import jax
  import jax.numpy as jnp
  from cxrjax.core.task import Task
  from cxrjax.losses.masked_tokens import cosine_mask, mask_inputs, masked_token_loss

  def init(rng):
    return model.init(rng, jnp.zeros((1, model.seq_len), jnp.int32),
                      jnp.zeros((1, 1, model.text_dim), jnp.float32))

  def loss(params, b, ctx):
    k_mask, k_drop = jax.random.split(ctx.rng)
    mask = cosine_mask(k_mask, batch, model.seq_len)
    logits = model.apply({"params": params}, mask_inputs(b["codes"], mask, model.mask_id),
                         b["text"], deterministic=model.attention_dropout == 0.0,
                         rngs={"dropout": k_drop})
    value, accuracy = masked_token_loss(logits, b["codes"], mask)
    return value, {"terms": {"masked_ce": value, "accuracy": accuracy}}

  return Task("raygen_transformer", init, loss=loss)


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--codebook", type=int, default=1024, help="codes (the mask id is this number)")
  p.add_argument("--tokens", type=int, default=1024, help="image tokens N (32 x 32)")
  p.add_argument("--width", type=int, default=1024)
  p.add_argument("--depth", type=int, default=6)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--ffn", type=int, default=4096, help="GEGLU hidden width H")
  p.add_argument("--text_tokens", type=int, default=256)
  p.add_argument("--text_dim", type=int, default=768)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--attention_dropout", type=float, default=0.1)
  p.add_argument("--lr", type=float, default=1e-5)
  p.add_argument("--torch_variants", nargs="+", choices=("seed", "sdpa"), default=["seed"])
  p.add_argument("--gen_batch", type=int, default=16)
  p.add_argument("--gen_steps", type=int, default=3)
  p.add_argument("--gen_reps", type=int, default=3)
  p.add_argument("--no_generation", action="store_true")
  p.add_argument("--check_atol", type=float, default=1e-4)
  add_comparison_args(p, rounds=5, per_round="steps_per_round", per_round_default=1)
  return parse_comparison_args(p, QUICK)


def main() -> None:
  args = parse_args()
  backend, device = select_backend(args.device)
  import jax
  import jax.numpy as jnp
  import torch
  from torch.nn import functional as F
  from cxrjax.core import mesh as mesh_lib
  from cxrjax.core.allocator import active_allocator
  from cxrjax.core.task import compile_task
  from cxrjax.losses.masked_tokens import masked_token_loss
  from cxrjax.models import mask_decoding
  from cxrjax.models.bert import normalize_text_states
  from cxrjax.models.maskgit import TokenTransformer, make_tokens_to_logits
  from cxrjax.models.maskgit_convert import convert_state_dict
  from cxrjax.models.maskgit_torch import build_seed_model_v2

  emit = JsonLines()

  matmul = matmul_peak_flops()
  peak = args.peak_tflops * 1e12 if args.peak_tflops else matmul
  sizes = (args.tokens, args.text_tokens, args.text_dim, args.width, args.depth, args.ffn,
           args.codebook)
  step_flop = 3 * forward_flops(args.batch, *sizes)
  gen_flop = args.gen_steps * forward_flops(args.gen_batch, *sizes)
  emit({"bench": "raygen_step", "backend": backend, "device_kind": jax.devices()[0].device_kind,
        "jax": jax.__version__, "torch": torch.__version__, "torch_threads": args.threads,
        "dtype": args.dtype, "batch": args.batch, "tokens": args.tokens, "width": args.width,
        "depth": args.depth, "heads": args.heads, "ffn": args.ffn, "codebook": args.codebook,
        "text": [args.text_tokens, args.text_dim], "attention_dropout": args.attention_dropout,
        "allocator": active_allocator(), "matmul_fp32_flop_per_s": matmul, "peak_flop_per_s": peak,
        "reference": "nominal" if args.peak_tflops else "measured_fp32_matmul",
        "loadavg": os.getloadavg()})

  # Same weights on both sides: torch's init, converted.
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  net = build_seed_model_v2(args.codebook, args.tokens, args.width, args.depth, args.heads,
                            args.ffn, args.text_dim, args.attention_dropout).to(device)
  fields = dict(codebook_size=args.codebook, seq_len=args.tokens, width=args.width,
                depth=args.depth, heads=args.heads, ffn_hidden=args.ffn, text_dim=args.text_dim,
                attention_dropout=args.attention_dropout)
  model32 = TokenTransformer(**fields)
  model = TokenTransformer(**fields, dtype=jnp.dtype(args.dtype))
  params = convert_state_dict({k: v.detach().cpu() for k, v in net.state_dict().items()}, model32)
  rng = np.random.default_rng(0)
  codes = rng.integers(0, args.codebook, (args.batch, args.tokens)).astype(np.int32)
  text = np.array(normalize_text_states(
      rng.normal(size=(args.batch, args.text_tokens, args.text_dim)).astype(np.float32)))
  codes_t = torch.from_numpy(codes).long().to(device)
  text_t = torch.from_numpy(text).to(device)

  check = "skipped (--no_check)"
  if not args.no_check:  # eval mode, float32, full-precision matmuls on both sides
    mask = rng.uniform(size=codes.shape) < 0.6
    inputs = np.where(mask, args.codebook, codes)
    with jax.default_matmul_precision("highest"):
      logits_j = jax.jit(model32.apply)(params, jnp.asarray(inputs), jnp.asarray(text))
      ce_j = float(masked_token_loss(logits_j, jnp.asarray(codes), jnp.asarray(mask))[0])
    net.eval()
    with torch.no_grad():
      logits_t = net(torch.from_numpy(inputs).long().to(device), text_t)
      ce_t = float(F.cross_entropy(logits_t.reshape(-1, args.codebook),
                                   torch.from_numpy(np.where(mask, codes, -1)).long().reshape(-1)
                                   .to(device), ignore_index=-1))
    net.train()
    diff = float(np.max(np.abs(np.asarray(logits_j) - logits_t.cpu().numpy())))
    ce_diff = abs(ce_j - ce_t) / abs(ce_t)
    ok = diff <= args.check_atol and ce_diff <= 1e-5
    emit({"check": "logits (eval, float32) and masked CE on a fixed mask, same weights", "ok": ok,
          "max_abs_logit_diff": diff, "atol": args.check_atol,
          "logit_abs_max": float(logits_t.abs().max()), "ce_jax": ce_j, "ce_torch": ce_t,
          "ce_rel_diff": ce_diff})
    check = f"{'ok' if ok else 'FAILED'} (max |logit diff| {diff:.1e}, CE rel diff {ce_diff:.1e})"
    if not ok:
      sys.exit("error: the JAX and torch networks disagree (see the check line); "
               "--no_check times anyway")
  if device == "cuda":  # like XLA's default for fp32 dots on GPUs
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

  # JAX train step: the loop's compiled step, its state holding the converted weights.
  mesh = mesh_lib.create_mesh()
  # config_blocks.torch_adam(lr), spelled out so that the script needs no ml_collections
  optim = dict(name="adamw", lr=args.lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
               weight_decay_mask="none", schedule="constant", warmup_steps=0, grad_clip=0.0)
  compiled = compile_task(jax_task(model, args.batch), mesh=mesh, optim=optim, num_steps=10_000)
  state = compiled.init(0)
  state = state.replace(params=jax.tree.map(
      lambda new, old: jax.device_put(jnp.asarray(new, old.dtype), old.sharding),
      params["params"], state.params))
  local = mesh_lib.process_slice(args.batch)
  batch = mesh_lib.global_batch({"codes": codes[local], "text": text[local]}, mesh)
  step = compiled.bind()
  t0 = time.perf_counter()
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0

  # torch train step(s)
  opt = torch.optim.Adam(net.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8)

  def torch_step():
    inputs, labels = torch_masking(codes_t, args.codebook)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16"):
      logits = net(inputs, text_t)
    loss = F.cross_entropy(logits.float().reshape(-1, args.codebook), labels.reshape(-1),
                           ignore_index=-1)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()

  holder = [state]

  def run_jax(n):
    s = holder[0]
    for _ in range(n):
      s, m = step(s, batch)
    jax.block_until_ready((s, m))
    holder[0] = s

  def torch_run(need_weights):
    def run(n):
      net.set_need_weights(need_weights)
      for _ in range(n):
        torch_step()
      if device == "cuda":
        torch.cuda.synchronize()
    return run

  runs = {"jax": run_jax}
  if not args.no_torch:
    runs.update({f"torch_{v}": torch_run(v == "seed") for v in args.torch_variants})
  for run in runs.values():
    if args.warmup:
      run(args.warmup)
  times, cpu = alternate_rounds(runs, args.rounds, args.steps_per_round)
  sec = {k: statistics.median(v) for k, v in times.items()}
  for k, v in sec.items():
    emit({"variant": k, "dtype": args.dtype, "sec_per_step": v, "images_per_s": args.batch / v,
          "times": [round(t, 4) for t in times[k]], "cpu_s_per_step": statistics.median(cpu[k]),
          "model_flop_per_step": step_flop, "achieved_flop_per_s": step_flop / v,
          "mfu": step_flop / v / peak, "mfu_vs_matmul": step_flop / v / matmul,
          **({"compile_and_first_step_s": compile_s} if k == "jax" else
             {"torch_attention": "need_weights=True (the seed's call)" if k == "torch_seed"
              else "need_weights=False (fused sdpa)"})})

  gen = None
  if not args.no_generation:  # JAX generation throughput (codes only; no VQ-GAN decoding)
    gen_params = jax.device_put(params)
    gen_text = jnp.asarray(normalize_text_states(
        rng.normal(size=(args.gen_batch, args.text_tokens, args.text_dim)).astype(np.float32)))

    @jax.jit
    def generate(p, txt, key):
      fn = make_tokens_to_logits(model, p, txt)
      return mask_decoding.decode(fn, key, args.gen_batch, args.tokens, model.mask_id,
                                  steps=args.gen_steps, temperature=1.3, topk_filter=0.5)[0]

    t0 = time.perf_counter()
    generate(gen_params, gen_text, jax.random.PRNGKey(0)).block_until_ready()
    gen_compile_s = time.perf_counter() - t0
    generate(gen_params, gen_text, jax.random.PRNGKey(1)).block_until_ready()
    gen_times = []
    for i in range(args.gen_reps):
      t0 = time.perf_counter()
      ids = generate(gen_params, gen_text, jax.random.PRNGKey(2 + i))
      ids.block_until_ready()
      gen_times.append(time.perf_counter() - t0)
    gen = statistics.median(gen_times)
    assert int(ids.max()) < args.codebook and int(ids.min()) >= 0
    emit({"variant": "jax_generation", "dtype": args.dtype, "images": args.gen_batch,
          "decoding_steps": args.gen_steps, "sec_per_call": gen,
          "images_per_s": args.gen_batch / gen,
          "times": [round(t, 4) for t in gen_times], "model_flop_per_call": gen_flop,
          "achieved_flop_per_s": gen_flop / gen, "mfu": gen_flop / gen / peak,
          "mfu_vs_matmul": gen_flop / gen / matmul, "compile_and_first_call_s": gen_compile_s,
          "excluded": "VQ-GAN decoding of the codes to pixels"})
  summary = {"loadavg_at_end": os.getloadavg()}
  for k in sec:
    if k.startswith("torch"):
      summary[f"{k}_over_jax"] = sec[k] / sec["jax"]
  emit(summary)

  say = lambda s: print(s, file=sys.stderr)
  say(f"\nRayGen ModelV2 train step, {args.tokens} tokens, width {args.width}, "
      f"{args.depth} layers, "
      f"{args.heads} heads, FFN {args.ffn}, text ({args.text_tokens}, {args.text_dim}), batch "
      f"{args.batch}, {args.dtype}, {backend} ({jax.devices()[0].device_kind}); torch "
      f"{args.threads} threads; check {check}")
  say(f"  model {step_flop / 1e9:.1f} GFLOP/step; reference {peak / 1e9:.0f} GFLOP/s "
      f"({'nominal' if args.peak_tflops else 'fp32 matmul, this run'})")
  for k, v in sec.items():
    say(f"  {k:12s} {v:8.3f} s/step  {args.batch / v:7.2f} images/s  {step_flop / v / 1e9:8.1f} "
        f"GFLOP/s  {100 * step_flop / v / peak:5.1f} % of reference")
  for k in sec:
    if k.startswith("torch"):
      say(f"  {k} / JAX = {sec[k] / sec['jax']:.2f}x  (target >= 1.2x, and >= 70 % of the matmul "
          f"rate; the seed's code: 20.66 s/step on the CPU machine kind)")
  if gen is not None:
    say(f"  generation (JAX, {args.gen_batch} images, K={args.gen_steps}, codes only): "
        f"{gen:.3f} s, "
        f"{args.gen_batch / gen:.2f} images/s, {100 * gen_flop / gen / peak:.1f} % of reference")
  emit.save(args.json_out)


if __name__ == "__main__":
  from cxrjax.core.allocator import reexec_with_allocator
  reexec_with_allocator([sys.executable, *sys.argv], os.environ.get("CXRJAX_ALLOCATOR", "tcmalloc"))
  main()
