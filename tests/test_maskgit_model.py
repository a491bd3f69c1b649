"""Tests for RayGen's ModelV2 port: models.maskgit and maskgit_convert (spec C.5, C.10).

The PyTorch reference is models/maskgit_torch.py (the seed's ModelV2 under its module names), at
small sizes, with random weights.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn as tnn

from cxrjax.core.errors import CheckpointError
from cxrjax.losses import masked_tokens as L
from cxrjax.models import mask_decoding as D
from cxrjax.models import maskgit as M
from cxrjax.models import maskgit_convert as C
from cxrjax.models.maskgit_torch import build_seed_model_v2

SIZES = dict(codebook_size=40, seq_len=16, width=32, depth=2, heads=4, ffn_hidden=48, text_dim=24)
B, T = 3, 5


# ----------------------------------------------------------------------------- torch reference
def _torch_model(**overrides):
  torch.manual_seed(0)
  net = build_seed_model_v2(**{**SIZES, **overrides})
  net.tokenizer = tnn.Linear(3, 3)  # stands in for the frozen CXR-BERT the seed's ModelV2 holds
  with torch.no_grad():  # move zero biases and unit norms off their trivial values
    for name, p in net.named_parameters():
      if name.endswith("in_proj_bias") or name.endswith("out_proj.bias"):
        p.uniform_(-0.3, 0.3)
      elif "layer_norm" in name:
        p.add_(torch.empty_like(p).uniform_(-0.2, 0.2))
  return net.eval()


def _inputs(seed=0, width=SIZES["text_dim"]):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, SIZES["codebook_size"] + 1, (B, SIZES["seq_len"])).astype(np.int64)
  text = rng.normal(size=(B, T, width)).astype(np.float32)
  mask = np.ones((B, T), bool)
  mask[0, 3:] = False
  mask[2, 1:] = False
  return ids, text, mask


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, variables, ids, text, mask=None):
  """Deterministic logits, one compiled program per (model, shapes) for the whole file."""
  return model.apply(variables, ids, text, mask)


@functools.lru_cache(maxsize=None)
def _attention():
  """(module, variables, x (2, 3, 64), ctx (2, 4, 64)): a small cross-attention, initialised
  once for the file."""
  attn = M.Attention(64, 4, dropout_rate=0.5)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 64))
  ctx = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 64))
  return attn, jax.jit(attn.init)(jax.random.PRNGKey(2), x, ctx), x, ctx


def _state_dict(net) -> dict:
  return {k: v.detach().numpy() for k, v in net.state_dict().items()}


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize("key_padding", [False, True])
def test_logits_match_torch(key_padding):
  net = _torch_model()
  model = M.TokenTransformer(**SIZES, text_key_padding=key_padding)
  variables = C.convert_state_dict(net.state_dict(), model)  # torch tensors accepted
  ids, text, mask = _inputs()
  with torch.no_grad():
    want = net(torch.from_numpy(ids), torch.from_numpy(text),
               torch.from_numpy(~mask) if key_padding else None).numpy()
    if key_padding:  # the padding really matters here (rows 0 and 2 are padded)
      free = net(torch.from_numpy(ids), torch.from_numpy(text)).numpy()
      assert np.abs(free[0] - want[0]).max() > 1e-3
  got = _apply(model, variables, jnp.asarray(ids, jnp.int32), jnp.asarray(text),
               jnp.asarray(mask))
  assert got.shape == (B, SIZES["seq_len"], SIZES["codebook_size"]) and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)


def test_identity_projector_and_lightning_prefix():
  """A Lightning 'model.' prefix is stripped and keys outside it ignored; with text_dim == width
  the seed's nn.Identity becomes an identity projector (kernel I, bias 0)."""
  sd = _state_dict(_torch_model())
  prefixed = {"model." + k: v for k, v in sd.items()}
  prefixed["loss_fn.weight"] = np.zeros(3, np.float32)
  model = M.TokenTransformer(**SIZES)
  jax.tree.map(np.testing.assert_array_equal, C.convert_state_dict(prefixed, model),
               C.convert_state_dict(sd, model))
  assert C.infer_config(prefixed) == {k: v for k, v in SIZES.items() if k != "heads"}
  same = {**SIZES, "text_dim": SIZES["width"]}
  sd = _state_dict(_torch_model(text_dim=SIZES["width"]))
  assert not any(k.startswith("text_projector") for k in sd)
  proj = C.convert_state_dict(sd, M.TokenTransformer(**same))["params"]["text_projector"]
  np.testing.assert_array_equal(proj["kernel"], np.eye(SIZES["width"]))
  np.testing.assert_array_equal(proj["bias"], np.zeros(SIZES["width"]))
  assert C.infer_config(sd)["text_dim"] == SIZES["width"]


def test_converter_errors_name_every_problem():
  sd = _state_dict(_torch_model())
  model = M.TokenTransformer(**SIZES)
  del sd["transformer.dec_layers.1.ffn.linear_2.weight"]
  sd["transformer.dec_layers.0.extra.weight"] = np.zeros(2, np.float32)
  sd["final_dense.bias"] = np.zeros(7, np.float32)
  sd["transformer.dec_layers.0.cross_mha.mha.in_proj_weight"] = np.zeros((3 * 16, 16), np.float32)
  with pytest.raises(CheckpointError) as err:
    C.convert_state_dict(sd, model)
  msg = str(err.value)
  assert "\n" not in msg and msg.startswith("RayGen ModelV2 state dict does not fit")
  assert "missing (1): transformer.dec_layers.1.ffn.linear_2.weight" in msg
  assert "unexpected (1): transformer.dec_layers.0.extra.weight" in msg
  assert "final_dense.bias: file (7,)" in msg
  assert "transformer.dec_layers.0.cross_mha.mha.in_proj_weight[q]: file (16, 16)" in msg
  assert "layer_norm_1" not in msg and "tokenizer" not in msg  # skipped / ignored, not reported
  with pytest.raises(CheckpointError, match="not a RayGen ModelV2 state dict"):
    C.convert_state_dict({"conv1.weight": np.zeros(1)}, model)


def test_load_token_transformer_from_file(tmp_path):
  net = _torch_model()
  path = str(tmp_path / "modelv2.pt")
  torch.save(net.state_dict(), path)
  model, variables = C.load_token_transformer(path, heads=SIZES["heads"])
  assert model.width == SIZES["width"] and model.depth == SIZES["depth"]
  ids, text, mask = _inputs(2)
  with torch.no_grad():
    want = net(torch.from_numpy(ids), torch.from_numpy(text)).numpy()
  got = _apply(model, variables, jnp.asarray(ids, jnp.int32), jnp.asarray(text),
               jnp.asarray(mask))  # ignored: text_key_padding is off
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4)
  with pytest.raises(CheckpointError, match="width=32, not 64"):
    C.load_token_transformer(path, width=64)


# ----------------------------------------------------------------------------- the Flax model
def test_raygen_size_init_and_parameter_count():
  """Defaults are RayGen's: 129.9M parameters = the seed's minus its 12 unused LayerNorm vectors;
  q/k/v drawn as torch's xavier-uniform over the packed (3D, D) in_proj, their biases 0."""
  params = C.expected_params(M.TokenTransformer())["params"]
  d, h, c, e, n = 1024, 4096, 1024, 768, 1024
  per_layer = 2 * (4 * d * d + 4 * d) + (2 * d + d * 2 * h + 2 * h + h * d) + 2 * d
  want = (c + 1) * d + n * d + (e * d + d) + 6 * per_layer + (d * c + c)
  assert sum(x.size for x in jax.tree.leaves(params)) == want == 129_887_232
  attn = _attention()[1]["params"]
  bound = math.sqrt(6 / (64 + 3 * 64))
  for name in ("query", "key", "value"):
    q = np.asarray(attn[name]["kernel"])
    assert bound * 0.9 < np.abs(q).max() <= bound and not np.any(np.asarray(attn[name]["bias"]))
  assert 0.9 / 8 < np.abs(np.asarray(attn["out"]["kernel"])).max() <= 1 / 8  # 1/sqrt(fan_in)


def test_null_condition_bf16_and_guided_generation():
  model = M.TokenTransformer(**SIZES, text_key_padding=True)
  variables = C.convert_state_dict(_state_dict(_torch_model()), model)
  ids, text, mask = _inputs(3)
  ids, text, mask = jnp.asarray(ids, jnp.int32), jnp.asarray(text), jnp.asarray(mask)
  null_text, null_mask = M.null_condition(text)
  null = _apply(model, variables, ids, null_text, null_mask)
  assert np.isfinite(np.asarray(null)).all()
  dropped, dmask = L.drop_text(jax.random.PRNGKey(0), text, mask, 1.0)
  np.testing.assert_array_equal(np.asarray(_apply(model, variables, ids, dropped, dmask)),
                                np.asarray(null))
  # bf16 compute on the same float32 params stays close
  full = _apply(model, variables, ids, text, mask)
  half = _apply(model.clone(dtype=jnp.bfloat16), variables, ids, text, mask)
  assert half.dtype == jnp.float32 and np.abs(np.asarray(half - full)).max() < 0.15
  # generation: decode jitted as a whole around make_tokens_to_logits, guided by the null
  @jax.jit
  def generate(variables, text, mask, key):
    fn = M.make_tokens_to_logits(model, variables, text, mask)
    return D.decode(fn, key, B, model.seq_len, model.mask_id, steps=3, guidance_scale=2.0)

  out, per_step = generate(variables, text, mask, jax.random.PRNGKey(0))
  assert out.shape == (B, SIZES["seq_len"]) and per_step.shape == (3, B, SIZES["seq_len"])
  assert 0 <= int(out.min()) and int(out.max()) < SIZES["codebook_size"]


def test_attention_dropout_on_the_probabilities():
  """Dropout acts only when not deterministic, reproducibly from the rng; with every key masked
  the cross-attention adds only its output bias (zero weights, no NaN)."""
  attn, variables, x, ctx = _attention()
  run = jax.jit(lambda key, keys: attn.apply(variables, x, ctx, keys, False,
                                             rngs={"dropout": key}))
  keys = jnp.array([[True, True, False, True], [False] * 4])
  a, b = run(jax.random.PRNGKey(0), keys), run(jax.random.PRNGKey(1), keys)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(run(jax.random.PRNGKey(0), keys)))
  assert np.abs(np.asarray(a - b))[0].max() > 1e-4
  np.testing.assert_allclose(np.asarray(a[1]),
                             np.broadcast_to(variables["params"]["out"]["bias"], (3, 64)))
  det = attn.apply(variables, x, ctx, keys, True)
  np.testing.assert_array_equal(np.asarray(det), np.asarray(attn.apply(variables, x, ctx, keys)))


def test_too_many_tokens_refused():
  model = M.TokenTransformer(**SIZES)
  with pytest.raises(ValueError, match="exceed the model's seq_len 16"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 17), jnp.int32),
               jnp.zeros((1, T, SIZES["text_dim"])))
