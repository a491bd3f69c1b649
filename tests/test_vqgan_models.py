"""Tests for RayGen's VQ-GAN: models.vqgan, models.patchgan, models.vqgan_convert (spec
raygen_and_raddiffusion.md §C.3).

The reference is taming-transformers' VQModel (Encoder, Decoder, VectorQuantizer2) and the Pix2Pix
NLayerDiscriminator, rebuilt in torch under taming's state-dict names (models/vqgan_torch.py),
tiny and random.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn as tnn

from cxrjax.core.errors import CheckpointError
from cxrjax.models import vqgan_convert as C
from cxrjax.models.patchgan import DiscriminatorBatchNorm, NLayerDiscriminator
from cxrjax.models.vqgan import VQGAN, VectorQuantizer, last_layer, quantizer_loss, with_last_layer
from cxrjax.models.vqgan_torch import build_nlayer_discriminator, build_taming_vqmodel

# Levels at 32, 16, 8 px; attention inside the 8-px level (encoder and decoder) and in the mids.
ARCH = dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,), resolution=32,
            z_channels=16, embed_dim=16, n_embed=64)


class Opaque:
  """An object pickled beside the weights (as an OmegaConf config would be)."""


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


@pytest.fixture(scope="module")
def reference():
  """(torch model, its state dict with a loss entry, images NHWC, torch outputs)."""
  torch.manual_seed(0)
  net = build_taming_vqmodel(**ARCH)
  x = np.random.default_rng(0).uniform(-1, 1, size=(2, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    for m in net.modules():  # norms away from their trivial 1/0
      if isinstance(m, tnn.GroupNorm):
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.2, 0.2)
    z = net.encode_features(_nchw(x))
    # Codes near the encoder's features, so that the argmin spreads over many of them.
    zf = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    pick = torch.randperm(zf.shape[0])[:ARCH["n_embed"]]
    net.quantize.embedding.weight.copy_(zf[pick] + 0.3 * zf.std() * torch.randn_like(zf[pick]))
    idx, dist = net.quantize_codes(z)
    recon = net.decode_indices(idx)
  sd = {k: v.detach().clone() for k, v in net.state_dict().items()}
  sd["loss.discriminator.main.0.weight"] = torch.zeros(8, 3, 4, 4)  # ignored, as taming's loss
  top2 = torch.topk(dist, 2, dim=1, largest=False).values
  return {"sd": sd, "x": x, "z": z.numpy().transpose(0, 2, 3, 1), "idx": idx.numpy(),
          "recon": recon.numpy().transpose(0, 2, 3, 1),
          "margin": float((top2[:, 1] - top2[:, 0]).min())}


# ----------------------------------------------------------------------------- parity
def test_vqgan_matches_taming(reference, tmp_path):
  from safetensors.torch import save_file
  ref = reference
  assert ref["margin"] > 1e-4  # no near-tie in the reference's argmin: the comparison is exact
  assert len(np.unique(ref["idx"])) > 20
  st, pt = str(tmp_path / "vq.safetensors"), str(tmp_path / "vq.ckpt")
  save_file({"model." + k: v.contiguous() for k, v in ref["sd"].items()}, st)  # a prefix
  torch.save({"state_dict": ref["sd"], "epoch": 3, "global_step": 10}, pt)  # Lightning layout
  model, variables = C.load_vqgan(st, resolution=32)
  assert {k: getattr(model, k) for k in ARCH} == ARCH
  _, from_pt = C.load_vqgan(pt, resolution=32, attn_resolutions=(8, 3))  # same levels: accepted
  jax.tree.map(np.testing.assert_array_equal, from_pt, variables)

  @jax.jit
  def run(v, x, idx):
    recon, aux = model.apply(v, x)
    return recon, aux, model.apply(v, idx, method=model.decode_indices)

  recon, aux, decoded = run(variables, ref["x"], ref["idx"])
  assert ref["z"].std() > 0.1 and ref["recon"].std() > 0.05  # not a degenerate comparison
  np.testing.assert_allclose(aux["z"], ref["z"], atol=1e-4, rtol=0)
  np.testing.assert_array_equal(aux["indices"], ref["idx"])
  assert aux["indices"].dtype == jnp.int32 and aux["indices"].shape == (2, 8, 8)
  assert aux["distances"].shape == (2, 8, 8, ARCH["n_embed"])
  np.testing.assert_allclose(decoded, ref["recon"], atol=1e-4, rtol=0)
  np.testing.assert_allclose(recon, ref["recon"], atol=1e-4, rtol=0)
  # Legacy codebook loss: the two terms are equal in value, (1 + beta) * mse.
  codes_vec = variables["params"]["quantize"]["embedding"][ref["idx"]]
  np.testing.assert_allclose(aux["codebook_loss"], 1.25 * np.mean((codes_vec - aux["z"]) ** 2),
                             rtol=1e-5)


def test_converter_errors(reference, tmp_path):
  model = VQGAN(**ARCH)
  sd = {k: v.numpy() for k, v in reference["sd"].items()}
  broken = dict(sd)
  del broken["decoder.up.2.attn.1.q.bias"]
  broken["encoder.down.1.block.0.conv2.weight"] = np.zeros((64, 32, 3, 3), np.float32)
  broken["decoder.up.0.block.3.conv1.weight"] = np.zeros((32, 32, 3, 3), np.float32)
  with pytest.raises(CheckpointError) as err:
    C.convert_state_dict(broken, model)
  msg = str(err.value)
  assert "\n" not in msg
  assert "missing (1): decoder.up.2.attn.1.q.bias" in msg
  assert "unexpected (1): decoder.up.0.block.3.conv1.weight" in msg
  assert "shape mismatch (1): encoder.down.1.block.0.conv2.weight: file (64, 32, 3, 3)" in msg
  with pytest.raises(CheckpointError, match="not a taming VQ-GAN state dict"):
    C.convert_state_dict({"conv1.weight": np.zeros((8, 3, 3, 3))}, model)
  # A file for another architecture is named field by field before any conversion.
  path = str(tmp_path / "vq.pt")
  torch.save(reference["sd"], path)
  with pytest.raises(CheckpointError, match=r"n_embed: file 64, asked 1024"):
    C.load_vqgan(path, resolution=32, n_embed=1024)

  bad = str(tmp_path / "last.ckpt")
  torch.save({"state_dict": reference["sd"], "hparams": Opaque()}, bad)
  with pytest.raises(CheckpointError) as err:
    C.load_vqgan(bad)
  msg = str(err.value)
  assert "weights_only" in msg and "state_dict" in msg and "safetensors" in msg
  assert "\n" not in msg
  with pytest.raises(CheckpointError, match="does not exist"):
    C.load_vqgan(str(tmp_path / "absent.ckpt"))


def test_image_side_must_be_a_multiple_of_the_factor():
  model = VQGAN(**ARCH)
  variables = C._abstract(model)
  with pytest.raises(ValueError, match=r"^image side 30x32 is not a multiple of the VQGAN's "
                                       r"downsampling factor 4"):
    jax.eval_shape(model.apply, variables, jax.ShapeDtypeStruct((1, 30, 32, 3), jnp.float32))
  with pytest.raises(ValueError, match=r"NHWC images \(B, H, W, 3\)"):
    jax.eval_shape(model.apply, variables, jax.ShapeDtypeStruct((1, 3, 32, 32), jnp.float32))


# ----------------------------------------------------------------------------- gradients
def _random_params(model, shape, seed=0):
  """Params shaped as the model's init, filled with N(0, 0.2) (no compiled random init needed)."""
  rng = np.random.default_rng(seed)
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct(shape,
                                                                                   jnp.float32))
  return jax.tree.map(lambda a: (0.2 * rng.normal(size=a.shape)).astype(np.float32),
                      abstract["params"])


def test_straight_through_and_last_layer_gradients():
  """Gradients reach the encoder through the quantiser; the last-layer vjp that the adaptive GAN
  weight uses equals the full gradient at VQGAN.LAST_LAYER."""
  model = VQGAN(ch=32, ch_mult=(1,), num_res_blocks=1, z_channels=8, embed_dim=8, n_embed=16)
  x = np.random.default_rng(2).uniform(-1, 1, size=(2, 4, 4, 3)).astype(np.float32)
  params = _random_params(model, x.shape)
  c = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)

  def loss_of_recon(recon):
    return jnp.sum(recon * c)

  @jax.jit
  def grads(params):
    full = jax.grad(lambda p: loss_of_recon(model.apply({"params": p}, x)[0]))(params)
    recon, vjp, aux = jax.vjp(
        lambda k: model.apply({"params": with_last_layer(params, k)}, x), last_layer(params),
        has_aux=True)
    codes = model.apply({"params": params}, x, method=model.encode)
    return full, vjp(jax.grad(loss_of_recon)(recon))[0], (aux["indices"], codes)

  full, last, (indices, codes) = grads(params)
  np.testing.assert_array_equal(codes, indices)  # encode is the forward's quantisation
  enc = np.concatenate([np.ravel(g) for g in jax.tree.leaves(full["encoder"])])
  assert np.all(np.isfinite(enc)) and np.abs(enc).max() > 1e-3
  assert np.abs(np.asarray(full["quant_conv"]["kernel"])).max() > 1e-3
  # The reconstruction path never moves the codebook: only the codebook loss does.
  assert np.abs(np.asarray(full["quantize"]["embedding"])).max() == 0
  np.testing.assert_allclose(last, last_layer(full), rtol=1e-4, atol=1e-5)
  assert with_last_layer(params, last)["encoder"] is params["encoder"]


@pytest.mark.parametrize("legacy", [True, False])
def test_codebook_loss_weighting(legacy):
  """legacy: beta scales the codebook term (grad wrt codes); otherwise the commitment term."""
  rng = np.random.default_rng(0)
  z = rng.normal(size=(2, 3, 3, 4)).astype(np.float32)
  e = rng.normal(size=(5, 4)).astype(np.float32)
  vq = VectorQuantizer(n_embed=5, embed_dim=4, beta=0.25, legacy=legacy)
  v = {"params": {"embedding": e}}

  @jax.jit
  def loss(v, z):
    return vq.apply(v, z)[1]["codebook_loss"]

  ge, gz = jax.jit(jax.grad(loss, argnums=(0, 1)))(v, z)
  idx = np.argmin(((z[..., None, :] - e) ** 2).sum(-1), -1)
  q, n = e[idx], z.size
  w_commit, w_codebook = (1.0, 0.25) if legacy else (0.25, 1.0)
  np.testing.assert_allclose(gz, w_commit * 2 * (z - q) / n, rtol=1e-5, atol=1e-7)
  want_e = np.zeros_like(e)
  np.add.at(want_e, idx.ravel(), (w_codebook * 2 * (q - z) / n).reshape(-1, 4))
  np.testing.assert_allclose(ge["params"]["embedding"], want_e, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(loss(v, z), (w_commit + w_codebook) * np.mean((q - z) ** 2), rtol=1e-5)
  np.testing.assert_allclose(quantizer_loss(z, q, 0.25, legacy), loss(v, z), rtol=1e-6)
  # Straight through: d(sum(z_q * c))/dz = c, whatever code was picked.
  c = rng.normal(size=z.shape).astype(np.float32)
  @jax.jit
  def straight_through(z):
    return vq.apply(v, z)[0], jax.grad(lambda z: jnp.sum(vq.apply(v, z)[0] * c))(z)

  z_q, g = straight_through(z)
  np.testing.assert_allclose(g, c, rtol=1e-6)
  np.testing.assert_allclose(z_q, q, atol=1e-6)


# ----------------------------------------------------------------------------- discriminator
def test_patchgan_matches_torch_train_mode():
  torch.manual_seed(0)
  net = build_nlayer_discriminator(ndf=8)
  sd = {"first_stage_model.loss.discriminator." + k: v.detach().clone()
        for k, v in net.state_dict().items()}
  sd["first_stage_model.encoder.conv_in.weight"] = torch.zeros(4, 3, 3, 3)  # not the PatchGAN's
  model = NLayerDiscriminator(in_channels=3, ndf=8, n_layers=3)
  variables = C.convert_discriminator(sd, model)
  x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    ref = net.main.train()(_nchw(x)).numpy().transpose(0, 2, 3, 1)
  logits, upd = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
      variables, x)
  assert logits.shape == (2, 2, 2, 1) and ref.std() > 1e-3
  np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=0)
  for i in ("3", "6", "9"):
    bn = net.main[int(i)]
    np.testing.assert_allclose(upd["batch_stats"][i]["mean"], bn.running_mean.numpy(), atol=1e-6)
    np.testing.assert_allclose(upd["batch_stats"][i]["var"], bn.running_var.numpy(), rtol=1e-4)
  init = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
  assert jax.tree.map(lambda a: a.shape, init) == jax.tree.map(np.shape, variables)
  # taming's BN init N(1, 0.02) / 0 (densenet.BatchNorm's own is ones).
  bn = DiscriminatorBatchNorm().init(jax.random.PRNGKey(0), jnp.zeros((1, 4096)), train=False)
  scale = np.asarray(bn["params"]["scale"])
  assert abs(scale.mean() - 1) < 0.002 and abs(scale.std() - 0.02) < 0.002
  assert not np.any(bn["params"]["bias"])
  with pytest.raises(CheckpointError, match="no 'loss.discriminator.main"):
    C.convert_discriminator({"encoder.conv_in.weight": np.zeros((4, 3, 3, 3))}, model)
