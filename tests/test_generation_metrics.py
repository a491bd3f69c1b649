"""Tests for cxrjax.evaluate.generation: FID, SSIM, MS-SSIM, PSNR, L1, the cv2 resizes, and the
seed's preprocessing, against closed forms, scikit-image and torchmetrics."""
import jax
import numpy as np
import pytest

from cxrjax.evaluate import generation as gen


def _tm():
  """torchmetrics.image, imported only by the tests that compare with it (the torch extra)."""
  return pytest.importorskip("torchmetrics.image")


def _nchw(x):
  torch = pytest.importorskip("torch")
  return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def _pairs(shape, seed=0):
  """(a, correlated b, unrelated c) float32 images in [0, 1]; a is smooth-ish so SSIM is not
  only noise."""
  rng = np.random.default_rng(seed)
  a = rng.random(shape)
  a = (a + np.roll(a, 1, axis=1) + np.roll(a, 1, axis=2)) / 3
  b = np.clip(a + 0.08 * rng.standard_normal(shape), 0, 1)
  c = rng.random(shape)
  return a.astype(np.float32), b.astype(np.float32), c.astype(np.float32)


# --------------------------------------------------------------------------- FID
def test_frechet_distance_closed_form_diagonal():
  mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([0.5, -1.0, 0.0])
  s1, s2 = np.array([1.0, 2.0, 0.5]), np.array([3.0, 0.25, 0.5])
  want = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
  assert gen.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(want, rel=1e-10)


def test_frechet_distance_commuting_full_covariances():
  # S1 = Q D1 Q^T, S2 = Q D2 Q^T share eigenvectors, so sqrtm(S1 S2) = Q sqrt(D1 D2) Q^T.
  q, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((4, 4)))
  d1, d2 = np.array([1.0, 2.0, 3.0, 4.0]), np.array([0.5, 2.0, 6.0, 1.0])
  mu1, mu2 = np.ones(4), np.zeros(4)
  want = 4.0 + np.sum(d1 + d2 - 2 * np.sqrt(d1 * d2))
  got = gen.frechet_distance(mu1, q @ np.diag(d1) @ q.T, mu2, q @ np.diag(d2) @ q.T)
  assert got == pytest.approx(want, rel=1e-8)


def test_fid_from_samples_approaches_closed_form():
  rng = np.random.default_rng(2)
  mu1, mu2 = np.array([0.0, 1.0, 0.0]), np.array([1.0, 0.0, 0.5])
  s1, s2 = np.array([1.0, 2.0, 0.5]), np.array([2.0, 0.5, 0.5])
  n = 40_000
  x = mu1 + rng.standard_normal((n, 3)) * np.sqrt(s1)
  y = mu2 + rng.standard_normal((n, 3)) * np.sqrt(s2)
  want = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
  assert gen.fid_from_features(x, y) == pytest.approx(want, abs=0.05)
  # The seed's moments: column means and numpy's N-1 covariance.
  assert gen.fid_from_features(x, y) == gen.frechet_distance(
      x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))


def test_fid_identical_features_is_zero_and_shapes_checked():
  f = np.random.default_rng(3).standard_normal((200, 16)).astype(np.float32)
  assert abs(gen.fid_from_features(f, f.copy())) < 1e-8
  assert gen.fid_from_features(f, f + 1.0) == pytest.approx(16.0, abs=1e-6)
  with pytest.raises(ValueError):
    gen.fid_from_features(f, f[:, :8])


# --------------------------------------------------------------------------- SSIM
def test_ssim_valid_matches_scikit_image():
  structural_similarity = pytest.importorskip("skimage.metrics").structural_similarity
  a, b, c = _pairs((3, 48, 56, 3))
  for y in (b, c):
    want = np.mean([structural_similarity(a[i].astype(np.float64), y[i].astype(np.float64),
                                          gaussian_weights=True, sigma=1.5, data_range=1.0,
                                          use_sample_covariance=False, channel_axis=-1)
                    for i in range(3)])
    assert abs(float(gen.ssim(a, y, 1.0)) - want) <= 1e-4
  per_image = gen.ssim(a, b, 1.0, reduction="none")
  assert per_image.shape == (3,)
  with pytest.raises(ValueError):
    gen.ssim(a, b)  # the valid-window SSIM, like scikit-image, needs a data range


def test_ssim_reflect_matches_torchmetrics_and_differs_from_valid():
  a, b, c = _pairs((3, 48, 56, 3), seed=4)
  for y in (b, c):
    for data_range in (None, 1.0):  # None: torchmetrics infers it from the batch
      metric = _tm().StructuralSimilarityIndexMeasure(data_range=data_range)
      want = metric(_nchw(a), _nchw(y)).item()
      got = float(gen.ssim(a, y, data_range, borders="reflect"))
      assert abs(got - want) <= 1e-4
  # The border conventions differ by far more than the tolerance on unrelated images.
  assert abs(float(gen.ssim(a, c, 1.0)) - float(gen.ssim(a, c, 1.0, borders="reflect"))) > 1e-4


# --------------------------------------------------------------------------- MS-SSIM
@pytest.fixture(scope="module")
def ms_images():
  # One shape for every 5-scale call in this file, so ms_ssim compiles once.
  return _pairs((3, 176, 176, 1), seed=5)


def test_ms_ssim_matches_torchmetrics_defaults(ms_images):
  a, b, c = ms_images
  metric = _tm().MultiScaleStructuralSimilarityIndexMeasure(data_range=1.0)
  for y in (b, c, a):
    want = metric(_nchw(a), _nchw(y)).item()
    assert abs(float(gen.ms_ssim(a, y)) - want) <= 1e-4
  assert float(gen.ms_ssim(a, a)) == pytest.approx(1.0, abs=1e-6)
  per_image = gen.ms_ssim(a, b, reduction="none")
  assert per_image.shape == (3,)
  assert float(per_image.mean()) == pytest.approx(float(gen.ms_ssim(a, b)), abs=1e-7)


def test_ms_ssim_fewer_scales_inferred_range_and_jit():
  # 3 scales need sides with side // 4 > 10: small images, cheap compiles.
  a, b, _ = _pairs((2, 48, 52, 3), seed=6)
  betas = (0.2, 0.3, 0.5)
  metric = _tm().MultiScaleStructuralSimilarityIndexMeasure
  want = metric(data_range=1.0, betas=betas)(_nchw(a), _nchw(b))
  jitted = jax.jit(lambda x, y: gen.ms_ssim(x, y, 1.0, betas=betas))
  assert abs(float(jitted(a, b)) - want.item()) <= 1e-4
  # data_range=None: torchmetrics re-infers the range on every pooled scale.
  b = b * 0.7 + 0.2
  want = metric(data_range=None, betas=betas)(_nchw(a), _nchw(b))
  assert abs(float(gen.ms_ssim(a, b, None, betas=betas)) - want.item()) <= 1e-4


def test_ms_ssim_size_check():
  small = np.zeros((1, 160, 160, 1), np.float32)
  with pytest.raises(ValueError, match="sides >= 176"):
    gen.ms_ssim(small, small)
  with pytest.raises(ValueError):
    _tm().MultiScaleStructuralSimilarityIndexMeasure(data_range=1.0)(_nchw(small), _nchw(small))


# --------------------------------------------------------------------------- PSNR, L1
def test_psnr_and_l1():
  a, b, _ = _pairs((2, 16, 20, 1), seed=7)
  a255, b255 = a * 255, b * 255
  got = np.asarray(gen.psnr(a255, b255, 255.0, reduction="none"))
  mse = ((a255.astype(np.float64) - b255) ** 2).mean(axis=(1, 2, 3))
  np.testing.assert_allclose(got, 10 * np.log10(255.0 ** 2 / mse), atol=1e-3)
  # torchmetrics' PSNR pools the MSE over the batch; one image at a time they agree.
  want = _tm().PeakSignalNoiseRatio(data_range=255.0)(_nchw(a255[:1]), _nchw(b255[:1])).item()
  assert got[0] == pytest.approx(want, abs=1e-3)
  const = np.full((1, 8, 8, 1), 0.5, np.float32)
  assert float(gen.psnr(const, const + 0.1, 1.0)) == pytest.approx(20.0, abs=1e-4)
  assert float(gen.l1(a, b)) == pytest.approx(np.abs(a - b).mean(), rel=1e-5)
  assert gen.l1(a, b, reduction="none").shape == (2,)


# --------------------------------------------------------------------------- resizing
def test_area_resize_is_block_average_for_integer_factors():
  x = np.random.default_rng(8).random((12, 18))
  for f in (2, 3, 6):
    want = x.reshape(12 // f, f, 18 // f, f).mean(axis=(1, 3))
    np.testing.assert_allclose(gen.cv2_resize(x, (12 // f, 18 // f)), want, rtol=1e-6)


def test_area_resize_preserves_the_mean_for_non_integer_factors():
  x = np.random.default_rng(9).random((100, 70)) * 2048 - 1024
  for size in ((30, 30), (7, 13), (64, 48)):
    assert gen.cv2_resize(x, size).mean() == pytest.approx(x.mean(), abs=1e-4)


def test_resize_hand_computed_cv2_examples():
  # Values cv2.resize(..., INTER_AREA) gives (checked against opencv 5.1), computed by hand:
  # 5 -> 2: cells [0, 2.5) and [2.5, 5): (x0 + x1 + x2/2) / 2.5 and (x2/2 + x3 + x4) / 2.5.
  np.testing.assert_allclose(gen.cv2_resize(np.arange(5.0)[None], (1, 2)), [[0.8, 3.2]], rtol=1e-6)
  # 7 -> 3, cell width 7/3: (0 + 10 + 20/3) / (7/3).
  got = gen.cv2_resize(np.arange(0.0, 70, 10)[None], (1, 3))
  np.testing.assert_allclose(got, [[50 / 7, 30.0, 370 / 7]], rtol=1e-6)
  np.testing.assert_allclose(gen.cv2_resize(np.arange(25.0).reshape(5, 5), (2, 2)),
                             [[4.8, 7.2], [16.8, 19.2]], rtol=1e-6)
  # Enlarging 3 -> 5, INTER_AREA copies pixels except where a cell straddles a boundary.
  np.testing.assert_allclose(gen.cv2_resize(np.array([[0.0, 3.0, 6.0]]), (1, 5)),
                             [[0.0, 1.0, 3.0, 5.0, 6.0]], atol=1e-6)
  # INTER_LINEAR, half-pixel centres, replicated borders: 2 -> 4.
  np.testing.assert_allclose(gen.cv2_resize(np.array([[0.0, 4.0]]), (1, 4), "linear"),
                             [[0.0, 1.0, 3.0, 4.0]], atol=1e-6)


# --------------------------------------------------------------------------- preprocessing
def test_xrv_preprocess_range_shape_crop_and_grey():
  rng = np.random.default_rng(10)
  imgs = rng.integers(0, 256, (2, 40, 52), dtype=np.uint8)
  imgs[0, 20, 26], imgs[0, 21, 26] = 0, 255
  out = gen.xrv_preprocess(imgs, size=16)
  assert out.shape == (2, 16, 16, 1) and out.dtype == np.float32
  assert out.min() >= -1024 and out.max() <= 1024
  # size = the crop side: the resize is the identity, so the crop offsets show exactly.
  x = rng.integers(0, 256, (6, 9), dtype=np.uint8)
  got = gen.xrv_preprocess([x], size=6)[0, ..., 0]
  want = (2 * (x.astype(np.float32) / 255) - 1) * 1024
  np.testing.assert_allclose(got, want[:, 9 // 2 - 3:9 // 2 + 3], rtol=1e-6)
  extremes = gen.xrv_preprocess([np.array([[0, 255]], np.uint8)], size=1)
  # A 1 x 2 image crops to its column 2 // 2 - 1 // 2 = 1: the 255 pixel.
  assert extremes.shape == (1, 1, 1, 1) and float(extremes[0, 0, 0, 0]) == 1024.0
  np.testing.assert_allclose(gen.xrv_preprocess([np.zeros((3, 3)), np.full((5, 4), 255.0)], 2)
                             [..., 0], [np.full((2, 2), -1024.0), np.full((2, 2), 1024.0)])
  rgb = np.stack([x, x, x], axis=-1)
  np.testing.assert_allclose(gen.xrv_preprocess([rgb], 6), gen.xrv_preprocess([x], 6), rtol=1e-6)
  with pytest.raises(ValueError, match="higher than expected"):
    gen.xrv_preprocess([np.full((4, 4), 300.0)])


def test_mssim_preprocess_and_diversity(ms_images):
  rng = np.random.default_rng(11)
  grey = rng.integers(1, 200, (176, 176), dtype=np.uint8)
  prepared = gen.mssim_preprocess(grey, 176)
  assert prepared.shape == (176, 176, 1) and prepared.max() == pytest.approx(1.0)
  np.testing.assert_allclose(prepared[..., 0], grey / grey.max(), rtol=1e-6)
  rgb = np.stack([grey, grey, grey], -1)
  np.testing.assert_allclose(gen.mssim_preprocess(rgb, 176), prepared, rtol=1e-6)
  assert gen.mssim_preprocess(grey[:88, :88], 176).shape == (176, 176, 1)  # resized up
  with pytest.raises(ValueError):
    gen.mssim_preprocess(np.zeros((176, 176)), 176)

  a, b, _ = ms_images
  a, b = a + 0.01, b + 0.01
  score = gen.mssim_diversity(list(a[..., 0]), list(b[..., 0]), size=176, batch_size=3)
  scaled_a = a / a.max(axis=(1, 2, 3), keepdims=True)
  scaled_b = b / b.max(axis=(1, 2, 3), keepdims=True)
  assert score == pytest.approx(float(gen.ms_ssim(scaled_a, scaled_b)), abs=1e-5)
  assert gen.mssim_diversity(a, a, size=176) == pytest.approx(1.0, abs=1e-6)
