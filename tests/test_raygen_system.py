"""RayGen end to end through the launcher on its :tiny variant (one shared reference run): every
stage, the tables and figures; the VQ-GAN's alternating generator/discriminator stage killed
mid-run resumes bit-identically (discriminator batch statistics and code usage included); the
generate entry point; and the bad-input errors, each one line."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from launch_util import ROOT, copy_stages, launch, ok, restored_state

TINY = ("--config", os.path.join(ROOT, "configs/raygen.py:tiny"))


def _results(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def reference_run(raygen_tiny_run):
  """The session's uninterrupted tiny run (conftest.py; the RayGen notebook's test shares it)."""
  return raygen_tiny_run


def test_tiny_run_writes_every_table_and_figure(reference_run):
  workdir, proc = reference_run
  r = _results(workdir)
  v = r["vqgan"]
  assert 0 < v["l1"] < 1 and v["psnr"] > 5 and -1 <= v["ssim"] <= 1
  assert 1 <= v["codes_used"] <= v["n_embed"] == 32 and v["codes_per_image"] == 16  # 32 px / 8
  assert 0 <= r["text"]["mlm_accuracy"] <= 1 and r["text"]["vocab_size"] <= 200
  g = r["generation"]
  assert np.isfinite(g["fid"]) and g["fid"] >= -1e-6 and g["n_generated"] == 6
  assert 0 <= g["ms_ssim_diversity"] <= 1
  assert [row["prompt"] for row in g["prompt_fidelity"]][0] == "Large right pleural effusion."
  for row in g["prompt_fidelity"]:
    assert 0 <= row["flag_rate"] <= 1 and row["n"] == 4
  d = r["downstream"]
  assert set(d) >= {"real", "real+100%", "real+50%", "counts"}
  assert d["counts"]["synthetic_half"] <= d["counts"]["synthetic"] <= 20
  for name in ("reconstructions.png", "code_usage.png", "generations.png", "decoding_steps.png",
               "prompt_fidelity.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 1000, name
  text = open(os.path.join(workdir, "results.md")).read()
  for heading in ("tokenizer on the test split", "| generation |", "flagged (prompted)",
                  "macro AUROC"):
    assert heading in text
  assert "[vqgan] step 6/6 eval: val_l1" in proc.stdout


def _leaves(tree):
  import jax
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_vqgan_killed_mid_run_resumes_bit_identical(reference_run, tmp_path):
  workdir, _ = reference_run
  run = str(tmp_path / "run")
  # Everything but the killed stage is copied: the kill and the resumption are under test.
  copy_stages(workdir, run, skip=("vqgan",))
  # Killed at step 5: after the discriminator's start (3) and the step-3 checkpoint.
  killed = launch(*TINY, "--workdir", run, env={"CXRJAX_FAULT_KILL_AT": "vqgan:5"})
  assert killed.returncode != 0 and not os.path.exists(os.path.join(run, "results.json"))
  proc = ok(launch(*TINY, "--workdir", run))
  assert ("[vqgan] resuming: step 3/6" in proc.stdout
          or "[vqgan] training steps 0..6" in proc.stdout), proc.stdout[-3000:]
  assert "[generator] already trained" in proc.stdout  # same tokenizer bits: same fingerprint
  a, b = (restored_state(w, "vqgan") for w in (workdir, run))
  for x, y in zip(_leaves(a), _leaves(b)):
    np.testing.assert_array_equal(x, y)
  assert _results(run)["vqgan"] == _results(workdir)["vqgan"]


def _generate(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", "cxrjax.systems.raygen.generate", *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=600)


def test_generate_writes_pngs_and_refuses_what_it_cannot_serve(reference_run, tmp_path):
  workdir, _ = reference_run
  out = str(tmp_path / "png")
  proc = _generate("--workdir", workdir, "--prompt", "Large left pleural effusion.",
                   "--prompt", "No acute cardiopulmonary abnormality.", "--per_prompt", "2",
                   "--out", out)
  assert proc.returncode == 0, proc.stderr[-3000:]
  record = json.load(open(os.path.join(out, "prompts.json")))
  assert len(record["images"]) == 4 and record["sampling"]["steps"] == 3
  for item in record["images"]:
    assert os.path.getsize(os.path.join(out, item["file"])) > 100
  empty = _generate("--workdir", workdir, "--prompt", "  ")
  assert empty.returncode != 0 and "non-empty prompt" in empty.stderr.strip().splitlines()[-1]
  guided = _generate("--workdir", str(tmp_path / "nothing"), "--prompt", "x")
  last = guided.stderr.strip().splitlines()[-1]
  assert guided.returncode != 0 and "holds no RayGen run" in last and "cxrjax.launch" in last


def test_bad_inputs_are_one_line(reference_run, tmp_path):
  workdir, _ = reference_run
  odd = launch(*TINY, "--workdir", str(tmp_path / "odd"), "--config.data.image_size=36")
  assert odd.returncode != 0
  last = odd.stderr.strip().splitlines()[-1]
  assert "not a multiple of the VQ-GAN's downsampling factor 8" in last
  guide = launch(*TINY, "--workdir", str(tmp_path / "g"), "--config.sampling.guidance_scale=2",
                 "--config.generator.text_dropout=0")
  assert guide.returncode != 0 and "text dropout" in guide.stderr.strip().splitlines()[-1]
  # A tokenizer of another configuration in the same workdir is refused, naming what differs.
  run = str(tmp_path / "other")
  shutil.copytree(workdir, run)
  other = launch(*TINY, "--workdir", run, "--config.vqgan.entropy_weight=0.5")
  assert other.returncode != 0
  assert "entropy_weight" in other.stderr + other.stdout


def test_published_weights_are_loaded_and_only_evaluated(reference_run, tmp_path):
  """--config.vqgan.init_from (a taming state dict) and --config.text.init_from (an HF BERT
  directory with its vocab): nothing trains, the table names the files."""
  import torch
  import transformers
  from cxrjax.models.vqgan_torch import build_taming_vqmodel

  torch.manual_seed(0)
  vq = build_taming_vqmodel(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, attn_resolutions=(),
                            resolution=32, z_channels=8, embed_dim=8, n_embed=32)
  vq_path = str(tmp_path / "vqgan.pt")
  torch.save({"state_dict": vq.state_dict()}, vq_path)  # Lightning's layout
  workdir, _ = reference_run
  bert_dir = str(tmp_path / "bert")
  vocab = open(os.path.join(workdir, "wordpiece", "vocab.txt")).read().split("\n")
  vocab = [v for v in vocab if v]
  config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, intermediate_size=64,
                                   max_position_embeddings=64)
  transformers.BertForMaskedLM(config).save_pretrained(bert_dir)
  shutil.copy(os.path.join(workdir, "wordpiece", "vocab.txt"), bert_dir)
  run = str(tmp_path / "run")
  proc = ok(launch("--config", os.path.join(ROOT, "configs/raygen.py:tokenizer_tiny"),
                   "--workdir", run, f"--config.vqgan.init_from={vq_path}",
                   f"--config.text.init_from={bert_dir}"))
  assert "training steps" not in proc.stdout, proc.stdout[-2000:]
  r = _results(run)
  assert r["vqgan"]["source"] == vq_path and r["text"]["source"] == bert_dir
  assert r["text"]["mlm_accuracy"] is None and r["text"]["vocab_size"] == len(vocab)
  assert not os.path.exists(os.path.join(run, "vqgan")) and not os.path.exists(os.path.join(run, "text"))
