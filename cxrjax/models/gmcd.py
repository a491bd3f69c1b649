"""GMCD's networks (spec gmcd.md §2.1, §3.1, §8): the multimodal teacher, the image-only student.

The seed's teacher is PathomicFusion's ``PathomicNet`` with a ResNet-18 pathology branch; here
the two modalities are an image and an 80-d tabular vector (the phantom world's, or the seed's
genomics), so the spec's path / omic / fused are named image / tabular / fused:

  image (B, H, W, C) -> ResNet-18 (no fc) -> 512 -> fc_new1 (Linear, BN1d, ReLU) -> h_p (B, 128)
                                                                  -> fc_new2 -> logits_image (B, 3)
  tabular (B, 80) -> SNN 80-64-48-32-128 (Linear, ELU, AlphaDropout each) -> ReLU -> h_o (B, 128)
                                                                    -> classifier -> logits_tabular
  (h_p, h_o) -> gated attention per modality -> o1, o2 (B, 128) -> [o1, 1] kron [o2, 1] (B, 16641)
    -> Dropout -> encoder1 (Linear, BN1d, ReLU, Dropout) -> encoder2 (same) -> h_f (B, 128)
                                                                    -> classifier -> logits_fused

The student (§3.1) is the same image branch; it also holds the trainable DSCD projections of
both contrastive instances (§3.4: ``embed_s`` on the student feature, ``embed_t`` on the teacher
feature of each instance, Linear(128 -> 128) then l2-normalisation), which stage 2 optimises with
the student. Stage 2's teachers are the frozen multimodal teacher (its 'fused' feature and
'logits_fused') and the student's own EMA copy (its 'image' feature and 'logits_image').

Initialisation as the seed's ``init_type max``: every nn.Linear of the SNN (its classifier too)
and of the fusion gets W ~ N(0, 1/fan_in), b = 0 (``max_init``); the bilinear gates, batch norms,
fc_new1/fc_new2, the fused classifier and the DSCD projections keep PyTorch's defaults;
the ResNet convolutions are torchvision's (ImageNet weights are grafted over them by the system).

``train`` is torch's ``.train()``: batch statistics in every BatchNorm (with running-stat updates
in the mutable 'batch_stats' collection) *and* active (alpha) dropout, which needs a 'dropout'
rng. The seed runs the teacher and the EMA networks in train mode when they produce targets.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cxrjax.models.prior_layers import l2norm, torch_bias_init, torch_linear_init
from cxrjax.models.resnet import STAGE_SIZES, BatchNorm, ResNet, num_features

Array = jax.Array
Dtype = Any

# PathomicFusion's init_max_weights: W ~ N(0, 1 / fan_in) (std = 1/sqrt(fan_in)), untruncated.
max_init = nn.initializers.variance_scaling(1.0, "fan_in", "normal")

# -alpha * scale of SELU: the value SELU saturates to, which alpha dropout drops to.
ALPHA_PRIME = -1.7580993408473766


def _max_dense(features: int, name: str) -> nn.Dense:
  return nn.Dense(features, kernel_init=max_init, bias_init=nn.initializers.zeros, name=name)


def _torch_dense(features: int, fan_in: int, name: str | None = None) -> nn.Dense:
  return nn.Dense(features, kernel_init=torch_linear_init, bias_init=torch_bias_init(fan_in),
                  name=name)


def alpha_dropout(x: Array, rate: float, rng: Array) -> Array:
  """torch's F.alpha_dropout in training: (...) -> same shape and dtype.

  Each entry is set to alpha' = -1.758... with probability `rate`, then the result is mapped
  affinely, a * (x * keep + alpha' * (1 - keep)) + b with q = 1 - rate,
  a = (q + alpha'^2 q (1 - q))^-1/2 and b = -a (1 - q) alpha', so an input of mean 0 and
  variance 1 keeps mean 0 and variance 1 (Klambauer et al. 2017).
  """
  if rate <= 0.0:
    return x
  if rate >= 1.0:
    return jnp.zeros_like(x)  # as torch at p = 1 (a would divide by zero)
  q = 1.0 - rate
  a = (q + ALPHA_PRIME ** 2 * q * (1.0 - q)) ** -0.5
  b = -a * (1.0 - q) * ALPHA_PRIME
  keep = jax.random.bernoulli(rng, q, x.shape)
  return (a * jnp.where(keep, x, ALPHA_PRIME) + b).astype(x.dtype)


class AlphaDropout(nn.Module):
  """``alpha_dropout`` as a module (torch nn.AlphaDropout): identity when deterministic.

  rng collection 'dropout'. deterministic may be given here or at the call (as nn.Dropout).
  """
  rate: float
  deterministic: bool | None = None

  @nn.compact
  def __call__(self, x: Array, deterministic: bool | None = None) -> Array:
    deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
    if deterministic or self.rate <= 0.0:
      return x
    return alpha_dropout(x, self.rate, self.make_rng("dropout"))


class TabularSNN(nn.Module):
  """The seed's ``MaxNet``: (B, input_dim) -> (h_o (B, feature_dim) >= 0, logits (B, num_classes)).

  Linear -> ELU -> AlphaDropout for each width of hidden + (feature_dim,) (the seed uses ELU, not
  SELU), a ReLU, then the linear classifier. Layers 'encoder1'..'encoder4', 'classifier'.
  """
  input_dim: int = 80
  hidden: Sequence[int] = (64, 48, 32)
  feature_dim: int = 128
  num_classes: int = 3
  dropout_rate: float = 0.1

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> tuple[Array, Array]:
    if x.ndim != 2 or x.shape[-1] != self.input_dim:
      raise ValueError(f"TabularSNN expects (B, {self.input_dim}) inputs, got shape {x.shape}")
    h = x.astype(jnp.float32)
    for i, width in enumerate(tuple(self.hidden) + (self.feature_dim,)):
      h = nn.elu(_max_dense(width, f"encoder{i + 1}")(h))
      h = AlphaDropout(self.dropout_rate)(h, deterministic=not train)
    h = jax.nn.relu(h)
    return h, _max_dense(self.num_classes, "classifier")(h)


class Bilinear(nn.Module):
  """torch nn.Bilinear: (B, I), (B, J) -> (B, features), y_k = x1^T W_k x2 + b_k.

  Params 'kernel' (features, I, J) in torch's layout and 'bias' (features,), both
  U(+-1/sqrt(I)) as torch initialises them.
  """
  features: int

  @nn.compact
  def __call__(self, x1: Array, x2: Array) -> Array:
    bound = x1.shape[-1] ** -0.5
    uniform = lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound,
                                                                       bound)
    kernel = self.param("kernel", uniform, (self.features, x1.shape[-1], x2.shape[-1]))
    bias = self.param("bias", uniform, (self.features,))
    # Contract x1 first: one (B, I) x (I, K*J) matmul, then a batched dot with x2.
    t = jnp.einsum("bi,kij->bkj", x1, kernel)
    return jnp.einsum("bkj,bj->bk", t, x2) + bias


class GatedAttention(nn.Module):
  """One modality's gated multimodal unit: (v (B, D), v1 (B, D1), v2 (B, D2)) -> o (B, features).

  h = ReLU(linear_h(v)); z = linear_z(v1, v2) (bilinear, always in the order (v1, v2), as the
  seed calls it for both gates); o = Dropout(ReLU(linear_o(sigmoid(z) * h))). v is v1 for the
  first modality's gate and v2 for the second's.
  """
  features: int
  dropout_rate: float = 0.1

  @nn.compact
  def __call__(self, v: Array, v1: Array, v2: Array, train: bool = False) -> Array:
    h = jax.nn.relu(_max_dense(self.features, "linear_h")(v))
    z = Bilinear(self.features, name="linear_z")(v1, v2)
    o = jax.nn.relu(_max_dense(self.features, "linear_o")(jax.nn.sigmoid(z) * h))
    return nn.Dropout(self.dropout_rate)(o, deterministic=not train)


def kronecker_fusion(o1: Array, o2: Array) -> Array:
  """(B, D1), (B, D2) -> (B, (D1 + 1) * (D2 + 1)): per row, vec([o1, 1] [o2, 1]^T), row-major,
  i.e. entry i * (D2 + 1) + j is [o1, 1]_i * [o2, 1]_j (np.kron of the two rows; the seed's
  ``bmm(o1.unsqueeze(2), o2.unsqueeze(1)).flatten(1)``). The appended 1s keep the unimodal
  terms o1, o2 (and a constant) beside the bimodal products."""
  one = jnp.ones(o1.shape[:-1] + (1,), o1.dtype)
  a = jnp.concatenate([o1, one], axis=-1)
  b = jnp.concatenate([o2, one.astype(o2.dtype)], axis=-1)
  return jnp.einsum("bi,bj->bij", a, b).reshape(a.shape[0], -1)


class GatedBilinearFusion(nn.Module):
  """The seed's ``BilinearFusion`` as GMCD configures it (skip=0, bilinear gates on both
  modalities, scales 1): (v1 (B, D1), v2 (B, D2)) -> h_f (B, mmhid).

  ReLU both inputs; o1 = gate1(v1, v1, v2) (B, dim1), o2 = gate2(v2, v1, v2) (B, dim2);
  kronecker_fusion -> (B, (dim1 + 1)(dim2 + 1)) = (B, 16641) at the defaults; Dropout;
  encoder1 = Linear -> BN1d -> ReLU -> Dropout to mmhid; encoder2 the same, mmhid -> mmhid.
  (The BN layers are GMCD's, PathomicFusion's encoders have none.)
  """
  dim1: int = 128
  dim2: int = 128
  mmhid: int = 128
  dropout_rate: float = 0.1

  @nn.compact
  def __call__(self, v1: Array, v2: Array, train: bool = False) -> Array:
    v1, v2 = jax.nn.relu(v1), jax.nn.relu(v2)
    o1 = GatedAttention(self.dim1, self.dropout_rate, name="gate1")(v1, v1, v2, train)
    o2 = GatedAttention(self.dim2, self.dropout_rate, name="gate2")(v2, v1, v2, train)
    h = nn.Dropout(self.dropout_rate)(kronecker_fusion(o1, o2), deterministic=not train)
    for i in (1, 2):
      h = _max_dense(self.mmhid, f"encoder{i}")(h)
      h = BatchNorm(relu=True, name=f"encoder{i}_bn")(h, train)
      h = nn.Dropout(self.dropout_rate)(h, deterministic=not train)
    return h


class ImageBranch(nn.Module):
  """The seed's ResNet18 path network: (B, H, W, C) -> (h_p (B, feature_dim) >= 0, logits).

  'backbone': models.resnet.ResNet without fc (torchvision names; graft converted ImageNet
  weights at params/.../backbone and batch_stats/.../backbone); 'fc_new1' Linear(512 ->
  feature_dim) -> 'fc_new1_bn' BN1d -> ReLU gives h_p; 'fc_new2' Linear(feature_dim ->
  num_classes) the logits. ``classify(h)`` applies fc_new2 alone (GKM differentiates the
  heads with respect to the feature, spec §3.5).
  """
  feature_dim: int = 128
  num_classes: int = 3
  stage_sizes: Sequence[int] = STAGE_SIZES[18]
  dtype: Dtype = jnp.float32

  def setup(self):
    self.backbone = ResNet(self.stage_sizes, num_classes=None, dtype=self.dtype)
    self.fc_new1 = _torch_dense(self.feature_dim, num_features(self.stage_sizes))
    self.fc_new1_bn = BatchNorm(relu=True)
    self.fc_new2 = _torch_dense(self.num_classes, self.feature_dim)

  def __call__(self, x: Array, train: bool = False) -> tuple[Array, Array]:
    pooled, _ = self.backbone(x, train)
    h = self.fc_new1_bn(self.fc_new1(pooled), train)
    return h, self.fc_new2(h)

  def classify(self, h: Array) -> Array:
    """(B, feature_dim) -> (B, num_classes) logits."""
    return self.fc_new2(h)


class GMCDTeacher(nn.Module):
  """The multimodal teacher (the seed's ``PathomicNet``, pofusion):
  (image (B, H, W, C), tabular (B, input_dim)) -> dict of float32 arrays

    'image'   (B, image_dim)    h_p, the image branch's feature (>= 0)
    'tabular' (B, tabular_dim)  h_o, the SNN's feature (>= 0)
    'fused'   (B, fused_dim)    h_f, the fusion's feature: stage 2's DSCD teacher feature f_t1
    'logits_fused', 'logits_image', 'logits_tabular'  (B, num_classes) pre-softmax logits

  M3LR (stage 1) reads 'fused', 'image' and 'tabular'; stage 2 reads 'fused' and 'logits_fused'.
  Spec names: image_dim = path_dim, tabular_dim = omic_dim, fused_dim = mmhid. Submodules
  'image' (ImageBranch), 'tabular' (TabularSNN), 'fusion' (GatedBilinearFusion), 'classifier'.
  """
  input_dim: int = 80
  tabular_hidden: Sequence[int] = (64, 48, 32)
  image_dim: int = 128
  tabular_dim: int = 128
  fused_dim: int = 128
  num_classes: int = 3
  dropout_rate: float = 0.1
  stage_sizes: Sequence[int] = STAGE_SIZES[18]
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, image: Array, tabular: Array, train: bool = False) -> dict[str, Array]:
    h_p, logits_p = ImageBranch(self.image_dim, self.num_classes, self.stage_sizes, self.dtype,
                                name="image")(image, train)
    h_o, logits_o = TabularSNN(self.input_dim, self.tabular_hidden, self.tabular_dim,
                               self.num_classes, self.dropout_rate, name="tabular")(tabular, train)
    h_f = GatedBilinearFusion(self.image_dim, self.tabular_dim, self.fused_dim, self.dropout_rate,
                              name="fusion")(h_p, h_o, train)
    logits_f = _torch_dense(self.num_classes, self.fused_dim, name="classifier")(h_f)
    return {"image": h_p, "tabular": h_o, "fused": h_f, "logits_fused": logits_f,
            "logits_image": logits_p, "logits_tabular": logits_o}


class GMCDStudent(nn.Module):
  """The image-only student (spec §3.1) with its DSCD projections (§3.4):
  (image (B, H, W, C), teacher_features) -> dict of float32 arrays

    'image'        (B, image_dim)              f_s = h_p, the feature GKM differentiates against
    'logits_image' (B, num_classes)            pre-softmax logits (fc_new2)
    'embed_s'      (K, B, embed_dim)           l2-normalised embed_s_k(f_s), one per DSCD instance
    'embed_t'      (K, B, embed_dim)           l2-normalised embed_t_k(teacher_features[k]); only
                                               when teacher_features is given

  K = len(teacher_dims): the DSCD instances, by default two, (multimodal teacher's 'fused',
  EMA student's 'image'), each teacher feature of width teacher_dims[k]. The projections are
  RepDistiller's ``Embed`` (Linear with torch's default init, then F.normalize); they are unused
  at inference. Methods for GKM, each a function of the feature: ``classify(f_s)`` (logits),
  ``project_student(f_s)`` and ``project_teacher(teacher_features)`` ((K, B, embed_dim)).
  Submodules 'image' (ImageBranch), 'embed_s_0', 'embed_s_1', 'embed_t_0', 'embed_t_1'.
  """
  image_dim: int = 128
  num_classes: int = 3
  embed_dim: int = 128
  teacher_dims: Sequence[int] = (128, 128)
  stage_sizes: Sequence[int] = STAGE_SIZES[18]
  dtype: Dtype = jnp.float32

  def setup(self):
    self.image = ImageBranch(self.image_dim, self.num_classes, self.stage_sizes, self.dtype)
    self.embed_s = [_torch_dense(self.embed_dim, self.image_dim) for _ in self.teacher_dims]
    self.embed_t = [_torch_dense(self.embed_dim, d) for d in self.teacher_dims]

  def __call__(self, image: Array, train: bool = False,
               teacher_features: Sequence[Array] | None = None) -> dict[str, Array]:
    f_s, logits = self.image(image, train)
    out = {"image": f_s, "logits_image": logits, "embed_s": self.project_student(f_s)}
    if teacher_features is None and self.is_initializing():
      # init must create the teacher projections too, whose inputs are not needed for shapes.
      teacher_features = [jnp.zeros((f_s.shape[0], d), jnp.float32) for d in self.teacher_dims]
      self.project_teacher(teacher_features)
    elif teacher_features is not None:
      out["embed_t"] = self.project_teacher(teacher_features)
    return out

  def classify(self, f_s: Array) -> Array:
    """(B, image_dim) -> (B, num_classes) logits."""
    return self.image.classify(f_s)

  def project_student(self, f_s: Array) -> Array:
    """(B, image_dim) -> (K, B, embed_dim), unit rows."""
    return jnp.stack([l2norm(e(f_s)) for e in self.embed_s])

  def project_teacher(self, teacher_features: Sequence[Array]) -> Array:
    """K arrays (B, teacher_dims[k]) -> (K, B, embed_dim), unit rows."""
    if len(teacher_features) != len(self.teacher_dims):
      raise ValueError(f"GMCDStudent has {len(self.teacher_dims)} DSCD instances, got "
                       f"{len(teacher_features)} teacher features")
    return jnp.stack([l2norm(e(f)) for e, f in zip(self.embed_t, teacher_features)])
