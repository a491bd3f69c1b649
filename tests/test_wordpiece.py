"""cxrjax.data.wordpiece (spec raygen_and_raddiffusion.md C.2.2) and cxrjax.losses.mlm: cleaning,
a WordPiece vocabulary trained on phantom reports, the tokenize hook's layout, truncation,
pickling and the study pipeline contract; BERT masking and the MLM loss; and a few steps of MLM
pretraining of a tiny BERT on the phantom reports."""
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxrjax.data import wordpiece as W
from cxrjax.data.phantoms.attributes import PhantomConfig, sample_study
from cxrjax.data.phantoms.reports import write_report
from cxrjax.losses import mlm

N_REPORTS = 200


def _reports(n=N_REPORTS, seed=0):
  """(findings, impression) of phantom studies 0..n-1, as phantoms/world.py writes them."""
  out = []
  for i in range(n):
    attrs = sample_study(seed, i, PhantomConfig())
    out.append(write_report(attrs, np.random.default_rng([seed, i, 0x4E9087])))
  return out


@pytest.fixture(scope="module")
def reports():
  return [f"{f} {imp}" for f, imp in _reports()]


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory, reports):
  return W.train_wordpiece(reports, 400, str(tmp_path_factory.mktemp("wordpiece")))


# ----------------------------------------------------------------------------- cleaning
def test_clean_impression_known_answers():
  assert W.clean_impression("FINDINGS: Clear.\n IMPRESSION: No acute process.") == "no acute process"
  # The LAST marker wins; digits, punctuation and newlines go (glueing newline-split words).
  text = "IMPRESSION: old. FINAL REPORT\n IMPRESSION: 1. Small L-sided\neffusion, 2cm.  "
  assert W.clean_impression(text) == "small lsidedeffusion cm"
  assert W.clean_impression(b"No marker: Heart 12 OK!") == "no marker heart  ok"
  assert W.clean_impression("impression: lower case is not the marker") == (
      "impression lower case is not the marker")
  assert W.clean_impression("IMPRESSION:") == ""


# ----------------------------------------------------------------------------- vocabulary
def test_vocab_files_specials_and_determinism(vocab_dir, reports, tmp_path):
  vocab = open(f"{vocab_dir}/vocab.txt").read().split("\n")[:-1]
  assert vocab[:5] == list(W.SPECIAL_TOKENS) and 100 < len(vocab) <= 400
  assert {"pneumothorax", "effusion", "no"} <= set(vocab)
  # tokenizers' trainer alone is not deterministic (hash-map order); train_wordpiece is.
  again = W.train_wordpiece(reports, 400, str(tmp_path))
  assert open(f"{again}/vocab.txt").read() == open(f"{vocab_dir}/vocab.txt").read()
  with pytest.raises(ValueError, match="no room"):
    W.train_wordpiece(reports, 50, str(tmp_path))


def test_layout_round_trip_and_files(vocab_dir, reports):
  tok = W.TextTokenizer(vocab_dir, max_length=128)
  assert (tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 2, 3, 4)
  assert tok.special_ids == (0, 1, 2, 3, 4) and tok.get_vocab_size() <= 400
  out = tok(reports[0].encode())
  ids, mask = out["tokens"], out["token_mask"]
  assert ids.shape == mask.shape == (128,) and ids.dtype == np.int32 and mask.dtype == bool
  n = int(mask.sum())
  assert mask[:n].all() and not mask[n:].any()
  assert ids[0] == 2 and ids[n - 1] == 3 and (ids[n:] == 0).all()
  assert not np.isin(ids[1:n - 1], tok.special_ids).any()
  # In-vocabulary text decodes to its cleaned form (spaces collapsed: digits leave double ones).
  for text in reports[:20]:
    assert tok.decode(tok(text)["tokens"]) == " ".join(W.clean_impression(text).split())
  # The batch function, vocab.txt and tokenizer.json agree.
  batch_ids, batch_mask = tok.encode_texts(reports)
  assert batch_ids.shape == (N_REPORTS, 128) and batch_mask.dtype == bool
  np.testing.assert_array_equal(batch_ids[0], ids)
  for path in (f"{vocab_dir}/vocab.txt", f"{vocab_dir}/tokenizer.json"):
    np.testing.assert_array_equal(W.TextTokenizer(path, max_length=128).encode_texts(reports)[0],
                                  batch_ids)
  # An empty report (the pipeline's padding rows) is [CLS] [SEP].
  empty = tok(b"")
  assert list(empty["tokens"][:3]) == [2, 3, 0] and empty["token_mask"].sum() == 2


def test_matches_transformers_bert_tokenizer(vocab_dir, reports):
  """The layout of BertTokenizer(padding='max_length', truncation=True), RayGen's call."""
  transformers = pytest.importorskip("transformers")
  path = f"{vocab_dir}/vocab.txt"
  if int(transformers.__version__.split(".")[0]) >= 5:  # 5.x takes the vocabulary as a dict
    vocab = {t: i for i, t in enumerate(open(path).read().split("\n")[:-1])}
    ref = transformers.BertTokenizer(vocab=vocab, do_lower_case=True)
  else:
    ref = transformers.BertTokenizerFast(vocab_file=path, do_lower_case=True)
  texts = [W.clean_impression(r) for r in reports[:50]]
  want = ref(texts, padding="max_length", max_length=24, truncation=True)
  ids, mask = W.TextTokenizer(vocab_dir, max_length=24).encode_texts(texts)
  np.testing.assert_array_equal(ids, np.asarray(want["input_ids"]))
  np.testing.assert_array_equal(mask, np.asarray(want["attention_mask"], bool))


def test_truncation_warns_once_with_count(vocab_dir, reports, monkeypatch):
  messages = []
  monkeypatch.setattr(W.logging, "warning", lambda msg, *args: messages.append(msg % args))
  tok = W.TextTokenizer(vocab_dir, max_length=16)
  ids, mask = tok.encode_texts(reports[:10])
  lengths = [len(tok.tokenizer.encode(W.clean_impression(r), add_special_tokens=False).ids)
             for r in reports[:10]]
  cut = [n for n in lengths if n > 14]
  np.testing.assert_array_equal(mask.all(axis=1), np.array(lengths) >= 14)
  assert (ids[mask.all(axis=1), -1] == 3).all()
  assert tok.truncated == len(cut) > 0
  assert len(messages) == 1
  assert f"{len(cut)} text(s) longer than max_length=16" in messages[0]
  assert f"the longest {max(cut) + 2} tokens" in messages[0]
  tok(reports[int(np.argmax(lengths))])
  assert len(messages) == 1 and tok.truncated == len(cut) + 1


def test_pickles_for_grain_workers(vocab_dir, reports):
  tok = W.TextTokenizer(vocab_dir, max_length=64)
  want = tok(reports[3])
  clone = pickle.loads(pickle.dumps(tok))
  assert clone._tok is None  # rebuilt lazily from the JSON string
  got = clone(reports[3].encode())
  for k in ("tokens", "token_mask"):
    np.testing.assert_array_equal(got[k], want[k])


def test_study_pipeline_hook(vocab_dir):
  from cxrjax.data.pipeline import PipelineConfig, StudyPipeline
  texts = _reports(3)
  studies = [dict(study_id=f"s{i}".encode(), patient_id=b"p", images=[np.zeros((8, 8, 1), np.uint8)],
                  views=[0], labels=np.zeros(14, np.float32), age_years=np.float32(50),
                  sex_male=np.float32(1), race=b"", site=b"", findings=f.encode(),
                  impression=imp.encode()) for i, (f, imp) in enumerate(texts)]
  tok = W.TextTokenizer(vocab_dir, max_length=32)
  cfg = PipelineConfig.for_eval(4, image_size=8, read_threads=0, report_fields=("impression",))
  batch = next(StudyPipeline(studies, cfg, tokenize=tok))
  assert batch["tokens"].shape == batch["token_mask"].shape == (4, 32)
  assert batch["tokens"].dtype == np.int32 and batch["token_mask"].dtype == bool
  np.testing.assert_array_equal(batch["tokens"][:3], tok.encode_texts([t[1] for t in texts])[0])


# ----------------------------------------------------------------------------- masking, loss
SPECIALS = (0, 1, 2, 3, 4)


def _masked_batch(b=512, l=64, vocab=400, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, vocab, (b, l)).astype(np.int32)
  lengths = rng.integers(4, l + 1, b)
  lengths[:2] = (2, 3)  # [CLS] [SEP] only, and one real token
  mask = np.arange(l)[None] < lengths[:, None]
  ids[np.arange(b), 0], ids[np.arange(b), lengths - 1] = 2, 3
  ids[~mask] = 0
  ids[5, 1] = 1  # an [UNK]: special, never a target
  return ids, mask


def test_mask_tokens_properties():
  ids, mask = _masked_batch()
  fn = jax.jit(mlm.mask_tokens, static_argnums=(3, 4, 5))
  inputs, targets, chosen = map(np.asarray, fn(jax.random.PRNGKey(0), ids, mask, 4, 400, SPECIALS))
  assert inputs.dtype == targets.dtype == np.int32 and chosen.dtype == bool
  np.testing.assert_array_equal(targets, ids)
  candidate = mask & ~np.isin(ids, SPECIALS)
  assert not (chosen & ~candidate).any()  # never specials or padding
  np.testing.assert_array_equal(inputs[~chosen], ids[~chosen])
  assert chosen[candidate.any(1)].any(1).all() and not chosen[0].any()  # >= 1 where possible
  assert chosen[1].sum() == 1
  rate = chosen.sum() / candidate.sum()
  assert 0.14 < rate < 0.17, rate  # 15% plus the forced picks of short rows
  to_mask = (inputs == 4) & chosen
  kept = (inputs == ids) & chosen
  other = chosen & ~to_mask & ~kept
  n = chosen.sum()
  assert abs(to_mask.sum() / n - 0.8) < 0.02 and abs(other.sum() / n - 0.1) < 0.015
  assert abs(kept.sum() / n - 0.1) < 0.015
  assert not np.isin(inputs[other], SPECIALS).any() and (inputs[other] < 400).all()
  again = fn(jax.random.PRNGKey(0), ids, mask, 4, 400, SPECIALS)
  for x, y in zip(again, (inputs, targets, chosen)):
    np.testing.assert_array_equal(x, y)
  assert (np.asarray(fn(jax.random.PRNGKey(1), ids, mask, 4, 400, SPECIALS)[2]) != chosen).any()


def test_mlm_loss_known_answer():
  logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.2, 0.7], [1 / 3, 1 / 3, 1 / 3]]]))
  targets = jnp.array([[0, 1, 2]])
  loss, acc = mlm.mlm_loss(logits, targets, jnp.array([[True, True, False]]))
  np.testing.assert_allclose(loss, (np.log(2) + np.log(5)) / 2, rtol=1e-6)
  np.testing.assert_allclose(acc, 0.5)
  loss, acc = mlm.mlm_loss(logits, targets, jnp.zeros((1, 3), bool))
  assert float(loss) == 0.0 and float(acc) == 0.0


def test_tiny_bert_mlm_pretraining_learns(vocab_dir, reports):
  """40 Adam steps of MLM on phantom reports lower the masked-token loss."""
  import optax

  from cxrjax.models.bert import Bert, BertMaskedLM
  tok = W.TextTokenizer(vocab_dir, max_length=32)
  ids, mask = tok.encode_texts(reports[:64])
  model = BertMaskedLM(Bert(vocab_size=tok.get_vocab_size(), hidden=32, layers=1, heads=2,
                            intermediate=64, max_positions=32, dropout=0.0))
  params = jax.jit(model.init)(jax.random.PRNGKey(0), ids[:1], mask[:1])["params"]
  opt = optax.adam(1e-2)
  specials = tok.special_ids

  @jax.jit
  def step(params, state, key):
    inputs, targets, chosen = mlm.mask_tokens(key, ids, mask, tok.mask_id, tok.get_vocab_size(),
                                              specials)

    def loss_fn(p):
      return mlm.mlm_loss(model.apply({"params": p}, inputs, mask), targets, chosen)

    (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  state = opt.init(params)
  losses = []
  for s in range(40):
    params, state, loss = step(params, state, jax.random.PRNGKey(s))
    losses.append(float(loss))
  # From about log(V) (~6 nats) towards the reports' unigram entropy (~4.5): a wiring check (the
  # tied decoder, the masking, the loss), not a measure of what pretraining reaches.
  assert np.mean(losses[:3]) > 5.5 and np.mean(losses[-5:]) < 0.8 * np.mean(losses[:3]), losses
