"""Image-generation metrics of RayGen (spec raygen_and_raddiffusion.md C.9) as pure functions.

- FID (C.9.1): `xrv_preprocess` reproduces torchxrayvision's input pipeline as RayGen's
  `FIDDataset` runs it; the features themselves (xrv DenseNet-121 `densenet121-res224-chex`,
  ReLU, global average pool, 1024-d) come from a model outside this module, and
  `fid_from_features` scores them like the seed (numpy covariance with N-1, scipy sqrtm, real
  part, no eps).
- MS-SSIM diversity (C.9.2): `ms_ssim` equals torchmetrics'
  `MultiScaleStructuralSimilarityIndexMeasure(data_range=1.0)` with its defaults;
  `mssim_diversity` adds the seed's per-image preparation and averages over prompt pairs.
- SSIM (C.9.3), PSNR, L1: on dm-pix. `ssim(borders="valid")` is dm-pix's, which equals
  scikit-image's `structural_similarity(gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False)`; `borders="reflect"` is torchmetrics'
  `StructuralSimilarityIndexMeasure`, the one the seed's ModelV1 logged.

Images are batched (N, H, W, C) floats; the JAX metrics return a scalar (reduction "mean", the
torchmetrics elementwise mean over images) or per-image values (N,) (reduction "none").
"""
from __future__ import annotations

from typing import Optional, Sequence

import dm_pix as pix
import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


# --------------------------------------------------------------------------- #
# OpenCV's resize, as separable weight matrices (cv2 is not a dependency)
# --------------------------------------------------------------------------- #
def _area_weights(src: int, dst: int) -> np.ndarray:
  """(dst, src) weights of cv2.INTER_AREA shrinking one axis: each output pixel is the average
  of the source pixels its cell [d*s, (d+1)*s) covers (s = src/dst), weighted by overlap."""
  scale = src / dst
  lo = np.arange(dst)[:, None] * scale
  s = np.arange(src)[None, :]
  overlap = np.clip(np.minimum(lo + scale, s + 1) - np.maximum(lo, s), 0.0, None)
  # cv2 (computeResizeAreaTab) skips partial cells thinner than 1e-3 px without renormalising.
  overlap[overlap <= 1e-3] = 0.0
  return overlap / np.minimum(scale, src - lo)


def _linear_weights(src: int, dst: int, area_mode: bool) -> np.ndarray:
  """(dst, src) weights of cv2's two-tap interpolation: INTER_LINEAR (half-pixel centres), or,
  with area_mode, INTER_AREA enlarging (each output pixel copies its source pixel except
  where its cell straddles a source boundary). Borders replicate, as cv2's clamping does."""
  scale, inv = src / dst, dst / src
  d = np.arange(dst)
  if area_mode:
    sx = np.floor(d * scale).astype(int)
    fx = (d + 1) - (sx + 1) * inv
    fx = np.where(fx <= 0, 0.0, fx - np.floor(fx))
  else:
    f = (d + 0.5) * scale - 0.5
    sx = np.floor(f).astype(int)
    fx = f - sx
  fx = fx.astype(np.float32).astype(np.float64)  # cv2 keeps the fraction in float32
  fx = np.where((sx < 0) | (sx >= src - 1), 0.0, fx)
  sx = np.clip(sx, 0, src - 1)
  w = np.zeros((dst, src))
  np.add.at(w, (d, sx), 1.0 - fx)
  np.add.at(w, (d, np.minimum(sx + 1, src - 1)), fx)
  return w


def cv2_resize_matrices(src_hw: tuple[int, int], dst_hw: tuple[int, int],
                        interpolation: str = "area") -> tuple[np.ndarray, np.ndarray]:
  """(Wy (h, H), Wx (w, W)) with cv2.resize(img, (w, h), interpolation) == Wy @ img @ Wx.T
  for a float (H, W) image. interpolation: "area" (INTER_AREA) or "linear" (INTER_LINEAR)."""
  (sh, sw), (dh, dw) = src_hw, dst_hw
  if interpolation not in ("area", "linear"):
    raise ValueError(f"interpolation must be 'area' or 'linear', got {interpolation!r}")
  shrink = sh >= dh and sw >= dw
  if interpolation == "area" and shrink:
    return _area_weights(sh, dh), _area_weights(sw, dw)
  area_mode = interpolation == "area"
  return _linear_weights(sh, dh, area_mode), _linear_weights(sw, dw, area_mode)


def cv2_resize(image: np.ndarray, size: tuple[int, int], interpolation: str = "area") -> np.ndarray:
  """A float (H, W) image -> (h, w) float32 as cv2.resize(image, (w, h), interpolation) gives
  for float32 input (size is (h, w), not cv2's (w, h)). For uint8 input cv2 would also round
  its fixed-point result to uint8; that rounding is not reproduced."""
  wy, wx = cv2_resize_matrices(image.shape, tuple(size), interpolation)
  return (wy @ np.asarray(image, np.float64) @ wx.T).astype(np.float32)


# --------------------------------------------------------------------------- #
# FID (C.9.1)
# --------------------------------------------------------------------------- #
def _as_images(images) -> list[np.ndarray]:
  """An (N, H, W[, C]) array or a sequence of (H, W[, C]) arrays -> a list of images."""
  return [images[i] for i in range(len(images))] if isinstance(images, np.ndarray) else list(images)


def xrv_preprocess(images, size: int = 224) -> np.ndarray:
  """torchxrayvision's input pipeline as RayGen's FIDDataset applies it, image by image.

  images: (N, H, W) or (N, H, W, C) uint8 or float on the 0..255 scale, or a sequence of
  (H, W[, C]) images of different sizes. Per image: xrv.datasets.normalize(x, 255), i.e.
  (2 x / 255 - 1) * 1024 in float32 (values above 255 raise, as xrv does); channels averaged to
  grey; XRayCenterCrop (a square of side min(H, W) starting at H//2 - side//2, W//2 - side//2);
  XRayResizer(size, engine="cv2"), i.e. cv2.INTER_AREA (exact pixel-area averaging when
  shrinking). Returns (N, size, size, 1) float32 in [-1024, 1024].
  """
  out = []
  for img in _as_images(images):
    img = np.asarray(img)
    if img.max() > 255:
      raise ValueError(f"max image value ({img.max()}) higher than expected bound (255)")
    x = (2 * (img.astype(np.float32) / 255) - 1.0) * 1024
    if x.ndim == 3:
      x = x.mean(axis=2)
    if x.ndim != 2:
      raise ValueError(f"expected an (H, W) or (H, W, C) image, got shape {img.shape}")
    h, w = x.shape
    side = min(h, w)
    y0, x0 = h // 2 - side // 2, w // 2 - side // 2
    out.append(cv2_resize(x[y0:y0 + side, x0:x0 + side], (size, size), "area"))
  return np.stack(out)[..., None]


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)) for means (D,) and covariances (D, D),
  as the seed computes it: scipy's sqrtm, its real part, no eps on the diagonals."""
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  diff = mu1 - mu2
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
  if np.iscomplexobj(covmean):
    covmean = covmean.real
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_features(feats_real, feats_fake) -> float:
  """FID between features (N, D) and (M, D): column means and np.cov(rowvar=False) (N-1)."""
  a, b = np.asarray(feats_real, np.float64), np.asarray(feats_fake, np.float64)
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
    raise ValueError(f"features must be (N, D) and (M, D); got {a.shape} and {b.shape}")
  return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


# --------------------------------------------------------------------------- #
# SSIM, MS-SSIM, PSNR, L1 (C.9.2, C.9.3)
# --------------------------------------------------------------------------- #
def _check_pair(a, b):
  a, b = jnp.asarray(a), jnp.asarray(b)
  if a.ndim != 4 or a.shape != b.shape:
    raise ValueError(f"expected two (N, H, W, C) batches of one shape; got {a.shape} and {b.shape}")
  dtype = jnp.result_type(a.dtype, b.dtype, jnp.float32)
  return a.astype(dtype), b.astype(dtype)


def _reduce(values, reduction: str):
  if reduction == "mean":
    return jnp.mean(values)
  if reduction == "none":
    return values
  raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def _gaussian_1d(sigma: float) -> np.ndarray:
  # torchmetrics' rule: the kernel_size argument is ignored for a Gaussian; 11 taps at sigma 1.5.
  size = int(3.5 * sigma + 0.5) * 2 + 1
  d = np.arange(size) - (size - 1) / 2
  g = np.exp(-0.5 * (d / sigma) ** 2)
  return g / g.sum()


def _blur_valid(x, g):
  """Separable depthwise 'valid' filtering of (N, H, W, C) by the 1-D kernel g on H and W."""
  c, k = x.shape[-1], len(g)
  dn = ("NHWC", "HWIO", "NHWC")
  for shape in ((k, 1, 1, 1), (1, k, 1, 1)):
    kernel = jnp.broadcast_to(jnp.asarray(g, x.dtype).reshape(shape), shape[:3] + (c,))
    x = jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=dn,
                                     feature_group_count=c, precision=jax.lax.Precision.HIGHEST)
  return x


def _infer_range(a, b):
  # torchmetrics' data_range=None: the larger max - min of the two whole batches.
  return jnp.maximum(a.max() - a.min(), b.max() - b.min())


def _torchmetrics_ssim_cs(a, b, data_range, sigma, k1, k2):
  """torchmetrics' _ssim_update: reflect-pad by the kernel radius, Gaussian moments, clamp the
  variances at 0 -> (SSIM averaged over the whole H x W x C map, contrast-sensitivity averaged
  over the map without the radius-wide border), each (N,)."""
  g = _gaussian_1d(sigma)
  p = (len(g) - 1) // 2
  if data_range is None:
    data_range = _infer_range(a, b)
  c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
  pad = ((0, 0), (p, p), (p, p), (0, 0))
  a, b = jnp.pad(a, pad, mode="reflect"), jnp.pad(b, pad, mode="reflect")
  n = a.shape[0]
  # One filtering pass over the five moments, like torchmetrics' concatenated conv.
  m = _blur_valid(jnp.concatenate([a, b, a * a, b * b, a * b]), g)
  mu_a, mu_b, e_aa, e_bb, e_ab = (m[i * n:(i + 1) * n] for i in range(5))
  var_a = jnp.maximum(e_aa - mu_a ** 2, 0.0)
  var_b = jnp.maximum(e_bb - mu_b ** 2, 0.0)
  cov = e_ab - mu_a * mu_b
  upper, lower = 2 * cov + c2, var_a + var_b + c2
  ssim_map = ((2 * mu_a * mu_b + c1) * upper) / ((mu_a ** 2 + mu_b ** 2 + c1) * lower)
  cs_map = (upper / lower)[:, p:-p, p:-p, :]
  return ssim_map.mean(axis=(1, 2, 3)), cs_map.mean(axis=(1, 2, 3))


@jax.jit
def _ssim_valid(a, b, data_range):
  return pix.ssim(a, b, max_val=data_range)


@jax.jit
def _ssim_reflect(a, b, data_range):
  return _torchmetrics_ssim_cs(a, b, data_range, 1.5, 0.01, 0.03)[0]


def ssim(a, b, data_range: Optional[float] = None, *, borders: str = "valid",
         reduction: str = "mean"):
  """SSIM of image batches a, b (N, H, W, C): Gaussian window 11, sigma 1.5, k1 0.01, k2 0.03.

  borders="valid" (default): dm-pix's pix.ssim, the mean over the window positions inside the
  image ((H-10) x (W-10) x C); equal to scikit-image's structural_similarity(...,
  gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=data_range,
  channel_axis=-1) (dm-pix also clips the variances at eps^2 and the covariance at
  sqrt(var_a var_b), which only moves rounding-level values). data_range is required here.
  borders="reflect": torchmetrics' StructuralSimilarityIndexMeasure: reflect padding by 5 and the
  mean over the full H x W x C map; data_range=None infers it as torchmetrics does (the larger
  max - min of the two batches), which is what the seed's ModelV1 used.
  Returns a scalar (reduction "mean") or (N,) ("none").
  """
  a, b = _check_pair(a, b)
  if borders == "valid":
    if data_range is None:
      raise ValueError("ssim(borders='valid') needs data_range (scikit-image requires it too)")
    values = _ssim_valid(a, b, data_range)
  elif borders == "reflect":
    values = _ssim_reflect(a, b, data_range)
  else:
    raise ValueError(f"borders must be 'valid' or 'reflect', got {borders!r}")
  return _reduce(values, reduction)


def _pool2(x):
  # torch's avg_pool2d(2, 2): an odd last row or column is dropped.
  n, h, w, c = x.shape
  x = x[:, :h // 2 * 2, :w // 2 * 2]
  return x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


@jax.jit(static_argnames=("betas", "normalize"))
def _ms_ssim(a, b, data_range, betas, normalize):
  factors = []
  for i in range(len(betas)):
    sim, cs = _torchmetrics_ssim_cs(a, b, data_range, 1.5, 0.01, 0.03)
    if normalize == "relu":
      sim, cs = jax.nn.relu(sim), jax.nn.relu(cs)
    # Contrast-sensitivity at every scale but the coarsest, where the full SSIM stands instead.
    factors.append(sim if i == len(betas) - 1 else cs)
    a, b = _pool2(a), _pool2(b)
  stack = jnp.stack(factors)
  if normalize == "simple":
    stack = (stack + 1) / 2
  return jnp.prod(stack ** jnp.asarray(betas, stack.dtype)[:, None], axis=0)


def ms_ssim(a, b, data_range: Optional[float] = 1.0, *, betas: Sequence[float] = MS_SSIM_BETAS,
            normalize: Optional[str] = "relu", reduction: str = "mean"):
  """MS-SSIM of image batches a, b (N, H, W, C), equal to torchmetrics'
  MultiScaleStructuralSimilarityIndexMeasure(data_range=data_range) with its defaults.

  Per scale (len(betas) of them, 2x2 average pooling between): the torchmetrics SSIM above
  (reflect padding; SSIM averaged over the full map, contrast-sensitivity over the map without
  its 5-pixel border), each ReLU'd when normalize="relu"; the product of cs_1..cs_{K-1} and
  SSIM_K raised to the betas. data_range=None re-infers the range at every scale, as
  torchmetrics does. Like torchmetrics, it refuses sides under 2**K or with side // (K-1)**2 <= 10
  (so 5 scales need sides >= 176, 3 scales >= 44). Returns a scalar ("mean") or (N,) ("none").
  """
  a, b = _check_pair(a, b)
  betas = tuple(float(x) for x in betas)
  if normalize not in (None, "relu", "simple"):
    raise ValueError(f"normalize must be None, 'relu' or 'simple', got {normalize!r}")
  div = max(1, len(betas) - 1) ** 2
  for side in a.shape[1:3]:
    if side < 2 ** len(betas) or side // div <= 10:
      raise ValueError(f"MS-SSIM with {len(betas)} scales needs image sides >= "
                       f"{max(11 * div, 2 ** len(betas))}; got {a.shape[1:3]}")
  return _reduce(_ms_ssim(a, b, data_range, betas, normalize), reduction)


@jax.jit
def _psnr(a, b, data_range):
  return pix.psnr(a / data_range, b / data_range)


_l1 = jax.jit(pix.mae)


def psnr(a, b, data_range: float, *, reduction: str = "mean"):
  """Per-image PSNR 10 log10(data_range^2 / MSE) of batches (N, H, W, C) (dm-pix's, which
  assumes a range of 1, on a / data_range). torchmetrics' PSNR instead pools the MSE over the
  whole batch before the log. Returns a scalar (mean of the per-image values) or (N,)."""
  a, b = _check_pair(a, b)
  return _reduce(_psnr(a, b, data_range), reduction)


def l1(a, b, *, reduction: str = "mean"):
  """Per-image mean absolute error of batches (N, H, W, C) (dm-pix's mae)."""
  a, b = _check_pair(a, b)
  return _reduce(_l1(a, b), reduction)


# --------------------------------------------------------------------------- #
# MS-SSIM diversity (C.9.2)
# --------------------------------------------------------------------------- #
def mssim_preprocess(image, size: int = 512) -> np.ndarray:
  """The seed's per-image preparation for MS-SSIM -> (size, size, 1) float32 in [0, 1].

  image: (H, W), (H, W, 1) or RGB (H, W, 3), uint8 or float. RGB becomes grey with cv2's
  weights 0.299 R + 0.587 G + 0.114 B (what cv2.imread(..., IMREAD_GRAYSCALE) applies, without
  its uint8 rounding); then cv2.resize to size x size (INTER_LINEAR, cv2's default; the
  identity for the generator's 512 x 512 outputs); then division by the image's own max.
  An all-zero image raises (the seed would divide by zero).
  """
  x = np.asarray(image, np.float64)
  if x.ndim == 3 and x.shape[-1] == 3:
    x = x @ np.array([0.299, 0.587, 0.114])
  elif x.ndim == 3 and x.shape[-1] == 1:
    x = x[..., 0]
  if x.ndim != 2:
    raise ValueError(f"expected an (H, W), (H, W, 1) or (H, W, 3) image, got shape {x.shape}")
  if x.shape != (size, size):
    x = cv2_resize(x, (size, size), "linear").astype(np.float64)
  peak = x.max()
  if peak <= 0:
    raise ValueError("an image with no positive pixel cannot be divided by its max")
  return (x / peak).astype(np.float32)[..., None]


def mssim_diversity(pairs_a, pairs_b, size: int = 512, batch_size: int = 16) -> float:
  """Mean MS-SSIM over prompt pairs (lower = more diverse), as the seed's compute_mssim.

  pairs_a, pairs_b: equally long sequences (or (N, H, W[, C]) arrays) of images, the two
  independent generations for each prompt. Each image goes through mssim_preprocess(size),
  each pair through ms_ssim(data_range=1.0); the per-pair scores are averaged.
  """
  a_list, b_list = _as_images(pairs_a), _as_images(pairs_b)
  if len(a_list) != len(b_list) or not a_list:
    raise ValueError("need two equally long, non-empty image lists; "
                     f"got {len(a_list)} and {len(b_list)}")
  scores = []
  for i in range(0, len(a_list), batch_size):
    a = np.stack([mssim_preprocess(x, size) for x in a_list[i:i + batch_size]])
    b = np.stack([mssim_preprocess(x, size) for x in b_list[i:i + batch_size]])
    scores.append(np.asarray(ms_ssim(a, b, 1.0, reduction="none"), np.float64))
  return float(np.concatenate(scores).mean())
