"""Decoding radiographs from disk to (H, W) uint8 and resizing them to a square.

``load_image`` reads PNG/JPEG (8- or 16-bit, gray or colour) with Pillow and DICOM with pydicom
(the ``dicom`` extra). Every failure is a ``DataError`` naming the file.

Display conventions, as torchxrayvision's ``read_xray_dcm``: bone is bright. DICOM pixels go
through the modality LUT (RescaleSlope/RescaleIntercept), then the VOI LUT or window
(WindowCenter/WindowWidth) when the file has one, then MONOCHROME1 is inverted, then the result
is min-max scaled to 0..255.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from cxrjax.data.errors import DataError

DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", *DICOM_SUFFIXES)


def _to_uint8(arr: np.ndarray, *, lo: float | None = None, hi: float | None = None) -> np.ndarray:
  """Linear map of [lo, hi] (default: the image's own min and max) onto 0..255."""
  arr = np.asarray(arr, np.float64)
  lo = float(arr.min()) if lo is None else lo
  hi = float(arr.max()) if hi is None else hi
  if hi <= lo:  # a constant image carries no contrast; keep it black rather than divide by 0
    return np.zeros(arr.shape, np.uint8)
  return np.clip(np.rint((arr - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)


def _is_dicom(path: Path) -> bool:
  if path.suffix.lower() in DICOM_SUFFIXES:
    return True
  try:
    with open(path, "rb") as f:
      f.seek(128)
      return f.read(4) == b"DICM"  # the DICOM preamble magic, for suffix-less files
  except OSError:
    return False


def _load_raster(path: Path, sixteen_bit: str) -> np.ndarray:
  from PIL import Image

  try:
    with Image.open(path) as im:
      im.load()  # decodes now, so truncation raises here rather than later
      mode = im.mode
      if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im).astype(np.int64)
        if sixteen_bit == "bitdepth":
          return _to_uint8(arr, lo=0, hi=65535)
        return _to_uint8(arr)
      if mode == "F":
        return _to_uint8(np.asarray(im))
      if mode != "L":
        im = im.convert("L")  # RGB/RGBA/P/1/LA: ITU-R 601 luma
      return np.asarray(im, np.uint8).copy()
  except FileNotFoundError:
    raise DataError(f"{path}: image file not found") from None
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise DataError(f"{path}: cannot decode image ({e})") from e


def _dicom_luts():
  """pydicom's apply_modality_lut / apply_voi_lut: `pydicom.pixels` in pydicom >= 3,
  `pydicom.pixel_data_handlers.util` before."""
  try:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut
  except ImportError:
    from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut
  return apply_modality_lut, apply_voi_lut


def _load_dicom(path: Path, apply_voi: bool) -> np.ndarray:
  try:
    import pydicom
  except ImportError:
    raise DataError(f"{path}: reading DICOM needs pydicom (pip install 'cxrjax[dicom]')") from None
  apply_modality_lut, apply_voi_lut = _dicom_luts()
  try:
    ds = pydicom.dcmread(path)
  except FileNotFoundError:
    raise DataError(f"{path}: image file not found") from None
  except Exception as e:  # InvalidDicomError, EOFError, struct errors on truncated headers
    raise DataError(f"{path}: cannot read DICOM ({type(e).__name__}: {e})") from e
  if "PixelData" not in ds:
    if _has_pixel_tag(path):  # the element starts but the file ends inside it
      raise DataError(f"{path}: DICOM pixel data is truncated (the file ends inside it)")
    raise DataError(f"{path}: DICOM has no pixel data")
  try:
    arr = ds.pixel_array
  except Exception as e:  # a truncated PixelData element fails here with various types
    raise DataError(f"{path}: cannot decode DICOM pixel data, truncated or unsupported "
                    f"({type(e).__name__}: {e})") from e
  if arr.ndim == 3 and getattr(ds, "SamplesPerPixel", 1) == 1:
    arr = arr[0]  # multi-frame: the first frame
  photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
  if arr.ndim == 3:  # colour DICOM (RGB/YBR): luma
    from PIL import Image
    rgb = _to_uint8(arr) if arr.dtype != np.uint8 else arr
    return np.asarray(Image.fromarray(np.ascontiguousarray(rgb[..., :3])).convert("L"), np.uint8)
  arr = apply_modality_lut(arr, ds)
  has_voi = "VOILUTSequence" in ds or "WindowCenter" in ds
  if apply_voi and has_voi:
    arr = apply_voi_lut(arr, ds, index=0)
  arr = np.asarray(arr, np.float64)
  if photometric == "MONOCHROME1":  # low values are bright: flip within the image's range
    arr = arr.max() + arr.min() - arr
  return _to_uint8(arr)


def _has_pixel_tag(path: Path) -> bool:
  """Whether the file holds the PixelData tag (7FE0,0010), little- or big-endian: pydicom drops
  an element cut short by the end of the file, and "no pixel data" would then mislead."""
  try:
    data = path.read_bytes()
  except OSError:
    return False
  return b"\xe0\x7f\x10\x00" in data or b"\x7f\xe0\x00\x10" in data


def dicom_view(path: Path | str) -> str | None:
  """The raw ViewPosition of a DICOM file ('PA', 'AP', 'LL', ...), or None when the file is not
  DICOM, cannot be read, has no such element or leaves it blank. Reads the header only."""
  path = Path(path)
  if not path.is_file() or not _is_dicom(path):
    return None
  try:
    import pydicom
    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["ViewPosition"])
  except Exception:  # unreadable headers are reported when the image itself is read
    return None
  view = str(getattr(ds, "ViewPosition", "") or "").strip()
  return view or None


def load_image(path: Path | str, *, sixteen_bit: str = "range", apply_voi: bool = True
               ) -> np.ndarray:
  """One radiograph -> (H, W) uint8, bone bright.

  sixteen_bit: how 16-bit PNGs become 8-bit: 'range' (default) maps the image's own min..max
    to 0..255, right for 12-bit data stored in 16-bit containers; 'bitdepth' maps 0..65535.
  apply_voi: apply a DICOM's VOI LUT / window when it has one.
  """
  if sixteen_bit not in ("range", "bitdepth"):
    raise ValueError(f"sixteen_bit must be 'range' or 'bitdepth', got {sixteen_bit!r}")
  path = Path(path)
  if not path.is_file():
    raise DataError(f"{path}: image file not found")
  if _is_dicom(path):
    return _load_dicom(path, apply_voi)
  return _load_raster(path, sixteen_bit)


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
  """(H, W) uint8 -> (size, size) uint8.

  The long side is CENTRE-CROPPED to the short side (torchxrayvision's XRayCenterCrop: no
  padding border for a model to learn from), then Pillow's bilinear resize, which widens its
  filter when shrinking and so antialiases.
  """
  from PIL import Image

  image = np.asarray(image)
  if image.ndim != 2 or image.dtype != np.uint8:
    raise ValueError(f"expected (H, W) uint8, got {image.shape} {image.dtype}")
  h, w = image.shape
  s = min(h, w)
  top, left = (h - s) // 2, (w - s) // 2
  image = image[top:top + s, left:left + s]
  if s == size:
    return np.ascontiguousarray(image)
  resized = Image.fromarray(np.ascontiguousarray(image)).resize((size, size), Image.BILINEAR)
  return np.asarray(resized, np.uint8)
