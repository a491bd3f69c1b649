"""BERT-base forward (RayGen's text encoder): jitted JAX against transformers' BertModel.

Spec: shared/spec/raygen_and_raddiffusion.md §C.4.

  python benchmarks/bert_forward.py                   # 12 x 768, 12 heads, FFN 3072, vocab 30522;
                                                      # 256 tokens, batch 16, fp32, torch sdpa
  python benchmarks/bert_forward.py --attn eager      # transformers' eager attention instead
  python benchmarks/bert_forward.py --quick           # tiny sizes, 2 rounds: checks the plumbing
  python benchmarks/bert_forward.py --device gpu --dtype bfloat16 --batch 256 --peak_tflops 989

JAX: cxrjax.models.bert.Bert (the encoder RayGen reads: last hidden states, no pooler), its apply
under one jax.jit, deterministic (dropout off, as RayGen keeps CXR-BERT in eval mode).
PyTorch: transformers' BertModel(add_pooling_layer=False) at the same sizes, eval(), under
torch.no_grad(), with --attn sdpa (the default: torch's scaled_dot_product_attention) or eager
(the explicit softmax(QK^T)V), on --threads threads (default: this machine's cores). Both run the
same weights: transformers' random initialisation converted by models.bert_convert. Inputs: random
ids, every token real (an all-ones attention mask is passed to both), token types 0.
Before timing, the last hidden states of the two are compared once in float32 (on a GPU with
full-precision matmuls on both sides): the run stops when max |JAX - torch| > --check_atol (1e-4)
unless --no_check.

Timing: JAX and torch in alternating rounds in this one process (the machine's load moves both
alike), --reps_per_round forward passes a round, medians over --rounds rounds after compilation and
--warmup passes. Model FLOP per forward (2 x MACs of the matmuls, attention included; embeddings,
norms and softmax not counted) = batch * layers * (8 L D^2 + 4 L^2 D + 4 L D F), L tokens, D
width, F the FFN width: 734 GFLOP at the defaults. Achieved FLOP/s is divided by the same run's
large fp32 matmul rate (benchmarks/common.py: 5184x512 @ 512x2048, jit), or by --peak_tflops.

Prints JSON lines on stdout (the run's setup, the check, one row per framework, a summary with
torch_over_jax = torch s/forward / JAX s/forward; the issue's target: >= 1.0) and a human summary
on stderr; --json_out FILE also writes the JSON lines to FILE. --device gpu runs torch on CUDA with
TF32 allowed (XLA's default for fp32 on GPUs); --dtype bfloat16 makes JAX's dense layers compute in
bf16 (residual stream, LayerNorm and softmax stay fp32) and torch run under autocast(bfloat16).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

from common import (JsonLines, add_comparison_args, alternate_rounds,  # benchmarks/common.py
                    matmul_peak_flops, parse_comparison_args, select_backend)

QUICK = dict(vocab=1000, hidden=64, layers=2, heads=4, intermediate=256, tokens=32, batch=2,
             rounds=2, reps_per_round=2, warmup=1)


def forward_flops(batch: int, tokens: int, hidden: int, layers: int, intermediate: int) -> float:
  """Matmul FLOPs (2 x MACs) of one forward pass: q, k, v, out projections (8 L D^2), scores and
  weighted values (4 L^2 D), the feed-forward (4 L D F), per layer and text."""
  L, D, F = tokens, hidden, intermediate
  return float(batch * layers * (8 * L * D * D + 4 * L * L * D + 4 * L * D * F))


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--vocab", type=int, default=30522)
  p.add_argument("--hidden", type=int, default=768)
  p.add_argument("--layers", type=int, default=12)
  p.add_argument("--heads", type=int, default=12)
  p.add_argument("--intermediate", type=int, default=3072)
  p.add_argument("--tokens", type=int, default=256)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa",
                 help="transformers' attn_implementation for the torch side")
  p.add_argument("--check_atol", type=float, default=1e-4)
  add_comparison_args(p, rounds=7, per_round="reps_per_round", per_round_default=2)
  return parse_comparison_args(p, QUICK)


def main() -> None:
  args = parse_args()
  backend, device = select_backend(args.device)
  import jax
  import jax.numpy as jnp
  import torch
  import transformers
  from cxrjax.core.allocator import active_allocator
  from cxrjax.models.bert import Bert
  from cxrjax.models.bert_convert import convert

  emit = JsonLines()

  matmul = matmul_peak_flops()
  peak = args.peak_tflops * 1e12 if args.peak_tflops else matmul
  flop = forward_flops(args.batch, args.tokens, args.hidden, args.layers, args.intermediate)
  emit({"bench": "bert_forward", "backend": backend, "device_kind": jax.devices()[0].device_kind,
        "jax": jax.__version__, "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": args.threads, "torch_attention": args.attn, "dtype": args.dtype,
        "batch": args.batch, "tokens": args.tokens, "hidden": args.hidden, "layers": args.layers,
        "heads": args.heads, "intermediate": args.intermediate, "vocab": args.vocab,
        "allocator": active_allocator(), "matmul_fp32_flop_per_s": matmul, "peak_flop_per_s": peak,
        "reference": "nominal" if args.peak_tflops else "measured_fp32_matmul",
        "loadavg": os.getloadavg()})

  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  config = transformers.BertConfig(
      vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
      num_attention_heads=args.heads, intermediate_size=args.intermediate,
      max_position_embeddings=max(512, args.tokens), attn_implementation=args.attn)
  model = transformers.BertModel(config, add_pooling_layer=False).eval().to(device)
  fields = dict(vocab_size=args.vocab, hidden=args.hidden, layers=args.layers, heads=args.heads,
                intermediate=args.intermediate, max_positions=max(512, args.tokens))
  bert32 = Bert(**fields)
  bert = Bert(**fields, dtype=jnp.dtype(args.dtype))
  variables = convert({k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}, bert32)
  variables = jax.device_put(variables)
  rng = np.random.default_rng(0)
  ids = rng.integers(0, args.vocab, (args.batch, args.tokens)).astype(np.int32)
  mask = np.ones((args.batch, args.tokens), np.int32)
  ids_j, mask_j = jnp.asarray(ids), jnp.asarray(mask)
  ids_t = torch.from_numpy(ids).long().to(device)
  mask_t = torch.from_numpy(mask).long().to(device)

  def torch_forward():
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16,
                                         enabled=args.dtype == "bfloat16"):
      return model(input_ids=ids_t, attention_mask=mask_t).last_hidden_state

  check = "skipped (--no_check)"
  if not args.no_check:  # float32 on both sides, full-precision matmuls (no TF32) on a GPU
    with jax.default_matmul_precision("highest"):
      ours = np.asarray(jax.jit(bert32.apply)(variables, ids_j, mask_j))
    with torch.no_grad():
      ref = model(input_ids=ids_t, attention_mask=mask_t).last_hidden_state.float().cpu().numpy()
    diff = float(np.max(np.abs(ours - ref)))
    ok = diff <= args.check_atol
    emit({"check": "last hidden states, float32, same weights", "ok": ok,
          "max_abs_diff": diff, "atol": args.check_atol, "ref_abs_max": float(np.abs(ref).max())})
    check = f"{'ok' if ok else 'FAILED'} (max |diff| {diff:.1e}, atol {args.check_atol:g})"
    if not ok:
      sys.exit("error: the JAX and torch hidden states disagree (see the check line); "
               "--no_check times anyway")
  if device == "cuda":  # like XLA's default for fp32 dots on GPUs
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

  forward = jax.jit(bert.apply)
  t0 = time.perf_counter()
  forward(variables, ids_j, mask_j).block_until_ready()
  compile_s = time.perf_counter() - t0

  def run_jax(n):
    for _ in range(n):
      out = forward(variables, ids_j, mask_j)
    out.block_until_ready()

  def run_torch(n):
    for _ in range(n):
      out = torch_forward()
    if device == "cuda":
      torch.cuda.synchronize()
    return out

  runs = {"jax": run_jax, **({} if args.no_torch else {"torch": run_torch})}
  for run in runs.values():
    if args.warmup:
      run(args.warmup)
  times, cpu = alternate_rounds(runs, args.rounds, args.reps_per_round)
  sec = {k: statistics.median(v) for k, v in times.items()}
  for k, v in sec.items():
    emit({"variant": k, "dtype": args.dtype, "sec_per_forward": v, "texts_per_s": args.batch / v,
          "tokens_per_s": args.batch * args.tokens / v, "times": [round(t, 4) for t in times[k]],
          "cpu_s_per_forward": statistics.median(cpu[k]), "model_flop_per_forward": flop,
          "achieved_flop_per_s": flop / v, "mfu": flop / v / peak,
          "mfu_vs_matmul": flop / v / matmul,
          **({"compile_and_first_forward_s": compile_s} if k == "jax" else
             {"attn_implementation": args.attn})})
  summary = {"loadavg_at_end": os.getloadavg()}
  if "torch" in sec:
    summary["torch_over_jax"] = sec["torch"] / sec["jax"]
  emit(summary)
  say = lambda s: print(s, file=sys.stderr)
  say(f"\nBERT forward, {args.layers} x {args.hidden} ({args.heads} heads, FFN "
      f"{args.intermediate}), "
      f"{args.tokens} tokens, batch {args.batch}, {args.dtype}, {backend} "
      f"({jax.devices()[0].device_kind}); torch {args.attn} attention, {args.threads} threads; "
      f"check {check}")
  say(f"  model {flop / 1e9:.1f} GFLOP/forward; reference {peak / 1e9:.0f} GFLOP/s "
      f"({'nominal' if args.peak_tflops else 'fp32 matmul, this run'})")
  for k, v in sec.items():
    say(f"  {k:6s} {v:8.3f} s/forward  {args.batch / v:8.1f} texts/s  {flop / v / 1e9:8.1f} GFLOP/s"
        f"  {100 * flop / v / peak:5.1f} % of reference")
  if "torch" in sec:
    say(f"  torch / JAX = {sec['torch'] / sec['jax']:.2f}x  (target >= 1.0x)")
  emit.save(args.json_out)


if __name__ == "__main__":
  from cxrjax.core.allocator import reexec_with_allocator
  reexec_with_allocator([sys.executable, *sys.argv], os.environ.get("CXRJAX_ALLOCATOR", "tcmalloc"))
  main()
