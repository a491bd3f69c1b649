"""GMCD's stage-2 student step (spec gmcd.md §3) on CPU or GPU: JAX against a PyTorch reference.

  python benchmarks/gmcd_step.py                                 # the seed's sizes: batch 16, 512 px
  python benchmarks/gmcd_step.py --image_size 128 --rounds 3     # a quick look
  python benchmarks/gmcd_step.py --dtype bfloat16 --batch 64 --no_torch   # GPU images/s

JAX: the step the training loop runs (core.task.compile_task over systems.gmcd.student's Task, variant
'dscd_gkm': two augmented views, the frozen multimodal teacher and the EMA student in train mode,
the student, logit KD from both, two DSCD instances with their banks (300 candidates, 20 hard
positives, 1024 negatives), GKM's five gradients by one vjp over the student feature, Adam, the EMA
update), 'kd' (the same without DSCD and GKM) and 'ce' (the student with CE alone), both written here.
PyTorch: the seed's step written for this benchmark (its classes do not run as released, spec §0):
ResNet-18 (models/resnet_torch.py) PathomicNet teacher and path student, DSCD as CRD_loss_v2, GKM as the seed's
momentum_AEKD_loss (five backward passes with retain_graph and a hook on the feature), Adam, the EMA
update; torch on `--threads` threads. Alternating rounds in one process, so the machine's load moves
both alike. Prints JSON lines: per variant the median s/step and images/s, the ratios, and the
overhead of DSCD + GKM ((gmcd - kd) / ce), which the issue wants at most 25 %.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np

P, K, P2, FEAT, NC = 300, 1024, 20, 128, 3


def _batch(args, n_data):
  rng = np.random.default_rng(0)
  labels = rng.integers(0, NC, n_data)
  idx = rng.permutation(n_data)[:args.batch]
  contrast = np.stack([np.r_[i, rng.choice(np.flatnonzero(labels == labels[i]), P - 1),
                             rng.choice(np.flatnonzero(labels != labels[i]), K)] for i in idx])
  side = args.image_size * 9 // 8
  return {"image": rng.integers(0, 256, (args.batch, side, side), dtype=np.uint8),
          "tabular": rng.normal(size=(args.batch, 80)).astype(np.float32),
          "label": labels[idx].astype(np.int32), "index": idx.astype(np.int32),
          "contrast_index": contrast.astype(np.int32)}


def jax_steps(args, host):
  """{variant: [step(state, batch), state, batch]}."""
  import jax
  import jax.numpy as jnp
  from cxrjax.core import mesh as mesh_lib
  from cxrjax.core.task import Task, compile_task
  from cxrjax.losses import distill
  from cxrjax.models.gmcd import GMCDStudent, GMCDTeacher
  from cxrjax.systems.gmcd.data import augment
  from cxrjax.systems.gmcd.student import student_task, variant_weights
  from cxrjax.systems.gmcd.teacher import EMA
  dtype = jnp.dtype(args.dtype)
  teacher, student = GMCDTeacher(dtype=dtype), GMCDStudent(dtype=dtype)
  s = args.image_size
  mesh = mesh_lib.create_mesh()
  t_vars = teacher.init({"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(0)},
                        jnp.zeros((2, s, s, 3)), jnp.zeros((2, 80)))
  optim = dict(name="adam", lr=5e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=4e-4,
               weight_decay_mask="all", schedule="constant", warmup_steps=0, grad_clip=0.0)
  ema = {k: v for k, v in EMA.items() if k != "use_for_eval"}
  full = student_task(student, teacher, batch_size=args.batch, image_size=s, bank_rows=args.n_data)

  def simple(kd: bool):
    def loss(params, batch, ctx):
      k1, k2, k3 = jax.random.split(ctx.rng, 3)
      v1 = augment(k1, batch["image"], s)
      stats = ctx.state["batch_stats"]
      out, new = student.apply({"params": params, "batch_stats": stats}, v1, train=True,
                               mutable=["batch_stats"])
      total = distill.nll(jax.nn.log_softmax(out["logits_image"]), batch["label"])
      if kd:
        t_out, _ = teacher.apply(ctx.frozen["teacher"], v1, batch["tabular"], train=True,
                                 rngs={"dropout": k3}, mutable=["batch_stats"])
        e_out, _ = student.apply({"params": ctx.ema, "batch_stats": stats},
                                 augment(k2, batch["image"], s), train=True, mutable=["batch_stats"])
        total += distill.kd_kl(out["logits_image"], t_out["logits_fused"])
        total += distill.kd_kl(out["logits_image"], e_out["logits_image"])
      return total, {"terms": {}, "state": {"batch_stats": new["batch_stats"]}}
    init = lambda rng: student.init(rng, jnp.zeros((args.batch, s, s, 3)), train=False)
    return Task("kd" if kd else "ce", init, loss=loss)

  frozen = {"teacher": dict(t_vars), "weights": variant_weights("dscd_gkm", 1.0, 0.02),
            "num_samples": jnp.float32(args.n_data)}
  placed = jax.device_put(frozen, mesh_lib.tree_shardings(frozen, mesh))
  batch = mesh_lib.global_batch(host, mesh)
  out = {}
  for name, task, use_ema in (("gmcd", full, True), ("kd", simple(True), True),
                              ("ce", simple(False), False)):
    compiled = compile_task(task, mesh=mesh, optim=optim, num_steps=10_000,
                            ema=ema if use_ema else None)
    step = lambda state, b, c=compiled: c.step(state, b, placed, None)
    out[name] = [step, compiled.init(0), batch]
  return out


def torch_steps(args, host):
  """{variant: step()} of the PyTorch reference (see the module docstring)."""
  import torch
  from torch import nn
  from torch.nn import functional as F
  from cxrjax.models.resnet_torch import build_torch_resnet18
  torch.set_num_threads(args.threads)
  torch.manual_seed(2019)

  class Path(nn.Module):  # the seed's ResNet18 path network (fc_new1 + BN + ReLU, fc_new2)
    def __init__(self):
      super().__init__()
      self.trunk = build_torch_resnet18(head=False)
      self.fc_new1 = nn.Sequential(nn.Linear(512, FEAT), nn.BatchNorm1d(FEAT), nn.ReLU())
      self.fc_new2 = nn.Linear(FEAT, NC)

    def forward(self, x):
      h = self.fc_new1(self.trunk(x)[0])
      return h, self.fc_new2(h)

  class Gate(nn.Module):
    def __init__(self):
      super().__init__()
      self.h, self.z, self.o = nn.Linear(FEAT, FEAT), nn.Bilinear(FEAT, FEAT, FEAT), nn.Linear(FEAT, FEAT)

    def forward(self, v, v1, v2):
      return F.dropout(F.relu(self.o(torch.sigmoid(self.z(v1, v2)) * F.relu(self.h(v)))), 0.1)

  class Teacher(nn.Module):  # PathomicNet, pofusion
    def __init__(self):
      super().__init__()
      self.path = Path()
      dims = (80, 64, 48, 32, FEAT)
      self.snn = nn.Sequential(*[m for a, b in zip(dims, dims[1:])
                                 for m in (nn.Linear(a, b), nn.ELU(), nn.AlphaDropout(0.1))])
      self.omic_cls, self.g1, self.g2 = nn.Linear(FEAT, NC), Gate(), Gate()
      self.enc = nn.Sequential(nn.Dropout(0.1), nn.Linear(129 * 129, FEAT), nn.BatchNorm1d(FEAT),
                               nn.ReLU(), nn.Dropout(0.1), nn.Linear(FEAT, FEAT),
                               nn.BatchNorm1d(FEAT), nn.ReLU(), nn.Dropout(0.1))
      self.cls = nn.Linear(FEAT, NC)

    def forward(self, x, omic):
      h_p, _ = self.path(x)
      h_o = F.relu(self.snn(omic))
      v1, v2 = F.relu(h_p), F.relu(h_o)
      one = torch.ones(len(x), 1)
      o1 = torch.cat([self.g1(v1, v1, v2), one], 1)
      o2 = torch.cat([self.g2(v2, v1, v2), one], 1)
      h_f = self.enc(torch.bmm(o1[:, :, None], o2[:, None, :]).flatten(1))
      return h_f, self.cls(h_f)

  student, ema_student, teacher = Path(), Path(), Teacher().train()
  embed = nn.ModuleList([nn.Linear(FEAT, FEAT) for _ in range(4)])  # s0, t0, s1, t1
  params = list(student.parameters()) + list(embed.parameters())
  opt = torch.optim.Adam(params, lr=5e-4, betas=(0.9, 0.999), weight_decay=4e-4)
  opt_ce = torch.optim.Adam(student.parameters(), lr=5e-4, weight_decay=4e-4)
  for p in list(ema_student.parameters()) + list(teacher.parameters()):
    p.requires_grad_(False)
  mem = torch.rand(4, args.n_data, FEAT) * 0.306 - 0.153
  z = [None] * 4
  s = args.image_size
  images = torch.from_numpy(host["image"]).float() / 255
  omic, y = torch.from_numpy(host["tabular"]), torch.from_numpy(host["label"]).long()
  index, cidx = torch.from_numpy(host["index"]).long(), torch.from_numpy(host["contrast_index"]).long()

  def view():  # the seed's flips, random crop, (gray) jitter, normalisation to [-1, 1]
    x = images.flip(2) if torch.rand(()) < 0.5 else images
    x = x.flip(1) if torch.rand(()) < 0.5 else x
    o = np.random.randint(0, x.shape[1] - s + 1, 2)
    x = x[:, o[0]:o[0] + s, o[1]:o[1] + s] * (0.9 + 0.2 * torch.rand(len(x), 1, 1))
    return ((x.clamp(0, 1) - 0.5) / 0.5)[:, None].expand(-1, 3, -1, -1).contiguous()

  def dscd(k, q_s, q_t):  # CRD_loss_v2 + ContrastMemory_v4 (one instance: banks 2k, 2k + 1)
    ms, mt = mem[2 * k], mem[2 * k + 1]
    w_s, w_t = ms[cidx], mt[cidx]  # (B, P + K, D)
    x_s = torch.exp(torch.bmm(w_t, q_s[:, :, None])[..., 0] / 0.07)
    x_t = torch.exp(torch.bmm(w_s, q_t[:, :, None])[..., 0] / 0.07)
    with torch.no_grad():
      r_t = F.cosine_similarity(w_t[:, :P], q_t[:, None], dim=2)
      r_s = F.cosine_similarity(w_s[:, :P], q_s[:, None], dim=2)
      sel = torch.topk(r_t - r_s, P2, dim=1).indices
      sel[:, 0] = 0
    loss = 0
    for j, x in enumerate((x_s, x_t)):
      x = torch.cat([torch.gather(x[:, :P], 1, sel), x[:, P:]], 1)
      if z[2 * k + j] is None:
        z[2 * k + j] = (x.mean() * args.n_data).item()
      x = x / z[2 * k + j]
      c = K / args.n_data
      loss = loss - (torch.log(x[:, :P2] / (x[:, :P2] + c + 1e-7)).sum(1) / P2
                     + torch.log(c / (x[:, P2:] + c + 1e-7)).sum(1)).mean()
    with torch.no_grad():
      for b, q in ((2 * k, q_s), (2 * k + 1, q_t)):
        mem[b, index] = F.normalize(0.5 * mem[b, index] + 0.5 * q.detach(), dim=1)
    return loss

  state = {"scale": None}

  def gmcd_step():
    v1, v2 = view(), view()
    f_s, logit_s = student(v1)
    with torch.no_grad():
      f_t, logit_t = teacher(v1, omic)
      f_e, logit_e = ema_student(v2)
    grads = {}
    f_s.register_hook(lambda g: grads.__setitem__("g", g.detach().clone()))
    kl = lambda t: F.kl_div(F.log_softmax(logit_s, 1), F.softmax(t, 1), reduction="sum") / len(v1)
    q_s = [F.normalize(embed[2 * k](f_s), dim=1) for k in range(2)]
    q_t = [F.normalize(embed[2 * k + 1](f), dim=1) for k, f in enumerate((f_t, f_e))]
    losses = [kl(logit_t), kl(logit_e), 0.02 * dscd(0, q_s[0], q_t[0]), 0.02 * dscd(1, q_s[1], q_t[1]),
              F.cross_entropy(logit_s, y)]
    g = []
    for loss in losses:  # the seed's GKM: a full backward per loss, the feature's gradient kept
      opt.zero_grad()
      loss.backward(retain_graph=True)
      g.append(grads["g"].flatten())
    g = torch.stack(g)
    cos = (g @ g.T) / (g.norm(dim=1)[:, None] * g.norm(dim=1)[None])
    scale = (cos > 0.1).float().sum(1)
    state["scale"] = scale if state["scale"] is None else 0.5 * state["scale"] + 0.5 * scale
    total = losses[-1] + sum(w * l for w, l in zip(state["scale"][:4], losses[:4]))
    opt.zero_grad()
    total.backward()
    opt.step()
    with torch.no_grad():
      for e, p in zip(ema_student.parameters(), student.parameters()):
        e.mul_(0.99).add_(p, alpha=0.01)
    return total.item()

  def ce_step():
    _, logits = student(view())
    loss = F.cross_entropy(logits, y)
    opt_ce.zero_grad()
    loss.backward()
    opt_ce.step()
    return loss.item()

  return {"torch_gmcd": gmcd_step, "torch_ce": ce_step}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--image_size", type=int, default=512)
  parser.add_argument("--n_data", type=int, default=1200, help="training studies (bank rows)")
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--steps_per_round", type=int, default=2)
  parser.add_argument("--no_torch", action="store_true")
  args = parser.parse_args()
  import jax
  host = _batch(args, args.n_data)
  print(json.dumps({"backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
                    "batch": args.batch, "image_size": args.image_size, "dtype": args.dtype,
                    "loadavg": os.getloadavg()}), flush=True)
  runs = jax_steps(args, host)
  for run in runs.values():  # compile + a warm-up step
    for _ in range(2):
      run[1], metrics = run[0](run[1], run[2])
    jax.block_until_ready(metrics)
  fns = {} if args.no_torch else torch_steps(args, host)
  for fn in fns.values():
    fn()
  times = {k: [] for k in (*runs, *fns)}
  for _ in range(args.rounds):  # alternating rounds
    for name, run in runs.items():
      t0 = time.perf_counter()
      for _ in range(args.steps_per_round):
        run[1], metrics = run[0](run[1], run[2])
      jax.block_until_ready((run[1], metrics))
      times[name].append((time.perf_counter() - t0) / args.steps_per_round)
    for name, fn in fns.items():
      t0 = time.perf_counter()
      for _ in range(args.steps_per_round):
        fn()
      times[name].append((time.perf_counter() - t0) / args.steps_per_round)
  med = {k: statistics.median(v) for k, v in times.items()}
  for k, v in med.items():
    print(json.dumps({"variant": k, "sec_per_step": round(v, 4), "images_per_s": round(args.batch / v, 2),
                      "times": [round(t, 4) for t in times[k]]}), flush=True)
  summary = {"dscd_gkm_overhead_of_ce": round((med["gmcd"] - med["kd"]) / med["ce"], 3)}
  if fns:
    summary.update(speed_vs_torch=round(med["torch_gmcd"] / med["gmcd"], 3),
                   ce_speed_vs_torch=round(med["torch_ce"] / med["ce"], 3))
  print(json.dumps(summary), flush=True)


if __name__ == "__main__":
  main()
