"""torchvision's ResNet-18 rebuilt in PyTorch: the reference the JAX ResNet (models/resnet.py) is
checked and timed against.

torchvision does not install beside the pinned torch 2.13, so this reproduces
``torchvision.models.resnet18``'s modules, state-dict names (``conv1``, ``bn1``,
``layer{s}.{b}.{conv1,bn1,conv2,bn2}``, ``layer{s}.0.downsample.{0,1}``, ``fc``; the names
models/resnet_convert.py reads) and forward (7x7/2 stem, 3x3/2 max-pool, four stages of two
BasicBlocks, global average pool), with torch's default initialisation. Channels-first (B, 3, H, W)
inputs, as torch runs them. ``head=False`` leaves ``fc`` out, for networks that put their own
head on the pooled features (GMCD's path network). Used by the parity tests
(tests/test_gmcd_models.py) and the CPU speed reference (benchmarks/gmcd_step.py); needs the
``torch`` extra, imported only when called.
"""
from __future__ import annotations


def build_torch_resnet18(num_classes: int = 1000, head: bool = True):
  """A torch.nn.Module; forward(x) -> (pooled features (B, 512), logits (B, num_classes) or None)."""
  from torch import nn
  from torch.nn import functional as F

  class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(cout)
      self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(cout)
      self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                       nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else None)

    def forward(self, x):
      out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
      return F.relu(out + (x if self.downsample is None else self.downsample(x)))

  class ResNet18(nn.Module):
    def __init__(self):
      super().__init__()
      self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
      self.bn1 = nn.BatchNorm2d(64)
      cin = 64
      for i, cout in enumerate((64, 128, 256, 512)):
        stride = 1 if i == 0 else 2
        setattr(self, f"layer{i + 1}", nn.Sequential(BasicBlock(cin, cout, stride),
                                                     BasicBlock(cout, cout, 1)))
        cin = cout
      self.fc = nn.Linear(512, num_classes) if head else None

    def forward(self, x):
      h = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
      for i in range(1, 5):
        h = getattr(self, f"layer{i}")(h)
      features = h.mean(dim=(2, 3))
      return features, (self.fc(features) if self.fc is not None else None)

  return ResNet18()
