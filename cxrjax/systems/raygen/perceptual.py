"""The VQ-GAN's perceptual network: a DenseNet whose dense-block outputs stand in for LPIPS's VGG.

taming's VQ-GAN adds LPIPS (VGG-16 features with learned channel weights) to its L1 loss (spec
C.3). Neither VGG nor LPIPS's weights can be downloaded here, so the perceptual term compares the
feature maps of a DenseNet instead (losses.vqgan.perceptual_distance, uniform channel weights): by
default a small DenseNet that this system trains on the training split's labels first (stage
'perceptual'), or any DenseNet weights file the user gives (`perceptual.init_from`, e.g.
torchxrayvision's densenet121-res224-all, with `perceptual.intensity='xrv'`). A documented
deviation; the network is frozen while the VQ-GAN trains (a frozen input of its step).
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from cxrjax.core.errors import ConfigError
from cxrjax.core.stage import Run
from cxrjax.core.writers import say
from cxrjax.data.iterators import ShuffledBatches
from cxrjax.evaluate.multilabel import macro_value
from cxrjax.models.densenet import DenseBlock, DenseNet
from cxrjax.models.densenet_convert import load_densenet
from cxrjax.tasks.image_classifier import ImageNetwork, bce_classifier_task


@dataclasses.dataclass(eq=False)
class PerceptualNet:
  """A frozen DenseNet and how VQ-GAN images enter it.

  variables: {'params', 'batch_stats'}; intensity: the range its training images had ('unit':
  [-1, 1], 'xrv': torchxrayvision's [-1024, 1024], 'raw': 0..255); channels: 1 or 3; blocks: which
  dense blocks' outputs are compared (0-based).
  """
  module: DenseNet
  variables: dict
  intensity: str
  channels: int
  blocks: tuple[int, ...]

  def network(self) -> ImageNetwork:
    """The same network as an image classifier on uint8 images (logits, pooled features)."""
    return ImageNetwork(self.module, self.variables, self.intensity, self.channels)

  def feature_maps(self, variables, images) -> list:
    """images (B, S, S, 3) in [-1, 1] -> the chosen dense blocks' outputs [(B, h, w, c), ...],
    eval mode (running statistics). `variables` is this network's (passed as a frozen input)."""
    x = jnp.mean(images, axis=-1, keepdims=True)  # the decoder's three channels -> grey
    if self.intensity == "xrv":
      x = x * 1024.0
    elif self.intensity == "raw":
      x = (x + 1.0) * 127.5
    if self.channels != 1:
      x = jnp.repeat(x, self.channels, axis=-1)
    _, state = self.module.apply(
        variables, x, train=False, mutable=["intermediates"],
        capture_intermediates=lambda m, name: isinstance(m, DenseBlock) and name == "__call__")
    found = state["intermediates"]
    maps = [found[f"denseblock{i + 1}"]["__call__"][0] for i in self.blocks]
    return [m.astype(jnp.float32) for m in maps]


def network(pc, num_labels: int) -> DenseNet:
  return DenseNet(block_config=tuple(pc.block_config), num_classes=num_labels,
                  growth_rate=pc.growth_rate, num_init_features=pc.num_init_features)


def phantom_classifier(run: Run, train, valid, config, parent: dict) -> PerceptualNet:
  """The DenseNet of config.perceptual trained on the training split's labels (masked BCE; the
  validation macro AUROC logged, so a user sees whether it learned anything). It is the VQ-GAN's
  perceptual network unless perceptual.init_from names another, and the evaluator of generated
  images (features for FID, findings for the prompt-fidelity check)."""
  pc = config.perceptual
  module = network(pc, train.labels.shape[1])
  task = bce_classifier_task(module, image_size=config.data.image_size, intensity="unit", channels=1)

  def evaluate(state) -> dict:
    net = ImageNetwork(module, state.variables(), "unit", 1)
    logits, _ = net.extract(valid.images, run.mesh, config.eval.batch_size)
    return {"val_macro_auroc": macro_value(valid.labels, logits)}

  data = ShuffledBatches({"image": train.images, "labels": train.labels}, pc.train.batch_size,
                         seed=config.seed + 1)
  result = run.stage(task, data, pc.train, seed=config.seed + 1, name="classifier", parent=parent,
                     defines={"net": {k: v for k, v in pc.to_dict().items()
                                      if k not in ("train", "init_from", "intensity", "blocks")}},
                     evaluate=evaluate)
  return PerceptualNet(module, result.variables(), "unit", 1, tuple(pc.blocks))


def perceptual_net(classifier: PerceptualNet | None, config) -> PerceptualNet:
  """perceptual.init_from's DenseNet, or the phantom classifier."""
  pc = config.perceptual
  blocks = tuple(pc.blocks)
  if not pc.init_from:
    return classifier
  module, variables, extras = load_densenet(pc.init_from)
  say(f"[perceptual] DenseNet from {pc.init_from} ({len(module.block_config)} blocks, "
      f"{extras['in_chans']} input channel(s), intensity {pc.intensity!r})")
  if max(blocks) >= len(module.block_config):
    raise ConfigError(f"perceptual.blocks={blocks} names a block the DenseNet in {pc.init_from} "
                      f"lacks (it has {len(module.block_config)})")
  return PerceptualNet(module, variables, pc.intensity, extras["in_chans"], blocks)
