"""torchvision's DenseNet rebuilt in PyTorch: the reference the JAX DenseNet is checked against.

torchvision does not install beside the pinned torch 2.13, so this reproduces
``torchvision.models.DenseNet`` (``memory_efficient=False``): the same modules, state-dict names
(``features.denseblock1.denselayer1.norm1.weight`` ...), forward (each layer concatenates the
block's feature list, BN -> ReLU -> conv; transitions BN -> ReLU -> 1x1 conv -> 2x2 average pool;
ReLU and global average pool before the classifier) and initialisation (Kaiming-normal
convolutions, unit/zero batch norm, zero classifier bias). Channels-first (B, C, H, W) inputs, as
torch runs them. Used by the parity tests (tests/test_densenet.py) and the CPU speed reference
(benchmarks/densenet_step_torch.py); needs the ``torch`` extra, imported only when called.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence


def build_torch_densenet(block_config: Sequence[int], num_classes: int, in_chans: int = 3,
                         growth_rate: int = 32, bn_size: int = 4, num_init_features: int = 64):
  """A torch.nn.Module with torchvision's DenseNet structure, names and initialisation."""
  import torch
  from torch import nn

  class DenseLayer(nn.Module):
    def __init__(self, cin: int):
      super().__init__()
      self.norm1, self.relu1 = nn.BatchNorm2d(cin), nn.ReLU(inplace=True)
      self.conv1 = nn.Conv2d(cin, bn_size * growth_rate, 1, bias=False)
      self.norm2, self.relu2 = nn.BatchNorm2d(bn_size * growth_rate), nn.ReLU(inplace=True)
      self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False)

    def forward(self, feats):
      h = self.conv1(self.relu1(self.norm1(torch.cat(feats, 1))))
      return self.conv2(self.relu2(self.norm2(h)))

  class DenseBlock(nn.ModuleDict):
    def forward(self, x):
      feats = [x]
      for layer in self.values():
        feats.append(layer(feats))
      return torch.cat(feats, 1)

  class DenseNet(nn.Module):
    def __init__(self):
      super().__init__()
      self.features = nn.Sequential(OrderedDict([
          ("conv0", nn.Conv2d(in_chans, num_init_features, 7, 2, 3, bias=False)),
          ("norm0", nn.BatchNorm2d(num_init_features)), ("relu0", nn.ReLU(inplace=True)),
          ("pool0", nn.MaxPool2d(3, 2, 1))]))
      c = num_init_features
      for i, n in enumerate(block_config):
        block = DenseBlock()
        for j in range(n):
          block.add_module(f"denselayer{j + 1}", DenseLayer(c + j * growth_rate))
        self.features.add_module(f"denseblock{i + 1}", block)
        c += n * growth_rate
        if i != len(block_config) - 1:
          self.features.add_module(f"transition{i + 1}", nn.Sequential(OrderedDict([
              ("norm", nn.BatchNorm2d(c)), ("relu", nn.ReLU(inplace=True)),
              ("conv", nn.Conv2d(c, c // 2, 1, bias=False)), ("pool", nn.AvgPool2d(2, 2))])))
          c //= 2
      self.features.add_module("norm5", nn.BatchNorm2d(c))
      self.classifier = nn.Linear(c, num_classes)
      for m in self.modules():
        if isinstance(m, nn.Conv2d):
          nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, nn.BatchNorm2d):
          nn.init.constant_(m.weight, 1)
          nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.Linear):
          nn.init.constant_(m.bias, 0)

    def forward(self, x):
      f = torch.relu(self.features(x))
      return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(f, 1), 1))

  return DenseNet()
