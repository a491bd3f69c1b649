"""GMCD's losses (spec gmcd.md §2.3-2.6, §3.2-3.5) against numpy transcriptions of the seed's code."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxrjax.losses import distill as KD
from cxrjax.losses import dscd as C
from cxrjax.losses import gkm as G
from cxrjax.losses import low_rank as LR


# ---------------------------------------------------------------- M3LR (low_rank)

def _np_rotate(x, rotate):
  return np.transpose(x, (1, 2, 0)) if rotate else x


def _np_tsvd_shrink(x, tau, rotate):
  """Full-FFT t-SVD-MSC shrinkage in float64: every slice thresholded, TNN over all n3 slices."""
  y = np.fft.fft(_np_rotate(np.asarray(x, np.float64), rotate), axis=2)
  out, tnn = np.zeros_like(y), 0.0
  for k in range(y.shape[2]):
    u, s, vh = np.linalg.svd(y[:, :, k], full_matrices=False)
    s = np.maximum(s - tau, 0.0)
    out[:, :, k] = (u * s) @ vh
    tnn += s.sum()
  out = np.fft.ifft(out, axis=2).real
  return (np.transpose(out, (2, 0, 1)) if rotate else out), tnn


def _np_tnn(x, rotate):
  y = np.fft.fft(_np_rotate(np.asarray(x, np.float64), rotate), axis=2)
  return sum(np.linalg.svd(y[:, :, k], compute_uv=False).sum() for k in range(y.shape[2]))


def _np_svt(m, tau):
  u, s, vh = np.linalg.svd(m, full_matrices=False)
  return (u * np.maximum(s - tau, 0)) @ vh


def test_relation_matrix_is_row_normalised_gram():
  f = np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32)
  g = f @ f.T
  np.testing.assert_allclose(LR.relation_matrix(f), g / np.linalg.norm(g, axis=1, keepdims=True),
                             rtol=1e-5, atol=1e-6)
  # an all-zero (ReLU) row stays 0 and keeps a finite gradient
  f[2] = 0
  assert np.all(np.asarray(LR.relation_matrix(f))[2] == 0)
  grad = jax.jit(jax.grad(lambda x: jnp.sum(LR.relation_matrix(x) ** 2)))(jnp.asarray(f))
  assert np.isfinite(np.asarray(grad)).all()


@pytest.mark.parametrize("rotate, shape", [(True, (6, 6, 4)), (False, (5, 7, 3))])  # even, odd n3
def test_tsvd_shrink_and_tnn_match_numpy(rotate, shape):
  x = np.random.default_rng(1).normal(size=shape).astype(np.float32)
  tau = 1.3
  got, tnn, norm = jax.jit(lambda a: LR.tsvd_shrink(a, tau, rotate=rotate)
                           + (LR.tensor_nuclear_norm(a, rotate=rotate),))(x)
  want, want_tnn = _np_tsvd_shrink(x, tau, rotate)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(tnn, want_tnn, rtol=1e-4)
  np.testing.assert_allclose(norm, _np_tnn(x, rotate), rtol=1e-5)
  # the TNN reported with the shrinkage is the TNN of the shrunk tensor
  np.testing.assert_allclose(tnn, _np_tnn(want, rotate), rtol=1e-4)


def test_third_dimension_one_is_matrix_svt():
  m = np.random.default_rng(2).normal(size=(7, 5)).astype(np.float32)
  want = _np_svt(m.astype(np.float64), 0.8)
  got, tnn = LR.tsvd_shrink(m[:, :, None], 0.8, rotate=False)
  np.testing.assert_allclose(got[:, :, 0], want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(tnn, np.maximum(np.linalg.svd(m, compute_uv=False) - 0.8, 0).sum(),
                             rtol=1e-5)
  # rotated, the tube axis is the first one: a (1, n, m) tensor is the matrix again
  got, _ = LR.tsvd_shrink(m[None], 0.8, rotate=True)
  np.testing.assert_allclose(got[0], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rotate", [True, False])
def test_low_rank_tensor_plus_noise_is_recovered(rotate):
  rng = np.random.default_rng(3)
  n, n3, r = 10, 4, 2
  u, v = rng.normal(size=(n, r, n3)), rng.normal(size=(r, n, n3))
  # t-product: every Fourier slice has rank r, i.e. tubal rank r in the layout the solver uses
  y = np.fft.ifft(np.einsum("irk,rjk->ijk", np.fft.fft(u, axis=2), np.fft.fft(v, axis=2)), axis=2).real
  clean = np.transpose(y, (2, 0, 1)) if rotate else y
  noisy = (clean + 0.01 * rng.normal(size=clean.shape)).astype(np.float32)
  got, _ = LR.tsvd_shrink(noisy, 0.5, rotate=rotate)
  got = np.asarray(got, np.float64)
  fourier = np.fft.fft(_np_rotate(got, rotate), axis=2)
  ranks = [int(np.sum(np.linalg.svd(fourier[:, :, k], compute_uv=False) > 1e-3)) for k in range(n3)]
  assert max(ranks) == r and min(ranks) == r
  err = np.linalg.norm(got - clean) / np.linalg.norm(clean)
  assert err < 0.02 and err < np.linalg.norm(noisy - clean) / np.linalg.norm(clean) + 0.02


def test_mu_schedule():
  np.testing.assert_allclose(LR.shrink_threshold(1e-5), 1e4, rtol=1e-6)
  np.testing.assert_allclose(LR.next_mu(0.95), 1.0)
  np.testing.assert_allclose(LR.next_mu(1e-5), 1.1e-5, rtol=1e-6)
  assert float(LR.mu_after(120)) < 1.0 and float(LR.mu_after(121)) == 1.0  # spec: ~121 steps


_relations = jax.jit(LR.pathomic_relations)
_m3lr = jax.jit(LR.m3lr_loss)


def _stage1_features(seed=4, b=6, d=5):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(np.maximum(rng.normal(size=(b, d)), 0), jnp.float32) for _ in range(6)]


def test_m3lr_loss_value_state_and_gradient_paths():
  feats = _stage1_features()
  b = feats[0].shape[0]
  state = LR.init_m3lr_state(b)
  state = {**state, "mu": jnp.asarray(0.05, jnp.float32)}  # τ = 2: some slices survive
  rel = _relations(*feats)
  assert rel.shape == (2, b, b, 4)
  loss, new, terms = _m3lr(rel, state, refresh=jnp.asarray(True))
  mu = 0.05 * 1.1
  want = 0.0
  for t in range(2):
    aux, tnn = _np_tsvd_shrink(np.asarray(rel[t]), 0.1 / 0.05, True)
    np.testing.assert_allclose(new["aux"][t], aux, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(terms[f"tnn_{t}"], tnn, rtol=1e-4)
    want += mu / 2 * np.sum((np.asarray(rel[t], np.float64) - aux) ** 2)
  np.testing.assert_allclose(new["mu"], mu, rtol=1e-6)
  np.testing.assert_allclose(loss, want, rtol=1e-4)
  # no refresh: 𝒢 and μ stay
  _, kept, _ = _m3lr(rel, new, refresh=jnp.asarray(False))
  np.testing.assert_allclose(kept["aux"], new["aux"])
  np.testing.assert_allclose(kept["mu"], new["mu"])

  # only the online unimodal features (h_p, h_o: arguments 2 and 4) get a gradient
  def total(*f):
    return LR.m3lr_loss(LR.pathomic_relations(*f), state)[0]
  grads = jax.jit(jax.grad(total, argnums=tuple(range(6))))(*feats)
  norms = [float(jnp.abs(g).sum()) for g in grads]
  assert norms[2] > 0 and norms[4] > 0
  assert norms[0] == norms[1] == norms[3] == norms[5] == 0.0


def test_first_step_aux_is_zero():
  state = LR.init_m3lr_state(6)
  _, new, terms = _m3lr(_relations(*_stage1_features()), state, refresh=jnp.asarray(True))
  assert float(jnp.abs(new["aux"]).max()) == 0.0 and float(terms["tnn_0"]) == 0.0  # τ = 1e4
  np.testing.assert_allclose(new["mu"], 1.1e-5, rtol=1e-6)


@pytest.mark.parametrize("n_views", [2, 6, 8])
def test_other_view_counts(n_views):
  path, omic = LR.pathomic_views(*_stage1_features(), n_views=n_views)
  assert len(path) == len(omic) == n_views


# ---------------------------------------------------------------- DSCD

def _np_norm(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _np_contrast(q_s, q_t, mem_s, mem_t, z_s, z_t, y, idx, p, p2, t, mom, kind):
  """ContrastMemory_v4 + ContrastLoss_v2 (kind 'dscd') or CRD_criterion_v3 (kind 'crd')."""
  n = mem_s.shape[0]
  w1, w2 = mem_s[idx], mem_t[idx]  # memory_v1 (student) and memory_v2 (teacher) rows
  out_v2 = np.exp(np.einsum("bjd,bd->bj", w1, q_t) / t)  # x_t
  out_v1 = np.exp(np.einsum("bjd,bd->bj", w2, q_s) / t)  # x_s
  if kind == "dscd":
    s_rel = np.einsum("bjd,bd->bj", _np_norm(w1), _np_norm(q_s))
    t_rel = np.einsum("bjd,bd->bj", _np_norm(w2), _np_norm(q_t))
    sel = np.argsort(-(t_rel[:, :p] - s_rel[:, :p]), axis=1, kind="stable")[:, :p2].copy()
    sel[:, 0] = 0
    pick = lambda o: np.concatenate([np.take_along_axis(o[:, :p], sel, 1), o[:, p:]], 1)
    out_v1, out_v2, npos = pick(out_v1), pick(out_v2), p2
  else:
    sel = None
    cut = lambda o: np.concatenate([o[:, :1], o[:, p:]], 1)
    out_v1, out_v2, npos = cut(out_v1), cut(out_v2), 1
  z_s = out_v1.mean() * n if z_s < 0 else z_s
  z_t = out_v2.mean() * n if z_t < 0 else z_t

  def nce(x):  # literal transcription of ContrastLoss_v2 (sample_KD "False")
    bsz, m = x.shape[0], x.shape[1] - npos
    pn = 1.0 / n
    d1 = np.log(x[:, :npos] / (x[:, :npos] + m * pn + 1e-7))
    d0 = np.log(m * pn / (x[:, npos:] + m * pn + 1e-7))
    return -((d1.sum(0) + np.repeat(d0.reshape(-1, 1), npos, 1).sum(0)) / bsz).sum(0) / npos

  loss = nce(out_v1 / z_s) + nce(out_v2 / z_t)
  new_s, new_t = mem_s.copy(), mem_t.copy()
  new_s[y] = _np_norm(mom * mem_s[y] + (1 - mom) * q_s)
  new_t[y] = _np_norm(mom * mem_t[y] + (1 - mom) * q_t)
  return loss, new_s, new_t, z_s, z_t, sel


def _dscd_case(seed=5, n=12, d=8, b=3, p=4, k=5, mode="multi_pos"):
  rng = np.random.default_rng(seed)
  labels = np.arange(n) % 3
  y = np.array([0, 4, 8])[:b]
  idx = np.asarray(C.sample_contrast_indices(jax.random.key(seed), labels, y, p, k, mode))
  q_s = _np_norm(rng.normal(size=(b, d)))
  q_t = _np_norm(rng.normal(size=(b, d)))
  state = C.init_state(jax.random.key(seed + 1), n, d)
  return labels, y, idx, q_s, q_t, state


def test_positive_selection_by_discrepancy():
  r_t = jnp.array([[0.9, 0.8, 0.1, 0.5, 0.7], [0.2, 0.3, 0.9, 0.1, 0.0]])
  r_s = jnp.array([[0.9, 0.1, 0.0, 0.5, 0.6], [0.2, 0.4, 0.1, 0.0, 0.5]])
  # r_t − r_s: row 0 [0, .7, .1, 0, .1] -> 1, then 2 or 4; row 1 [0, -.1, .8, .1, -.5] -> 2, 3
  sel = np.asarray(C.select_hard_positives(r_t, r_s, 3))
  assert sel[0, 0] == 0 and sel[0, 1] in (2, 4) and sel[0, 2] in (2, 4)  # slot 0 forced to self
  np.testing.assert_array_equal(sel[1], [0, 3, 0])  # the hardest (2) dropped; self may repeat


@pytest.mark.parametrize("kind", ["dscd", "crd"])
def test_dscd_matches_numpy_reference_over_two_steps(kind):
  mode, p = ("multi_pos", 4) if kind == "dscd" else ("exact", 1)
  labels, y, idx, q_s, q_t, state = _dscd_case(mode=mode, p=p)
  mem_s, mem_t = np.asarray(state["memory_s"], np.float64), np.asarray(state["memory_t"], np.float64)
  z_s = z_t = -1.0

  def loss(qs, qt, st, i):
    return C.dscd_loss(qs, qt, st, jnp.asarray(y), i, kind=kind, num_candidates=p, num_pos=2)
  step = jax.jit(jax.value_and_grad(lambda *a: (lambda o: (o[0], o[1:]))(loss(*a)),
                                    argnums=(0, 1, 2), has_aux=True))
  for it in range(2):  # the second step uses the updated banks and the Z fixed by the first
    q_s2, q_t2 = (q_s, q_t) if it == 0 else (np.roll(q_s, 1, 0), q_t[::-1].copy())
    (value, (new, terms)), (g_s, g_t, g_state) = step(
        jnp.asarray(q_s2, jnp.float32), jnp.asarray(q_t2, jnp.float32), state, jnp.asarray(idx))
    want, mem_s, mem_t, z_s, z_t, _ = _np_contrast(q_s2, q_t2, mem_s, mem_t, z_s, z_t, y, idx,
                                                   p, 2, 0.07, 0.5, kind)
    np.testing.assert_allclose(value, want, rtol=2e-4)
    np.testing.assert_allclose(terms["nce_s"] + terms["nce_t"], value, rtol=1e-6)
    np.testing.assert_allclose(new["memory_s"], mem_s, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["memory_t"], mem_t, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([new["z_s"], new["z_t"]], [z_s, z_t], rtol=1e-4)
    # gradients reach both queries (the teacher's through its projection head), never the banks
    assert float(jnp.abs(g_s).sum()) > 0 and float(jnp.abs(g_t).sum()) > 0
    assert all(float(jnp.abs(v).sum()) == 0 for v in jax.tree_util.tree_leaves(g_state))
    state = new
  # updated rows are unit-norm
  assert np.allclose(np.linalg.norm(np.asarray(state["memory_s"])[y], axis=1), 1, atol=1e-5)


def test_contrast_sampling_rules():
  labels = np.array([0] * 6 + [1] * 3 + [2] * 3)
  y = np.array([1, 6, 9])
  idx = np.asarray(C.sample_contrast_indices(jax.random.key(0), labels, y, 4, 5))
  assert idx.shape == (3, 9)
  np.testing.assert_array_equal(idx[:, 0], y)
  for row, i in zip(idx, y):
    assert np.all(labels[row[:4]] == labels[i]) and np.all(labels[row[4:]] != labels[i])
    assert len(set(row[4:])) == 5  # at least 6 others in every case: no repeats
  # class 0 has 6 >= 4 members: distinct draws (beyond the self overwrite)
  assert len(set(idx[0, 1:4])) == 3
  # classes 1 and 2 have 3 < 4 members: with replacement, still same-class only
  for row in idx[1:]:
    assert set(row[:4]) <= set(np.flatnonzero(labels == labels[row[0]]))
  # exact mode: the sample, then negatives from everyone else
  ex = np.asarray(C.sample_contrast_indices(jax.random.key(1), labels, y, 1, 5, mode="exact"))
  np.testing.assert_array_equal(ex[:, 0], y)
  assert all(i not in row[1:] for row, i in zip(ex, y))


# ---------------------------------------------------------------- GKM

def _np_weights(grads, thresh=0.1):
  g = grads.reshape(grads.shape[0], -1).astype(np.float64)
  n = np.linalg.norm(g, axis=1, keepdims=True)
  with np.errstate(invalid="ignore"):
    cos = (g @ g.T) / (n @ n.T)
  return np.sum(np.where(cos > thresh, 1.0, 0.0), axis=1), cos


def test_agreement_weights_and_momentum():
  rng = np.random.default_rng(6)
  base = rng.normal(size=(4, 3))
  grads = np.stack([base + 0.5 * rng.normal(size=base.shape) for _ in range(4)]
                   + [rng.normal(size=base.shape)])
  grads[3] = -grads[3]
  grads = np.concatenate([grads, np.zeros((1, 4, 3))]).astype(np.float32)  # a 6th, zero gradient
  want, cos = _np_weights(grads)
  np.testing.assert_allclose(G.gradient_cosines(grads), cos, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(G.agreement_scale(grads), want)
  assert want[-1] == 0  # zero gradient: NaN cosines, no agreement even with itself
  np.testing.assert_allclose(G.agreement_scale(grads, None), np.nansum(cos, 1), rtol=1e-5)

  state = G.init_state(6)
  losses = jnp.arange(1.0, 7.0)
  gkm = jax.jit(G.gkm_loss)
  kd, state, terms = gkm(losses, grads, state)
  np.testing.assert_allclose(kd, np.dot(want[:-1], np.arange(1.0, 6.0)), rtol=1e-6)
  assert set(terms) == {f"gkm_w{i}" for i in range(5)}
  flipped = grads.copy()
  flipped[0] = -flipped[0]
  s2, _ = _np_weights(flipped)
  kd, state, _ = gkm(losses, flipped, state)
  np.testing.assert_allclose(state["scale"], 0.5 * want + 0.5 * s2)
  np.testing.assert_allclose(kd, np.dot((0.5 * want + 0.5 * s2)[:-1], np.arange(1.0, 6.0)), rtol=1e-6)
  assert int(state["steps"]) == 2


def _heads(seed=7, b=3, f=6, c=3):
  rng = np.random.default_rng(seed)
  params = {"fc": jnp.asarray(rng.normal(size=(f, c)), jnp.float32),
            "embed": jnp.asarray(rng.normal(size=(f, 8)), jnp.float32)}
  feat = jnp.asarray(rng.normal(size=(b, f)), jnp.float32)
  t1, t2 = (jnp.asarray(rng.normal(size=(b, c)), jnp.float32) for _ in range(2))
  q_t = C.l2_normalize(jnp.asarray(rng.normal(size=(b, 8)), jnp.float32))
  labels = jnp.array([0, 1, 2])
  return params, feat, t1, t2, q_t, labels


def test_loss_gradients_equal_per_loss_grads_and_outer_grad():
  params, feat, t1, t2, q_t, labels = _heads()

  def losses(f, p, st):
    logits = f @ p["fc"]
    align = -jnp.sum(C.l2_normalize(f @ p["embed"]) * q_t)  # a stand-in for a contrastive term
    ce = KD.nll(jax.nn.log_softmax(logits), labels)
    return jnp.stack([KD.kd_kl(logits, t1), KD.kd_kl(logits, t2, 2.0), 0.02 * align,
                      jnp.sum(f ** 2), ce]), {"calls": st["calls"] + 1}

  state0 = {"calls": jnp.zeros((), jnp.int32)}

  # the outer gradient through the vjp's primal output is the gradient of Σ ŝ_i L_i + CE, ŝ fixed
  def total(p):
    v, g = G.loss_gradients(lambda f: losses(f, p, state0)[0], feat)
    kd, _, _ = G.gkm_loss(v, g, G.init_state())
    return kd + v[-1], G.agreement_scale(g)

  def fixed(p, w):
    v = losses(feat, p, state0)[0]
    return jnp.sum(w[:-1] * v[:-1]) + v[-1]

  @jax.jit
  def run(f, p, st):
    _, grads, new_st = G.loss_gradients(losses, f, p, st, has_aux=True)
    each = jnp.stack([jax.grad(lambda x, i=i: losses(x, p, st)[0][i])(f) for i in range(5)])
    got, w = jax.grad(total, has_aux=True)(p)
    return grads, new_st, each, got, jax.grad(fixed)(p, w)

  grads, new_state, each, got, want = run(feat, params, state0)
  assert grads.shape == (5,) + feat.shape
  assert int(new_state["calls"]) == 1
  np.testing.assert_allclose(grads, each, rtol=1e-4, atol=1e-6)
  for k in params:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- prediction KD, L1

def _np_kl_div(inp, target):
  """torch F.kl_div(input, target, reduction='none') = target (log target − input)."""
  return target * (np.log(target) - inp)


def _np_log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_kd_kl_and_prediction_kd_match_the_seed():
  rng = np.random.default_rng(8)
  s, t = rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=(4, 3)).astype(np.float32)
  for temp in (1.0, 4.0):  # DistillKL: kl_div(log_softmax(s/T), softmax(t/T), sum) T² / B
    ref = _np_kl_div(_np_log_softmax(s / temp), np.exp(_np_log_softmax(t / temp))).sum() * temp ** 2 / 4
    np.testing.assert_allclose(KD.kd_kl(s, t, temp), ref, rtol=1e-5)
  # stage-1 pred_KD_loss: sum(kl_div(log p_s, exp(log p_t), 'none')) / B, summed over the 3 heads
  ls, lt = _np_log_softmax(rng.normal(size=(3, 4, 3))), _np_log_softmax(rng.normal(size=(3, 4, 3)))
  ref = sum(_np_kl_div(ls[h], np.exp(lt[h])).sum() / 4 for h in range(3))
  ls, lt = jnp.asarray(ls, jnp.float32), jnp.asarray(lt, jnp.float32)
  np.testing.assert_allclose(KD.prediction_kd(ls, lt), ref, rtol=1e-5)
  np.testing.assert_allclose(KD.prediction_kd(ls[0], lt[0]) + KD.prediction_kd(ls[1:], lt[1:]), ref,
                             rtol=1e-5)
  # the teachers are constant targets
  g = jax.jit(jax.grad(lambda a, b: KD.kd_kl(s, a) + KD.prediction_kd(ls, b), argnums=(0, 1)))(
      jnp.asarray(t), lt)
  assert all(float(jnp.abs(x).sum()) == 0 for x in g)


def test_nll_and_l1_penalty():
  lp = jax.nn.log_softmax(jnp.asarray([[1.0, 2.0, 0.5], [0.1, 0.2, 3.0]]))
  np.testing.assert_allclose(KD.nll(lp, jnp.array([1, 0])), -(lp[0, 1] + lp[1, 0]) / 2, rtol=1e-6)
  tree = {"fc1": {"kernel": jnp.array([[1.0, -2.0]]), "bias": jnp.array([-0.5])},
          "fc2": {"kernel": jnp.array([3.0])}}
  value, g = jax.jit(jax.value_and_grad(KD.l1_penalty))(tree)
  np.testing.assert_allclose(value, 6.5)
  np.testing.assert_array_equal(g["fc1"]["kernel"], [[1.0, -1.0]])
