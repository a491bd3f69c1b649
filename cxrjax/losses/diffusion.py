"""The CXR->CTPA prior's training loss (spec A.4) as a free function."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from cxrjax.losses.classification import soft_bce_from_logits

CLS_TARGETS = ("teacher", "label")


def prior_loss(output, target, pred_x0, x0, *, head_logits: Callable, unnormalize: Callable,
               scale: float, w_diff: float = 0.8, w_cls: float = 0.2, cls_target: str = "teacher",
               labels=None, faithful_no_grad_cls: bool = False):
  """w_diff * MSE(output, target) + w_cls * BCE(sigma(h(U(pred_x0))), cls target).

  output, target: (B, D) network output and its regression target (x0, eps or v; the
    seed predicts x0, where output == pred_x0 and target == x0).
  pred_x0, x0: (B, D) predicted and true embeddings in the diffusion space (normalised
    embedding times `scale`, the seed's image_embed_scale = sqrt(D)).
  head_logits: raw CTPA embedding (B, D) -> (B,) logits of the frozen CTPA classifier.
  unnormalize: normalised -> raw embedding (the seed's U).
  cls_target: 'teacher' = the head's own soft prediction on the real embedding (the
    seed); 'label' = the PE label, rows with NaN labels left out.
  faithful_no_grad_cls: reproduce the seed's code exactly: the term is computed without
    gradient (it only changes the logged loss) and U is applied to the *scaled* tensors.
  Returns (total, {'diffusion': mse, 'cls': bce}).
  """
  mse = jnp.mean(jnp.square(output - target))
  if faithful_no_grad_cls:
    logits = head_logits(unnormalize(pred_x0))
    target = jax.nn.sigmoid(head_logits(unnormalize(x0)))
    cls = jax.lax.stop_gradient(soft_bce_from_logits(logits, target))
  else:
    logits = head_logits(unnormalize(pred_x0 / scale))
    if cls_target == "teacher":
      target = jax.nn.sigmoid(jax.lax.stop_gradient(head_logits(unnormalize(x0 / scale))))
      cls = soft_bce_from_logits(logits, target)
    elif cls_target == "label":
      mask = jnp.isfinite(labels)
      cls = soft_bce_from_logits(logits, jnp.where(mask, labels, 0.0), mask=mask)
    else:
      raise ValueError(f"cls_target={cls_target!r}; choose one of {CLS_TARGETS}")
  return w_diff * mse + w_cls * cls, {"diffusion": mse, "cls": cls}
