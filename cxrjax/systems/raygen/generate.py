"""Report texts -> radiograph PNGs from a trained RayGen workdir.

  python -m cxrjax.systems.raygen.generate --workdir runs/raygen \
      --prompt "Large right pleural effusion." --prompt "No acute cardiopulmonary abnormality." \
      --out generated/ [--prompts_file prompts.txt] [--per_prompt 4] [--guidance 2.0] [--seed 0]

Reads the run's configuration from <workdir>/raygen_config.json, loads every stage from its final
checkpoint (nothing trains: a workdir whose generator has not finished is refused, naming the
command that trains it) and writes <out>/<index>_<sample>.png plus prompts.json. Prompts longer
than the text encoder's positions are truncated with a warning; empty prompts are refused.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys

import ml_collections
import numpy as np
from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "a RayGen workdir trained with configs/raygen.py")
flags.DEFINE_multi_string("prompt", [], "a report text (repeatable)")
flags.DEFINE_string("prompts_file", "", "a text file with one prompt per line")
flags.DEFINE_string("out", "", "output folder (default <workdir>/generated)")
flags.DEFINE_integer("per_prompt", 1, "images per prompt")
flags.DEFINE_float("guidance", None, "classifier-free guidance scale (default: the config's)")
flags.DEFINE_integer("seed", 0, "generation seed")
flags.DEFINE_integer("batch_size", 16, "prompts per compiled batch")


class GenerateError(ValueError):
  """A request this workdir cannot serve; the message says what to run."""


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  from cxrjax.systems.raygen import CONFIG_FILE
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise GenerateError(f"{workdir} holds no RayGen run ({CONFIG_FILE} missing): train one with "
                        f"python -m cxrjax.launch --config configs/raygen.py --workdir {workdir}")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  if config.get("stages") != "all":
    raise GenerateError(f"{workdir} was run with stages={config.get('stages')!r} (the tokenizer "
                        f"only): train the generator with python -m cxrjax.launch --config "
                        f"configs/raygen.py --workdir <a new workdir>")
  final = os.path.join(workdir, "generator", "ckpt", str(config.generator_train.steps))
  if not os.path.isdir(final):
    raise GenerateError(f"{workdir} has no finished generator (no {final}): finish it with "
                        f"python -m cxrjax.launch --config configs/raygen.py:{config.variant} "
                        f"--workdir {workdir}")
  return config


def read_prompts(prompts: list, prompts_file: str) -> list:
  texts = list(prompts)
  if prompts_file:
    with open(prompts_file, encoding="utf-8") as f:
      texts += [line.rstrip("\n") for line in f if line.strip()]
  empty = [i for i, t in enumerate(texts) if not t.strip()]
  if empty or not texts:
    raise GenerateError("give at least one non-empty prompt (--prompt or --prompts_file)"
                        + (f"; prompts {empty} are empty" if empty else ""))
  return texts


def generate_pngs(workdir: str, texts: list, out: str, *, per_prompt: int = 1, seed: int = 0,
                  guidance: float | None = None, batch_size: int = 16) -> list:
  """Writes per_prompt PNGs per text into `out`; returns their paths."""
  from PIL import Image

  from cxrjax.systems.raygen import build
  from cxrjax.systems.raygen.generator import Sampling

  config = load_run_config(workdir)
  sampling = Sampling.from_config(config.sampling)
  if guidance is not None:
    if guidance and not config.generator.text_dropout:
      raise GenerateError("this generator was trained without text dropout: guidance needs "
                          "generator.text_dropout > 0")
    sampling = dataclasses.replace(sampling, guidance_scale=float(guidance))
  parts = build(config, workdir)
  os.makedirs(out, exist_ok=True)
  paths, record = [], []
  for k in range(per_prompt):
    images = parts.generator.generate(texts, parts.job.mesh, seed=seed + 1000 * k,
                                      batch_size=batch_size, sampling=sampling)
    for i, image in enumerate(images):
      path = os.path.join(out, f"{i:04d}_{k}.png")
      Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)).save(path)
      paths.append(path)
      record.append({"file": os.path.basename(path), "prompt": texts[i], "sample": k})
  with open(os.path.join(out, "prompts.json"), "w") as f:
    json.dump({"sampling": dataclasses.asdict(sampling), "seed": seed, "images": record}, f, indent=1)
  return paths


def main(argv):
  del argv
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every checkpoint it opens at INFO
  if not FLAGS.workdir:
    sys.exit("error: --workdir is required")
  try:
    texts = read_prompts(FLAGS.prompt, FLAGS.prompts_file)
    paths = generate_pngs(FLAGS.workdir, texts, FLAGS.out or os.path.join(FLAGS.workdir, "generated"),
                          per_prompt=FLAGS.per_prompt, seed=FLAGS.seed, guidance=FLAGS.guidance,
                          batch_size=FLAGS.batch_size)
  except GenerateError as e:
    sys.exit(f"error: {e}")
  print(f"wrote {len(paths)} images to {os.path.dirname(paths[0])}")


if __name__ == "__main__":
  app.run(main)
