"""Chest-X-ray augmentations: pure numpy/PIL functions of (image, np.random.Generator).

One image costs one affine warp and one lookup table:
  * geometry: random resized crop, small rotation and translation (and an optional flip) are
    composed into ONE affine map from output pixels to input pixels and applied once with PIL's
    bilinear ``Image.transform`` on the uint8 image (several times faster than scipy.ndimage, and
    one resampling instead of three keeps the image sharper);
  * intensity: brightness and contrast jitter become one 256-entry uint8 lookup table.
With every range at zero the warp is a plain resize to ``size`` x ``size``, so evaluation uses
the same code path (``augment(image, None, cfg)`` or ``resize``).

Coordinates are continuous pixel coordinates, pixel (i, j) covering [j, j+1) x [i, i+1), which is
PIL's convention for ``Image.AFFINE``: output pixel centre p maps to input point A p + t.

Why horizontal flip is OFF by default: a flipped PA film shows the heart on the image's right, i.e.
dextrocardia, an anatomy that hardly occurs in real data; flips also mirror laterality markers and
the side of devices and findings, so a model learns invariances real films never need and
left/right findings in reports stop matching the image. Enable it (``hflip_prob``) only for
side-agnostic tasks.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Augmentation ranges; every draw is uniform in its range.

  size: output side S (images come out S x S).
  scale: range of the crop's area as a fraction of the image's area (random resized crop).
  aspect: range of the crop's width/height ratio (relative to the image's own aspect).
  rotate_deg: maximum absolute rotation in degrees; positive turns content counter-clockwise.
  translate: maximum shift of the crop centre, as a fraction of the image's width/height.
  brightness: maximum additive brightness shift, in units of the full [0, 1] intensity range.
  contrast: maximum relative contrast change: the factor is drawn from [1 - c, 1 + c] (about
    mid-grey).
  hflip_prob: probability of a horizontal flip (0 by default; see the module docstring).
  fill: grey level (0..255) of pixels the warp pulls from outside the image.
  """
  size: int = 256
  scale: tuple[float, float] = (0.7, 1.0)
  aspect: tuple[float, float] = (0.9, 1.1)
  rotate_deg: float = 10.0
  translate: float = 0.05
  brightness: float = 0.1
  contrast: float = 0.1
  hflip_prob: float = 0.0
  fill: int = 0

  def __post_init__(self):
    if self.size < 1:
      raise ValueError(f"size must be >= 1, got {self.size}")
    lo, hi = self.scale
    if not 0.0 < lo <= hi <= 1.0:
      raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")
    lo, hi = self.aspect
    if not 0.0 < lo <= hi:
      raise ValueError(f"aspect must satisfy 0 < lo <= hi, got {self.aspect}")
    if min(self.rotate_deg, self.translate, self.brightness, self.contrast) < 0:
      raise ValueError("rotate_deg, translate, brightness and contrast must be >= 0")
    if not 0.0 <= self.hflip_prob <= 1.0 or not 0 <= self.fill <= 255:
      raise ValueError("hflip_prob must lie in [0, 1] and fill in [0, 255]")

  @classmethod
  def identity(cls, size: int = 256) -> "AugmentConfig":
    """No augmentation: a plain resize to size x size."""
    return cls(size=size, scale=(1.0, 1.0), aspect=(1.0, 1.0), rotate_deg=0.0, translate=0.0,
               brightness=0.0, contrast=0.0, hflip_prob=0.0)


def augment_config(block, size: int) -> AugmentConfig:
  """An AugmentConfig of output side `size` from a config block holding any of its fields
  (lists become tuples; fields the block lacks keep their defaults)."""
  fields = {f.name for f in dataclasses.fields(AugmentConfig)} - {"size"}
  values = block.to_dict() if hasattr(block, "to_dict") else dict(block)
  unknown = sorted(set(values) - fields)
  if unknown:
    raise ValueError(f"augment fields {unknown} are not AugmentConfig's ({sorted(fields)})")
  return AugmentConfig(size=size, **{k: tuple(v) if isinstance(v, list) else v
                                     for k, v in values.items()})


@dataclasses.dataclass(frozen=True)
class AugmentParams:
  """One draw of the augmentation of one image (all in input-image pixels / degrees).

  center: (x, y) centre of the crop in the input image; crop_size: (width, height) of the crop;
  angle_deg: counter-clockwise rotation of the content; flip: mirror horizontally;
  brightness: additive shift in [0, 1] units; contrast: multiplicative factor about 0.5.
  """
  center: tuple[float, float]
  crop_size: tuple[float, float]
  angle_deg: float = 0.0
  flip: bool = False
  brightness: float = 0.0
  contrast: float = 1.0


def identity_params(height: int, width: int) -> AugmentParams:
  """The whole image, unrotated, unchanged intensities."""
  return AugmentParams(center=(width / 2, height / 2), crop_size=(float(width), float(height)))


def sample_params(cfg: AugmentConfig, rng: np.random.Generator, height: int,
                  width: int) -> AugmentParams:
  """Draws one image's augmentation. Always consumes the same number of draws from `rng`, so a
  change of ranges never shifts the random stream of the images that follow."""
  u = rng.random(8)
  area = cfg.scale[0] + (cfg.scale[1] - cfg.scale[0]) * u[0]
  # Log-uniform aspect, as torchvision's RandomResizedCrop, so r and 1/r are equally likely.
  log_lo, log_hi = math.log(cfg.aspect[0]), math.log(cfg.aspect[1])
  ratio = math.exp(log_lo + (log_hi - log_lo) * u[1])
  cw = min(width * math.sqrt(area * ratio), float(width))
  ch = min(height * math.sqrt(area / ratio), float(height))
  # Crop centre uniform over positions that keep the crop inside, then the translation on top.
  cx = cw / 2 + (width - cw) * u[2] + cfg.translate * width * (2 * u[3] - 1)
  cy = ch / 2 + (height - ch) * u[4] + cfg.translate * height * (2 * u[5] - 1)
  angle = cfg.rotate_deg * (2 * u[6] - 1)
  flip = bool(u[7] < cfg.hflip_prob)
  bc = rng.random(2)
  return AugmentParams(center=(cx, cy), crop_size=(cw, ch), angle_deg=angle, flip=flip,
                       brightness=cfg.brightness * (2 * bc[0] - 1),
                       contrast=1.0 + cfg.contrast * (2 * bc[1] - 1))


def affine_matrix(params: AugmentParams, size: int, prescale: float = 1.0) -> tuple[float, ...]:
  """PIL AFFINE coefficients (a, b, c, d, e, f): output point (x, y) -> input point
  (a x + b y + c, d x + e y + f), for an input already shrunk by `prescale` (>= 1).

  input = centre + R(-angle) . diag(sx, sy) . (output - size / 2), where diag scales the output
  square onto the crop and R(-angle) undoes the content's counter-clockwise rotation (y points
  down).
  """
  sx = params.crop_size[0] / size / prescale
  sy = params.crop_size[1] / size / prescale
  if params.flip:
    sx = -sx
  t = math.radians(params.angle_deg)
  cos, sin = math.cos(t), math.sin(t)
  a, b = cos * sx, -sin * sy
  d, e = sin * sx, cos * sy
  cx, cy = params.center[0] / prescale, params.center[1] / prescale
  h = size / 2
  return (a, b, cx - a * h - b * h, d, e, cy - d * h - e * h)


def intensity_lut(brightness: float, contrast: float) -> np.ndarray:
  """(256,) uint8 table v -> clip(((v/255 - 0.5) * contrast + 0.5 + brightness) * 255).

  Contrast pivots on mid-grey rather than the image mean so the table needs no pass over the image.
  """
  v = np.arange(256, dtype=np.float32) / 255.0
  out = ((v - 0.5) * contrast + 0.5 + brightness) * 255.0
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _as_2d_uint8(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.ndim != 2 or image.dtype != np.uint8:
    raise ValueError(f"expected an (H, W) or (H, W, 1) uint8 image, got {image.shape} "
                     f"{image.dtype}")
  return image


def apply(image: np.ndarray, params: AugmentParams, size: int, fill: int = 0) -> np.ndarray:
  """Warps and re-grades one image: (H, W) or (H, W, 1) uint8 -> (size, size) uint8."""
  image = _as_2d_uint8(image)
  pil = Image.fromarray(image)
  # Bilinear sampling of a point aliases when the crop is much larger than the output (a 2500 px
  # film to 256 px); an integer box-filter reduction first keeps the warp's own shrink below 2x.
  shrink = min(abs(params.crop_size[0]), abs(params.crop_size[1])) / size
  prescale = 1
  if shrink >= 2:
    prescale = int(shrink)
    pil = pil.reduce(prescale)
  coeffs = affine_matrix(params, size, prescale)
  if coeffs == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0) and pil.size == (size, size):
    out = pil  # exact identity: skip the resampling
  else:
    out = pil.transform((size, size), Image.AFFINE, coeffs, resample=Image.BILINEAR,
                        fillcolor=int(fill))
  if params.brightness != 0.0 or params.contrast != 1.0:
    out = out.point(intensity_lut(params.brightness, params.contrast).tolist())
  return np.asarray(out)


def augment(image: np.ndarray, rng: np.random.Generator | None, cfg: AugmentConfig) -> np.ndarray:
  """One random augmentation of one image: (H, W) or (H, W, 1) uint8 -> (S, S) uint8.

  rng None means no augmentation (a plain resize), whatever the ranges.
  """
  image = _as_2d_uint8(image)
  h, w = image.shape
  params = identity_params(h, w) if rng is None else sample_params(cfg, rng, h, w)
  return apply(image, params, cfg.size, cfg.fill)


def resize(image: np.ndarray, size: int) -> np.ndarray:
  """The evaluation transform: (H, W) or (H, W, 1) uint8 -> (size, size) uint8."""
  image = _as_2d_uint8(image)
  return apply(image, identity_params(*image.shape), size)
