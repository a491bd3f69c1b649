"""A DenseNet multi-label chest-X-ray classifier on any study dataset (issue 4's classifier system).

  python -m cxrjax.launch --config configs/classifier.py          # DenseNet-121 on phantoms, ~14 min on 2 CPU cores
  python -m cxrjax.launch --config configs/classifier.py:tiny     # seconds; what the tests run
  python -m cxrjax.launch --config configs/classifier.py \\
      --config.data.builder=mimic_cxr_jpg --config.data.data_dir=~/tfds \\
      --config.data.builder_config="('image_size=256','views=PA,AP')" --config.data.image_size=224

Reads a prepared TFDS study dataset (cxr_phantoms is rendered on first use; the real-data builders
mimic_cxr_jpg, cxr_chexpert and cxr_folder are prepared once from your download with
`python -m cxrjax.data prepare ...`, and `data.builder_config` holds the same key=value items as that
command's --config; left empty it means data.phantom_config for cxr_phantoms and, for the others,
the builder's default config or the only one prepared in data.data_dir). The classifier has one
output per label of the dataset, named as the dataset names them (CheXpert's 14, or a folder's
own). `eval.builder` (with eval.builder_config, eval.split) scores the trained model on another
prepared dataset instead, its labels matched by name and the unmatched listed. It trains with masked BCE (uncertain labels by data.uncertain: 'ignore' masks them,
'ones'/'zeros' map them; optional per-class positive weights), keeps the checkpoint with the best
validation macro AUROC, and reports per-label and macro AUROC / AUPRC on the test split with
percentile-bootstrap 95 % CIs over studies (results.json, results.md, roc.png).

`model.init_from` starts from a local torchvision / torchxrayvision DenseNet file (safetensors or a
weights_only .pt; models/densenet_convert.py): its architecture and input channels are read from
the file and a fresh head (one output per label) replaces one of another size. Inputs: grey levels mapped to [-1, 1]
(intensity='unit') or to torchxrayvision's [-1024, 1024] ('xrv'), 1 channel or 3 replicated ones.
"""
import ml_collections

from cxrjax.core import config_blocks as blocks

VARIANTS = ("default", "tiny")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = blocks.variant(arg, VARIANTS, "configs/classifier.py")
  c = ml_collections.ConfigDict()
  c.system = "classifier"
  c.variant = variant
  c.seed = 0
  c.mesh = dict(data=-1, fsdp=1)
  c.tensorboard = True
  # '' = $JAX_COMPILATION_CACHE_DIR if set, else <workdir>/jax_cache; 'none' = off; else a directory
  c.compile_cache = ""
  c.data = dict(
      builder="cxr_phantoms", data_dir="",  # '' = <workdir>/data
      builder_config=(), phantom_config=("size=128", "num_studies=2000", "views=frontal"),
      image_size=128, views=("PA", "AP"), uncertain="ignore", intensity="unit", channels=1,
      splits=("train", "validation", "test"), read_threads=2)
  c.model = dict(block_config=(6, 12, 24, 16), growth_rate=32, num_init_features=64, bn_size=4,
                 init_from="")
  # 'balanced': positive weight n_neg / n_pos per label, counted on (up to 20000) training studies.
  c.loss = dict(class_weights="none")
  c.augment = dict(scale=(0.85, 1.0), rotate_deg=10.0, translate=0.03, brightness=0.05,
                   contrast=0.05, hflip_prob=0.0)
  # The checkpoint with the best validation macro AUROC is kept (evaluations: train.eval_every).
  c.train = blocks.stage(
      300, 32, blocks.optim(1e-3, weight_decay=1e-4, schedule="cosine", warmup_steps=20),
      logs=12, evals=3, checkpoints=3)
  # builder '' = the test split of the training dataset; else that dataset's eval.split.
  c.eval = dict(batch_size=64, n_bootstrap=1000, alpha=0.05, seed=0, builder="", builder_config=(),
                data_dir="", split="test")
  if variant == "tiny":
    c.data.update(phantom_config=("size=64", "num_studies=240", "views=frontal"), image_size=32)
    c.model.update(block_config=(2, 2), growth_rate=8, num_init_features=16)
    c.train.update(steps=6, batch_size=8)
    blocks.set_counts(c.train, logs=3, evals=2, checkpoints=2)
    c.train.optim.warmup_steps = 2
    c.eval.update(batch_size=16, n_bootstrap=50)
    c.tensorboard = False
  return c
