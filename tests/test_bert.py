"""cxrjax.models.bert and bert_convert (spec raygen_and_raddiffusion.md C.4): parity with
transformers' BertModel / BertForMaskedLM built with random weights (nothing is downloaded), the
converter on save_pretrained directories (safetensors and a torch .bin) at CXR-BERT's widths, its
refusals, and RayGen's sequence-axis normalisation against torch's F.normalize."""
import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxrjax.models import bert as B
from cxrjax.models import bert_convert as C

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=100, hidden=64, layers=2, heads=4, intermediate=128, max_positions=64)
HF_TINY = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=128, max_position_embeddings=64)


def _hf(cls_name="BertModel", seed=0, **cfg):
  """A random transformers BERT in eval mode, weights well away from init (LayerNorm gains and
  biases not 1 / 0), eager attention."""
  torch.manual_seed(seed)
  config = transformers.BertConfig(**{**HF_TINY, **cfg}, attn_implementation="eager")
  model = getattr(transformers, cls_name)(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "LayerNorm" in name and name.endswith("weight"):
        p.uniform_(0.5, 1.5)
      elif name.endswith("bias"):
        p.uniform_(-0.3, 0.3)
      else:
        p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]))
  return model


def _sd(model) -> dict:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _batch(b=3, l=20, vocab=100, seed=0):
  """ids (B, L) int32 and a mask with one full row and padded rows (ids 0 at padding)."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, vocab, (b, l)).astype(np.int32)
  lengths = np.array([l] + list(rng.integers(3, l, b - 1)))
  mask = np.arange(l)[None] < lengths[:, None]
  return np.where(mask, ids, 0).astype(np.int32), mask


def _torch_hidden(model, ids, mask, types=None):
  kwargs = {} if types is None else {"token_type_ids": torch.from_numpy(types).long()}
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(ids).long(),
                attention_mask=torch.from_numpy(mask.astype(np.int64)), **kwargs)
  return out


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize("with_types", [False, True])
def test_hidden_states_match_transformers(with_types):
  model = _hf()
  ids, mask = _batch()
  types = (np.random.default_rng(1).integers(0, 2, ids.shape).astype(np.int32)
           if with_types else None)
  ref = _torch_hidden(model, ids, mask, types).last_hidden_state.numpy()
  bert = B.Bert(**TINY)
  variables = C.convert(_sd(model), bert)
  ours = jax.jit(bert.apply)(variables, ids, mask, types)
  assert ours.shape == (3, 20, 64) and ours.dtype == jnp.float32
  # Every position, padding included: HF computes padded queries with the same key mask.
  assert np.max(np.abs(np.asarray(ours) - ref)) <= 1e-5


def test_mlm_logits_match_transformers(tmp_path):
  model = _hf("BertForMaskedLM", seed=1)
  model.save_pretrained(tmp_path)  # safetensors; the tied decoder weight is not stored
  ids, mask = _batch(seed=2)
  ref = _torch_hidden(model, ids, mask).logits.numpy()
  module, variables = C.load_bert(str(tmp_path))
  assert isinstance(module, B.BertMaskedLM) and module.bert.layers == 2
  assert set(variables["params"]) == {"bert", "head"}
  logits = jax.jit(module.apply)(variables, ids, mask)
  assert logits.shape == (3, 20, 100)
  assert np.max(np.abs(np.asarray(logits) - ref)) <= 1e-4 * max(1.0, np.abs(ref).max())
  hidden = jax.jit(functools.partial(module.apply, method="encode"))(variables, ids, mask)
  ref_h = _torch_hidden(model.bert, ids, mask).last_hidden_state.numpy()
  assert np.max(np.abs(np.asarray(hidden) - ref_h)) <= 1e-5
  # The encoder alone from the same directory: the head is left out.
  bare, bare_vars = C.load_bert(str(tmp_path), mlm_head=False)
  assert isinstance(bare, B.Bert) and "head" not in bare_vars["params"]
  np.testing.assert_allclose(jax.jit(bare.apply)(bare_vars, ids, mask), hidden, atol=1e-6, rtol=0)


def test_real_shapes_safetensors_and_bin_dirs(tmp_path):
  """CXR-BERT's widths (vocab 30522, 768, 12 heads, 3072, 512 positions) with one layer, as
  save_pretrained writes it and as an older torch .bin with the extras CXR-BERT's file holds."""
  cfg = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=1, num_attention_heads=12,
             intermediate_size=3072, max_position_embeddings=512)
  torch.manual_seed(0)
  model = transformers.BertForMaskedLM(
      transformers.BertConfig(**cfg, attn_implementation="eager")).eval()
  st_dir, bin_dir = tmp_path / "st", tmp_path / "bin"
  model.save_pretrained(st_dir)
  os.makedirs(bin_dir)
  config = json.loads((st_dir / "config.json").read_text())
  config.update(architectures=["CXRBertModel"], model_type="cxr-bert", projection_size=128)
  (bin_dir / "config.json").write_text(json.dumps(config))
  sd = dict(model.state_dict())  # with the tied decoder weight and bias, as old files store them
  sd["bert.embeddings.position_ids"] = torch.arange(512)[None]
  sd["bert.pooler.dense.weight"], sd["bert.pooler.dense.bias"] = torch.zeros(768, 768), torch.zeros(768)
  sd["cls_projection_head.dense_to_hidden.weight"] = torch.zeros(128, 768)
  torch.save(sd, bin_dir / "pytorch_model.bin")
  (st_mod, st_vars), (bin_mod, bin_vars) = C.load_bert(str(st_dir)), C.load_bert(str(bin_dir))
  for module in (st_mod, bin_mod):
    assert isinstance(module, B.BertMaskedLM)
    b = module.bert
    assert (b.vocab_size, b.hidden, b.layers, b.heads, b.intermediate, b.max_positions,
            b.type_vocab, b.layer_norm_eps) == (30522, 768, 1, 12, 3072, 512, 2, 1e-12)
  jax.tree.map(np.testing.assert_array_equal, st_vars, bin_vars)
  p = st_vars["params"]
  assert p["bert"]["word_embeddings"]["embedding"].shape == (30522, 768)
  assert p["bert"]["layer_0"]["intermediate"]["kernel"].shape == (768, 3072)
  assert p["head"]["bias"].shape == (30522,)
  n_params = sum(x.size for x in jax.tree.leaves(p))
  hf_params = sum(t.numel() for n, t in model.named_parameters() if "pooler" not in n)
  assert n_params == hf_params  # the decoder is tied: counted once on both sides
  ids, mask = _batch(2, 8, 30522, seed=3)
  ref = _torch_hidden(model.bert, ids, mask).last_hidden_state.numpy()
  ours = jax.jit(functools.partial(st_mod.apply, method="encode"))(st_vars, ids, mask)
  assert np.max(np.abs(np.asarray(ours) - ref)) <= 1e-5


# ----------------------------------------------------------------------------- refusals
def test_converter_refuses_bad_state_dicts():
  sd = _sd(_hf())
  bert = B.Bert(**TINY)
  missing = {k: v for k, v in sd.items() if k != "encoder.layer.1.output.dense.bias"}
  with pytest.raises(C.BertWeightsError, match=r"missing \(1\): encoder\.layer\.1\.output\.dense"
                                               r"\.bias") as e:
    C.convert(missing, bert)
  assert "\n" not in str(e.value)
  with pytest.raises(C.BertWeightsError, match=r"unexpected \(1\): encoder\.layer\.2\.extra"):
    C.convert({**sd, "encoder.layer.2.extra": np.zeros(3)}, bert)
  bad = dict(sd, **{"encoder.layer.0.attention.self.query.weight": np.zeros((64, 32))})
  with pytest.raises(C.BertWeightsError, match="shape mismatch.*self.query.weight"):
    C.convert(bad, bert)
  with pytest.raises(C.BertWeightsError, match="missing"):  # a 2-layer file for a 3-layer model
    C.convert(sd, B.Bert(**{**TINY, "layers": 3}))
  # A bare BertModel file cannot fill an MLM head; an MLM file's head is ignored by Bert.
  with pytest.raises(C.BertWeightsError, match=r"missing.*cls\.predictions\.bias"):
    C.convert(sd, B.BertMaskedLM(bert))
  mlm = _sd(_hf("BertForMaskedLM"))
  C.convert(mlm, bert)
  untied = dict(mlm, **{"cls.predictions.decoder.weight": mlm["cls.predictions.decoder.weight"] + 1})
  with pytest.raises(C.BertWeightsError, match="differs from the word embeddings"):
    C.convert(untied, B.BertMaskedLM(bert))


def test_load_bert_refusals(tmp_path):
  with pytest.raises(C.BertWeightsError, match="config.json does not exist"):
    C.load_bert(str(tmp_path))
  model = _hf()
  model.save_pretrained(tmp_path)
  with pytest.raises(C.BertWeightsError, match="no cls.predictions"):
    C.load_bert(str(tmp_path), mlm_head=True)
  module, variables = C.load_bert(str(tmp_path), dropout=0.0)
  assert isinstance(module, B.Bert) and module.dropout == 0.0

  class Tok:  # the tokenizers.Tokenizer interface
    def __init__(self, n):
      self.n = n

    def get_vocab_size(self):
      return self.n

  C.check_vocab(Tok(100), variables)
  with pytest.raises(C.BertWeightsError, match="vocabulary has 120 tokens but the word embeddings "
                                               "have 100 rows"):
    C.load_bert(str(tmp_path), tokenizer=Tok(120))
  cfg = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({**cfg, "hidden_act": "relu"}))
  with pytest.raises(C.BertWeightsError, match="hidden_act='relu'"):
    C.load_bert(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  os.remove(tmp_path / "model.safetensors")
  with pytest.raises(C.BertWeightsError, match="no model.safetensors"):
    C.load_bert(str(tmp_path))


def test_text_longer_than_positions_and_bad_heads():
  bert = B.Bert(**TINY)
  ids = jnp.ones((1, 65), jnp.int32)
  with pytest.raises(ValueError, match="65 tokens is longer than the encoder's max_positions=64"):
    jax.eval_shape(bert.init, jax.random.PRNGKey(0), ids)
  with pytest.raises(ValueError, match="not divisible"):
    jax.eval_shape(B.Bert(**{**TINY, "heads": 5}).init, jax.random.PRNGKey(0), ids[:, :8])


def test_dropout_only_when_not_deterministic():
  bert = B.Bert(**TINY, dropout=0.5)
  ids, mask = _batch()
  variables = C.convert(_sd(_hf()), bert)  # no init to compile
  apply = jax.jit(bert.apply, static_argnames="deterministic")
  a = apply(variables, ids, mask)
  rngs = {"dropout": jax.random.PRNGKey(1)}
  d1 = apply(variables, ids, mask, deterministic=False, rngs=rngs)
  d2 = apply(variables, ids, mask, deterministic=False, rngs=rngs)
  np.testing.assert_array_equal(d1, d2)
  assert np.abs(np.asarray(d1) - np.asarray(a)).max() > 1e-2


# ----------------------------------------------------------------------------- normalisation
def test_normalize_text_states_matches_torch():
  rng = np.random.default_rng(0)
  h = rng.normal(size=(2, 7, 5)).astype(np.float32)
  h[1, :, 3] = 0.0  # a channel that is zero at every position: torch's eps clamp, no NaN
  t = torch.from_numpy(h)
  seq = B.normalize_text_states(h)  # the faithful default: over the sequence axis
  np.testing.assert_allclose(seq, torch.nn.functional.normalize(t, dim=1).numpy(), atol=1e-7)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(seq)[0], axis=0), 1.0, atol=1e-6)
  assert np.all(np.asarray(seq)[1, :, 3] == 0)
  tok = B.normalize_text_states(h, axis="token")
  np.testing.assert_allclose(tok, torch.nn.functional.normalize(t, dim=-1).numpy(), atol=1e-7)
  with pytest.raises(ValueError, match="'sequence' or 'token'"):
    B.normalize_text_states(h, axis=1)
