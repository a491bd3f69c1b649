"""Small prediction heads on pre-computed embeddings."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn


class EmbeddingClassifier(nn.Module):
  """MLP head: (B, D) embeddings -> (B,) logits (num_outputs=1) or (B, num_outputs).

  Plays the CTPA teacher's `.classifier` head in the prior system (frozen after
  its own stage) and the X-ray-only baseline.
  """
  hidden: Sequence[int] = (256,)
  dropout: float = 0.1
  num_outputs: int = 1

  @nn.compact
  def __call__(self, x, *, deterministic: bool = True):
    for width in self.hidden:
      x = nn.gelu(nn.Dense(width)(x))
      x = nn.Dropout(self.dropout, deterministic=deterministic)(x)
    logits = nn.Dense(self.num_outputs)(x)
    return logits[:, 0] if self.num_outputs == 1 else logits
