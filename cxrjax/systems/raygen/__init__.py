"""RayGen (seed 001, spec C): report text -> chest radiograph through a VQ-GAN's codes, a BERT text
encoder and a text-conditioned masked-token transformer.

`run(config, workdir)` executes the stages of config.stages, each resuming from its own checkpoint:
  1. data        one frontal image and the cleaned report per study, each split read once
  2. classifier  a DenseNet on the training labels: the VQ-GAN's perceptual network (unless
                 perceptual.init_from) and the evaluator of generated images (perceptual.py)
  3. vqgan       the VQ-GAN: generator and PatchGAN discriminator, two updates of one step
  4. wordpiece, text   the vocabulary and the BERT pretrained by MLM (text.py)
  -- config.stages == 'all' goes on --
  5. codes       every split encoded once, cached per tokenizer (generator.py)
  6. generator   the masked-token transformer on codes and frozen text states
  7. evaluation  FID, MS-SSIM diversity, prompt fidelity (quality.py); the downstream classifiers
                 real / real + 100 % / real + 50 % synthetic (downstream.py)
  8. results     results.json / results.md and the figures
With vqgan.init_from / text.init_from the published weights are loaded instead of trained.
`build(config, workdir)` runs 1-6 (loading what is trained) and returns the parts: what
`python -m cxrjax.systems.raygen.generate` and the notebook use.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np

from cxrjax.core.stage import Run
from cxrjax.core.writers import say
from cxrjax.data.features import label_names
from cxrjax.evaluate.report import evaluation_dir, write_results_files
from cxrjax.systems.raygen import data as rdata
from cxrjax.systems.raygen import evaluation, quality
from cxrjax.systems.raygen.downstream import run_downstream
from cxrjax.systems.raygen.generator import Generator, Sampling, cached_codes, train_generator
from cxrjax.systems.raygen.perceptual import PerceptualNet, perceptual_net, phantom_classifier
from cxrjax.systems.raygen.text import TextEncoder, fixed_masking, mlm_metrics, text_encoder
from cxrjax.systems.raygen.tokenizer import (ImageTokenizer, image_tokenizer,
                                             reconstruction_metrics)
from cxrjax.systems.raygen.validate import validate_config

__all__ = ["run", "build", "validate_config", "Parts", "CONFIG_FILE"]

CONFIG_FILE = "raygen_config.json"


@dataclasses.dataclass(eq=False)
class Parts:
  """What the stages made: the job, the splits, the label names and the trained parts
  (generator None when config.stages is 'tokenizer')."""
  job: Run
  splits: dict
  names: list
  classifier: PerceptualNet | None
  tokenizer: ImageTokenizer
  text: TextEncoder
  generator: Generator | None
  fingerprint: dict


def build(config, workdir: str) -> Parts:
  """Runs (or resumes, or loads) stages 1-6."""
  validate_config(config)
  job = Run.start(config, workdir, {"vqgan_train.batch_size": config.vqgan_train.batch_size,
                                    "text_train.batch_size": config.text_train.batch_size,
                                    "perceptual.train.batch_size": config.perceptual.train.batch_size,
                                    "generator_train.batch_size": config.generator_train.batch_size})
  if jax.process_index() == 0:
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
      json.dump(config.to_dict(), f, indent=1, default=str)
  dc = config.data
  sources = dict(zip(("train", "valid", "test"), rdata.open_dataset(dc, workdir).values()))
  splits = {name: rdata.load_reports(src, dc, seed=config.seed, name=name)
            for name, src in sources.items()}
  names = list(label_names(sources["train"]))
  fp = {"data": dc.to_dict(), "seed": config.seed}
  everything = config.stages == "all"
  needs_classifier = everything or (not config.vqgan.init_from and config.vqgan.perceptual_weight
                                    and not config.perceptual.init_from)
  classifier = (phantom_classifier(job, splits["train"], splits["valid"], config, fp)
                if needs_classifier else None)
  perceptual = None
  if not config.vqgan.init_from and config.vqgan.perceptual_weight:
    perceptual = perceptual_net(classifier, config)
  tokenizer = image_tokenizer(job, splits["train"], splits["valid"], perceptual, config, fp)
  text = text_encoder(job, splits["train"], splits["valid"], config, fp)
  generator = None
  if everything:
    cache = os.path.join(dc.data_dir or os.path.join(workdir, "data"), "raygen_codes")
    codes = cached_codes(tokenizer, splits, cache, job.mesh, config.eval.batch_size)
    generator = train_generator(job, splits, codes, text, tokenizer, config, fp)
  return Parts(job, splits, names, classifier, tokenizer, text, generator, fp)


def run(config, workdir: str) -> dict:
  """Runs (or resumes) every stage; returns the results dict written to results.json."""
  parts = build(config, workdir)
  job, test, ec = parts.job, parts.splits["test"], config.eval
  out_dir = evaluation_dir(workdir, config.to_dict(), ("eval", "sampling", "downstream"))
  vq_metrics, codes, recon = reconstruction_metrics(parts.tokenizer, test.images, job.mesh,
                                                    ec.batch_size)
  results = {"config": config.to_dict(), "counts": {k: len(v) for k, v in parts.splits.items()},
             "vqgan": {**vq_metrics, "source": config.vqgan.init_from or "trained here",
                       "codes_per_image": int(codes.shape[1])},
             "text": {**_mlm_on(parts.text, test, config, job),
                      "source": config.text.init_from or "trained here",
                      "vocab_size": parts.text.tokenizer.get_vocab_size(),
                      "max_length": parts.text.tokenizer.max_length}}
  figures = {}
  if parts.generator is not None:
    results["generation"], figures = _generation(parts, config)
    if config.downstream.enabled:
      results["downstream"] = run_downstream(job, parts.splits, parts.names, parts.generator,
                                             config, parts.fingerprint)
  title = "RayGen" if parts.generator is not None else "RayGen tokenizer and text encoder"
  text_md = "\n\n".join([f"# {title} on {config.data.builder} ({config.variant})",
                         f"Studies: {results['counts']}.", evaluation.tables(results)])
  if jax.process_index() == 0:
    n = min(ec.show, len(test))
    evaluation.plot_reconstructions(test.images[:n] / 255.0, recon[:n],
                                    os.path.join(out_dir, "reconstructions.png"), vq_metrics["psnr"])
    evaluation.plot_code_usage(codes, parts.tokenizer.model.n_embed,
                               os.path.join(out_dir, "code_usage.png"))
    for name, draw in figures.items():
      draw(os.path.join(out_dir, name))
    write_results_files(out_dir, results, text_md)
  say("\n" + text_md + f"\n\nresults: {os.path.join(out_dir, 'results.json')}")
  return results


def _mlm_on(text: TextEncoder, split, config, job) -> dict:
  """MLM accuracy on a split (None for a loaded encoder without its MLM head)."""
  if text.mlm_model is None:
    return {"mlm_accuracy": None, "mlm_loss": None}
  ids, mask = text.encode(split.texts)
  masked = fixed_masking(text.tokenizer, ids, mask, text.module.vocab_size, config.text.mask_rate,
                         config.seed + 1)
  return mlm_metrics(text.mlm_model, text.mlm_params, masked, job.mesh, config.eval.batch_size)


def _generation(parts: Parts, config) -> tuple[dict, dict]:
  """FID, diversity and prompt fidelity of generations; the figures to draw."""
  job, ec, gen = parts.job, config.eval, parts.generator
  test, valid = parts.splits["test"], parts.splits["valid"]
  sampling = Sampling.from_config(config.sampling)
  bs = ec.batch_size
  n = min(ec.n_generate, len(test))
  fake = gen.generate(test.texts[:n], job.mesh, seed=config.seed + 50, batch_size=bs,
                      sampling=sampling)
  evaluator, fid_name = quality.fid_network(parts.classifier, ec.fid_network)
  out = {"fid": quality.fid(evaluator, quality.resized_for(test.images[:n], ec.fid_network),
                            quality.resized_for(quality.to_uint8(fake), ec.fid_network),
                            job.mesh, bs),
         "fid_network": fid_name, "n_generated": n}
  m = min(ec.n_diversity, n)
  second = gen.generate(test.texts[:m], job.mesh, seed=config.seed + 51, batch_size=bs,
                        sampling=sampling)
  out["ms_ssim_diversity"] = quality.diversity(fake[:m], second, bs)
  out["ms_ssim_real_pairs"] = quality.diversity(test.images[:m] / 255.0,
                                                test.images[1:m + 1] / 255.0, bs)
  # Prompt fidelity with the phantom classifier (thresholds from real validation images).
  clf = parts.classifier.network()
  val_logits, _ = clf.extract(valid.images, job.mesh, bs)
  thresholds = quality.flag_thresholds(val_logits, valid.labels)
  prompts = [p for _, _, p in quality.FIDELITY_PROMPTS] + [quality.NORMAL_PROMPT]
  made = {p: quality.to_uint8(gen.generate([p] * ec.n_fidelity, job.mesh, seed=config.seed + 60 + i,
                                           batch_size=bs, sampling=sampling))
          for i, p in enumerate(prompts)}
  probe = quality.fit_side_probe(parts.splits["train"].images, parts.splits["train"].texts)
  out["prompt_fidelity"] = quality.prompt_fidelity(
      {p: made[p] for p in prompts[:-1]}, made[quality.NORMAL_PROMPT], test.images, clf,
      thresholds, parts.names, probe, job.mesh, bs)
  out["side_probe"] = probe
  out["sampling"] = dataclasses.asdict(sampling)
  shown = np.arange(min(ec.show, n, m))
  steps = gen.generate([test.texts[i] for i in shown[:2]], job.mesh, seed=config.seed + 50,
                       batch_size=bs, sampling=sampling, per_step=True)
  figures = {
      "generations.png": lambda path: evaluation.plot_generations(
          [test.texts[i] for i in shown], test.images[shown] / 255.0, fake[shown], second[shown],
          path),
      "decoding_steps.png": lambda path: evaluation.plot_decoding_steps(
          [test.texts[i] for i in shown[:2]], steps, path),
      "prompt_fidelity.png": lambda path: evaluation.plot_fidelity(
          {p: made[p][:4] / 255.0 for p in prompts}, path)}
  return out, figures
