"""CXR->CTPA knowledge distillation with a DALLE-2 diffusion prior (seed 000, spec A).

  python -m cxrjax.launch --config configs/prior.py            # default: ~3 min on 2 CPU cores
  python -m cxrjax.launch --config configs/prior.py:paper      # the paper's sizes and optimiser
  python -m cxrjax.launch --config configs/prior.py:tiny       # seconds; for tests
  python -m cxrjax.launch --config configs/prior.py:curve      # + the label-efficiency curve, ~20 min
  python -m cxrjax.launch --config configs/prior.py:phantoms   # CXR embeddings of phantom images, ~6 min

Four stages, each checkpointed and resumable: (1) CTPA-only classifier (the frozen
teacher head h), (2) X-ray-only classifier (baseline), (3) the prior, trained on CXR/CTPA
pairs (labels not needed) with w_diff * diffusion loss + w_cls * BCE(h(prior(CXR)), h(CTPA)),
(4) evaluation of h(prior(CXR)) on the test set.

Where the seed's code is broken we default to the intended behaviour:
  * loss.faithful_no_grad_cls=False: the classification term has a gradient and sees
    unscaled embeddings. True reproduces the seed (no gradient, U applied to x*sqrt(d)).
  * The seed's EMA config keys were ignored by its trainer; we use the library defaults it
    really ran with (beta 0.9999, after 100 steps, every 10, power 2/3).
Data: `data.source` = synthetic (embedded default) | seed_layout (y_{train,valid,test}.csv +
one .npy per accession) | npz | table (parquet/CSV) | phantoms (CXR embeddings computed by an image
encoder from rendered phantom radiographs, the CTPA side from the phantom world's PE state:
systems/prior/phantom_pairs.py; the encoder is the classifier system, configured in
`phantoms.encoder` as configs/classifier.py is, or `phantoms.encoder_file`).
"""
import importlib.util
import os

import ml_collections

from cxrjax.core import config_blocks as blocks

VARIANTS = ("default", "paper", "tiny", "curve", "curve_tiny", "phantoms", "phantoms_tiny")


def _classifier_config(variant: str) -> ml_collections.ConfigDict:
  """configs/classifier.py's config: the phantoms source's CXR encoder is that system."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "classifier.py")
  spec = importlib.util.spec_from_file_location("cxrjax_config_classifier_for_prior", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = blocks.variant(arg, VARIANTS, "configs/prior.py")
  c = ml_collections.ConfigDict()
  c.system = "prior"
  c.variant = variant
  c.seed = 0
  c.mesh = dict(data=-1, fsdp=1)
  c.init_from = ""  # a prior-stage checkpoint directory to start the prior from
  c.tensorboard = True

  c.data = dict(
      source="synthetic",
      synthetic=dict(seed=0, n_labelled=300, n_unlabelled=3000, n_valid=300, n_test=500,
                     cxr_dim=128, ctpa_dim=128),
      seed_layout=dict(root="", ctpa_dir="", cxr_dir=""),
      path="",  # for source=npz or table
      normalize="minmax",  # minmax (seed: global scalar min/max -> [-1, 1]) | l2_sqrt_d | standardize | none
  )

  # Stages 1-2: heads on raw embeddings (inputs standardised with train statistics). hidden=()
  # is a linear head, like the `.classifier` Linear of the seed's DenseNet teacher; give widths
  # (e.g. (256,)) for an MLP. The checkpoint with the best validation AUC is kept.
  c.classifier = dict(hidden=(), dropout=0.2)
  c.classifier_train = blocks.stage(
      600, 64, blocks.optim(1e-3, weight_decay=1e-2, schedule="cosine", warmup_steps=20,
                            grad_clip=1.0),
      logs=6, evals=12, checkpoints=3, keep=1)

  # Stage 3: DiffusionPriorNetwork (spec A.2). dim=0 means "the CTPA embedding dimension".
  # max_text_len: the seed's 77 learned null-text tokens (CLIP's text length; no text is ever
  # given). The CPU default keeps 8 of them to fit its 5-minute budget; :paper keeps 77.
  c.prior = dict(dim=0, depth=4, heads=4, dim_head=64, ff_mult=4, attn_dropout=0.05,
                 ff_dropout=0.05, num_timesteps=1000, max_text_len=8, normformer=True,
                 rotary=True, remat=False, dtype="float32")  # dtype: compute (bfloat16 on GPU)
  c.diffusion = dict(timesteps=64, schedule="cosine", parametrisation="x0", cond_drop_prob=0.1,
                     image_embed_scale=0.0)  # 0: sqrt(dim) as in the seed
  c.loss = dict(w_diff=0.8, w_cls=0.2, cls_target="teacher", faithful_no_grad_cls=False)
  c.train = blocks.stage(
      2500, 64, blocks.optim(3e-4, b2=0.99, eps=1e-6, weight_decay=0.0602, schedule="cosine",
                             warmup_steps=50, grad_clip=0.5),
      logs=25, checkpoints=5, keep=2,
      ema=dict(enabled=True, beta=0.9999, update_after_step=100, update_every=10, inv_gamma=1.0,
               power=2 / 3))
  # Stage 4: sampling and evaluation.
  # The distilled P(PE) averages the teacher head over num_samples draws per CXR (a Monte
  # Carlo estimate of E[h(CTPA) | CXR]); the seed's evaluation code is not published.
  # steps == diffusion.timesteps is the seed's ancestral DDPM; fewer steps use DDIM (the CPU
  # default takes 16 to fit its time budget; :paper samples with all 64).
  c.sampling = dict(steps=16, best_of=1, num_samples=8, eta=1.0, cond_scale=1.0, batch_size=4096,
                    seed=0)
  # The table's linear reference rows (systems/prior/references.py), fitted on the same pairs.
  c.eval = dict(n_bootstrap=1000, seed=0, references=dict(ridge_alpha=100.0, soft_label_C=0.1))
  # data.source='phantoms': n_labelled of the phantom training studies keep their PE label, the
  # rest are unlabelled pairs; encoder_file (a DenseNet file, read with encoder_intensity) replaces
  # training the encoder.
  c.phantoms = dict(n_labelled=300, ctpa_dim=128, encoder_file="", encoder_intensity="unit",
                    encoder=_classifier_config("tiny" if variant == "phantoms_tiny" else "default"))
  c.phantoms.encoder.tensorboard = False
  # The label-efficiency curve (systems/prior/curve.py): the whole job again at every
  # (labelled, unlabelled) size of the synthetic world; empty = no curve.
  c.curve = dict(labelled=(), unlabelled=())

  if variant == "paper":
    c.data.synthetic.update(cxr_dim=512, ctpa_dim=512, n_labelled=784, n_unlabelled=0,
                            n_valid=98, n_test=98)
    c.prior.update(depth=12, heads=12, max_text_len=77)
    c.train.steps = 13000
    blocks.set_counts(c.train, logs=130, checkpoints=13)
    c.train.optim.update(lr=1.1e-4, schedule="constant")
    c.sampling.update(steps=64)
  elif variant == "curve":
    # 7 more runs of the default job (its own point, 300 labels / 3000 pairs, is reused).
    c.curve.update(labelled=(50, 100, 300, 1000), unlabelled=(3000, 10000))
  elif variant == "phantoms":
    # DenseNet-121 at 64 px on 4000 phantom studies (3200 train: 300 labelled + 2900 pairs).
    c.data.source = "phantoms"
    c.phantoms.encoder.data.update(phantom_config=("size=64", "num_studies=4000", "views=frontal"),
                                   image_size=64)
  elif variant in ("tiny", "curve_tiny", "phantoms_tiny"):
    c.data.synthetic.update(n_labelled=64, n_unlabelled=192, n_valid=48, n_test=64, cxr_dim=16,
                            ctpa_dim=16)
    c.classifier_train.update(steps=20, batch_size=16)
    blocks.set_counts(c.classifier_train, logs=2, evals=2, checkpoints=2)
    c.classifier_train.optim.update(lr=3e-2, warmup_steps=2)
    c.prior.update(depth=1, heads=2, dim_head=8, max_text_len=4)
    c.diffusion.timesteps = 8
    c.train.update(steps=20, batch_size=16)
    blocks.set_counts(c.train, logs=2, checkpoints=2)
    c.train.ema.update(update_after_step=4, update_every=2)
    c.sampling.update(steps=8, batch_size=64, num_samples=2, best_of=2)
    c.eval.n_bootstrap = 200
    c.tensorboard = False
    if variant == "curve_tiny":
      c.curve.update(labelled=(32, 64), unlabelled=(192, 384))
    if variant == "phantoms_tiny":  # the classifier's :tiny world: 240 studies, ~190 in train
      c.data.source = "phantoms"
      c.phantoms.update(n_labelled=64, ctpa_dim=16)
      c.sampling.best_of = 1  # best-of ranks samples by similarity to the CXR: equal dims only
  return c
