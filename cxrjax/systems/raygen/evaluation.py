"""RayGen's tables and figures: the tokenizer's reconstructions and code usage, the text encoder's
masked-language-model accuracy, the generations (FID, diversity, prompt fidelity) and the
downstream real-vs-synthetic classifiers."""
from __future__ import annotations

import numpy as np

from cxrjax.evaluate.figures import figure, image_rows
from cxrjax.evaluate.report import markdown_rows


def tokenizer_table(results: dict) -> str:
  """Markdown: reconstruction and code usage of the VQ-GAN on test, MLM accuracy of the text
  encoder on test."""
  v, t = results["vqgan"], results["text"]
  rows = [["VQ-GAN reconstruction L1 ([0, 1] pixels)", f"{v['l1']:.4f}"],
          ["VQ-GAN reconstruction PSNR (dB)", f"{v['psnr']:.2f}"],
          ["VQ-GAN reconstruction SSIM", f"{v['ssim']:.3f}"],
          ["codes used on test / codebook size", f"{v['codes_used']} / {v['n_embed']}"],
          ["code perplexity on test", f"{v['perplexity']:.1f}"]]
  if t.get("mlm_accuracy") is not None:
    rows += [["text encoder MLM accuracy (15 % of pieces masked)", f"{t['mlm_accuracy']:.3f}"],
             ["text encoder MLM loss", f"{t['mlm_loss']:.3f}"]]
  return markdown_rows(["tokenizer on the test split", "value"], rows)


def generation_table(g: dict) -> str:
  rows = [[f"FID, test reports vs real test images ({g['n_generated']} each)", f"{g['fid']:.2f}"],
          ["FID features", g["fid_network"]],
          ["MS-SSIM between two generations per prompt (lower = more diverse)",
           f"{g['ms_ssim_diversity']:.3f}"],
          ["MS-SSIM between pairs of different real studies (a floor)",
           f"{g['ms_ssim_real_pairs']:.3f}"]]
  s = g["sampling"]
  rows.append(["decoding", f"{s['variant']}, K={s['steps']}, T0={s['temperature']}, "
                           f"alpha={s['topk_filter']}, guidance {s['guidance_scale']}"])
  return markdown_rows(["generation", "value"], rows)


def fidelity_table(g: dict) -> str:
  probe = g["side_probe"]
  rows = []
  for r in g["prompt_fidelity"]:
    side = "" if np.isnan(r["side_agreement"]) else f"{r['side_agreement']:.2f}"
    rows.append([r["prompt"], f"{r['flag_rate']:.2f}", f"{r['normal_rate']:.2f}",
                 f"{r['real_rate']:.2f}", side])
  acc = probe["accuracy"]
  note = (f"Flag rates of the phantom classifier (threshold: flags each finding on real validation "
          f"images as often as it is present). Side: agreement of a left/right density probe whose "
          f"own accuracy on {probe['n']} real studies with a sided effusion is "
          + ("n/a" if np.isnan(acc) else f"{acc:.2f}") + ".")
  return note + "\n\n" + markdown_rows(
      ["prompt", "flagged (prompted)", "flagged (normal prompt)", "flagged (real test)",
       "side agreement"], rows)


def downstream_table(d: dict, arms=("real", "real+100%", "real+50%")) -> str:
  def cell(m):
    return "n/a" if m is None else f"{m['value']:.3f} [{m['lo']:.3f}, {m['hi']:.3f}]"
  names = [r["label"] for r in d[arms[0]]["per_label"]]
  rows = []
  for j, name in enumerate(names):
    rows.append([name] + [cell(d[a]["per_label"][j]["auroc"]) for a in arms])
  rows.append(["**macro AUROC**"] + [cell(d[a]["macro"]["auroc"]) for a in arms])
  rows.append(["macro F1 at 0.5"] + [f"{d[a]['f1']['mean']:.3f}" for a in arms])
  c = d["counts"]
  note = (f"DenseNet classifiers of RayGen's 10 findings, tested on {c['test']} real studies; "
          f"{c['real_train']} real training images, + {c['synthetic']} (100 %) or "
          f"{c['synthetic_half']} (50 %) class-prompted synthetic ones. AUROC [95 % CI].")
  return note + "\n\n" + markdown_rows(["finding"] + list(arms), rows)


def tables(results: dict) -> str:
  parts = [tokenizer_table(results)]
  if "generation" in results:
    parts += [generation_table(results["generation"]), fidelity_table(results["generation"])]
  if "downstream" in results:
    parts.append(downstream_table(results["downstream"]))
  return "\n\n".join(parts)


def plot_generations(texts: list, real: np.ndarray, first: np.ndarray, second: np.ndarray,
                     path: str) -> str:
  """Per test report (columns, its text wrapped above): the real image and two generations."""
  return image_rows({"real": real, "generated": first, "generated (other seed)": second}, path,
                    "Test reports, their real radiographs and RayGen's generations",
                    column_titles=list(texts))


def plot_decoding_steps(texts: list, frames: np.ndarray, path: str) -> str:
  """frames (n, K, S, S): the images each decoding step's codes decode to, one row per prompt."""
  rows = {(t if len(t) < 30 else t[:27] + "..."): frames[i] for i, t in enumerate(texts)}
  return image_rows(rows, path, "Decoding steps (columns): every slot as the step leaves it",
                    column_titles=[f"step {k + 1}" for k in range(frames.shape[1])])


def plot_fidelity(made: dict, path: str) -> str:
  """A few generations per fidelity prompt (rows)."""
  return image_rows(made, path, "Generations from prompts naming one finding")


def plot_reconstructions(images: np.ndarray, recon: np.ndarray, path: str, psnr: float) -> str:
  """Originals over their encode -> decode reconstructions, (n, S, S) in [0, 1] each."""
  return image_rows({"original": images, "reconstruction": recon}, path,
                    f"VQ-GAN reconstructions of test studies (PSNR {psnr:.1f} dB on the split)")


def plot_code_usage(codes: np.ndarray, n_embed: int, path: str) -> str:
  """Code frequencies on the test split, sorted: how much of the codebook the tokenizer uses."""
  counts = np.sort(np.bincount(codes.reshape(-1), minlength=n_embed))[::-1]
  fig = figure(6, 3.2)
  ax = fig.subplots()
  ax.bar(np.arange(n_embed), counts / max(counts.sum(), 1), width=1.0, color="#4c72b0")
  used = int((counts > 0).sum())
  ax.set_title(f"Code usage on test: {used} of {n_embed} codes used", fontsize="small")
  ax.set_xlabel("code (sorted by frequency)")
  ax.set_ylabel("frequency")
  ax.set_yscale("log")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  return path
