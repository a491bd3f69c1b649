"""Tests for cxrjax.models.vit and vit_convert (spec raygen_and_raddiffusion.md D.3, D.4, D.9).

Parity tests build tiny random transformers ``ViTMAEModel``s (nothing is downloaded), convert
their state dicts and compare last_hidden_state with the same pixels and masking noise.
"""
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxrjax.models import vit as V
from cxrjax.models import vit_convert as C

TINY = dict(patch_size=8, hidden=32, depth=2, heads=4, mlp=64, image_size=32, channels=1)
L_TINY = 16  # (32 / 8) ** 2 patches


# ----------------------------------------------------------------------------- transformers helpers
def _hf_positions(model):
  """Fills HF's position table with HF's own code. transformers 5.x's ``ViTMAEModel(config)``
  leaves it (and cls_token) at zeros: post_init initialises the patch conv first, which flags it,
  and ``ViTMAEEmbeddings.initialize_weights`` then returns early. Clearing the flags and calling
  it again runs HF's table construction."""
  emb = model.embeddings
  for t in [*emb.modules(), *emb.parameters()]:
    if hasattr(t, "_is_hf_initialized"):
      delattr(t, "_is_hf_initialized")
  emb.initialize_weights()
  table = emb.position_embeddings.detach().numpy()[0]
  assert np.abs(table[1:]).max() > 0.5 and np.all(table[0] == 0)
  return table


def _hf_model(mask_ratio=0.5, seed=0, **overrides):
  """A tiny random ViTMAEModel: weights well away from init, LayerNorm gains/biases not 1/0."""
  torch = pytest.importorskip("torch")
  from transformers import ViTMAEConfig, ViTMAEModel
  cfg = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             patch_size=8, image_size=32, num_channels=1, mask_ratio=mask_ratio,
             layer_norm_eps=1e-12, attn_implementation="eager")
  torch.manual_seed(seed)
  model = ViTMAEModel(ViTMAEConfig(**{**cfg, **overrides})).eval()
  _hf_positions(model)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("position_embeddings"):
        continue
      if "layernorm" in name and name.endswith("weight"):
        p.uniform_(0.5, 1.5)
      elif name.endswith("bias"):
        p.uniform_(-0.3, 0.3)
      elif name.endswith("cls_token"):
        p.normal_(0.0, 1.0)
      else:
        p.normal_(0.0, 1.0 / math.sqrt(np.prod(p.shape[1:])))
  return model


def _numpy_state_dict(model) -> dict:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _legacy_names(sd: dict) -> dict:
  """transformers 5.x names -> the 4.x names (RadDiffusion's, the hub's)."""
  renames = [("attention.q_proj", "attention.attention.query"),
             ("attention.k_proj", "attention.attention.key"),
             ("attention.v_proj", "attention.attention.value"),
             ("attention.o_proj", "attention.output.dense"),
             ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense")]
  out = {}
  for k, v in sd.items():
    k = re.sub(r"(^|\.)layers\.", r"\1encoder.layer.", k)  # not the decoder's decoder_layers.
    for a, b in renames:
      k = k.replace(a, b)
    out[k] = v
  return out


# ----------------------------------------------------------------------------- sizes, tables
def test_sizes_table_and_param_count():
  xs, s, b = V.VIT_SIZES["xs"], V.VIT_SIZES["s"], V.VIT_SIZES["b"]
  assert (xs.patch_size, xs.hidden, xs.depth, xs.heads, xs.head_dim, xs.mlp, xs.mask_ratio,
          xs.decoder_hidden, xs.decoder_depth, xs.decoder_heads, xs.decoder_mlp) == (
              32, 256, 6, 8, 32, 1024, 0.5, 128, 2, 4, 512)
  assert (s.patch_size, s.hidden, s.depth, s.heads, s.mlp, s.mask_ratio, s.decoder_hidden,
          s.decoder_depth, s.decoder_heads, s.decoder_mlp) == (32, 768, 6, 12, 3072, 0.75, 512, 4,
                                                               16, 2048)
  assert (b.patch_size, b.hidden, b.depth, b.heads, b.mlp, b.mask_ratio, b.num_patches) == (
      16, 768, 12, 12, 3072, 0.5, 256)
  for size in (xs, s, b):
    assert (size.image_size, size.channels, size.layer_norm_eps) == (256, 1, 1e-12)
  assert [V.num_kept(z.num_patches, z.mask_ratio) for z in (xs, s, b)] == [32, 16, 128]
  with pytest.raises(ValueError, match="unknown ViT size"):
    V.study_encoder("l")
  enc = V.study_encoder("xs", bottleneck=False)
  assert (enc.hidden, enc.depth, enc.heads, enc.patch_size, enc.bottleneck) == (
      256, 6, 8, 32, False)
  count = sum(math.prod(p.shape) for p in jax.tree.leaves(C.expected_params(enc)))
  assert count == 5_001_728  # the spec's "xs encoder ~ 5.0M"
  pytest.importorskip("torch")
  from transformers import ViTMAEConfig, ViTMAEModel
  hf = ViTMAEModel(ViTMAEConfig(hidden_size=256, num_hidden_layers=6, num_attention_heads=8,
                                intermediate_size=1024, patch_size=32, image_size=256,
                                num_channels=1))
  trainable = sum(p.numel() for n, p in hf.named_parameters() if "position_embeddings" not in n)
  assert count == trainable
  # Forward FLOPs: xs at its mask ratio runs 33 tokens; without masking 65.
  assert V.flops_per_view("xs", 0.0) > V.flops_per_view("xs") > 0


def test_sincos_2d_by_hand():
  t = V.sincos_2d(8, 2)  # w_k = 10000^(-k/2): 1, 0.01
  assert t.shape == (5, 8) and t.dtype == np.float32 and np.all(t[0] == 0)
  w = np.array([1.0, 0.01])
  row, col = 0, 1  # patch 1 of a 2x2 grid, row-major
  want = np.concatenate([np.sin(col * w), np.cos(col * w), np.sin(row * w), np.cos(row * w)])
  np.testing.assert_allclose(t[1 + row * 2 + col], want, rtol=0, atol=1e-7)
  np.testing.assert_allclose(t[1 + 1 * 2 + 0, 4:6], np.sin(w), atol=1e-7)  # row 1, column 0
  with pytest.raises(ValueError, match="divisible by 4"):
    V.sincos_2d(6, 2)


@pytest.mark.parametrize("dim,grid", [(32, 4), (256, 8), (64, 16)])
def test_sincos_2d_equals_transformers(dim, grid):
  pytest.importorskip("torch")
  from transformers.models.vit_mae import modeling_vit_mae as M
  ours = V.sincos_2d(dim, grid)
  # The table a ViTMAEModel actually adds (HF's own construction, halves rotated in 5.x).
  model = _hf_model(hidden_size=dim, num_attention_heads=4, patch_size=2, image_size=2 * grid)
  np.testing.assert_allclose(ours, _hf_positions(model), rtol=0, atol=1e-6)
  if hasattr(M, "get_2d_sincos_pos_embed"):  # transformers 4.x
    ref = M.get_2d_sincos_pos_embed(dim, grid, add_cls_token=True)
  else:  # 5.x: [sin_h | cos_h | sin_w | cos_w], which ViT-MAE rotates to put the column first
    ref = M.build_2d_sinusoidal_position_embedding(grid, grid, dim, cls_token=True).numpy()
    ref = np.concatenate([ref[:, dim // 2:], ref[:, :dim // 2]], axis=1)
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- masking
def test_random_masking_invariants():
  ids_keep, mask, ids_restore = V.random_masking(jax.random.PRNGKey(0), (3, 4), 64, 0.5)
  assert ids_keep.shape == (3, 4, 32) and ids_keep.dtype == jnp.int32
  assert mask.shape == ids_restore.shape == (3, 4, 64)
  ids_keep, mask, ids_restore = map(np.asarray, (ids_keep, mask, ids_restore))
  ids_shuffle = np.argsort(ids_restore, axis=-1)
  # ids_restore inverts the shuffle; the kept ids are its first K; the mask marks the rest.
  np.testing.assert_array_equal(np.take_along_axis(ids_shuffle, ids_restore, -1),
                                np.broadcast_to(np.arange(64), (3, 4, 64)))
  np.testing.assert_array_equal(ids_keep, ids_shuffle[..., :32])
  assert np.all(mask.sum(-1) == 32)
  assert np.all(np.take_along_axis(mask, ids_keep, -1) == 0)
  # Every image (all 12 views of the batch) gets its own mask.
  rows = {tuple(r) for r in mask.reshape(12, 64).astype(int)}
  assert len(rows) == 12
  for r, k in ((0.75, 16), (0.0, 64), (0.7, int(64 * (1 - 0.7)))):
    assert V.random_masking(jax.random.PRNGKey(1), (2,), 64, r)[0].shape == (2, k)


def test_masking_from_noise_matches_transformers():
  torch = pytest.importorskip("torch")
  for ratio in (0.5, 0.75, 0.3):
    model = _hf_model(mask_ratio=ratio)
    noise = torch.rand(5, L_TINY, generator=torch.Generator().manual_seed(3))
    seq = torch.arange(L_TINY, dtype=torch.float32).reshape(1, L_TINY, 1).repeat(5, 1, 1)
    kept, mask, restore = model.embeddings.random_masking(seq, noise)
    ids_keep, our_mask, our_restore = V.masking_from_noise(noise.numpy(), ratio)
    np.testing.assert_array_equal(ids_keep, kept[..., 0].numpy().astype(np.int32))
    np.testing.assert_array_equal(our_mask, mask.numpy())
    np.testing.assert_array_equal(our_restore, restore.numpy())


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize("mask_ratio", [0.5, 0.0])
def test_parity_with_transformers(mask_ratio):
  torch = pytest.importorskip("torch")
  model = _hf_model(mask_ratio=mask_ratio)
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(3, 32, 32, 1)).astype(np.float32)
  if mask_ratio:
    noise = torch.rand(3, L_TINY, generator=torch.Generator().manual_seed(1))
    ids_keep = V.masking_from_noise(noise.numpy(), mask_ratio)[0][:, None]  # (B, V=1, K)
  else:  # HF shuffles even at ratio 0; sorted noise keeps the natural patch order
    noise, ids_keep = torch.arange(L_TINY, dtype=torch.float32).repeat(3, 1), None
  with torch.no_grad():
    ref = model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), noise=noise).last_hidden_state
  params = C.from_hf_vit_mae(_numpy_state_dict(model))
  enc = V.StudyEncoder(**TINY, bottleneck=False)
  tokens, aux = jax.jit(enc.apply)({"params": params}, x[:, None], jnp.ones((3, 1), bool),
                                   ids_keep)
  assert tokens.shape == (3, 1, 1 + (8 if mask_ratio else 16), 32) == (3, 1, *ref.shape[1:])
  assert np.max(np.abs(np.asarray(tokens[:, 0]) - ref.numpy())) < 1e-5
  np.testing.assert_allclose(aux["cls"], ref.numpy()[:, 0], atol=1e-5, rtol=0)


def test_converter_names_prefix_files(tmp_path):
  torch = pytest.importorskip("torch")
  pytest.importorskip("safetensors")
  from safetensors.numpy import save_file
  from transformers import ViTMAEForPreTraining
  model = _hf_model()
  sd = _numpy_state_dict(model)
  params = C.from_hf_vit_mae(sd)
  enc = V.StudyEncoder(**TINY)
  jax.tree.map(lambda a, b: None if a.shape == b.shape else pytest.fail(f"{a.shape} {b.shape}"),
               params, C.expected_params(enc))
  legacy = _legacy_names(sd)
  assert "encoder.layer.1.attention.attention.query.weight" in legacy
  assert "encoder.layer.0.output.dense.bias" in legacy and "layernorm.bias" in legacy
  jax.tree.map(np.testing.assert_array_equal, C.from_hf_vit_mae(legacy, enc), params)
  st, pt = str(tmp_path / "model.safetensors"), str(tmp_path / "pytorch_model.bin")
  save_file(legacy, st)
  torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, pt)
  jax.tree.map(np.testing.assert_array_equal, C.load_vit_mae(st, enc), params)
  jax.tree.map(np.testing.assert_array_equal, C.load_vit_mae(pt), params)
  assert C.infer_fields(sd) == dict(patch_size=8, hidden=32, depth=2, channels=1, mlp=64,
                                    image_size=32)
  # ViTMAEForPreTraining: the encoder under 'vit.', the decoder beside it is ignored.
  pre = ViTMAEForPreTraining(model.config)
  pre.vit.load_state_dict(model.state_dict())
  jax.tree.map(np.testing.assert_array_equal,
               C.from_hf_vit_mae(_legacy_names(_numpy_state_dict(pre))), params)


def test_converter_reports_problems():
  sd = _legacy_names(_numpy_state_dict(_hf_model()))
  broken = dict(sd)
  del broken["encoder.layer.1.attention.attention.key.bias"]
  broken["encoder.layer.0.intermediate.dense.weight"] = np.zeros((64, 31), np.float32)
  broken["embeddings.extra"] = np.zeros(3, np.float32)
  with pytest.raises(ValueError) as err:
    C.from_hf_vit_mae(broken)
  msg = str(err.value)
  assert "missing (1): encoder.layer.1.attention.attention.key.bias" in msg
  assert "unexpected (1): embeddings.extra" in msg
  assert "encoder.layer.0.intermediate.dense.weight: file (64, 31)" in msg
  assert isinstance(err.value, C.ViTMAEWeightsError)
  with pytest.raises(ValueError, match=r"missing \(16\): encoder\.layer\.2\."):
    C.from_hf_vit_mae(sd, V.StudyEncoder(**{**TINY, "depth": 3}))
  with pytest.raises(ValueError, match="shape mismatch"):
    C.from_hf_vit_mae(sd, V.StudyEncoder(**{**TINY, "mlp": 48}))
  zeros = dict(sd, **{"embeddings.position_embeddings": np.zeros((1, 17, 32), np.float32)})
  with pytest.raises(ValueError, match="sin-cos table"):
    C.from_hf_vit_mae(zeros)
  C.from_hf_vit_mae(zeros, check_positions=False)
  with pytest.raises(ValueError, match=r"not \(65, 32\) \(a 8x8 patch grid"):  # 64 px model
    C.from_hf_vit_mae(sd, V.StudyEncoder(**{**TINY, "image_size": 64}))
  with pytest.raises(ValueError, match="not a ViT-MAE encoder"):
    C.from_hf_vit_mae({k: v for k, v in sd.items() if "projection.weight" not in k})
  with pytest.raises(ValueError, match="does not exist"):
    C.load_vit_mae("/nonexistent/model.safetensors")


# ----------------------------------------------------------------------------- bottleneck
@pytest.fixture(scope="module")
def study():
  """Random-scaled tiny encoder params and a batch: study 0 with 2 present views, study 1 with
  1 present view + 1 absent (padded) view."""
  enc = V.StudyEncoder(**TINY, bottleneck=True)
  x = np.random.default_rng(0).uniform(size=(2, 2, 32, 32, 1)).astype(np.float32)
  abstract = jax.eval_shape(lambda x: enc.init(jax.random.PRNGKey(0), x), x)["params"]
  rng = np.random.default_rng(1)

  def draw(kp, leaf):  # far from N(0, 0.02) and LN 1/0, so every path moves the outputs clearly
    name = kp[-1].key
    if name == "kernel":
      return rng.normal(size=leaf.shape) / math.sqrt(np.prod(leaf.shape[:-1]))
    if name == "scale":
      return rng.uniform(0.5, 1.5, size=leaf.shape)
    return rng.normal(size=leaf.shape) * (1.0 if name == "cls_token" else 0.2)

  params = jax.tree.map(lambda a: np.asarray(a, np.float32),
                        jax.tree_util.tree_map_with_path(draw, abstract))
  view_mask = np.array([[True, True], [True, False]])
  ids_keep = V.random_masking(jax.random.PRNGKey(2), (2, 2), L_TINY, 0.5)[0]
  run = jax.jit(lambda p, x, m, ids, bottleneck: V.StudyEncoder(**TINY, bottleneck=bottleneck)
                .apply({"params": p}, x, m, ids, mutable=["intermediates"]),
                static_argnums=4)
  return run, params, x, view_mask, ids_keep


@pytest.mark.parametrize("masked", [True, False])
def test_absent_view_never_matters(study, masked):
  run, params, x, view_mask, ids_keep = study
  ids = ids_keep if masked else None
  (tokens, aux), _ = run(params, x, view_mask, ids, True)
  x2 = x.copy()
  x2[1, 1] = np.random.default_rng(5).uniform(-100, 100, size=x2[1, 1].shape)
  (tokens2, aux2), _ = run(params, x2, view_mask, ids, True)
  assert not np.array_equal(tokens[1, 1, 1:], tokens2[1, 1, 1:])  # the padded view did change
  np.testing.assert_array_equal(tokens[1, 0], tokens2[1, 0])
  np.testing.assert_array_equal(tokens[0], tokens2[0])
  jax.tree.map(np.testing.assert_array_equal, aux, aux2)


def test_present_views_share_the_cls_after_every_layer(study):
  run, params, x, view_mask, ids_keep = study
  (tokens, aux), state = run(params, x, view_mask, ids_keep, True)
  layers = state["intermediates"]["layer_outputs"]
  assert len(layers) == 2 and layers[0].shape == (2, 2, 9, 32)
  for h in layers:
    np.testing.assert_array_equal(h[0, 0, 0], h[0, 1, 0])
    assert not np.allclose(h[0, 0, 1:], h[0, 1, 1:])
  np.testing.assert_array_equal(tokens[0, 0, 0], tokens[0, 1, 0])
  np.testing.assert_allclose(aux["cls"][0], tokens[0, 0, 0], rtol=0, atol=1e-6)
  np.testing.assert_allclose(aux["cls"][1], tokens[1, 0, 0], rtol=0, atol=1e-6)
  np.testing.assert_allclose(aux["cls_pre_ln"], np.asarray(layers[-1])[:, 0, 0], rtol=0,
                             atol=1e-6)
  # Without the bottleneck the two views' CLS differ (the check above can fail).
  (plain, _), _ = run(params, x, view_mask, ids_keep, False)
  assert not np.allclose(plain[0, 0, 0], plain[0, 1, 0], atol=1e-3)


def test_single_present_view_equals_plain_encoder(study):
  run, params, x, _, ids_keep = study
  one = np.array([[True, False], [False, True]])  # one present view per study
  (shared, aux), _ = run(params, x, one, ids_keep, True)
  (plain, plain_aux), _ = run(params, x, one, ids_keep, False)
  np.testing.assert_allclose(shared[0, 0], plain[0, 0], rtol=0, atol=1e-6)
  np.testing.assert_allclose(shared[1, 1], plain[1, 1], rtol=0, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), aux, plain_aux)


def test_information_flows_between_present_views(study):
  run, params, x, view_mask, ids_keep = study
  (tokens, _), _ = run(params, x, view_mask, ids_keep, True)
  x2 = x.copy()
  x2[0, 0] = 1.0 - x2[0, 0]
  (tokens2, _), _ = run(params, x2, view_mask, ids_keep, True)
  # View 1's patches see view 0 only through the layer-1 shared CLS (depth 2).
  assert np.max(np.abs(tokens2[0, 1, 1:] - tokens[0, 1, 1:])) > 1e-3
  (plain, _), _ = run(params, x, view_mask, ids_keep, False)
  (plain2, _), _ = run(params, x2, view_mask, ids_keep, False)
  np.testing.assert_array_equal(plain[0, 1], plain2[0, 1])  # no bottleneck, no flow
  np.testing.assert_array_equal(tokens[1], tokens2[1])  # never across studies


def test_layer_norms_are_hf(study):
  """Every LayerNorm: HF's eps 1e-12, float32, two-pass variance (parity at 1e-5 cannot tell eps
  1e-12 from 1e-6), in bfloat16 compute too."""
  import flax.linen as nn
  _, params, x, view_mask, ids_keep = study
  seen = []

  def record(f, a, kw, ctx):
    if isinstance(ctx.module, nn.LayerNorm) and ctx.method_name == "__call__":
      seen.append((ctx.module.epsilon, ctx.module.dtype, ctx.module.use_fast_variance))
    return f(*a, **kw)

  enc = V.StudyEncoder(**TINY, dtype=jnp.bfloat16)
  with nn.intercept_methods(record):
    jax.eval_shape(enc.apply, {"params": params}, x, view_mask, ids_keep)
  assert len(seen) == 2 * TINY["depth"] + 1 and set(seen) == {(1e-12, jnp.float32, False)}


def test_bfloat16_compute_and_bad_inputs(study):
  _, params, x, view_mask, ids_keep = study
  f32, bf = jax.jit(lambda p: [V.StudyEncoder(**TINY, dtype=dt).apply({"params": p}, x, view_mask,
                                                                       ids_keep)
                                for dt in (jnp.float32, jnp.bfloat16)])(params)
  assert bf[0].dtype == jnp.float32 and bf[1]["cls"].dtype == jnp.float32
  assert np.max(np.abs(bf[0] - f32[0])) < 0.1
  enc = V.StudyEncoder(**TINY)
  with pytest.raises(ValueError, match=r"\(B, V, H, W, C\)"):
    enc.apply({"params": params}, x[0])
  with pytest.raises(ValueError, match="32x32x1"):
    enc.apply({"params": params}, np.zeros((1, 1, 64, 64, 1), np.float32))
  with pytest.raises(ValueError, match="ids_keep"):
    enc.apply({"params": params}, x, view_mask, ids_keep[0])
